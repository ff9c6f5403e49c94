"""deploykit.native.kernels: the torch face of the compiled kernels (tensors in, tensors out).

Numeric contract of the int8 linear (the same for every ISA variant, see csrc/int8_kernels.h):
activations are quantized per row (token), symmetric, to [-127, 127] with
``scale = max|x_row| / 127`` and round-half-to-even; weights per output channel, symmetric, to
[-127, 127]; ``acc = qa @ qw^T`` exactly in int32; ``y = acc * sa * sw + bias``.

Tensors are passed zero-copy (``Tensor.numpy()`` views of CPU tensors); inputs must be float32
(refused otherwise, with the argument named); non-contiguous activations are copied once.
Every name here is also reachable as ``deploykit.native.<name>``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from deploykit.native import _C, _require


# ---------------------------------------------------------------------------------- helpers


def _threads(threads: int | None) -> int:
    return torch.get_num_threads() if threads is None else max(1, int(threads))


def _np(t: Tensor, fn: str, name: str, dtype: torch.dtype) -> Any:
    """Zero-copy numpy view of a CPU tensor of the given dtype (refuses others, naming `name`)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{fn}: argument '{name}' must be on the CPU, got device {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{fn}: argument '{name}' must have dtype {dtype}, got {t.dtype}")
    return t.detach().numpy()


# ----------------------------------------------------------------------------- int8 linear


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: w (N, K) -> (qw int8 (N, K) in [-127, 127], scales (N,))."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)  # (N,)
    scales = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    qw = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return qw.contiguous(), scales.contiguous()


def quantize_rows(x: Tensor, *, isa: str | None = None) -> tuple[Tensor, Tensor]:
    """The kernel's dynamic activation quantization: x (M, K) -> (qa int8 (M, K), sa (M,))."""
    C = _require()
    x2 = x.contiguous()
    qa = torch.empty(x2.shape, dtype=torch.int8)
    sa = torch.empty(x2.shape[0], dtype=torch.float32)
    C.quantize_rows(_np(x2, "quantize_rows", "x", torch.float32), qa.numpy(), sa.numpy(), isa or "")
    return qa, sa


class PackedInt8Weight(NamedTuple):
    """Int8 weights in the kernel layout (16-channel panels, K padded to a multiple of 4).

    ``scales``/``colsum`` are per internal (padded) channel. For a SwiGLU pack,
    ``out_features`` is F and the pack holds the gate and up projections interleaved.
    """

    packed: Tensor  # int8 (n_panels * Kp * 16,)
    scales: Tensor  # float32 (n_panels * 16,)
    colsum: Tensor  # int32 (n_panels * 16,): sum_k qw, for the VNNI compensation
    out_features: int
    in_features: int
    swiglu: bool

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        """Flat dict for safetensors (shape metadata is stored as a small int64 tensor)."""
        meta = torch.tensor([self.out_features, self.in_features, int(self.swiglu), 1])
        return {f"{prefix}.packed": self.packed, f"{prefix}.scales": self.scales,
                f"{prefix}.colsum": self.colsum, f"{prefix}.meta": meta}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], prefix: str) -> PackedInt8Weight:
        n, k, sw, version = (int(v) for v in d[f"{prefix}.meta"].tolist())
        if version != 1:
            raise ValueError(f"{prefix}.meta: packed-weight layout version {version} is not 1")
        p = cls(d[f"{prefix}.packed"].contiguous(), d[f"{prefix}.scales"].contiguous(),
                d[f"{prefix}.colsum"].contiguous(), n, k, bool(sw))
        nb, nc = _require().packed_sizes(2 * n if p.swiglu else n, k, p.swiglu)
        if p.packed.numel() != nb or p.scales.numel() != nc or p.colsum.numel() != nc:
            raise ValueError(f"{prefix}: packed tensors do not match out={n}, in={k}, swiglu={sw}")
        return p


def _pack(qw: Tensor, scales: Tensor, swiglu: bool) -> tuple[Tensor, Tensor, Tensor]:
    C = _require()
    rows, k = qw.shape
    nb, nc = C.packed_sizes(rows, k, swiglu)
    packed = torch.empty(nb, dtype=torch.int8)
    sw = torch.empty(nc, dtype=torch.float32)
    cs = torch.empty(nc, dtype=torch.int32)
    C.pack_int8_weight(_np(qw.contiguous(), "pack_int8_weight", "qweight", torch.int8),
                       _np(scales.float().contiguous(), "pack_int8_weight", "scales", torch.float32),
                       swiglu, packed.numpy(), sw.numpy(), cs.numpy())
    return packed, sw, cs


