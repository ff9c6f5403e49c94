"""llama.cpp's Q4_K blocks with deploykit's codes: the grid is llama.cpp's own, the 4-bit codes GPTQ's.

``struct block_q4_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128]; }`` holds 256
values in 8 sub-blocks of 32: sub-block j decodes as ``d * sc[j] * q - dmin * m[j]`` with 6-bit ``sc``,
``m`` packed into ``scales`` and q in [0, 15]; ``qs[32 c + l] = q[64 c + l] | q[64 c + 32 + l] << 4``.

The grid (d, dmin, the 6-bit scales and mins) is computed by llama.cpp itself: ggml's
``quantize_row_q4_K_ref`` (what ``llama_model_quantize`` runs for Q4_K without an importance matrix),
called through ctypes in the libggml-base that llama-cpp-python ships. The gguf package has Q4_K's
dequantizer but no quantizer, and a port of ``make_qkx2_quants`` would drift from llama.cpp's floats. The
grid is kept byte for byte; only ``qs`` is replaced, so round-to-nearest on it gives llama.cpp's own
blocks back (tests/test_gptq.py checks this bit for bit) and GPTQ changes nothing but the codes.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from deploykit.deploy.gptq import FixedGrid
from deploykit.errors import BackendUnavailable, ConfigError

QK_K = 256
BLOCK_BYTES = 144  # 2 + 2 + 12 + 128
HEAD_BYTES = 16  # d, dmin, scales: the grid


@lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    path = next((p for p in sorted(lib_dir.glob("libggml-base.*")) if p.suffix in (".so", ".dylib", ".dll")), None)
    if path is None:
        raise BackendUnavailable(f"llama-cpp-python's libggml-base is not in {lib_dir}",
                                 hint="reinstall llama-cpp-python (pip install 'deploykit[gguf]')")
    lib = ctypes.CDLL(str(path))
    lib.quantize_row_q4_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.quantize_row_q4_K_ref.restype = None
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def llama_blocks(w: np.ndarray, ggml_type: str, importance: np.ndarray) -> np.ndarray:
    """llama.cpp's importance-weighted blocks of w (N, K) in ``ggml_type`` (ggml_quantize_chunk with an
    importance matrix, what llama-quantize --imatrix runs per tensor): (N, bytes per row) uint8."""
    import gguf

    N, K = w.shape
    qtype = gguf.GGMLQuantizationType[ggml_type]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if K % block or importance.shape != (K,):
        raise ConfigError(f"{ggml_type}: rows of {K} values need a multiple of {block} and {K} importances, "
                          f"got {importance.shape}")
    x = np.ascontiguousarray(w, dtype=np.float32)
    imp = np.ascontiguousarray(importance, dtype=np.float32)
    out = np.zeros((N, K // block * size), dtype=np.uint8)
    _ggml().ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, N, K, imp.ctypes.data)
    return out


def llama_q4_k(w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's own Q4_K blocks of w (N, K): (N, K/256 * 144) uint8 (ggml's quantize_row_q4_K_ref; with an
    importance (K,), its importance-weighted quantizer)."""
    N, K = w.shape
    if K % QK_K:
        raise ConfigError(f"Q4_K rows must be a multiple of {QK_K} values, got {K}")
    if importance is not None:
        return llama_blocks(w, "Q4_K", importance)
    x = np.ascontiguousarray(w, dtype=np.float32)
    out = np.zeros((N, K // QK_K * BLOCK_BYTES), dtype=np.uint8)
    _ggml().quantize_row_q4_K_ref(x.ctypes.data, out.ctypes.data, x.size)
    return out


def grid_of(blocks: np.ndarray) -> FixedGrid:
    """The (N, K/32) scale ``d * sc`` and offset ``dmin * m`` that Q4_K blocks (N, K/256 * 144) decode with."""
    from gguf.quants import Q4_K

    N = blocks.shape[0]
    b = blocks.reshape(-1, BLOCK_BYTES)  # (N * S, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # (N * S, 1)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(b[:, 4:HEAD_BYTES].copy())  # (N * S, 8) each, 6-bit
    scale = (d * sc.astype(np.float32)).reshape(N, -1)  # (N, G): float32 products, as ggml computes them
    offset = (dmin * m.astype(np.float32)).reshape(N, -1)
    return FixedGrid(torch.from_numpy(scale), torch.from_numpy(offset))


def with_codes(blocks: np.ndarray, q: torch.Tensor) -> np.ndarray:
    """``blocks`` (N, K/256 * 144) with their 4-bit codes replaced by q (N, K) in [0, 15]."""
    N, K = q.shape
    if blocks.shape != (N, K // QK_K * BLOCK_BYTES):
        raise ConfigError(f"Q4_K: blocks {blocks.shape} do not hold a ({N}, {K}) weight")
    u = q.numpy().astype(np.uint8).reshape(N * K // QK_K, 4, 2, 32)  # (blocks, chunk of 64, half, 32)
    qs = u[:, :, 0] | (u[:, :, 1] << 4)  # (blocks, 4, 32)
    out = blocks.reshape(-1, BLOCK_BYTES).copy()
    out[:, HEAD_BYTES:] = qs.reshape(-1, 128)
    return out.reshape(blocks.shape)
