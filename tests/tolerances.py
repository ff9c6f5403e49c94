"""How close two float results must be when they were computed along different paths.

Bit-exactness holds only for the SAME computation: same shapes, same kernel, same thread count (a
resumed training step, a model and its deep copy on one input, one runner called twice, integer
accumulators). Change a GEMM's shape (an MoE expert that gets other tokens, a KV-cache step
instead of a full forward) and oneDNN/MKL pick another blocking, which differs again between AVX2,
AVX-512 and AMX machines: the sums are reordered and the last bits move. No BLAS promises more.
Seen on a Sapphire Rapids Xeon: 7.8447e-04 vs 7.8450e-04 for the same logit.

Where the bound comes from. A dot product of n fp32 terms, summed in any order, is within
n·u·Σ|a_i·b_i| of the exact value (u = 2^-24, the unit roundoff); the rounding errors mostly cancel,
so in practice it is about sqrt(n)·u·Σ|a_i·b_i|. The test models reduce over at most D, F <= 512
per GEMM, and a logit goes through a few such layers, each adding its error to the residual stream.
That is a few to a few tens of ulps of the logit scale (the Xeon's difference above is ~0.1 ulp of
its logits' scale, ~2.3). REORDER_ULPS = 256 ulps of the largest |value| leaves room above that, and
stays far below what a real bug gives: a causal-mask leak, a KV-cache position off by one or a
mis-routed token moves logits by 1e-2 to 1 of their scale, 1e3 to 1e5 times this tolerance. Tests
that use it also assert that gap where they can (e.g. that the positions a change should move do
move by far more).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

FP32_EPS = float(np.finfo(np.float32).eps)  # 2^-23: one ulp at 1.0
REORDER_ULPS = 256


def _np(x: Any) -> np.ndarray:
    """A float64 numpy copy of a torch tensor, numpy array or nested list."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def reorder_atol(*values: Any, ulps: int = REORDER_ULPS) -> float:
    """``ulps`` fp32 ulps at the largest |value| among ``values``: the bound above, as an atol."""
    scale = max((float(np.abs(a).max()) for a in map(_np, values) if a.size), default=0.0)
    return ulps * FP32_EPS * max(scale, float(np.finfo(np.float32).tiny))


def assert_close_reordered(actual: Any, expected: Any, *, ulps: int = REORDER_ULPS, what: str = "") -> float:
    """Assert ``actual`` equals ``expected`` up to fp32 summation order; returns the atol used."""
    a, e = _np(actual), _np(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    atol = reorder_atol(a, e, ulps=ulps)
    worst = float(np.abs(a - e).max()) if a.size else 0.0
    assert worst <= atol, (f"{what}: max |difference| {worst:.3e} > {atol:.3e} ({ulps} fp32 ulps of the largest "
                           f"|value|): more than reordered float sums explain")
    return atol


def assert_same_greedy(got: Sequence[int], want: Sequence[int], logits_at: Callable[[list[int]], Any],
                       prompt: Sequence[int], *, ulps: int = REORDER_ULPS) -> None:
    """Two greedy continuations of ``prompt`` whose logits were computed along different paths (KV
    cache vs full recompute, ours vs transformers') are equal, or part at a near tie.

    Argmax is exact, but its input is not: two logits within float reordering of each other may
    swap on another machine. So at the first step where the tokens differ, ``got``'s token must
    score within ``reorder_atol`` of ``want``'s in the reference logits there, ``logits_at(prompt +
    want[:i])`` (V,); a real bug picks a token that is far behind. After that step the two decode
    different prefixes and are not compared.
    """
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            logits = _np(logits_at(list(prompt) + list(want[:i])))  # (V,)
            gap, atol = logits[w] - logits[g], reorder_atol(logits, ulps=ulps)
            assert gap <= atol, (f"greedy step {i}: got token {g}, want {w}, which scores {gap:.3e} higher "
                                 f"(> {atol:.3e}, {ulps} ulps of the logits): not a near tie; got {list(got)}, "
                                 f"want {list(want)}")
            return
    assert len(got) == len(want), f"greedy lengths differ: got {list(got)}, want {list(want)}"
