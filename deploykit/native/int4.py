"""Int4 linears: group-wise 4-bit weights (groups of 32 along K, one fp32 scale each) times per-row int8
activations, the nibbles unpacked in registers inside the GEMM (csrc/int4_kernels.h).

Numeric contract (every ISA variant): activations as the int8 kernels quantize them (per row,
symmetric, [-127, 127]); weights ``q`` in [-8, 7] with scales ``s`` (N, ceil(K/32));
``acc[r, n, g] = sum_{k in g} qa[r, k] * q[n, k]`` exactly in int32; ``y = sa[r] * sum_g acc * s[n, g]``
(an fp32 fma chain over g in order) ``+ bias``. Which ``q`` and ``s`` (round to nearest, GPTQ) is the
caller's choice: this module packs and runs them; ``deploykit.deploy.gptq`` computes them.

Packed layout: 16-channel panels like the int8 packs; per (panel, group) 256 bytes of unsigned nibbles
``u = q + 8`` (see :func:`unpack_int4_weight`, the layout written out in numpy).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from deploykit.native import _require
from deploykit.native.kernels import _np, _threads

GROUP = 32
LAYOUT_VERSION = 1


class PackedInt4Weight(NamedTuple):
    """Int4 weights in the kernel layout. For a SwiGLU pack ``out_features`` is F (gate and up interleaved)."""

    packed: Tensor  # uint8 (n_panels * G * 256,)
    scales: Tensor  # float32 (n_panels * G * 16,): per internal channel and group, 0 in padding
    out_features: int
    in_features: int
    swiglu: bool

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        meta = torch.tensor([self.out_features, self.in_features, int(self.swiglu), LAYOUT_VERSION, GROUP])
        return {f"{prefix}.packed": self.packed, f"{prefix}.scales": self.scales, f"{prefix}.meta": meta}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], prefix: str) -> PackedInt4Weight:
        meta = [int(v) for v in d[f"{prefix}.meta"].tolist()]
        if len(meta) != 5 or meta[3] != LAYOUT_VERSION or meta[4] != GROUP:
            raise ValueError(f"{prefix}.meta: int4 layout {meta} is not version {LAYOUT_VERSION} with groups of {GROUP}")
        n, k, sw = meta[0], meta[1], bool(meta[2])
        p = cls(d[f"{prefix}.packed"].contiguous(), d[f"{prefix}.scales"].contiguous(), n, k, sw)
        nb, ns = _require().int4_packed_sizes(2 * n if sw else n, k, sw)
        if p.packed.dtype != torch.uint8 or p.packed.numel() != nb or p.scales.numel() != ns:
            raise ValueError(f"{prefix}: int4 packed tensors ({p.packed.numel()} bytes, {p.scales.numel()} scales) do "
                             f"not match out={n}, in={k}, swiglu={sw} ({nb} bytes, {ns} scales)")
        return p


def pack_int4_weight(qweight: Tensor, scales: Tensor, *, swiglu: bool = False) -> PackedInt4Weight:
    """Pack q (rows, K) int8 in [-8, 7] with group scales (rows, ceil(K/32)); swiglu: q = [gate; up]."""
    C = _require()
    rows, k = qweight.shape
    nb, ns = C.int4_packed_sizes(rows, k, swiglu)
    packed = torch.empty(nb, dtype=torch.uint8)
    sw = torch.empty(ns, dtype=torch.float32)
    C.pack_int4_weight(_np(qweight.contiguous(), "pack_int4_weight", "qweight", torch.int8),
                       _np(scales.float().contiguous(), "pack_int4_weight", "scales", torch.float32),
                       swiglu, packed.numpy(), sw.numpy())
    return PackedInt4Weight(packed, sw, rows // 2 if swiglu else rows, k, swiglu)


def unpack_int4_weight(p: PackedInt4Weight) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`pack_int4_weight`, in numpy: (q (rows, K) int8, scales (rows, G))."""
    G = -(-p.in_features // GROUP)
    nib = p.packed.numpy().reshape(-1, G, 4, 16, 4)  # (panel, group, block, channel, k % 4)
    lo, hi = nib & 0x0F, nib >> 4
    # quad 2i = low nibbles of block i, quad 2i+1 = high: (panel, group, block, lo/hi, channel, t)
    u = np.stack([lo, hi], axis=3).transpose(0, 4, 1, 2, 3, 5).reshape(nib.shape[0] * 16, G * GROUP)
    q = u.astype(np.int8) - 8  # (internal channels, Kp)
    s = p.scales.numpy().reshape(-1, G, 16).transpose(0, 2, 1).reshape(-1, G)  # (internal channels, G)
    idx = _internal_rows(p)
    return torch.from_numpy(q[idx, :p.in_features].copy()), torch.from_numpy(s[idx].copy())


def _internal_rows(p: PackedInt4Weight) -> np.ndarray:
    """Internal (padded, interleaved) channel index of each logical row, in the order rows were packed."""
    if not p.swiglu:
        return np.arange(p.out_features)
    n = np.arange(p.out_features)
    gate = (n // 16) * 32 + n % 16  # panel 2j holds gate channels [16j, 16j + 16)
    return np.concatenate([gate, gate + 16])


def int4_linear(x: Tensor, p: PackedInt4Weight, bias: Tensor | None = None, *, threads: int | None = None,
                isa: str | None = None) -> Tensor:
    """y (..., N) = int4 GEMM of quant_rows(x) (+ bias); a SwiGLU pack gives silu(gate) * up. x float32 (..., K)."""
    C = _require()
    if x.shape[-1] != p.in_features:
        raise ValueError(f"int4_linear: argument 'x' has {x.shape[-1]} features in its last dimension, "
                         f"the packed weight expects {p.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features).contiguous()
    out = torch.empty(x2.shape[0], p.out_features, dtype=torch.float32)
    b = None if bias is None else _np(bias.contiguous(), "int4_linear", "bias", torch.float32)
    C.int4_linear(_np(x2, "int4_linear", "x", torch.float32), p.packed.numpy(), p.scales.numpy(), p.out_features,
                  p.swiglu, b, out.numpy(), _threads(threads), isa or "")
    return out.reshape(*lead, p.out_features)


def int4_gemm_s32(qa: Tensor, p: PackedInt4Weight, *, threads: int | None = None, isa: str | None = None) -> Tensor:
    """Exact group accumulators of qa (M, K) int8: int32 (M, internal channels, G) (see _internal_rows)."""
    C = _require()
    G = -(-p.in_features // GROUP)
    channels = p.scales.numel() // G
    out = torch.empty(qa.shape[0], channels, G, dtype=torch.int32)
    C.int4_gemm_s32(_np(qa.contiguous(), "int4_gemm_s32", "qa", torch.int8), p.packed.numpy(), p.scales.numpy(),
                    p.out_features, p.swiglu, out.numpy(), _threads(threads), isa or "")
    return out


class Int4Linear(nn.Module):
    """Drop-in for nn.Linear on the int4 kernel; buffers ``packed``, ``scales`` (+ ``bias``) hold the packed weight."""

    def __init__(self, packed: PackedInt4Weight, bias: Tensor | None = None) -> None:
        super().__init__()
        if packed.swiglu:
            raise ValueError("Int4Linear: got a SwiGLU pack; use Int4SwiGLU")
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.register_buffer("packed", packed.packed)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def weight_packed(self) -> PackedInt4Weight:
        return PackedInt4Weight(self.packed, self.scales, self.out_features, self.in_features, False)

    def forward(self, x: Tensor) -> Tensor:
        return int4_linear(x, self.weight_packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


class Int4SwiGLU(nn.Module):
    """SwiGLU MLP down(silu(gate x) * up x) on int4 packs, the gate product fused into the first kernel."""

    def __init__(self, gate_up: PackedInt4Weight, down: PackedInt4Weight) -> None:
        super().__init__()
        if not gate_up.swiglu or down.swiglu:
            raise ValueError("Int4SwiGLU: expects a SwiGLU gate_up pack and a plain down pack")
        self.d_model, self.d_ff = gate_up.in_features, gate_up.out_features
        self.register_buffer("gate_up_packed", gate_up.packed)
        self.register_buffer("gate_up_scales", gate_up.scales)
        self.register_buffer("down_packed", down.packed)
        self.register_buffer("down_scales", down.scales)

    def forward(self, x: Tensor) -> Tensor:
        gu = PackedInt4Weight(self.gate_up_packed, self.gate_up_scales, self.d_ff, self.d_model, True)
        dn = PackedInt4Weight(self.down_packed, self.down_scales, self.d_model, self.d_ff, False)
        return int4_linear(int4_linear(x, gu), dn)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, int4 groups of {GROUP}"