def pack_int8_weight(w: Tensor | None = None, *, qweight: Tensor | None = None,
                     scales: Tensor | None = None) -> PackedInt8Weight:
    """Quantize (per channel) and pack a float weight (N, K), or pack given qweight/scales."""
    if w is not None:
        qweight, scales = quantize_weight(w)
    if qweight is None or scales is None:
        raise ValueError("pack_int8_weight: pass a float weight `w`, or both `qweight` and `scales`")
    packed, sw, cs = _pack(qweight, scales, False)
    return PackedInt8Weight(packed, sw, cs, qweight.shape[0], qweight.shape[1], False)


def pack_int8_swiglu(w_gate: Tensor, w_up: Tensor) -> PackedInt8Weight:
    """Pack gate and up projections (F, K) each, for ``int8_linear -> silu(x Wg^T) * (x Wu^T)``."""
    if w_gate.shape != w_up.shape:
        raise ValueError(f"pack_int8_swiglu: w_gate {tuple(w_gate.shape)} and w_up "
                         f"{tuple(w_up.shape)} must have the same shape (F, K)")
    qg, sg = quantize_weight(w_gate)
    qu, su = quantize_weight(w_up)
    packed, sw, cs = _pack(torch.cat([qg, qu]), torch.cat([sg, su]), True)
    return PackedInt8Weight(packed, sw, cs, w_gate.shape[0], w_gate.shape[1], True)


