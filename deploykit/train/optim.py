"""Optimizer pieces of pretraining: AdamW parameter groups, the learning-rate schedule, and the
peak FLOP/s that model FLOPs utilisation is measured against."""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from ..errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay, everything else does not.

    Weight decay pulls weights towards zero. That regularises projection matrices, but on a norm's
    gain it fights the scale the norm exists to learn, on a bias it has nothing to regularise, and
    on embeddings it shrinks the rows of rare tokens just because they are rarely updated. So 1-D
    tensors (norm weights, biases) and embedding tables get no decay. A tied LM head is the
    embedding table itself (one Parameter, listed once by ``named_parameters``), so it follows the
    embedding; an untied head is a projection and decays.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    decay_names: list[str] = []
    no_decay_names: list[str] = []
    for name, p in model.named_parameters():  # shared (tied) parameters are yielded once
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in embedding_params:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_adamw(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    # `names` is for humans and tests; AdamW keeps unknown group keys, which also puts them into the
    # saved optimizer state, so a resume can check that groups still line up with the model.
    # foreach=False: one fixed kernel path, independent of how tensors happen to be grouped in memory,
    # so a resumed run takes bit-for-bit the same update as an uninterrupted one.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, foreach=False)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate for optimizer step ``step`` (1-based): linear warmup, then cosine to ``min_lr``.

    Step 1 gets ``lr / warmup`` (not 0: a zero first step would waste a step of compute), step
    ``warmup`` gets ``lr``, and the cosine reaches ``min_lr`` exactly at ``total``. Steps past
    ``total`` (a run extended on resume) stay at ``min_lr``.
    """
    if step < 1:
        raise ConfigError(f"lr_at: step={step} must be >= 1 (optimizer steps count from 1)")
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)  # in (0, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def measure_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of one n×n×n matmul at the current thread count, best of ``repeats``.

    There is no portable way to ask a CPU for its peak (it depends on the ISA, the clock under load,
    and how many cores torch may use), so MFU is measured against what a large, well-shaped GEMM
    actually achieves here: an attainable peak, which makes MFU an upper-bound-ish efficiency figure
    rather than a fraction of a datasheet number. Pass ``peak_flops`` to compare against a datasheet.
    """
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool start, page faults of the output
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
