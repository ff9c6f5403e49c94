"""4-bit weight rounding shared by every 4-bit backend: round to nearest, or GPTQ from the calibration set.

The grid is llama.cpp's Q4_0, so that one rounding serves the native int4 kernels and GGUF Q4_0 blocks
alike: per output row and group of 32 consecutive inputs, the value of largest magnitude ``m`` sets the
scale ``d = fp16(m / -8)``, and ``q = clamp(floor(w / d + 8.5), 0, 15) - 8`` in [-8, 7], so ``w ≈ d * q``.

GPTQ (Frantar et al., 2022) rounds one input column at a time and spreads each column's rounding error
over the columns not yet rounded, weighted by the inverse Hessian of the layer's own objective
``||W X - Q X||²`` (``H = 2 X Xᵀ / n`` over the calibration inputs X of the layer), so the outputs on
calibration-like inputs move less than with round-to-nearest. The scale of each group is set when the
algorithm reaches the group's first column, from the weights as they are then (already corrected).

Hessians come from one pass of the fp32 model over the calibration sequences (every layer sees fp32
inputs, not the inputs of already-rounded earlier layers: simpler, one forward pass; the sequential
variant of the paper is left out). Nothing here knows a backend: a backend packs the (q, scales) it gets.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError

GROUP = 32
ROUNDINGS = ("gptq", "rtn")


def _grouped(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) -> (N, G, 32), zero-padded along K."""
    N, K = w.shape
    G = -(-K // GROUP)
    if G * GROUP != K:
        w = torch.nn.functional.pad(w, (0, G * GROUP - K))
    return w.reshape(N, G, GROUP)


def group_scales(w: torch.Tensor) -> torch.Tensor:
    """Q4_0 scales of w (N, K): (N, ceil(K/32)) float32, values exactly representable in fp16."""
    g = _grouped(w.detach().float())  # (N, G, 32)
    idx = g.abs().argmax(-1, keepdim=True)  # the element of largest magnitude keeps its sign
    m = torch.gather(g, -1, idx).squeeze(-1)  # (N, G)
    return (m / -8.0).to(torch.float16).float()


def round_to_grid(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8 in [-8, 7] for w (N, K) and group scales (N, G); a zero scale gives 0."""
    K = w.shape[1]
    d = scales.float().repeat_interleave(GROUP, dim=1)[:, :K]  # (N, K)
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return (torch.floor(w.float() * inv + 8.5).clamp_(0, 15) - 8).to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """d * q: (N, K) float32."""
    return q.float() * scales.float().repeat_interleave(GROUP, dim=1)[:, :q.shape[1]]


def rtn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest on the Q4_0 grid: (q (N, K) int8, scales (N, G))."""
    s = group_scales(w)
    return round_to_grid(w, s), s


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, *, damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of w (N, K) onto the Q4_0 grid given H (K, K) = 2 X Xᵀ / n: (q (N, K) int8, scales (N, G)).

    ``damp`` adds that share of H's mean diagonal to its diagonal (the paper's 1 %), so a rank-deficient
    H (fewer calibration tokens than inputs, dead inputs) stays invertible.
    """
    N, K = w.shape
    if hessian.shape != (K, K):
        raise ConfigError(f"gptq: the Hessian is {tuple(hessian.shape)}, the weight has {K} inputs")
    if block % GROUP:
        raise ConfigError(f"gptq: block={block} must be a multiple of the group size {GROUP}")
    W = w.detach().double().clone()  # (N, K), updated in place as columns are rounded
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (K, K)
    G = -(-K // GROUP)
    Q = torch.zeros(N, K, dtype=torch.int8)
    scales = torch.zeros(N, G, dtype=torch.float32)
    # The column loop is thousands of tiny ops: on one thread they skip the pool's hand-offs, which on a
    # busy machine cost more than the ops (measured at load 12: a 768x256 weight in 10.9 s on 2 threads, 0.94 s on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _columns(W, Hinv, Q, scales, block)
    finally:
        torch.set_num_threads(threads)
    return Q, scales


def _columns(W: torch.Tensor, Hinv: torch.Tensor, Q: torch.Tensor, scales: torch.Tensor, block: int) -> None:
    """GPTQ's lazy-batch column loop: rounds W (N, K) into Q / scales in place (W is updated as it goes)."""
    K = W.shape[1]
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()  # (N, B)
        Err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // GROUP
            if col % GROUP == 0:  # the group's scale, from its weights as corrected so far
                scales[:, g] = group_scales(W1[:, i:i + GROUP].float())[:, 0]
            d = scales[:, g].double()
            inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            q = (torch.floor(W1[:, i] * inv + 8.5).clamp(0, 15) - 8)  # (N,)
            Q[:, col] = q.to(torch.int8)
            err = (W1[:, i] - q * d) / Hb[i, i]  # (N,)
            W1[:, i:] -= err[:, None] * Hb[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]


@torch.no_grad()
def collect_hessians(model: nn.Module, names: Sequence[str], calibration: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / n (float64, (K, K)) of the inputs X of each named nn.Linear over the calibration sequences.

    Linears that read the same tensor in a forward (q/k/v, gate/up) reuse one Xᵀ X product."""
    seqs = [list(s) for s in calibration if len(s) >= 1]
    if not seqs:
        raise ConfigError("GPTQ needs calibration token sequences, got none",
                          hint="deploykit convert draws them from the calibration text; or use --option rounding=rtn")
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    # id(input) -> (the input, Xᵀ X) within one forward; holding the input keeps its id from being reused
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (n, K)
            if id(args[0]) not in shared:
                xd = x.double()
                shared[id(args[0])] = (args[0], xd.T @ xd)
            xtx = shared[id(args[0])][1]
            sums[name] = sums[name] + xtx if name in sums else xtx.clone()
            rows[name] = rows.get(name, 0) + x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for seq in seqs:
            shared.clear()
            model(torch.tensor([seq], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
        shared.clear()
    return {n: 2.0 * h / rows[n] for n, h in sums.items()}