def _linear_impl(x: Tensor, p: PackedInt8Weight, bias: Tensor | None, threads: int | None,
                 isa: str | None) -> Tensor:
    C = _require()
    if x.shape[-1] != p.in_features:
        raise ValueError(f"int8_linear: argument 'x' has {x.shape[-1]} features in its last "
                         f"dimension, the packed weight expects {p.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], p.out_features, dtype=torch.float32)
    b = None if bias is None else _np(bias.contiguous(), "int8_linear", "bias", torch.float32)
    C.int8_linear(_np(x2, "int8_linear", "x", torch.float32), p.packed.numpy(), p.scales.numpy(),
                  p.colsum.numpy(), p.out_features, p.swiglu, b, out.numpy(), _threads(threads),
                  isa or "")
    return out.reshape(*lead, p.out_features)


class _BufferViews:
    """numpy views of a module's packed buffers, made once and remade only when a buffer is replaced.

    A decode step calls a few dozen linears on one row each; there the Python around the kernel
    (module attribute lookups, a PackedInt8Weight per call, a ``.numpy()`` per buffer) cost about
    four times the 1x512x512 kernel itself. The views are keyed by the buffer tensors' identity and
    storage address, so ``module.to(...)``, a reassigned buffer or ``set_()`` remakes them, while
    ``load_state_dict`` (an in-place copy) keeps them valid.
    """

    __slots__ = ("names", "key", "views")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names, self.key, self.views = names, None, ()

    def get(self, buffers: dict[str, Tensor | None]) -> tuple[Any, ...]:
        ts = [buffers[n] for n in self.names]
        key = tuple((id(t), t.data_ptr()) if t is not None else None for t in ts)
        if key != self.key:
            self.views = tuple(None if t is None else t.detach().numpy() for t in ts)
            self.key = key
        return self.views


def _fast_input(x: Tensor, k: int) -> Tensor | None:
    """``x`` as a contiguous float32 (M, K) when the direct kernel call may take it, else None."""
    if type(x) is not Tensor or x.dtype is not torch.float32 or x.device.type != "cpu" or x.shape[-1] != k \
            or x.requires_grad or torch.compiler.is_compiling():
        return None
    x2 = x.reshape(-1, k)
    return x2 if x2.is_contiguous() else x2.contiguous()


def _eager(*ts: Tensor | None) -> bool:
    """True when the fast direct path may run (plain CPU tensors, not under compile/export)."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) is Tensor for t in ts)


def int8_linear(x: Tensor, packed: PackedInt8Weight, bias: Tensor | None = None, *,
                threads: int | None = None, isa: str | None = None) -> Tensor:
    """y (..., N) = dequant(quant_rows(x) @ qw^T) + bias; SwiGLU packs give silu(gate) * up.

    x: float32 (..., K). bias: (N,), or (2F,) = [gate; up] for a SwiGLU pack.
    threads: default torch.get_num_threads(). isa: force a variant (tests).
    Under torch.compile / torch.export this goes through ``torch.ops.deploykit.int8_linear``.
    """
    if isa is None and threads is None and not _eager(x, bias):
        return torch.ops.deploykit.int8_linear(x, packed.packed, packed.scales, packed.colsum, bias,
                                               packed.out_features, packed.in_features,
                                               packed.swiglu)
    return _linear_impl(x, packed, bias, threads, isa)


def int8_gemm_s32(qa: Tensor, packed: PackedInt8Weight, *, threads: int | None = None,
                  isa: str | None = None) -> Tensor:
    """Raw exact accumulators qa (M, K) int8 @ qw^T -> int32 (M, N) ((M, 2F) = [gate|up] for SwiGLU)."""
    C = _require()
    ncols = 2 * packed.out_features if packed.swiglu else packed.out_features
    out = torch.empty(qa.shape[0], ncols, dtype=torch.int32)
    C.int8_gemm_s32(_np(qa, "int8_gemm_s32", "qa", torch.int8), packed.packed.numpy(),
                    packed.scales.numpy(), packed.colsum.numpy(), packed.out_features,
                    packed.swiglu, out.numpy(), _threads(threads), isa or "")
    return out


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear running the fused int8 kernel (dynamic per-token activations).

    The packed weight lives in buffers (``packed``, ``scales``, ``colsum``), so ``state_dict()``
    / safetensors carry the prepacked layout and loading needs no re-packing.
    """

    def __init__(self, packed: PackedInt8Weight, bias: Tensor | None = None) -> None:
        super().__init__()
        if packed.swiglu:
            raise ValueError("Int8Linear: got a SwiGLU pack; use Int8SwiGLU")
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.register_buffer("packed", packed.packed)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("colsum", packed.colsum)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._views = _BufferViews(("packed", "scales", "colsum", "bias"))

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        return cls(pack_int8_weight(linear.weight), linear.bias)

    @property
    def weight_packed(self) -> PackedInt8Weight:
        return PackedInt8Weight(self.packed, self.scales, self.colsum, self.out_features,
                                self.in_features, False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = _fast_input(x, self.in_features)
        if x2 is None or _C is None:  # autograd, compile/export, other dtypes: the checked path
            return int8_linear(x, self.weight_packed, self.bias)
        packed, scales, colsum, bias = self._views.get(self._buffers)
        out = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        _C.int8_linear(x2.numpy(), packed, scales, colsum, self.out_features, False, bias, out.numpy(),
                       torch.get_num_threads(), "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8SwiGLU(nn.Module):
    """SwiGLU MLP y = down(silu(gate x) * up x), the gate product fused into the first kernel.

    Buffers: ``gate_up_{packed,scales,colsum}`` and ``down_{packed,scales,colsum}``.
    """

    def __init__(self, gate_up: PackedInt8Weight, down: PackedInt8Weight) -> None:
        super().__init__()
        if not gate_up.swiglu or down.swiglu or down.in_features != gate_up.out_features:
            raise ValueError("Int8SwiGLU: expected a SwiGLU pack (F, D) and a plain pack (D, F)")
        self.d_model, self.d_ff = gate_up.in_features, gate_up.out_features
        for name, p in (("gate_up", gate_up), ("down", down)):
            self.register_buffer(f"{name}_packed", p.packed)
            self.register_buffer(f"{name}_scales", p.scales)
            self.register_buffer(f"{name}_colsum", p.colsum)
        self._views = _BufferViews(tuple(f"{n}_{b}" for n in ("gate_up", "down") for b in ("packed", "scales", "colsum")))

    @classmethod
    def from_float(cls, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> Int8SwiGLU:
        for name, lin in (("gate", gate), ("up", up), ("down", down)):
            if lin.bias is not None:
                raise ValueError(f"Int8SwiGLU.from_float: '{name}' has a bias; SwiGLU MLPs here "
                                 "are bias-free (use Int8Linear per projection instead)")
        return cls(pack_int8_swiglu(gate.weight, up.weight), pack_int8_weight(down.weight))

    def forward(self, x: Tensor) -> Tensor:
        x2 = _fast_input(x, self.d_model)
        if x2 is not None and _C is not None:
            gp, gs, gc, dp, ds, dc = self._views.get(self._buffers)
            threads = torch.get_num_threads()
            h = torch.empty(x2.shape[0], self.d_ff, dtype=torch.float32)  # silu(gate) * up
            _C.int8_linear(x2.numpy(), gp, gs, gc, self.d_ff, True, None, h.numpy(), threads, "")
            out = torch.empty(x2.shape[0], self.d_model, dtype=torch.float32)
            _C.int8_linear(h.numpy(), dp, ds, dc, self.d_model, False, None, out.numpy(), threads, "")
            return out.view(*x.shape[:-1], self.d_model)
        gu = PackedInt8Weight(self.gate_up_packed, self.gate_up_scales, self.gate_up_colsum,
                              self.d_ff, self.d_model, True)
        dn = PackedInt8Weight(self.down_packed, self.down_scales, self.down_colsum,
                              self.d_model, self.d_ff, False)
        return int8_linear(int8_linear(x, gu), dn)


# -------------------------------------------------------------------------------------- MoE


class MoERouting(NamedTuple):
    ids: Tensor      # int32 (T, k): chosen experts, best first (ties -> lower index)
    weights: Tensor  # float32 (T, k)
    counts: Tensor   # int32 (E,): tokens per expert
    offsets: Tensor  # int32 (E + 1,): expert e's rows are [offsets[e], offsets[e+1])
    perm: Tensor     # int32 (T*k,): grouped row j holds flat (token, slot) perm[j] = t*k + s
    inv: Tensor      # int32 (T*k,): inverse of perm


_SOFTMAX = ("topk", "all")


def _softmax_all(softmax: str) -> bool:
    if softmax not in _SOFTMAX:
        raise ValueError(f"softmax must be one of {_SOFTMAX}, got {softmax!r} ('topk': softmax "
                         "over the chosen k logits, Mixtral; 'all': softmax over all E, not renormalised)")
    return softmax == "all"


def moe_route(logits: Tensor, k: int, softmax: str = "topk") -> MoERouting:
    """Top-k routing of router logits (T, E) with per-expert grouping (see MoERouting)."""
    C = _require()
    sm_all = _softmax_all(softmax)
    # The outputs are made by the binding: allocating and splitting them here cost more than the
    # routing itself at T = 256 (torch.empty / split / view are ~1 us each).
    out = C.moe_route_arrays(_np(logits.contiguous(), "moe_route", "logits", torch.float32), k, sm_all)
    return MoERouting(*map(torch.from_numpy, out))


def moe_gather(x: Tensor, routing: MoERouting, *, threads: int | None = None) -> Tensor:
    """Rows of x (T, D) in expert-grouped order: (T*k, D)."""
    C = _require()
    x2 = x.contiguous()
    k = routing.ids.shape[1]
    out = torch.empty(routing.perm.shape[0], x2.shape[1], dtype=torch.float32)
    C.moe_gather(_np(x2, "moe_gather", "x", torch.float32), routing.perm.numpy(), k, out.numpy(),
                 _threads(threads))
    return out


def moe_scatter(ys: Tensor, routing: MoERouting, *, threads: int | None = None) -> Tensor:
    """Weighted combine of expert outputs ys (T*k, D) (grouped order) back to tokens: (T, D)."""
    C = _require()
    y2 = ys.contiguous()
    T = routing.ids.shape[0]
    out = torch.empty(T, y2.shape[1], dtype=torch.float32)
    C.moe_scatter(_np(y2, "moe_scatter", "ys", torch.float32), routing.inv.numpy(),
                  routing.weights.numpy(), out.numpy(), _threads(threads))
    return out


class PackedMoEExperts(NamedTuple):
    """E SwiGLU experts packed for moe_ffn: w13 = [w1; w3] per expert (SwiGLU pack), w2 plain."""

    w13: Tensor  # int8 (E, bytes13)
    s13: Tensor  # float32 (E, ch13)
    c13: Tensor  # int32 (E, ch13)
    w2: Tensor   # int8 (E, bytes2)
    s2: Tensor
    c2: Tensor
    d_model: int
    d_ff: int

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        d = {f"{prefix}.{n}": getattr(self, n) for n in ("w13", "s13", "c13", "w2", "s2", "c2")}
        d[f"{prefix}.meta"] = torch.tensor([self.d_model, self.d_ff, 1])
        return d

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], prefix: str) -> PackedMoEExperts:
        dm, ff, version = (int(v) for v in d[f"{prefix}.meta"].tolist())
        if version != 1:
            raise ValueError(f"{prefix}.meta: packed-experts layout version {version} is not 1")
        ts = [d[f"{prefix}.{n}"].contiguous() for n in ("w13", "s13", "c13", "w2", "s2", "c2")]
        return cls(*ts, dm, ff)

    def expert(self, e: int) -> tuple[PackedInt8Weight, PackedInt8Weight]:
        """(gate/up pack, down pack) of expert e, usable with int8_linear."""
        return (PackedInt8Weight(self.w13[e], self.s13[e], self.c13[e], self.d_ff, self.d_model, True),
                PackedInt8Weight(self.w2[e], self.s2[e], self.c2[e], self.d_model, self.d_ff, False))


def pack_moe_experts(w1: Tensor, w3: Tensor, w2: Tensor) -> PackedMoEExperts:
    """Stacked expert weights w1, w3 (E, F, D) and w2 (E, D, F) -> PackedMoEExperts."""
    if w1.dim() != 3 or w1.shape != w3.shape or w2.shape != (w1.shape[0], w1.shape[2], w1.shape[1]):
        raise ValueError(f"pack_moe_experts: expected w1, w3 (E, F, D) and w2 (E, D, F), got "
                         f"{tuple(w1.shape)}, {tuple(w3.shape)}, {tuple(w2.shape)}")
    E, F, D = w1.shape
    up = [pack_int8_swiglu(w1[e], w3[e]) for e in range(E)]
    down = [pack_int8_weight(w2[e]) for e in range(E)]
    st = lambda ps, f: torch.stack([getattr(p, f) for p in ps]).contiguous()  # noqa: E731
    return PackedMoEExperts(st(up, "packed"), st(up, "scales"), st(up, "colsum"),
                            st(down, "packed"), st(down, "scales"), st(down, "colsum"), D, F)


def _moe_ffn_impl(x: Tensor, logits: Tensor, experts: PackedMoEExperts, k: int, softmax: str,
                  threads: int | None, isa: str | None) -> Tensor:
    C = _require()
    sm_all = _softmax_all(softmax)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, experts.d_model).contiguous()
    lg = logits.reshape(x2.shape[0], logits.shape[-1]).contiguous()
    out = torch.empty_like(x2)
    C.moe_ffn(_np(x2, "moe_ffn", "x", torch.float32), _np(lg, "moe_ffn", "logits", torch.float32),
              k, sm_all, experts.w13.numpy(), experts.s13.numpy(), experts.c13.numpy(),
              experts.w2.numpy(), experts.s2.numpy(), experts.c2.numpy(), experts.d_ff,
              out.numpy(), _threads(threads), isa or "")
    return out.reshape(*lead, experts.d_model)


def moe_ffn(x: Tensor, router_logits: Tensor, experts: PackedMoEExperts, k: int,
            softmax: str = "topk", *, threads: int | None = None, isa: str | None = None) -> Tensor:
    """Whole MoE FFN: out = sum_k weight_k * w2_e(silu(w1_e x) * w3_e x), int8 experts.

    x (..., D) float32, router_logits (..., E) float32 (computed by the caller's router).
    """
    if isa is None and threads is None and not _eager(x, router_logits):
        return torch.ops.deploykit.moe_ffn(x, router_logits, experts.w13, experts.s13, experts.c13,
                                           experts.w2, experts.s2, experts.c2, experts.d_model,
                                           experts.d_ff, k, softmax)
    return _moe_ffn_impl(x, router_logits, experts, k, softmax, threads, isa)


if _C is not None:
    from deploykit.native import _ops  # noqa: E402,F401  (registers torch.ops.deploykit.*)
