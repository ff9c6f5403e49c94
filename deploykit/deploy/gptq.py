"""4-bit weight rounding shared by every 4-bit backend: round to nearest, or GPTQ from the calibration set.

The grid is llama.cpp's Q4_0, so that one rounding serves the native int4 kernels and GGUF Q4_0 blocks
alike: per output row and group of 32 consecutive inputs, the value of largest magnitude ``m`` sets the
scale ``d = fp16(m / -8)``, and ``q = clamp(floor(w / d + 8.5), 0, 15) - 8`` in [-8, 7], so ``w ≈ d * q``.

GPTQ (Frantar et al., 2022) rounds one input column at a time and spreads each column's rounding error
over the columns not yet rounded, weighted by the inverse Hessian of the layer's own objective
``||W X - Q X||²`` (``H = 2 X Xᵀ / n`` over the calibration inputs X of the layer), so the outputs on
calibration-like inputs move less than with round-to-nearest. The scale of each group is set when the
algorithm reaches the group's first column, from the weights as they are then (already corrected).

A second grid is *fixed before rounding* (:class:`FixedGrid`): an asymmetric ``w ≈ scale * q - offset``,
q in [0, 15], per row and group of 32, whose scales a backend chose beforehand (llama.cpp's Q4_K: its
super-block scales and mins, 6-bit quantized); GPTQ then only picks the codes, column by column.

Hessians come from one pass of the fp32 model over the calibration sequences (every layer sees fp32
inputs, not the inputs of already-rounded earlier layers: simpler, one forward pass; the sequential
variant of the paper is left out). MoE experts (:func:`collect_expert_hessians`) get one Hessian each,
from the tokens the model's own top-k router sends to them (unweighted by the routing weight, as
GPTQ implementations for Mixtral do); an expert that got fewer than :data:`MIN_EXPERT_TOKENS` falls back
to round-to-nearest, and the caller records why. Nothing here knows a backend: a backend packs the
(q, scales) it gets.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

GROUP = 32
ROUNDINGS = ("gptq", "rtn")
# An expert whose Hessian rests on fewer routed calibration tokens is rounded to nearest: with a few dozen
# tokens H has a rank of a few dozen out of 256-384 inputs, and GPTQ would fit those tokens' directions,
# not the expert's input distribution. 64 is two groups of 32; the calibration set gives ~256 per expert.
MIN_EXPERT_TOKENS = 64


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


def _prepared(w: torch.Tensor, hessian: torch.Tensor, damp: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) float64 with dead inputs zeroed, and the upper Cholesky factor of H⁻¹ (K, K), damped."""
    K = w.shape[1]
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
    return W, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def _one_thread(fn: Callable[[], None]) -> None:
    # The column loop is thousands of tiny ops: on one thread they skip the pool's hand-offs, which on a
    # busy machine cost more than the ops (measured at load 12: a 768x256 weight in 10.9 s on 2 threads, 0.94 s on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, *, damp: float = 0.01, block: int = 128,
         scale_of: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of w (N, K) onto the Q4_0 grid given H (K, K) = 2 X Xᵀ / n: (q (N, K) int8, scales (N, G)).

    ``damp`` adds that share of H's mean diagonal to its diagonal (the paper's 1 %), so a rank-deficient
    H (fewer calibration tokens than inputs, dead inputs) stays invertible. ``scale_of(group, g)`` chooses
    group g's scales (N,) (fp16-representable) from its corrected weights (N, 32) float32 (default: Q4_0's
    ``max / -8``; a backend may pass its runtime's own importance-weighted choice).
    """
    W, Hinv = _prepared(w, hessian, damp, block)
    N, K = W.shape
    Q = torch.zeros(N, K, dtype=torch.int8)
    scales = torch.zeros(N, -(-K // GROUP), dtype=torch.float32)

    def round_col(col: int, W1: torch.Tensor, i: int) -> torch.Tensor:
        g = col // GROUP
        if col % GROUP == 0:  # the group's scale, from its weights as corrected so far
            group = W1[:, i:i + GROUP].float()
            scales[:, g] = group_scales(group)[:, 0] if scale_of is None else scale_of(group, g)
        d = scales[:, g].double()
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = (torch.floor(W1[:, i] * inv + 8.5).clamp(0, 15) - 8)  # (N,)
        Q[:, col] = q.to(torch.int8)
        return q * d

    _one_thread(lambda: _columns(W, Hinv, block, round_col))
    return Q, scales


def _columns(W: torch.Tensor, Hinv: torch.Tensor, block: int,
             round_col: Callable[[int, torch.Tensor, int], torch.Tensor]) -> None:
    """GPTQ's lazy-batch column loop over W (N, K), updated as it goes. ``round_col(col, W1, i)`` rounds
    column ``col`` (= column i of the current block W1 (N, B)), stores its codes and returns its value (N,)."""
    K = W.shape[1]
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()  # (N, B)
        Err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            err = (W1[:, i] - round_col(i1 + i, W1, i)) / Hb[i, i]  # (N,)
            W1[:, i:] -= err[:, None] * Hb[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]


# -- a grid fixed before rounding (llama.cpp's Q4_K) ------------------------------------------------
@dataclass(frozen=True)
class FixedGrid:
    """An asymmetric grid chosen before rounding: ``w ≈ scale * q - offset``, q in [0, levels - 1], with one
    (scale, offset) per row and group of :data:`GROUP` inputs. A zero scale codes its group as q = 0."""

    scale: torch.Tensor  # (N, G) float32
    offset: torch.Tensor  # (N, G) float32
    levels: int = 16

    def __post_init__(self) -> None:
        if self.scale.dim() != 2 or self.scale.shape != self.offset.shape:
            raise ConfigError(f"FixedGrid: scale {tuple(self.scale.shape)} and offset {tuple(self.offset.shape)} "
                              "must be the same (rows, groups) shape")
        if not 2 <= self.levels <= 256:
            raise ConfigError(f"FixedGrid: levels={self.levels} must be in [2, 256]")

    def columns(self, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """scale, offset expanded to (N, K)."""
        if -(-K // GROUP) != self.scale.shape[1]:
            raise ConfigError(f"FixedGrid: {self.scale.shape[1]} groups do not cover a weight of {K} inputs")
        return (self.scale.float().repeat_interleave(GROUP, 1)[:, :K],
                self.offset.float().repeat_interleave(GROUP, 1)[:, :K])


def _codes(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, levels: int) -> torch.Tensor:
    """round((w + m) / d) clamped to [0, levels - 1] (ties to even, as ggml's nearest_int); 0 where d == 0."""
    q = torch.round((w + m) / torch.where(d != 0, d, torch.ones_like(d))).clamp_(0, levels - 1)
    return torch.where(d != 0, q, torch.zeros_like(q))


def rtn_fixed(w: torch.Tensor, grid: FixedGrid) -> torch.Tensor:
    """Round to nearest on a fixed grid, in float32 as llama.cpp does: q (N, K) uint8."""
    d, m = grid.columns(w.shape[1])
    return _codes(w.detach().float(), d, m, grid.levels).to(torch.uint8)


def dequantize_fixed(q: torch.Tensor, grid: FixedGrid) -> torch.Tensor:
    """scale * q - offset: (N, K) float32."""
    d, m = grid.columns(q.shape[1])
    return d * q.float() - m


@torch.no_grad()
def gptq_fixed(w: torch.Tensor, hessian: torch.Tensor, grid: FixedGrid, *, damp: float = 0.01,
               block: int = 128) -> torch.Tensor:
    """GPTQ's codes for w (N, K) on a grid fixed beforehand, given H (K, K): q (N, K) uint8."""
    W, Hinv = _prepared(w, hessian, damp, block)
    d, m = (t.double() for t in grid.columns(W.shape[1]))  # (N, K)
    Q = torch.zeros(W.shape, dtype=torch.uint8)

    def round_col(col: int, W1: torch.Tensor, i: int) -> torch.Tensor:
        q = _codes(W1[:, i], d[:, col], m[:, col], grid.levels)  # (N,)
        Q[:, col] = q.to(torch.uint8)
        return d[:, col] * q - m[:, col]

    _one_thread(lambda: _columns(W, Hinv, block, round_col))
    return Q


def _sequences(calibration: Sequence[Sequence[int]]) -> list[list[int]]:
    seqs = [list(s) for s in calibration if len(s) >= 1]
    if not seqs:
        raise ConfigError("GPTQ needs calibration token sequences, got none",
                          hint="deploykit convert draws them from the calibration text; or use --option rounding=rtn")
    return seqs


@torch.no_grad()
def collect_hessians(model: nn.Module, names: Sequence[str], calibration: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / n (float64, (K, K)) of the inputs X of each named nn.Linear over the calibration sequences.

    Linears that read the same tensor in a forward (q/k/v, gate/up) reuse one Xᵀ X product."""
    seqs = _sequences(calibration)
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


@dataclass(frozen=True)
class ExpertHessians:
    """One MoE layer's per-expert Hessians over the calibration tokens its router sent to each expert."""

    inputs: tuple[torch.Tensor, ...]  # per expert (D, D): H of w1 (gate) and w3 (up), from the routed x
    hidden: tuple[torch.Tensor, ...]  # per expert (F, F): H of w2 (down), from silu(w1 x) * (w3 x)
    tokens: tuple[int, ...]  # per expert: routed calibration tokens (an all-zero H where 0)

    def __post_init__(self) -> None:
        if not len(self.inputs) == len(self.hidden) == len(self.tokens):
            raise ConfigError("ExpertHessians: inputs, hidden and tokens must have one entry per expert")

    def hessian(self, param: str, e: int) -> torch.Tensor:
        """H of expert e's ``w1`` / ``w3`` (inputs) or ``w2`` (hidden)."""
        return self.hidden[e] if param == "w2" else self.inputs[e]


@torch.no_grad()
def collect_expert_hessians(model: nn.Module, calibration: Sequence[Sequence[int]]) -> dict[str, ExpertHessians]:
    """Per-expert Hessians of every MoE layer (keyed by the MoE module's name), from one fp32 pass.

    Which tokens reach an expert is the model's own top-k routing of that forward (``MoE.last_experts``,
    set by ``route_top_k``), so the Hessians see exactly the tokens the expert computes on."""
    from ..model.graph import MoE

    seqs = _sequences(calibration)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
    xtx: dict[str, list] = {n: [0.0] * m.n_experts for n, m in layers.items()}  # (D, D) sums per expert
    hth: dict[str, list] = {n: [0.0] * m.n_experts for n, m in layers.items()}  # (F, F)
    count: dict[str, list[int]] = {n: [0] * m.n_experts for n, m in layers.items()}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            xf = args[0].detach().reshape(-1, args[0].shape[-1])  # (N, D)
            chosen = mod.last_experts  # (N, k): this forward's routing
            ex = mod.experts
            for e in range(mod.n_experts):
                x = xf[(chosen == e).any(-1)]  # (n_e, D)
                if not len(x):
                    continue
                h = torch.nn.functional.silu(x @ ex.w1[e].T) * (x @ ex.w3[e].T)  # (n_e, F)
                xd, hd = x.double(), h.double()
                xtx[name][e] = xtx[name][e] + xd.T @ xd
                hth[name][e] = hth[name][e] + hd.T @ hd
                count[name][e] += len(x)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for seq in seqs:
            model(torch.tensor([seq], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, m in layers.items():
        D, F = m.experts.w1.shape[2], m.experts.w1.shape[1]
        norm = lambda s, c, k: 2.0 * s / c if c else torch.zeros(k, k, dtype=torch.float64)
        out[n] = ExpertHessians(inputs=tuple(norm(s, c, D) for s, c in zip(xtx[n], count[n])),
                                hidden=tuple(norm(s, c, F) for s, c in zip(hth[n], count[n])),
                                tokens=tuple(count[n]))
    return out
