"""CUDA kernels against the CPU kernels / int32 reference. Marked gpu: skipped without a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deploykit import native
from deploykit.native import cuda as ncu

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not ncu.available(), reason=str(ncu.unavailable_reason()))]


@pytest.mark.parametrize("M,K,N", [(1, 5, 3), (37, 130, 70), (64, 512, 512), (300, 1024, 1408), (0, 8, 8)])
def test_cuda_gemm_bit_exact(M, K, N):
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    cw = ncu.pack_cuda_weight(w)
    qa, sa = ncu.quantize_rows(x.cuda())
    qa_cpu, sa_cpu = native.quantize_rows(x)
    # Exact across devices: a max and single IEEE operations (__fmul_rn, and '/' is correctly rounded
    # without --use_fast_math, which CMakeLists.txt does not pass); nothing is summed.
    assert torch.equal(qa[:, :K].cpu(), qa_cpu) and torch.equal(sa.cpu(), sa_cpu)
    acc = ncu.int8_gemm_s32(qa, cw).cpu().numpy()
    ref = qa_cpu.numpy().astype(np.int64) @ cw.qweight[:, :K].cpu().numpy().astype(np.int64).T
    np.testing.assert_array_equal(acc, ref)
    b = torch.randn(N, generator=g)
    y = ncu.int8_linear(x.cuda(), cw, b.cuda()).cpu()
    torch.testing.assert_close(y, native.int8_linear(x, native.pack_int8_weight(w), b), rtol=1e-5, atol=1e-5)


def test_cuda_swiglu_matches_cpu():
    g = torch.Generator().manual_seed(0)
    x, wg, wu = torch.randn(33, 96, generator=g), torch.randn(70, 96, generator=g), torch.randn(70, 96, generator=g)
    y = ncu.int8_linear(x.cuda(), ncu.pack_cuda_weight(wg, wu)).cpu()
    torch.testing.assert_close(y, native.int8_linear(x, native.pack_int8_swiglu(wg, wu)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (2048, 8, 2), (100, 16, 1), (9, 4, 4)])
def test_cuda_route_matches_cpu(T, E, k):
    logits = torch.randn(T, E)
    logits[: T // 2, 1] = logits[: T // 2, 0]  # ties
    a, b = native.moe_route(logits, k), ncu.moe_route(logits.cuda(), k)
    for name, x, y in zip(a._fields, a, b):
        if name == "weights":
            torch.testing.assert_close(y.cpu(), x, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(y.cpu(), x), name
