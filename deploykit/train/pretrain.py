"""Single-process pretraining: ``pretrain(TrainConfig) -> TrainResult``.

One run, top to bottom:

1. tokenizer — trained with byte-level BPE on the data (or loaded from ``--tokenizer``, or from the
   checkpoint on ``--resume``); the model's vocab_size becomes its size rounded up to 64;
2. data — documents packed into ``(N, block_size + 1)`` blocks, a seeded share held out for
   validation, batches from a resumable ``BlockLoader``;
3. model + AdamW (no decay on 1-D params and embeddings), linear warmup + cosine lr;
4. the loop — grad accumulation, optional bf16 autocast, grad clipping, MoE aux loss, a progress
   bar, one JSON record per step and per eval in ``OUT/train_log.jsonl``;
5. checkpoints — the whole folder (model, tokenizer, optimizer/RNG/loader state, log, loss.png)
   replaced atomically, so ``OUT`` is always a loadable model and a resumable run.

Bit-for-bit resume holds because everything a step reads is restored exactly: weights (fp32
safetensors), AdamW moments and step counts, the loader's (epoch, position), the RNG states, and
the lr schedule (its length, warmup and ``--time-budget`` re-fit); and because nothing in a step
depends on wall time: a budget decides the schedule (see ``budget.py``), which is then saved. Evals
and checkpoints only read the model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, DataError
from ..fsutil import Destination, atomic_folder, has_file
from ..model.checkpoint import load_model, save_model
from ..model.config import ModelConfig
from ..model.graph import CausalLM
from .budget import REFIT_SHARE, Clock, TimeBudget, eval_batch_count, probe_costs
from .config import LOG_NAME, MATH_FIELDS, PLOT_NAME, STATE_JSON, TrainConfig
from .optim import LrSchedule, build_adamw, measure_peak_flops
from .plots import plot_loss
from .state import optimizer_from_flat, optimizer_to_flat, read_state, rng_from_flat, rng_to_flat, write_state

VOCAB_MULTIPLE = 64  # embedding rows padded to a multiple of 64: aligned GEMMs, and HF does the same


@dataclass(frozen=True)
class TrainResult:
    out: Path  # the checkpoint folder (loadable by deploykit and transformers)
    steps: int  # optimizer steps completed in total (including those before a resume)
    schedule_steps: int  # length of the lr schedule the run followed
    stopped: str  # "done", "time_budget", "stop_at" or "interrupted" (SIGINT/SIGTERM; checkpoint saved)
    train_loss: float | None  # cross-entropy of the last step (mean over its micro-batches)
    val_loss: float | None  # last eval; None when val_fraction == 0
    val_ppl: float | None
    tokens_per_second: float  # training tokens / training-loop seconds of this call (evals excluded)
    mfu: float  # 6 · active params · tokens/s / peak_flops
    peak_flops: float
    params: int
    active_params: int
    tokens: int  # training tokens seen in total
    seconds: float  # wall time of this call, set-up and saving included
    sample: str  # greedy continuation of config.sample_prompt

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ---------------------------------------------------------------------------------------------
# set-up helpers
# ---------------------------------------------------------------------------------------------
def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / container CPU sets
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _destination(cfg: TrainConfig, need_bytes: int = 0) -> Destination:
    """The run folder as a guarded destination: replaced only if it is a run (with --force or --resume),
    never the data or the tokenizer folder, nor inside or around them."""
    sources = [Path(cfg.tokenizer)] if cfg.tokenizer is not None else []
    for item in [cfg.data] if isinstance(cfg.data, str) else list(cfg.data):
        if item != "embedded":
            head = Path(re.split(r"[*?\[]", item, maxsplit=1)[0] or ".")  # a glob's fixed prefix
            if head.exists():
                sources.append(head if head.is_dir() or head == Path(item) else head.parent)
    return Destination(cfg.out, what="run folder", force=cfg.force or cfg.resume, is_own=has_file(STATE_JSON),
                       sources=tuple(sources), need_bytes=need_bytes,
                       exists_hint="pass --resume to continue that run, --force to replace it, or choose another --out")


def _check_out(cfg: TrainConfig) -> None:
    """Refuse to clobber an existing folder, or to resume from nothing."""
    if cfg.resume and not cfg.out.is_dir():
        raise CheckpointError(f"--resume: {cfg.out} does not exist",
                              hint="drop --resume to start a new run there, or point --out at a run folder")
    _destination(cfg).check()


class _StopSignal:
    """SIGINT/SIGTERM during the loop: finish the current step, save, and stop (a second one aborts).

    Stopping between steps, never inside one, is what keeps the saved state exact: an interrupt inside
    ``optimizer.step()`` would leave some parameters updated and others not. Signal handlers can only
    be set from the main thread; elsewhere (a training call in a worker thread) signals keep their
    default behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, echo: Any) -> None:
        self.echo, self.received, self._previous = echo, None, {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second one: the user means it
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.echo(f"{self.received}: stopping after this step and saving (again to abort without saving)")


def _check_same_run(cfg: TrainConfig, saved: dict[str, Any], source: Path) -> TrainConfig:
    saved_cfg = TrainConfig.from_dict({**saved, "out": cfg.out, "resume": False, "force": False})
    diffs = [f"{name}: saved {getattr(saved_cfg, name)!r}, now {getattr(cfg, name)!r}"
             for name in MATH_FIELDS if getattr(saved_cfg, name) != getattr(cfg, name)]
    if diffs:
        raise ConfigError(f"--resume {source}: these settings differ from the saved run: " + "; ".join(diffs),
                          hint="resume with the saved settings (the CLI fills them in from the checkpoint when you "
                               "omit them), or start a new run with another --out")
    return saved_cfg


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _data_hash(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:16]


def _read_log(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """Records of a previous session up to the checkpoint's step. Records written after that
    checkpoint (the run went on, then died) are dropped: the resumed run writes them again.
    A torn last line from a killed process is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= upto_step:
            records.append(rec)
    return records


class _Echo:
    """Human-readable lines, routed around the progress bar so neither garbles the other."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.bar = None

    def __call__(self, msg: str) -> None:
        if self.stream is None:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def pretrain(config: TrainConfig, *, progress: bool = True, stream: TextIO | None = sys.stdout,
             started: float | None = None, clock: Clock = time.perf_counter) -> TrainResult:
    """Train (or continue training) a model as ``config`` says; see the module docstring.

    ``progress`` shows a tqdm bar on stderr; ``stream`` receives the human-readable log lines
    (None: silent). ``started`` is the ``clock()`` reading a time budget counts from (the CLI
    passes its process start; default: this call's start). ``clock`` is the time source of the
    budget and the step timings (tests pass a fake one). Raises ConfigError / DataError /
    CheckpointError / TargetExistsError with a hint.
    """
    from ..data import BlockLoader, build_blocks, eval_batches, load_texts
    from ..model.tokenizer import Tokenizer

    t_call = clock()
    echo = _Echo(stream)
    cfg = config
    _check_out(cfg)
    threads = cfg.threads or _available_cores()
    torch.set_num_threads(threads)

    # -- resume: read state first, so a bad folder fails before minutes of set-up ----------------
    saved_tensors: dict[str, torch.Tensor] = {}
    saved: dict[str, Any] = {}
    if cfg.resume:
        saved_tensors, saved = read_state(cfg.out)
        _check_same_run(cfg, saved["train_config"], cfg.out)

    # -- tokenizer and data ---------------------------------------------------------------------
    texts = load_texts(cfg.data if isinstance(cfg.data, str) else list(cfg.data))
    base_cfg = cfg.model_config()
    if cfg.resume:
        tokenizer = Tokenizer.load(cfg.out)
    elif cfg.tokenizer is not None:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        # The tokenizer sees every document, validation ones included: BPE merges are not labels, so
        # the validation loss still measures the LM on text it never trained on.
        tokenizer = Tokenizer.train(texts, cfg.vocab_size or base_cfg.vocab_size)
    train_blocks, val_blocks = build_blocks(texts, tokenizer, cfg.block_size,
                                            val_fraction=cfg.val_fraction, seed=cfg.seed)  # (N, T+1) each
    data_hash = _data_hash(train_blocks)
    if cfg.resume and saved.get("data_hash") != data_hash:
        raise DataError(f"--resume {cfg.out}: the training data differ from the saved run's "
                        f"(hash {data_hash}, saved {saved.get('data_hash')})",
                        hint="resume with the same --data files, unchanged; or start a new run")
    loader = BlockLoader(train_blocks, cfg.batch_size, seed=cfg.seed)

    # -- model and optimizer ----------------------------------------------------------------------
    model_cfg = base_cfg.replace(
        vocab_size=_round_up(tokenizer.vocab_size, VOCAB_MULTIPLE), bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if cfg.resume:
        model = load_model(cfg.out)
        if model.config != model_cfg:
            raise CheckpointError(f"--resume {cfg.out}: its config.json describes another model than this run's",
                                  hint="the folder was modified after training; start a new run")
    else:
        torch.manual_seed(cfg.seed)  # the only randomness in a run: the initial weights
        model = CausalLM(model_cfg)
    model.train()
    optimizer = build_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)

    step = 0
    schedule = LrSchedule(lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps(cfg.steps), total=cfg.steps)
    schedule_fixed = cfg.time_budget is None  # with a budget, the schedule is fitted to it before step 1
    tokens_seen = 0
    records: list[dict[str, Any]] = []
    peak = cfg.peak_flops
    if cfg.resume:
        optimizer_from_flat(optimizer, saved_tensors, saved["optimizer"], cfg.out)
        rng_from_flat(saved_tensors, saved["rng"])
        loader.load_state_dict(saved["loader"])
        step, tokens_seen = saved["step"], saved["tokens"]
        schedule_fixed = True
        if cfg.steps == saved["train_config"]["steps"]:
            schedule = _saved_schedule(saved, cfg)
        else:
            # The user extends (or shortens) the run: the remaining schedule changes shape.
            echo(f"note: --steps {cfg.steps} differs from the saved run's {saved['train_config']['steps']}: the lr "
                 "schedule is recomputed, so this is no longer the same run as an uninterrupted one")
        records = _read_log(cfg.out / LOG_NAME, step)
        peak = peak or saved.get("peak_flops")  # keep MFU comparable across sessions of one run
    autocast_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    peak_note = "given by --peak-flops"
    if peak is None:
        peak = measure_peak_flops(autocast_dtype)
        peak_note = (f"measured now: best of 3 {str(autocast_dtype).removeprefix('torch.')} 2048³ matmuls on "
                     f"{threads} thread(s); pass --peak-flops to compare against a datasheet figure")
    elif cfg.resume and cfg.peak_flops is None:
        peak_note = "measured when the run started"
    n_params, n_active = model.num_params(), model_cfg.active_params_per_token()
    # A save holds the weights and two AdamW moments (fp32), twice while the new folder replaces the old.
    _destination(cfg, need_bytes=n_params * 4 * 3 * 2 + (16 << 20)).check()
    flops_per_token = 6 * n_active  # forward 2N + backward 4N per token (attention scores ignored)

    echo(f"deploykit train: {model_cfg.variant} model, {n_params / 1e6:.2f}M params"
         + (f" ({n_active / 1e6:.2f}M active)" if model_cfg.is_moe else "")
         + f", vocab {tokenizer.vocab_size} (padded to {model_cfg.vocab_size}), {threads} thread(s)"
         + (", bf16 autocast" if cfg.bf16 else ""))
    echo(f"data: {train_blocks.shape[0]} train / {val_blocks.shape[0]} val blocks of {cfg.block_size} tokens "
         f"({train_blocks.shape[0] * cfg.block_size / 1e6:.2f}M train tokens); {cfg.tokens_per_step} tokens/step")
    echo(f"peak {peak / 1e9:.0f} GFLOP/s for MFU ({peak_note})")
    if cfg.resume:
        echo(f"resuming {cfg.out} at step {step}/{schedule.total}")

    # -- pieces of the loop ------------------------------------------------------------------------
    live_log = cfg.resume  # OUT/train_log.jsonl is appended to only once OUT is one of our checkpoints

    def emit(rec: dict[str, Any]) -> None:
        records.append(rec)
        if live_log:
            with open(cfg.out / LOG_NAME, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    @torch.no_grad()
    def evaluate() -> float | None:
        if val_blocks.shape[0] == 0:
            return None
        model.eval()
        total, count = 0.0, 0
        for i, (x, y) in enumerate(eval_batches(val_blocks, cfg.batch_size)):  # (b, T) each
            if cfg.eval_iters and i >= cfg.eval_iters:
                break
            with autocast():
                logits = model(x)  # (b, T, V)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        model.train()
        return total / count

    def save_checkpoint() -> None:
        nonlocal live_log
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        rng_tensors, rng_meta = rng_to_flat()
        meta = {
            "step": step, "schedule_steps": schedule.total, "schedule": schedule.to_dict(), "tokens": tokens_seen,
            "train_config": cfg.to_dict(), "loader": loader.state_dict(), "optimizer": opt_meta,
            "rng": rng_meta, "data_hash": data_hash, "peak_flops": peak,
        }
        # One atomic replacement of OUT: the model files, then the training state, log and plot are
        # written into the temporary folder; only a complete folder is renamed onto OUT.
        with atomic_folder(cfg.out, overwrite=True, is_own=has_file(STATE_JSON), what="run folder") as tmp:
            save_model(model, tmp, tokenizer, overwrite=True)
            write_state(tmp, {**opt_tensors, **rng_tensors}, meta)
            (tmp / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
            plot_loss(records, tmp / PLOT_NAME, title=f"{cfg.out.name}: {model_cfg.variant}, "
                      f"{n_params / 1e6:.2f}M params, step {step}")
        live_log = True

    # -- the loop ----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    budget: TimeBudget | None = None
    if cfg.time_budget is not None:
        budget, schedule = _start_budget(cfg, model, train_blocks, val_blocks, autocast, schedule, step,
                                         start=t_call if started is None else started, fixed=schedule_fixed,
                                         clock=clock, echo=echo)
    bar = tqdm(total=schedule.total, initial=step, disable=not progress, unit="step", dynamic_ncols=True,
               file=sys.stderr, leave=True)
    echo.bar = None if bar.disable else bar
    stopped = "done"
    last_loss: float | None = None
    last_val: float | None = None
    last_eval_step = last_save_step = step
    loop_seconds, loop_tokens = 0.0, 0
    ema_tps: float | None = None
    params = [p for p in model.parameters() if p.requires_grad]
    stop_signal = _StopSignal(echo)
    try:
        stop_signal.install()
        while step < schedule.total:
            if stop_signal.received:
                stopped = "interrupted"
                break
            if cfg.stop_at is not None and step >= cfg.stop_at:
                stopped = "stop_at"
                break
            if budget is not None and budget.must_stop(step, schedule.total):
                # Stop cleanly: the next step plus the final eval, save and sample would overrun.
                stopped = "time_budget"
                break
            t0 = clock()
            lr = schedule.at(step + 1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ce_sum, aux_sum = 0.0, 0.0
            counts: torch.Tensor | None = None  # (L, E) tokens per expert, summed over micro-batches
            for _ in range(cfg.grad_accum):
                x, y = next(loader)  # (B, T) inputs, (B, T) targets (already shifted by one)
                with autocast():
                    logits = model(x)  # (B, T, V)
                ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # fp32 log-softmax
                loss = ce
                if model_cfg.is_moe:
                    aux = model.aux_loss()
                    loss = ce + model_cfg.router_aux_coef * aux
                    aux_sum += aux.item()
                    c = model.expert_counts()
                    counts = c if counts is None else counts + c
                (loss / cfg.grad_accum).backward()  # mean over micro-batches = one big batch
                ce_sum += ce.item()
            # clip_grad_norm_ returns the pre-clip norm: logged, it shows spikes that clipping hid.
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += cfg.tokens_per_step
            dt = clock() - t0
            loop_seconds += dt
            loop_tokens += cfg.tokens_per_step
            tps = cfg.tokens_per_step / dt
            ema_tps = tps if ema_tps is None else 0.9 * ema_tps + 0.1 * tps
            last_loss = ce_sum / cfg.grad_accum
            rec: dict[str, Any] = {
                "kind": "train", "step": step, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": tokens_seen, "step_seconds": round(dt, 5), "tok_per_s": round(tps, 1),
                "mfu": round(flops_per_token * tps / peak, 5), "elapsed": round(clock() - t_call, 3),
            }
            if model_cfg.is_moe:
                share = counts.sum(0).float() / counts.sum()  # (E,) share of routed assignments
                rec["aux_loss"] = aux_sum / cfg.grad_accum
                rec["expert_share"] = [round(s, 4) for s in share.tolist()]
            emit(rec)
            postfix = {"loss": f"{last_loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{ema_tps:,.0f}"}
            if model_cfg.is_moe:
                postfix["aux"] = f"{rec['aux_loss']:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if budget is not None:
                budget.record_step(dt)
                total = budget.refit(step)
                if total is not None:
                    schedule = schedule.refit(step, total)
                    bar.total = schedule.total
                    bar.refresh()
                    echo(f"time budget: re-fitted at step {step} to the measured {budget.costs().step:.2f}s/step: "
                         f"the schedule is {schedule.total} steps (warmup {schedule.warmup} kept; the lr still "
                         "ends at min_lr)")

            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < schedule.total:
                te = clock()
                last_val = evaluate()
                if budget is not None:
                    budget.record_eval(clock() - te)
                last_eval_step = step
                if last_val is not None:
                    emit({"kind": "eval", "step": step, "val_loss": last_val, "val_ppl": math.exp(last_val)})
                    echo(f"step {step}: train loss {last_loss:.4f}, val loss {last_val:.4f}, "
                         f"val ppl {math.exp(last_val):.2f}")
            if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step < schedule.total:
                ts = clock()
                save_checkpoint()
                if budget is not None:
                    budget.record_save(clock() - ts)
                last_save_step = step
    except BaseException:
        stop_signal.restore()
        raise
    finally:
        bar.close()
        echo.bar = None

    # -- the end: eval, save, sample ---------------------------------------------------------------
    interrupted = stopped == "interrupted"  # then only save what was trained: the user is waiting
    try:  # a second Ctrl-C still aborts the save, and the previous checkpoint stays as it was
        if not interrupted and (last_eval_step != step or last_val is None):
            last_val = evaluate()
            if last_val is not None:
                emit({"kind": "eval", "step": step, "val_loss": last_val, "val_ppl": math.exp(last_val)})
        if last_save_step != step or not (cfg.out / STATE_JSON).is_file():
            save_checkpoint()
    finally:
        stop_signal.restore()
    sample = "" if interrupted else _greedy_sample(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens)
    model.train()
    if last_loss is None:  # nothing trained this call (resumed a finished run)
        last_loss = next((r["loss"] for r in reversed(records) if r.get("kind") == "train"), None)
    tps = loop_tokens / loop_seconds if loop_seconds else 0.0
    result = TrainResult(
        out=cfg.out, steps=step, schedule_steps=schedule.total, stopped=stopped, train_loss=last_loss,
        val_loss=last_val, val_ppl=None if last_val is None else math.exp(last_val), tokens_per_second=tps,
        mfu=flops_per_token * tps / peak, peak_flops=peak, params=n_params, active_params=n_active,
        tokens=tokens_seen, seconds=clock() - t_call, sample=sample)
    why = {"done": "", "time_budget": " (time budget reached)", "stop_at": f" (stopped at step {cfg.stop_at})",
           "interrupted": f" (interrupted; saved: continue with --resume --out {cfg.out})"}[stopped]
    echo(f"done: step {step}/{schedule.total}{why} in {result.seconds:.1f}s; {tps:,.0f} tok/s, "
         f"MFU {result.mfu:.1%} of {peak / 1e9:.0f} GFLOP/s")
    if last_val is not None:
        echo(f"eval: val loss {last_val:.4f}, val perplexity {result.val_ppl:.2f}")
    if not interrupted:
        echo(f"sample (greedy): {cfg.sample_prompt}{sample}")
    echo(f"checkpoint: {cfg.out}  (deploykit generate {cfg.out} --prompt \"...\")")
    return result


def _saved_schedule(saved: dict[str, Any], cfg: TrainConfig) -> LrSchedule:
    """The schedule a saved run followed; states written before re-fits existed hold only its length."""
    if "schedule" in saved:
        return LrSchedule.from_dict(saved["schedule"], lr=cfg.lr, min_lr=cfg.min_lr)
    total = saved["schedule_steps"]
    return LrSchedule(lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps(total), total=total)


def _start_budget(cfg: TrainConfig, model: CausalLM, train_blocks: torch.Tensor, val_blocks: torch.Tensor,
                  autocast, schedule: LrSchedule, step: int, *, start: float, fixed: bool, clock: Clock,
                  echo: _Echo) -> tuple[TimeBudget, LrSchedule]:
    """Probe the costs and fit the schedule to ``--time-budget`` (unless ``fixed``: a resumed run
    keeps its saved schedule, and the budget only stops it in time)."""
    costs = probe_costs(model, train_blocks, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                        eval_batches=eval_batch_count(val_blocks.shape[0], cfg.batch_size, cfg.eval_iters),
                        sample_tokens=cfg.sample_tokens, autocast=autocast, clock=clock)
    budget = TimeBudget(start, cfg.time_budget, costs, max_steps=cfg.steps, eval_interval=cfg.eval_interval,
                        checkpoint_interval=cfg.checkpoint_interval, can_refit=not fixed, clock=clock)
    if fixed:
        return budget, schedule
    total = budget.fit(step)
    schedule = LrSchedule(lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps(total), total=total)
    echo(f"time budget {cfg.time_budget:.0f}s: the probe says {costs.step:.2f}s/step and {costs.eval:.2f}s/eval, "
         f"so the schedule is {schedule.total} steps (warmup {schedule.warmup}); it is re-fitted once, when the "
         f"steps have spent {REFIT_SHARE:.0%} of the budget")
    return budget, schedule


def _greedy_sample(model: CausalLM, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    from ..model.generation import generate

    ids = tokenizer.encode(prompt, add_bos=True)
    new = generate(model, ids, max_new_tokens, temperature=0.0)
    return tokenizer.decode(new)


__all__ = ["TrainConfig", "TrainResult", "pretrain", "ModelConfig"]
