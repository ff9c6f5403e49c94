"""CUDA kernels (``deploykit.native._native_cuda``): int8 GEMM with the fused epilogue and MoE routing.

Same numeric contract as the CPU kernels (per-row symmetric activations in [-127, 127],
per-channel symmetric weights, exact int32 accumulation). Tensors are passed zero-copy as
device pointers on the current torch CUDA stream.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

try:
    from deploykit.native import _native_cuda as _CU

    _IMPORT_ERROR: str | None = None
except ImportError as e:
    _CU = None  # type: ignore[assignment]
    _IMPORT_ERROR = (f"deploykit.native._native_cuda is not built ({e}); it is built when CMake finds "
                     "nvcc (DEPLOYKIT_CUDA=AUTO/ON)")


def built() -> bool:
    """True when the CUDA module was compiled into this install."""
    return _CU is not None


def available() -> bool:
    """Built and a CUDA device is visible to both the module and torch."""
    return _CU is not None and _CU.device_count() > 0 and torch.cuda.is_available()


def unavailable_reason() -> str | None:
    if _CU is None:
        return _IMPORT_ERROR
    if _CU.device_count() == 0 or not torch.cuda.is_available():
        return "no CUDA device visible (deploykit.native._native_cuda is built, but there is no GPU)"
    return None


def _dev(t: Tensor, fn: str, name: str, dtype: torch.dtype) -> int:
    if t.device.type != "cuda":
        raise ValueError(f"{fn}: argument '{name}' must be a CUDA tensor, got device {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{fn}: argument '{name}' must have dtype {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{fn}: argument '{name}' must be contiguous; pass .contiguous()")
    return t.data_ptr()


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


class CudaInt8Weight(NamedTuple):
    qweight: Tensor  # int8 (rows, Kp) on the GPU, K zero-padded to a multiple of 4
    scales: Tensor   # float32 (rows,)
    out_features: int
    in_features: int
    swiglu: bool     # rows = [gate F; up F]


def pack_cuda_weight(w: Tensor, w_up: Tensor | None = None, device: str = "cuda") -> CudaInt8Weight:
    """Quantize (per channel, symmetric) w (N, K), or the SwiGLU pair (w = gate, w_up = up)."""
    from deploykit.native import quantize_weight

    ws = [w] if w_up is None else [w, w_up]
    qs, ss = zip(*(quantize_weight(x.float().cpu()) for x in ws))
    q, s = torch.cat(qs), torch.cat(ss)
    K = q.shape[1]
    Kp = (K + 3) // 4 * 4
    qp = torch.zeros(q.shape[0], Kp, dtype=torch.int8)
    qp[:, :K] = q
    return CudaInt8Weight(qp.to(device), s.to(device), w.shape[0], K, w_up is not None)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) float32 CUDA -> (qa int8 (M, Kp), sa (M,))."""
    M, K = x.shape
    Kp = (K + 3) // 4 * 4
    qa = torch.empty(M, Kp, dtype=torch.int8, device=x.device)
    sa = torch.empty(M, dtype=torch.float32, device=x.device)
    _CU.quantize_rows(_dev(x, "quantize_rows", "x", torch.float32), qa.data_ptr(), sa.data_ptr(),
                      M, K, Kp, _stream())
    return qa, sa


def int8_gemm_s32(qa: Tensor, w: CudaInt8Weight) -> Tensor:
    """Raw exact accumulators qa (M, Kp) @ qweight^T -> int32 (M, rows)."""
    M, rows = qa.shape[0], w.qweight.shape[0]
    out = torch.empty(M, rows, dtype=torch.int32, device=qa.device)
    _CU.int8_gemm(_dev(qa, "int8_gemm_s32", "qa", torch.int8), w.qweight.data_ptr(), 0,
                  w.scales.data_ptr(), 0, out.data_ptr(), M, rows, w.qweight.shape[1], 2, _stream())
    return out


def int8_linear(x: Tensor, w: CudaInt8Weight, bias: Tensor | None = None) -> Tensor:
    """Fused quantize + int8 GEMM + dequant (+ bias, + SwiGLU for a pair pack) on the GPU."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features).contiguous()
    qa, sa = quantize_rows(x2)
    out = torch.empty(x2.shape[0], w.out_features, dtype=torch.float32, device=x.device)
    b = 0 if bias is None else _dev(bias.contiguous(), "int8_linear", "bias", torch.float32)
    _CU.int8_gemm(qa.data_ptr(), w.qweight.data_ptr(), sa.data_ptr(), w.scales.data_ptr(), b,
                  out.data_ptr(), x2.shape[0], w.out_features, w.qweight.shape[1],
                  1 if w.swiglu else 0, _stream())
    return out.reshape(*lead, w.out_features)


class CudaRouting(NamedTuple):
    ids: Tensor
    weights: Tensor
    counts: Tensor
    offsets: Tensor
    perm: Tensor
    inv: Tensor


def moe_route(logits: Tensor, k: int, softmax: str = "topk") -> CudaRouting:
    """Same outputs and conventions as deploykit.native.moe_route, computed on the GPU (k <= 16)."""
    T, E = logits.shape
    dev = logits.device
    i32 = dict(dtype=torch.int32, device=dev)
    r = CudaRouting(torch.empty(T, k, **i32), torch.empty(T, k, device=dev),
                    torch.zeros(E, **i32), torch.empty(E + 1, **i32), torch.empty(T * k, **i32),
                    torch.empty(T * k, **i32))
    _CU.moe_route(_dev(logits, "moe_route", "logits", torch.float32), T, E, k, softmax == "all",
                  *(t.data_ptr() for t in r), _stream())
    return r
