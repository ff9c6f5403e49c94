"""Pretraining, in one process or in many under torchrun: ``pretrain(TrainConfig) -> TrainResult``.

One run, top to bottom:

1. data — documents split into train and validation first (``split_documents``: per document, so
   no validation text reaches the tokenizer or the model), then each side tokenized and packed into
   ``(N, block_size + 1)`` blocks; batches from a resumable ``BlockLoader``;
2. tokenizer — trained with byte-level BPE on the training documents only (or loaded from
   ``--tokenizer``, from ``--init``'s checkpoint, or from the run on ``--resume``); the model's
   vocab_size becomes its size rounded up to 64;
3. model + AdamW (no decay on 1-D params and embeddings), linear warmup + cosine lr; under torchrun
   wrapped in DDP or sharded by FSDP2 (``distributed.py``), optionally with per-block gradient
   checkpointing;
4. the loop — grad accumulation, optional bf16 (or CUDA fp16 + GradScaler) autocast, grad clipping,
   MoE aux loss, a progress bar, one JSON record per step and per eval in ``OUT/train_log.jsonl``;
5. checkpoints — the whole folder (model, tokenizer, optimizer/RNG/loader state, log, loss.png)
   replaced atomically, so ``OUT`` is always a loadable model and a resumable run; under torchrun
   the optimizer and model state are DCP shards written by every rank into the same folder.

Bit-for-bit resume holds because everything a step reads is restored exactly: weights (fp32
safetensors), AdamW moments and step counts, the loader's (epoch, position), the RNG states, and
the lr schedule (its length, warmup and ``--time-budget`` re-fit); and because nothing in a step
depends on wall time: a budget decides the schedule (see ``budget.py``), which is then saved. Evals
and checkpoints only read the model. Across world sizes the resume is exact up to the order of the
all-reduce's float sums: the global batch, and so the math, does not depend on the world size.
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
from functools import partial
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
from .distributed import Parallel, checkpoint_blocks, core, full_model_state, full_optimizer_state, grad_norm_value
from .distributed import finish as finish_distributed
from .distributed import launched_by_torchrun, load_full_optimizer_state, load_sharded, save_sharded, sync_gradients, wrap
from .distributed import start as start_distributed
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
    sample: str  # greedy continuation of config.sample_prompt ("" on ranks other than 0)
    rank: int = 0  # this process's rank under torchrun
    world_size: int = 1
    strategy: str | None = None  # "ddp" / "fsdp" under torchrun, None for one plain process
    # --init: perplexity on the domain's and the original run's held-out documents, before and after
    perplexity: dict[str, dict[str, float | None]] | None = None

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
    sources = [Path(p) for p in (cfg.tokenizer, cfg.init) if p is not None]
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

    def __init__(self, echo: Any, repeat_grace: float = 0.0) -> None:
        # Under torchrun a Ctrl-C reaches each worker twice (from the terminal, then forwarded by torchrun):
        # a repeat within ``repeat_grace`` seconds is the same request, not the "abort" one.
        self.echo, self.received, self._previous = echo, None, {}
        self.repeat_grace, self._at = repeat_grace, 0.0

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second one: the user means it
            if time.monotonic() - self._at < self.repeat_grace:
                return
            raise KeyboardInterrupt
        self.received, self._at = signal.Signals(signum).name, time.monotonic()
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
    budget and the step timings (tests pass a fake one). Under torchrun the call joins the process
    group (``distributed.start``), and only rank 0 logs, shows progress and writes the run folder.
    Raises ConfigError / DataError / CheckpointError / TargetExistsError with a hint.
    """
    t_call = clock()
    _check_out(config)
    if launched_by_torchrun() and config.time_budget is not None:
        raise ConfigError("--time-budget is not supported under torchrun: the ranks' clocks would fit different "
                          "schedules", hint="pass --steps (and --stop-at to stop early) for a distributed run")
    par = start_distributed(config.strategy, config.batch_size)
    try:
        return _run(config, par, progress=progress and par.is_main, stream=stream if par.is_main else None,
                    started=started, clock=clock, t_call=t_call)
    finally:
        finish_distributed(par)


