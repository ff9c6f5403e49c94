"""Optimizer pieces of pretraining: AdamW parameter groups, the learning-rate schedule (``lr_at``,
and ``LrSchedule`` for a run's length and its one re-fit), and the peak FLOP/s that model FLOPs
utilisation is measured against."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

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


@dataclass(frozen=True)
class LrSchedule:
    """The lr of every optimizer step of one run: ``lr_at`` with its length, possibly re-fitted once.

    A ``--time-budget`` run fixes its length before step 1 from a probe, then re-fits it once from
    measured step times (``refit``). The warmup is kept (changing it would bend a ramp already under
    way), and the cosine still reaches ``min_lr`` exactly at the new ``total``. A re-fit inside the
    warmup changes nothing already run: the ramp does not depend on the length. A re-fit during the
    cosine continues from the progress already reached, so the lr stays continuous.
    """

    lr: float
    min_lr: float
    warmup: int
    total: int  # the last step; lr == min_lr there and after
    refit_step: int = 0  # last step run under `previous_total`; 0: never re-fitted
    previous_total: int = 0

    def __post_init__(self) -> None:
        if self.total < 1 or self.warmup < 0:
            raise ConfigError(f"LrSchedule: total={self.total} must be >= 1 and warmup={self.warmup} >= 0")
        if self.refit_step and not self.refit_step < self.total:
            raise ConfigError(f"LrSchedule: refit_step={self.refit_step} must come before total={self.total}")

    def at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (1-based)."""
        kw = dict(lr=self.lr, min_lr=self.min_lr, warmup=self.warmup)
        if not self.refit_step or self.refit_step <= self.warmup:
            return lr_at(step, **kw, total=self.total)
        if step <= self.refit_step:
            return lr_at(step, **kw, total=self.previous_total)
        if step >= self.total:
            return self.min_lr
        # Cosine progress reached under the old length, then the rest of the way in the steps left.
        start = min(1.0, (self.refit_step - self.warmup) / max(1, self.previous_total - self.warmup))
        progress = start + (1.0 - start) * (step - self.refit_step) / (self.total - self.refit_step)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def refit(self, step: int, total: int) -> LrSchedule:
        """The same lr up to ``step``, then ending at ``min_lr`` at ``total``.

        ``total`` is raised to ``step + 1`` and past the warmup if needed: a cosine needs at least
        one step after the ramp. (Only a probe some 20x too optimistic asks for less; the loop's
        deadline check then ends the run in time, before the schedule does.)
        """
        if self.refit_step:
            raise ConfigError(f"LrSchedule: already re-fitted at step {self.refit_step}; a run re-fits once")
        if step < 1:
            raise ConfigError(f"LrSchedule.refit: step={step} must be >= 1 (re-fit after measured steps)")
        total = max(total, step + 1, self.warmup + 1)
        return replace(self, total=total, refit_step=step, previous_total=self.total)

    def to_dict(self) -> dict[str, Any]:
        """The length and re-fit only: lr and min_lr come from the run's config."""
        return {"total": self.total, "warmup": self.warmup, "refit_step": self.refit_step,
                "previous_total": self.previous_total}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, lr: float, min_lr: float) -> LrSchedule:
        return cls(lr=lr, min_lr=min_lr, warmup=int(data["warmup"]), total=int(data["total"]),
                   refit_step=int(data.get("refit_step", 0)), previous_total=int(data.get("previous_total", 0)))


def measure_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 3,
                       device: torch.device | str = "cpu") -> float:
    """FLOP/s of one n×n×n matmul at the current thread count, best of ``repeats``.

    There is no portable way to ask a CPU for its peak (it depends on the ISA, the clock under load,
    and how many cores torch may use), so MFU is measured against what a large, well-shaped GEMM
    actually achieves here: an attainable peak, which makes MFU an upper-bound-ish efficiency figure
    rather than a fraction of a datasheet number. Pass ``peak_flops`` to compare against a datasheet.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA kernels run asynchronously
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up: thread pool start, page faults of the output
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
