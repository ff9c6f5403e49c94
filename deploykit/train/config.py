"""``TrainConfig``: every knob of a pretraining run, frozen and validated on construction.

Kept free of torch so the CLI can build its ``--help`` (and read defaults) without importing it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..model.checkpoint import LOG_NAME, PLOT_NAME, RUN_FILES, STATE_DCP, STATE_JSON, STATE_TENSORS
from ..model.config import ModelConfig, preset

# Fields that decide the numbers a run computes. Resuming with any of them changed would not
# continue the same run, so `--resume` refuses it; the other fields (how long, how often to
# eval/save, threads, output) may change between sessions.
MATH_FIELDS: tuple[str, ...] = (
    "preset", "model", "data", "tokenizer", "vocab_size", "batch_size", "block_size", "grad_accum",
    "lr", "min_lr", "warmup", "weight_decay", "betas", "grad_clip", "bf16", "fp16", "seed", "val_fraction", "init",
)
STRATEGIES = ("ddp", "fsdp")  # under torchrun; one plain process needs neither


@dataclass(frozen=True)
class TrainConfig:
    out: Path  # checkpoint folder: the latest model (HF layout) + training state + log + loss.png
    preset: str = "micro"  # model preset; ignored when `model` is given
    model: ModelConfig | None = None  # explicit model config (its vocab_size is replaced by the tokenizer's)
    data: str | tuple[str, ...] = "embedded"  # "embedded", a file, folder, glob, or several
    tokenizer: Path | None = None  # folder with tokenizer.json; None trains one on the data
    vocab_size: int | None = None  # BPE size to train; None: the model config's vocab_size
    # Defaults fit the demo: `micro` for about two minutes on 2 cores (see README / report).
    steps: int = 2000  # length of the lr schedule in optimizer steps
    batch_size: int = 16  # blocks per micro-batch
    block_size: int = 128  # tokens per block (context length trained)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr: float | None = None  # None: lr / 10
    warmup: int | None = None  # warmup steps; None: 5% of the schedule (at least 1)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    bf16: bool = False  # bf16 autocast (CPU or CUDA): matmuls in bf16, weights, loss and norms in fp32
    fp16: bool = False  # fp16 autocast + GradScaler (CUDA only: CPU fp16 matmuls are slow and unscaled)
    grad_checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1/3 more compute)
    strategy: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2 fully_shard); ignored otherwise
    init: Path | None = None  # start from this checkpoint's weights and tokenizer (continued pretraining)
    eval_interval: int = 100  # steps between validation evals; 0: only at the end
    eval_iters: int = 20  # validation batches per eval; 0: all validation blocks
    checkpoint_interval: int = 500  # steps between checkpoints; 0: only at the end
    seed: int = 0
    val_fraction: float = 0.05  # share of blocks held out for validation
    time_budget: float | None = None  # seconds for the whole call: schedule fitted, re-fitted once (budget.py)
    stop_at: int | None = None  # stop (with a checkpoint) after this step; --resume continues the schedule
    threads: int | None = None  # torch threads; None: all cores this process may use
    peak_flops: float | None = None  # FLOP/s for MFU; None: measured by a 2048³ matmul at start-up
    resume: bool = False  # continue the run saved in `out`
    force: bool = False  # overwrite `out` if it exists (the old folder survives until the first save)
    sample_prompt: str = "Once upon a time"  # greedy sample printed at the end
    sample_tokens: int = 48

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        for name in ("tokenizer", "init"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if isinstance(self.data, list):
            object.__setattr__(self, "data", tuple(self.data))
        self._check_types()
        if self.init is not None and not (self.init / "config.json").is_file():
            _fail("init", str(self.init), "has no config.json: pass a checkpoint folder (one `deploykit train` wrote, "
                  "or a Hugging Face Llama/Mixtral folder)")
        if self.model is None:
            preset(self.preset)  # raises ConfigError listing the valid presets
        elif not isinstance(self.model, ModelConfig):
            _fail("model", self.model, "must be a deploykit.model.config.ModelConfig (or None to use `preset`)")
        for name in ("steps", "batch_size", "block_size", "grad_accum", "sample_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("eval_interval", "eval_iters", "checkpoint_interval", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "must be an integer >= 0")
        for name in ("vocab_size", "warmup", "stop_at", "threads"):
            value = getattr(self, name)
            if value is not None:
                if name == "warmup":
                    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                        _fail(name, value, "must be an integer >= 0 (or None for 5% of the schedule)")
                else:
                    _positive_int(name, value)
        if not self.lr > 0:
            _fail("lr", self.lr, "must be > 0, e.g. 2e-3")
        if self.min_lr is None:
            object.__setattr__(self, "min_lr", self.lr / 10)
        if not 0 <= self.min_lr <= self.lr:
            _fail("min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        if self.weight_decay < 0:
            _fail("weight_decay", self.weight_decay, "must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("betas", self.betas, "must be two numbers in [0, 1), e.g. (0.9, 0.95)")
        if self.grad_clip < 0:
            _fail("grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        if not 0 <= self.val_fraction < 1:
            _fail("val_fraction", self.val_fraction, "must be in [0, 1), e.g. 0.05")
        if self.time_budget is not None and not self.time_budget > 0:
            _fail("time_budget", self.time_budget, "must be > 0 seconds (or None for no limit)")
        if self.peak_flops is not None and not self.peak_flops > 0:
            _fail("peak_flops", self.peak_flops, "must be > 0 FLOP/s (or None to measure it)")
        if self.bf16 and self.fp16:
            _fail("fp16", self.fp16, "contradicts bf16=True: pick one autocast dtype")
        if self.strategy not in STRATEGIES:
            _fail("strategy", self.strategy, f"must be one of {', '.join(STRATEGIES)}")
        if self.init is not None and self.tokenizer is not None:
            _fail("tokenizer", self.tokenizer, "contradicts init: continued pretraining keeps the checkpoint's "
                  "tokenizer (its embedding rows are its token ids)")
        if self.resume and self.force:
            _fail("force", self.force, "contradicts resume=True: --resume continues `out`, --force replaces it")
        max_len = self.model_config().max_seq_len
        if self.block_size > max_len:
            _fail("block_size", self.block_size,
                  f"exceeds the model's max_seq_len={max_len}; lower --block-size or pick a larger preset")
        if self.tokenizer is None and self.vocab_size is not None and self.vocab_size < 259:
            _fail("vocab_size", self.vocab_size, "must be >= 259 (3 special tokens + 256 bytes), e.g. 2048")

    # -- derived ---------------------------------------------------------------------------------
    def _check_types(self) -> None:
        """Types before rules: from the Python API a string, a bool or a nan where a number belongs must
        fail here, naming the field, not as a TypeError deep inside AdamW. Ints become floats."""
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "val_fraction", "time_budget", "peak_flops"):
            value = getattr(self, name)
            if value is None and name in ("min_lr", "time_budget", "peak_flops"):
                continue
            if not _real(value):
                _fail(name, value, "must be a finite number")
            object.__setattr__(self, name, float(value))
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or not all(_real(b) for b in betas):
            _fail("betas", betas, "must be two numbers in [0, 1), e.g. (0.9, 0.95)")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        for name in ("bf16", "fp16", "grad_checkpointing", "resume", "force"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        for name in ("preset", "sample_prompt", "strategy"):
            if not isinstance(getattr(self, name), str):
                _fail(name, getattr(self, name), "must be a string")

    def model_config(self) -> ModelConfig:
        """The model config before the tokenizer fixes vocab_size (with ``init``: the checkpoint's, complete)."""
        if self.init is not None:
            from ..model.checkpoint import load_config

            return load_config(self.init)
        return self.model if self.model is not None else preset(self.preset)

    def warmup_steps(self, schedule_steps: int) -> int:
        return self.warmup if self.warmup is not None else max(1, round(0.05 * schedule_steps))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["out"] = str(self.out)
        d["tokenizer"] = None if self.tokenizer is None else str(self.tokenizer)
        d["init"] = None if self.init is None else str(self.init)
        d["model"] = None if self.model is None else self.model.to_dict()
        d["data"] = self.data if isinstance(self.data, str) else list(self.data)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown field(s) {', '.join(unknown)}",
                              hint=f"valid fields: {', '.join(sorted(known))}")
        data = dict(data)
        if isinstance(data.get("model"), dict):
            data["model"] = ModelConfig.from_dict(data["model"])
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, value, "must be a positive integer")


def _fail(field: str, value: Any, rule: str) -> None:
    raise ConfigError(f"TrainConfig.{field}={value!r} {rule}")


__all__ = ["LOG_NAME", "MATH_FIELDS", "PLOT_NAME", "RUN_FILES", "STATE_DCP", "STATE_JSON", "STATE_TENSORS", "STRATEGIES",
           "TrainConfig"]