def _default_threads(par: Parallel) -> int:
    # torchrun sets OMP_NUM_THREADS=1; the cores this process may use, shared by the node's ranks, say more.
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if par.distributed else 1
    return max(1, _available_cores() // per_node)


def _tokenizer(cfg: TrainConfig, par: Parallel, train_texts: list[str]) -> Any:
    """The run's tokenizer: the checkpoint's (--resume, --init), --tokenizer's, or BPE trained on the
    training documents only. Under torchrun rank 0 trains it and the others receive it."""
    import tokenizers

    from ..model.tokenizer import Tokenizer

    source = cfg.out if cfg.resume else cfg.init if cfg.init is not None else cfg.tokenizer
    if source is not None:
        return Tokenizer.load(source)
    vocab = cfg.vocab_size or cfg.model_config().vocab_size
    if not par.distributed:
        return Tokenizer.train(train_texts, vocab)
    text = Tokenizer.train(train_texts, vocab).hf.to_str() if par.is_main else None
    return Tokenizer.from_hf(tokenizers.Tokenizer.from_str(par.broadcast(text)))


def _build_model(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: Any) -> CausalLM:
    if cfg.resume:
        model = load_model(cfg.out)
        if model.config != model_cfg:
            raise CheckpointError(f"--resume {cfg.out}: its config.json describes another model than this run's",
                                  hint="the folder was modified after training; start a new run")
    elif cfg.init is not None:
        model = load_model(cfg.init)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise CheckpointError(f"--init {cfg.init}: its tokenizer has {tokenizer.vocab_size} tokens, the model "
                                  f"only {model.config.vocab_size} embedding rows",
                                  hint="pass a checkpoint folder whose tokenizer belongs to its model")
    else:
        torch.manual_seed(cfg.seed)  # the only randomness in a run: the initial weights
        model = CausalLM(model_cfg)
    if cfg.grad_checkpointing:
        checkpoint_blocks(model)
    model.train()
    return model


def _original_val_blocks(cfg: TrainConfig, tokenizer: Any, echo: _Echo) -> torch.Tensor | None:
    """--init: the held-out documents of the run that wrote the checkpoint (its saved data, seed and
    split), packed with its tokenizer; None when the checkpoint does not say what it was trained on."""
    from ..data import encode_and_pack, load_texts, split_documents

    path = cfg.init / STATE_JSON
    try:
        saved = json.loads(path.read_text())["train_config"]
        data, seed, fraction = saved["data"], int(saved["seed"]), float(saved["val_fraction"])
    except (OSError, ValueError, KeyError, TypeError):
        echo(f"note: {cfg.init} has no readable {STATE_JSON}, so its original held-out set is unknown: only the "
             "domain perplexity is reported")
        return None
    if fraction == 0:
        return None
    try:
        _, val = split_documents(load_texts(data if isinstance(data, str) else list(data)), fraction, seed)
        return encode_and_pack(val, tokenizer, cfg.block_size, what="original validation documents")
    except DataError as e:
        echo(f"note: the original held-out set of {cfg.init} cannot be rebuilt ({e.args[0]}): only the domain "
             "perplexity is reported")
        return None


def _run(cfg: TrainConfig, par: Parallel, *, progress: bool, stream: TextIO | None, started: float | None,
         clock: Clock, t_call: float) -> TrainResult:
    from ..data import BlockLoader, encode_and_pack, eval_batches, load_texts, split_documents

    echo = _Echo(stream)
    if cfg.fp16 and par.device.type != "cuda":
        raise ConfigError("TrainConfig.fp16=True needs a CUDA device (fp16 + GradScaler); this process trains on "
                          f"{par.device}", hint="use --bf16 on a CPU, or launch with torchrun on a GPU machine")
    threads = cfg.threads or _default_threads(par)
    torch.set_num_threads(threads)

    # -- resume: read state first, so a bad folder fails before minutes of set-up ----------------
    saved_tensors: dict[str, torch.Tensor] = {}
    saved: dict[str, Any] = {}
    if cfg.resume:
        saved_tensors, saved = read_state(cfg.out)
        _check_same_run(cfg, saved["train_config"], cfg.out)
    sharded_state = saved.get("optimizer", {}).get("format") == "dcp"

    # -- tokenizer and data: the split is per document, before the tokenizer sees any text -------------
    texts = load_texts(cfg.data if isinstance(cfg.data, str) else list(cfg.data))
    train_texts, val_texts = split_documents(texts, cfg.val_fraction, cfg.seed)
    tokenizer = _tokenizer(cfg, par, train_texts)
    train_blocks = encode_and_pack(train_texts, tokenizer, cfg.block_size, what="training documents")  # (N, T+1)
    val_blocks = encode_and_pack(val_texts, tokenizer, cfg.block_size, what="validation documents")  # (M, T+1)
    data_hash = _data_hash(train_blocks)
    if par.distributed and par.broadcast(data_hash) != data_hash:
        raise DataError(f"rank {par.rank} read other training data than rank 0 (hash {data_hash})",
                        hint="every node must see the same --data files (and the same tokenizer)")
    if cfg.resume and saved.get("data_hash") != data_hash:
        raise DataError(f"--resume {cfg.out}: the training data differ from the saved run's "
                        f"(hash {data_hash}, saved {saved.get('data_hash')})",
                        hint="resume with the same --data files, unchanged; or start a new run")
    loader = BlockLoader(train_blocks, cfg.batch_size, seed=cfg.seed)  # the global batch; each rank takes its rows

    # -- model and optimizer ----------------------------------------------------------------------
    base_cfg = cfg.model_config()
    model_cfg = base_cfg if cfg.init is not None else base_cfg.replace(
        vocab_size=_round_up(tokenizer.vocab_size, VOCAB_MULTIPLE), bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    model = _build_model(cfg, model_cfg, tokenizer)
    full_optim_state = None
    if cfg.resume and par.distributed and not sharded_state:
        # A single-process run continued under torchrun: its optimizer state, keyed by name, for the shards.
        plain = build_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
        optimizer_from_flat(plain, saved_tensors, saved["optimizer"], cfg.out)
        full_optim_state = full_optimizer_state(model, plain)
    train_model = wrap(model, par)  # the model, DDP around it, or the model fully sharded
    net = core(train_model)  # the CausalLM whose methods (aux loss, expert counts) the loop reads
    optimizer = build_adamw(net, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    scaler = torch.amp.GradScaler("cuda") if cfg.fp16 else None

    step = 0
    schedule = LrSchedule(lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps(cfg.steps), total=cfg.steps)
    schedule_fixed = cfg.time_budget is None  # with a budget, the schedule is fitted to it before step 1
    tokens_seen = 0
    records: list[dict[str, Any]] = []
    peak = cfg.peak_flops
    if cfg.resume:
        if sharded_state:
            load_sharded(cfg.out, train_model, optimizer)  # resharded to this world size (or one process)
        elif full_optim_state is not None:
            load_full_optimizer_state(train_model, optimizer, full_optim_state)
        else:
            optimizer_from_flat(optimizer, saved_tensors, saved["optimizer"], cfg.out)
        rng_from_flat(saved_tensors, saved["rng"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
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
    autocast_dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32
    peak_note = "given by --peak-flops"
    if peak is None:
        peak = measure_peak_flops(autocast_dtype, device=par.device)
        if par.distributed:
            peak = par.sum_([peak])[0] / par.world_size  # one figure for every rank: their mean
        peak_note = (f"measured now: best of 3 {str(autocast_dtype).removeprefix('torch.')} 2048³ matmuls on "
                     f"{threads} thread(s){' per rank' if par.distributed else ''}; pass --peak-flops to compare "
                     "against a datasheet figure")
    elif cfg.resume and cfg.peak_flops is None:
        peak_note = "measured when the run started"
    peak_total = peak * par.world_size  # MFU counts every rank's peak: communication is part of the cost
    n_params, n_active = net.num_params(), model_cfg.active_params_per_token()  # DTensors count their global size
    # A save holds the weights and two AdamW moments (fp32), twice while the new folder replaces the old.
    _destination(cfg, need_bytes=n_params * 4 * 3 * 2 + (16 << 20)).check()
    flops_per_token = 6 * n_active  # forward 2N + backward 4N per token (attention scores ignored)

    echo(f"deploykit train: {model_cfg.variant} model, {n_params / 1e6:.2f}M params"
         + (f" ({n_active / 1e6:.2f}M active)" if model_cfg.is_moe else "")
         + f", vocab {tokenizer.vocab_size} (padded to {model_cfg.vocab_size}), {threads} thread(s)"
         + (f" per rank, {par.world_size} ranks ({par.strategy}, {par.backend} on {par.device.type})"
            if par.distributed else "")
         + (", bf16 autocast" if cfg.bf16 else "") + (", fp16 autocast + GradScaler" if cfg.fp16 else "")
         + (", gradient checkpointing" if cfg.grad_checkpointing else ""))
    echo(f"data: {train_blocks.shape[0]} train / {val_blocks.shape[0]} val blocks of {cfg.block_size} tokens "
         f"({train_blocks.shape[0] * cfg.block_size / 1e6:.2f}M train tokens; {len(train_texts)} / {len(val_texts)} "
         f"documents); {cfg.tokens_per_step} tokens/step" + (f", {cfg.batch_size // par.world_size} blocks per rank "
                                                             "per micro-batch" if par.distributed else ""))
    echo(f"peak {peak / 1e9:.0f} GFLOP/s{' per rank' if par.distributed else ''} for MFU ({peak_note})")
    if cfg.resume:
        echo(f"resuming {cfg.out} at step {step}/{schedule.total}"
             + (f" (saved by {saved['optimizer']['world_size']} rank(s), {saved['optimizer']['strategy']})"
                if sharded_state else ""))

    # -- pieces of the loop ------------------------------------------------------------------------
    live_log = cfg.resume  # OUT/train_log.jsonl is appended to only once OUT is one of our checkpoints
    plain_model: list[CausalLM] = [net] if not par.distributed else []  # rank 0's full copy, for saving and sampling

    def emit(rec: dict[str, Any]) -> None:
        records.append(rec)
        if live_log and par.is_main:
            with open(cfg.out / LOG_NAME, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def autocast():
        if autocast_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(par.device.type, dtype=autocast_dtype)

    @torch.no_grad()
    def evaluate(blocks: torch.Tensor = val_blocks) -> float | None:
        if blocks.shape[0] == 0:
            return None
        train_model.eval()
        total, count = 0.0, 0
        for i, (x, y) in enumerate(eval_batches(blocks, cfg.batch_size)):  # (b, T) each
            if cfg.eval_iters and i >= cfg.eval_iters:
                break
            x, y = par.shard_rows(x), par.shard_rows(y)  # (b / world, T): every rank runs every forward (FSDP)
            with autocast():
                logits = train_model(x)  # (b, T, V)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        train_model.train()
        total, count = par.sum_([total, count])
        return total / count

    def save_checkpoint() -> None:
        nonlocal live_log
        rng_tensors, rng_meta = rng_to_flat()
        meta = {
            "step": step, "schedule_steps": schedule.total, "schedule": schedule.to_dict(), "tokens": tokens_seen,
            "train_config": cfg.to_dict(), "loader": loader.state_dict(), "rng": rng_meta, "data_hash": data_hash,
            "peak_flops": peak,
        }
        if scaler is not None:
            meta["scaler"] = scaler.state_dict()

        def write_rest(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
            save_model(plain_model[0], tmp, tokenizer, overwrite=True)
            write_state(tmp, {**tensors, **rng_tensors}, meta)
            (tmp / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
            plot_loss(records, tmp / PLOT_NAME, title=f"{cfg.out.name}: {model_cfg.variant}, "
                      f"{n_params / 1e6:.2f}M params, step {step}"
                      + (f", {par.world_size} ranks" if par.distributed else ""))

        folder = partial(atomic_folder, cfg.out, overwrite=True, is_own=has_file(STATE_JSON), what="run folder")
        if not par.distributed:
            opt_tensors, meta["optimizer"] = optimizer_to_flat(optimizer)
            # One atomic replacement of OUT: the model files, then the training state, log and plot are
            # written into the temporary folder; only a complete folder is renamed onto OUT.
            with folder() as tmp:
                write_rest(tmp, opt_tensors)
        else:
            meta["optimizer"] = {"format": "dcp", "world_size": par.world_size, "strategy": par.strategy}
            full = full_model_state(train_model, par)  # collective under FSDP; rank 0 gets the weights
            if par.is_main:
                if not plain_model:
                    plain_model.append(CausalLM(model_cfg))
                plain_model[0].load_state_dict(full)
            save_collective(par, folder, lambda tmp: save_sharded(tmp, train_model, optimizer),
                            lambda tmp: write_rest(tmp, {}))
        live_log = True

    adapt: dict[str, dict[str, float | None]] = {}
    original_val = _original_val_blocks(cfg, tokenizer, echo) if cfg.init is not None and not cfg.resume else None

    def perplexities(when: str) -> None:
        for name, blocks in (("domain", val_blocks), ("original", original_val)):
            loss = evaluate(blocks) if blocks is not None else None
            adapt.setdefault(name, {})[when] = None if loss is None else math.exp(loss)
        echo(f"perplexity {when}: domain held-out {_fmt(adapt['domain'][when])}, original held-out "
             f"{_fmt(adapt['original'][when])}")

    if cfg.init is not None and not cfg.resume:
        if cfg.lr >= TrainConfig.__dataclass_fields__["lr"].default:
            echo(f"note: --init with --lr {cfg.lr:g}, the from-scratch rate: continued pretraining usually wants one "
                 "about 10x lower (and a warmup) so the domain does not overwrite what the model knew")
        perplexities("before")

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
    params = [p for p in train_model.parameters() if p.requires_grad]
    stop_signal = _StopSignal(echo if par.is_main else _rank_echo(par.rank), repeat_grace=2.0 if par.distributed else 0.0)
    try:
        stop_signal.install()
        while step < schedule.total:
            # One tiny all-reduce under torchrun: a signal that reached any rank stops all at the same step.
            if par.any(stop_signal.received is not None):
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
            ce_sum, aux_sum, counts = _accumulate(cfg, par, model_cfg, train_model, net, loader, autocast, scaler)
            if par.distributed:  # the logged loss is the global batch's: the mean of the ranks' equal shares
                ce_sum, aux_sum = (v / par.world_size for v in par.sum_([ce_sum, aux_sum]))
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            # clip_grad_norm_ returns the pre-clip norm: logged, it shows spikes that clipping hid.
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if scaler is not None:
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
            else:
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
                "kind": "train", "step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm_value(grad_norm),
                "tokens": tokens_seen, "step_seconds": round(dt, 5), "tok_per_s": round(tps, 1),
                "mfu": round(flops_per_token * tps / peak_total, 5), "elapsed": round(clock() - t_call, 3),
            }
            if model_cfg.is_moe:
                share = counts.sum(0).float() / counts.sum()  # (E,) share of routed assignments (rank 0's rows)
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
        if adapt and not interrupted:
            perplexities("after")
    finally:
        stop_signal.restore()
    sample = ""
    if not interrupted and par.is_main:
        if not plain_model:  # a distributed run that saved nothing now (resumed a finished run)
            plain_model.append(load_model(cfg.out))
        sample = _greedy_sample(plain_model[0], tokenizer, cfg.sample_prompt, cfg.sample_tokens)
    train_model.train()
    if last_loss is None:  # nothing trained this call (resumed a finished run)
        last_loss = next((r["loss"] for r in reversed(records) if r.get("kind") == "train"), None)
    tps = loop_tokens / loop_seconds if loop_seconds else 0.0
    result = TrainResult(
        out=cfg.out, steps=step, schedule_steps=schedule.total, stopped=stopped, train_loss=last_loss,
        val_loss=last_val, val_ppl=None if last_val is None else math.exp(last_val), tokens_per_second=tps,
        mfu=flops_per_token * tps / peak_total, peak_flops=peak_total, params=n_params, active_params=n_active,
        tokens=tokens_seen, seconds=clock() - t_call, sample=sample, rank=par.rank, world_size=par.world_size,
        strategy=par.strategy, perplexity=adapt or None)
    why = {"done": "", "time_budget": " (time budget reached)", "stop_at": f" (stopped at step {cfg.stop_at})",
           "interrupted": f" (interrupted; saved: continue with --resume --out {cfg.out})"}[stopped]
    echo(f"done: step {step}/{schedule.total}{why} in {result.seconds:.1f}s; {tps:,.0f} tok/s, "
         f"MFU {result.mfu:.1%} of {peak_total / 1e9:.0f} GFLOP/s")
    if last_val is not None:
        echo(f"eval: val loss {last_val:.4f}, val perplexity {result.val_ppl:.2f}")
    if not interrupted:
        echo(f"sample (greedy): {cfg.sample_prompt}{sample}")
    echo(f"checkpoint: {cfg.out}  (deploykit generate {cfg.out} --prompt \"...\")")
    return result


def _accumulate(cfg: TrainConfig, par: Parallel, model_cfg: ModelConfig, train_model: torch.nn.Module, net: CausalLM,
                loader: Any, autocast: Any, scaler: Any) -> tuple[float, float, torch.Tensor | None]:
    """Forward and backward of one optimizer step's ``grad_accum`` micro-batches; gradients accumulate
    in the parameters. Returns this rank's summed cross-entropy and aux loss, and the MoE expert counts
    (L, E) summed over the micro-batches (None for dense models)."""
    ce_sum, aux_sum = 0.0, 0.0
    counts: torch.Tensor | None = None
    for micro in range(cfg.grad_accum):
        x, y = next(loader)  # (B, T) inputs, (B, T) targets (already shifted by one): the global batch
        x, y = par.shard_rows(x), par.shard_rows(y)  # (B / world, T): this rank's rows
        with sync_gradients(train_model, par, last=micro == cfg.grad_accum - 1):
            with autocast():
                logits = train_model(x)  # (B, T, V)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # fp32 log-softmax
            loss = ce
            if model_cfg.is_moe:
                aux = net.aux_loss()
                loss = ce + model_cfg.router_aux_coef * aux
                aux_sum += aux.item()
                c = net.expert_counts()
                counts = c if counts is None else counts + c
            # mean over micro-batches = one big batch; DDP/FSDP average over ranks, whose rows are equal in number
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        ce_sum += ce.item()
    return ce_sum, aux_sum, counts


def _fmt(ppl: float | None) -> str:
    return "n/a" if ppl is None else f"{ppl:.2f}"


def _rank_echo(rank: int) -> Any:
    return lambda msg: print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def save_collective(par: Parallel, folder: Any, shards: Any, rest: Any) -> None:
    """One atomic checkpoint written by every rank: rank 0 opens the temporary folder and writes the
    model, state, log and plot into it (``rest``: first, because ``save_model`` replaces the folder it
    writes), tells the others where it is, all write their DCP shards into it, and rank 0 renames it
    onto OUT; the closing all-reduce is the barrier after the rename, and tells every rank whether it worked."""
    if not par.is_main:
        tmp = par.broadcast(None)
        if tmp is None:
            raise CheckpointError("rank 0 could not write the checkpoint", hint="see rank 0's error")
        shards(Path(tmp))
        if par.any(False):
            raise CheckpointError("rank 0 could not finish the checkpoint", hint="see rank 0's error")
        return
    stage = "open"
    try:
        with folder() as tmp:
            rest(tmp)
            par.broadcast(str(tmp))
            stage = "shards"
            shards(tmp)
            stage = "rename"
        stage = "done"
    finally:
        if stage == "open":
            par.broadcast(None)
        elif stage in ("rename", "done"):
            par.any(stage != "done")


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


__all__ = ["ModelConfig", "TrainConfig", "TrainResult", "pretrain"]
