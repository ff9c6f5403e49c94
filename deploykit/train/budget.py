"""Fitting a run to ``--time-budget``: how many optimizer steps fit, estimated once and measured once.

A cosine schedule needs its length before step 1, but what a step costs is known only once steps
run. So the length is fitted twice:

1. before step 1, to a probe (``probe_costs``): forward+backward passes timed after warm-up. The
   first passes pay for allocations, the thread pool's start and page faults; timing the second
   one made the demo's probe read 0.81 s/step for steps that then took 0.41 s, so the run ended
   after half of its budget;
2. once, early in the run (when the steps have spent ``REFIT_SHARE`` of the budget, and at least
   ``REFIT_STEPS`` ran), to the median of the later half of the measured step times
   (``TimeBudget.refit``). Not right after the first steps: they run slower than the steady state
   (the allocator and AdamW's moments still growing), and on the demo steps went on speeding up,
   0.60 s over the first 5, 0.55 s over steps 25-50, 0.51 s at the end, so a re-fit at step 5 ended
   the run at 89 % of its budget. ``LrSchedule.refit`` keeps the warmup and still ends the cosine at
   min_lr at the new last step; the trainer state records the re-fit, so a resumed run follows it.

The fit charges the periodic evals and checkpoints and keeps a reserve for what follows the loop
(final eval, save, sample). If the machine slows down after the re-fit, ``must_stop`` ends the
loop before the next step would overrun, so the run still finishes inside its budget.

Time is read through an injectable clock (``Clock``): the unit tests drive this with a fake one.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Clock = Callable[[], float]  # seconds, monotonic (time.perf_counter)

REFIT_STEPS = 5  # steps measured at least before the one re-fit (a median of 5 shrugs off one slow step)
REFIT_SHARE = 0.2  # ...and this share of the budget spent in steps: early, but past the warm-up drift
FIT_MARGIN = 0.04  # of the budget, kept free by the fit: step-time noise must not hit the deadline (at 2 %, one
# of two idle make-demo runs still met it 6 steps before its schedule ended)
STOP_SLACK = 1.25  # the next step may be this much slower than the last before we stop for it
UPDATE_OVERHEAD = 1.1  # a step's clipping and AdamW update on top of its forward+backward passes
PROBE_WARMUP_PASSES = 2  # untimed: allocations, thread pool start, page faults
PROBE_TIMED_PASSES = 2  # the fastest one counts: the probe wants the steady state, not the noise


@dataclass(frozen=True)
class StepCosts:
    """Seconds the loop spends on each kind of work, measured or estimated."""

    step: float  # one optimizer step (grad_accum micro-batches, clipping, AdamW)
    eval: float  # one validation eval (periodic, and once more at the end)
    save: float  # one checkpoint (periodic, and once more at the end)
    sample: float  # the greedy sample printed at the end

    @property
    def finish(self) -> float:
        """What runs after the last step: the final eval, the final save and the sample."""
        return self.eval + self.save + self.sample


class TimeBudget:
    """The schedule length that fits ``seconds`` from ``start``, and when to stop the loop.

    ``estimate`` is the probe's (``probe_costs``); measured costs replace its entries as they come.
    Used by ``pretrain`` in this order: ``fit`` before step 1, then ``must_stop`` before every step,
    ``record_step`` and ``refit`` after it (a new length once, otherwise None), and ``record_eval``
    / ``record_save`` after those. ``can_refit=False`` (a resumed run: its schedule is saved) turns
    ``refit`` off; the deadline still holds.
    """

    def __init__(self, start: float, seconds: float, estimate: StepCosts, *, max_steps: int,
                 eval_interval: int, checkpoint_interval: int, can_refit: bool = True,
                 clock: Clock = time.perf_counter) -> None:
        self.start, self.seconds, self.deadline = start, seconds, start + seconds
        self.estimate = estimate
        self.max_steps, self.eval_interval, self.checkpoint_interval = max_steps, eval_interval, checkpoint_interval
        self.clock = clock
        self.step_times: list[float] = []
        self.eval_seconds: float | None = None
        self.save_seconds: float | None = None
        self.refitted = not can_refit

    # -- measurements ------------------------------------------------------------------------------
    def record_step(self, seconds: float) -> None:
        self.step_times.append(seconds)

    def record_eval(self, seconds: float) -> None:
        self.eval_seconds = seconds

    def record_save(self, seconds: float) -> None:
        self.save_seconds = seconds

    def costs(self) -> StepCosts:
        """The probe's estimate with every measured cost put in its place.

        Until an eval is measured, the probe's eval (and sample) estimate is scaled by how far it
        misjudged the steps: they were timed the same way, on the same machine, at the same moment.
        """
        e = self.estimate
        recent = self.step_times[len(self.step_times) // 2:]  # the later half: past the first, slow steps
        step = statistics.median(recent) if recent else e.step
        speed = step / e.step if e.step > 0 else 1.0
        return StepCosts(step=step, eval=e.eval * speed if self.eval_seconds is None else self.eval_seconds,
                         save=e.save if self.save_seconds is None else self.save_seconds, sample=e.sample * speed)

    # -- fitting -------------------------------------------------------------------------------------
    def fit(self, step: int) -> int:
        """The schedule length whose remaining steps, periodic evals and saves and the finish all end
        by the deadline less a margin, at the current costs; in [step + 1, max_steps]."""
        costs = self.costs()
        margin = FIT_MARGIN * self.seconds + 0.5 * costs.step  # one step's noise must fit too
        left = self.deadline - margin - self.clock() - costs.finish
        per_step = costs.step + (costs.eval / self.eval_interval if self.eval_interval else 0.0) \
            + (costs.save / self.checkpoint_interval if self.checkpoint_interval else 0.0)
        # The averages miscount by less than one eval and one save, so this n is an upper bound;
        # the exact cost grows with n, so the first n that fits is the most that fit.
        n = int((left + costs.eval + costs.save) / per_step) + 1 if left > 0 else 0
        while n > 0 and self._cost(step, n, costs) > left:
            n -= 1
        return max(step + 1, min(self.max_steps, step + n))

    def _cost(self, step: int, n: int, costs: StepCosts) -> float:
        """Seconds of steps step+1 .. step+n with the evals and saves the loop runs between them
        (at multiples of the interval, but not at the last step: the finish does those)."""
        def between(interval: int) -> int:
            return (step + n - 1) // interval - step // interval if interval else 0
        evals, saves = between(self.eval_interval), between(self.checkpoint_interval)
        return n * costs.step + evals * costs.eval + saves * costs.save

    def refit(self, step: int) -> int | None:
        """Once, when enough steps were measured: the schedule length fitted to the measured costs."""
        if self.refitted or len(self.step_times) < REFIT_STEPS or sum(self.step_times) < REFIT_SHARE * self.seconds:
            return None
        self.refitted = True
        return self.fit(step)

    # -- stopping ------------------------------------------------------------------------------------
    def must_stop(self, step: int, total: int) -> bool:
        """True if step ``step + 1`` (and the eval/save after it) would end past the deadline once
        the finish is added."""
        costs = self.costs()
        last = self.step_times[-1] if self.step_times else costs.step
        need = STOP_SLACK * max(last, costs.step) + costs.finish
        nxt = step + 1
        if nxt < total:
            if self.eval_interval and nxt % self.eval_interval == 0:
                need += costs.eval
            if self.checkpoint_interval and nxt % self.checkpoint_interval == 0:
                need += costs.save
        return self.clock() + need > self.deadline


# ---------------------------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------------------------
def probe_costs(model: torch.nn.Module, blocks: torch.Tensor, *, batch_size: int, grad_accum: int,
                eval_batches: int, sample_tokens: int, autocast: Callable,
                clock: Clock = time.perf_counter) -> StepCosts:
    """Estimated costs of this run's steps, evals, saves and sample, timed on ``blocks`` (N, T+1).

    Run before step 1, it changes nothing a training step reads: no optimizer step, gradients
    dropped, no loader batch or RNG draw taken; the model is back in train mode afterwards.
    """
    x, y = blocks[:batch_size, :-1], blocks[:batch_size, 1:]  # (B, T) each
    passes = []  # seconds of each forward+backward pass, warm-up ones included
    for _ in range(PROBE_WARMUP_PASSES + PROBE_TIMED_PASSES):
        t0 = clock()
        with autocast():
            logits = model(x)  # (B, T, V)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        model.zero_grad(set_to_none=True)  # as in a real step: each backward allocates .grad afresh
        passes.append(clock() - t0)
    model.eval()
    forward, token = [], []
    with torch.no_grad():
        for _ in range(2):  # the first no-grad forwards allocate; the second ones count
            t0 = clock()
            with autocast():
                model(x)  # (B, T, V): one eval batch
            forward.append(clock() - t0)
            t0 = clock()
            model(x[:1, :1])  # (1, 1, V): about what one greedy decode step costs
            token.append(clock() - t0)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    return StepCosts(
        step=min(passes[PROBE_WARMUP_PASSES:]) * grad_accum * UPDATE_OVERHEAD,
        eval=forward[-1] * eval_batches,
        # weights + two AdamW moments (fp32) at a modest 300 MB/s, plus the loss plot (~0.5 s)
        save=0.75 + 12 * n_params / 300e6,
        sample=token[-1] * (sample_tokens + 1),
    )


def eval_batch_count(n_val_blocks: int, batch_size: int, eval_iters: int) -> int:
    """Batches one eval runs: all validation blocks, or at most ``eval_iters`` batches of them."""
    batches = math.ceil(n_val_blocks / batch_size)
    return min(batches, eval_iters) if eval_iters else batches


__all__ = ["Clock", "StepCosts", "TimeBudget", "eval_batch_count", "probe_costs"]
