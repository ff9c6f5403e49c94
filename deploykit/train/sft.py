"""Supervised fine-tuning: ``sft(SftConfig) -> SftResult`` with methods ``full``, ``lora`` and ``prompt``.

One run, top to bottom:

1. data — instruction JSONL (``instruction``, ``input``, ``output``, optional ``task``) or the
   embedded verifiable tasks; each task gets its own held-out split (the embedded tasks use
   ``tasks.py``'s hash split, so train and eval never share a prompt);
2. examples — the template applied, the eos appended, and **labels only on the response tokens**.
   The boundary comes from the character offsets of the full templated text's tokenization: BPE may
   merge across the prompt/response seam, so tokenizing the prompt alone can give another count;
3. batches — tasks mixed by temperature sampling (``p_task ∝ n_task^(1/T)``), right-padded to the
   longest example of the batch, padding labelled -100 (causal attention: padding at the end cannot
   reach the real tokens before it); with ``replay`` > 0 that share of every batch is blocks of the
   embedded pretraining prose, every token labelled, so the model keeps the language it was
   pretrained on (without it, 1,500 LoRA steps on the tasks took the demo micro's held-out
   perplexity from ~6 to 29);
4. the method — ``full`` trains every weight; ``lora`` wraps deploykit's module tree with ``peft``
   (deploykit uses transformers' module names, so the adapter loads onto transformers' reading of
   the base checkpoint too); ``prompt`` learns virtual-token embeddings with the base frozen;
5. exact-match per task on the held-out examples, before and after, written to ``sft_report.json``.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.loading import jsonl_records
from ..errors import CheckpointError, ConfigError, DataError
from ..fsutil import Destination, has_file
from ..model.checkpoint import SFT_REPORT, load_model, save_model
from ..model.graph import CausalLM
from .optim import build_adamw, lr_at

METHODS = ("full", "lora", "prompt")
EMBEDDED = "embedded-tasks"
SOFT_PROMPT_NAME = "soft_prompt.safetensors"
IGNORE = -100  # cross_entropy's ignore_index: prompt and padding positions
# What each embedded task asks, as an instruction (the task's own prompt body is the input).
TASK_INSTRUCTIONS = {
    "add": "Add the two numbers.", "sub": "Subtract the second number from the first.",
    "mul": "Multiply the two numbers.", "reverse": "Reverse the letters.",
    "sort": "Sort the numbers in ascending order.", "recall": "Give the value of the asked key.",
}


@dataclass(frozen=True)
class Template:
    """The seed's prompt layout; ``{instruction}`` / ``{input}`` are filled in, an empty input is left out."""

    instruction: str = "### Instruction:\n{instruction}\n\n"
    input: str = "### Input:\n{input}\n\n"
    response: str = "### Response:\n"

    def __post_init__(self) -> None:
        # An empty instruction part is a template that shows no instruction (``qa``); a non-empty one
        # without its placeholder is a typo.
        for name, key in (("instruction", "{instruction}"), ("input", "{input}")):
            value = getattr(self, name)
            if key not in value and (name == "input" or value):
                raise ConfigError(f"Template.{name}={value!r} lacks {key}", hint=f"include {key}")

    def prompt(self, instruction: str, input: str = "") -> str:
        text = self.instruction.format(instruction=instruction)
        if input:
            text += self.input.format(input=input)
        return text + self.response


# Named templates for --template: the seed's layout, and the embedded corpus's own task format
# ("Q: 23+58=? A: 81"), which a model pretrained on the corpus has already seen, and which the
# bench's task-accuracy column asks in.
TEMPLATES: dict[str, Template] = {
    "seed": Template(),
    "qa": Template(instruction="", input="Q: {input} A:", response=" "),
}


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """bos + the prompt's tokens, without its trailing spaces: byte-level BPE attaches a space to the
    word after it, so in training the space before the answer is part of the answer's first token
    (" 81"), and a prompt fed with it would end on a lone-space token the model never saw there."""
    return [tokenizer.bos_id, *tokenizer.encode(prompt.rstrip(" "))]


@dataclass(frozen=True)
class SftExample:
    task: str
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class SftConfig:
    base: Path
    data: str  # a JSONL file or "embedded-tasks"
    out: Path
    method: str = "lora"
    steps: int = 200
    batch_size: int = 16
    lr: float | None = None  # None: 3e-3 for lora/prompt, 3e-4 for full
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    temperature: float = 1.0  # task mixing: 1 = proportional to size, large = uniform over tasks
    train_per_task: int = 5000  # embedded tasks, per task; 400 were memorised (train loss 0.004, held-out flat)
    eval_per_task: int = 20  # held-out examples per task (exact-match before/after)
    max_len: int = 128
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    prompt_tokens: int = 8
    max_new_tokens: int = 16
    replay: float = 0.0  # share of each batch replaying pretraining prose (language-model loss on every token)
    replay_len: int = 32  # tokens per replayed block
    template: Template = field(default_factory=Template)
    force: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", Path(self.base))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {list(METHODS)}", hint="e.g. --method lora")
        for name in ("steps", "batch_size", "train_per_task", "eval_per_task", "max_len", "lora_r", "lora_alpha",
                     "prompt_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1", hint=f"pass a positive {name}")
        for name in ("warmup",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr!r} must be a finite number > 0", hint="e.g. --lr 3e-3")
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"replay={self.replay!r} must be in [0, 1)", hint="e.g. --replay 0.25 (a quarter of each batch)")
        if not isinstance(self.replay_len, int) or self.replay_len < 2:
            raise ConfigError(f"replay_len={self.replay_len!r} must be an integer >= 2")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature!r} must be > 0", hint="1 = proportional mixing")
        if not self.lora_targets:
            raise ConfigError("lora_targets is empty", hint="e.g. q_proj,v_proj")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-4 if self.method == "full" else 3e-3)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def embedded_examples(n_per_task: int, *, split: str, seed: int = 0) -> list[SftExample]:
    """The verifiable tasks as instruction data: the task's prompt body is the input, its answer the output."""
    from ..data.tasks import TASK_KINDS, task_examples

    out = []
    for ex in task_examples(n_per_task * len(TASK_KINDS), seed=seed, split=split):  # type: ignore[arg-type]
        body = ex.prompt.removeprefix("Q: ").removesuffix(" A:")
        out.append(SftExample(ex.kind, TASK_INSTRUCTIONS[ex.kind], body, ex.answer))
    return out


def read_jsonl(path: Path) -> list[SftExample]:
    """Instruction records; ``task`` (default "default") groups them for balance and the held-out split."""
    out = []
    for n, rec in jsonl_records(path, missing_hint=f"pass a JSONL file or {EMBEDDED}"):
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("instruction", "output")):
            raise DataError(f"{path}:{n}: needs string fields 'instruction' and 'output'",
                            hint='e.g. {"instruction": "...", "input": "", "output": "..."}')
        out.append(SftExample(str(rec.get("task", "default")), rec["instruction"], str(rec.get("input", "")),
                              rec["output"]))
    if not out:
        raise DataError(f"{path}: no records", hint="one JSON object per line")
    return out


def split_per_task(examples: Sequence[SftExample], eval_per_task: int, seed: int
                   ) -> tuple[list[SftExample], list[SftExample]]:
    """Hold out up to ``eval_per_task`` examples of every task (at most half of a task, at least one
    train example left), chosen by a seeded shuffle."""
    by_task: dict[str, list[SftExample]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    rng = random.Random(seed)
    train, held = [], []
    for task in sorted(by_task):
        items = list(by_task[task])
        rng.shuffle(items)
        k = min(eval_per_task, len(items) // 2)
        held += items[:k]
        train += items[k:]
    return train, held


def encode_example(tokenizer: Any, template: Template, ex: SftExample, max_len: int) -> tuple[list[int], list[int]]:
    """``(ids, labels)``: bos + templated prompt + response + eos; labels are the ids on response
    tokens (eos included) and IGNORE elsewhere.

    A token belongs to the response when it ends past the prompt's last character; a token that
    straddles the seam holds response characters, so it is learned. Truncation keeps the start.
    """
    return encode_prompt_response(tokenizer, template.prompt(ex.instruction, ex.input), ex.output, max_len)


def encode_prompt_response(tokenizer: Any, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """:func:`encode_example` for an already templated prompt (preference pairs share it)."""
    enc = tokenizer.hf.encode(prompt + response, add_special_tokens=False)
    boundary = len(prompt)
    ids = [tokenizer.bos_id, *enc.ids, tokenizer.eos_id]
    labels = [IGNORE] + [i if end > boundary else IGNORE for i, (_, end) in zip(enc.ids, enc.offsets)]
    labels.append(tokenizer.eos_id)
    return ids[:max_len], labels[:max_len]


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(inputs, targets)``, each (B, T-1): targets are the labels shifted by one, so
    position t is scored on predicting token t+1; padding is IGNORE."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)  # (B, T)
    for b, (i, lab) in enumerate(rows):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
    return ids[:, :-1], labels[:, 1:]


# TaskMixer's key for the pretraining blocks: not a str, so no task of a user's JSONL (whose names are
# strings, "replay" included) can collide with it.
REPLAY = ("replay",)


class TaskMixer:
    """Batches drawn task by task with ``p_task ∝ n_task^(1/temperature)``, then an example uniformly;
    ``replay`` examples (if any) take the fixed share ``replay_share`` of the draws."""

    def __init__(self, encoded: dict[str, list[tuple[list[int], list[int]]]], temperature: float, seed: int,
                 replay: Sequence[tuple[list[int], list[int]]] = (), replay_share: float = 0.0):
        self.tasks = sorted(encoded)
        self.encoded = dict(encoded)
        sizes = [len(encoded[t]) ** (1.0 / temperature) for t in self.tasks]
        share = replay_share if replay else 0.0
        self.weights = [(1.0 - share) * s / sum(sizes) for s in sizes]
        if share:
            self.tasks.append(REPLAY)
            self.encoded[REPLAY] = list(replay)
            self.weights.append(share)
        self.rng = random.Random(seed)

    def batch(self, size: int) -> list[tuple[list[int], list[int]]]:
        tasks, replayed = self.batch_groups(size)
        return tasks + replayed

    def batch_groups(self, size: int) -> tuple[list[tuple[list[int], list[int]]], list[tuple[list[int], list[int]]]]:
        """One batch's draws as (task examples, replayed blocks): padded apart, a 33-token prose block
        does not pad every short task example to its length (which cost 60 % more per step)."""
        tasks = self.rng.choices(self.tasks, weights=self.weights, k=size)
        rows = [(t, self.rng.choice(self.encoded[t])) for t in tasks]
        return [r for t, r in rows if t != REPLAY], [r for t, r in rows if t == REPLAY]


def replay_blocks(tokenizer: Any, n: int, block: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``n`` blocks of ``block`` + 1 tokens of the embedded corpus's prose, as ``(ids, labels)`` with
    every token labelled (after collate's shift: next-token prediction on all of them)."""
    from ..data.corpus import english_documents
    from ..data.loading import encode_and_pack

    chars = n * (block + 1) * 6  # ~4 characters per token here; a margin so that n blocks come out
    packed = encode_and_pack(english_documents(chars, seed), tokenizer, block, what="replayed prose")  # (N, block+1)
    rows = packed[:n].tolist()
    return [(r, list(r)) for r in rows]


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------
class SoftPrompt(nn.Module):
    """Learned virtual-token embeddings in front of every sequence, the base model frozen.

    The sequence carries ``n`` placeholder ids in front; a forward hook on the embedding replaces
    their rows by the learned ones, so deploykit's graph (which exporters trace) is untouched.
    """

    def __init__(self, model: CausalLM, n: int, init_ids: torch.Tensor) -> None:
        super().__init__()
        self.n = n
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.embeddings = nn.Parameter(model.model.embed_tokens.weight[init_ids].detach().clone())  # (n, D)
        self.model = model
        model.model.embed_tokens.register_forward_hook(self._replace)
        for p in model.parameters():
            p.requires_grad_(False)

    def _replace(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        B = out.shape[0]
        return torch.cat([self.embeddings.unsqueeze(0).expand(B, -1, -1), out[:, self.n:]], dim=1)  # (B, T, D)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        placeholder = torch.full((input_ids.shape[0], self.n), self.pad_id, dtype=torch.long)  # (B, n)
        return self.model(torch.cat([placeholder, input_ids], dim=1))[:, self.n:]  # (B, T, V)


def attach_method(model: CausalLM, cfg: SftConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The trainable module for ``cfg.method`` and its parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    if cfg.method == "full":
        wrapped: nn.Module = model
    elif cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        wrapped = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                   target_modules=list(cfg.lora_targets), bias="none"))
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        init = torch.randint(0, model.config.vocab_size, (cfg.prompt_tokens,), generator=gen)
        wrapped = SoftPrompt(model, cfg.prompt_tokens, init)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return wrapped, {"trainable_params": trainable, "base_params": total, "trainable_share": trainable / total}


def load_soft_prompt(base: str | Path, folder: str | Path) -> SoftPrompt:
    """A saved prompt-tuning run on its base model, ready for ``forward(input_ids)``."""
    from safetensors.torch import load_file

    path = Path(folder) / SOFT_PROMPT_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {SOFT_PROMPT_NAME}", hint="pass the --out of `deploykit sft --method prompt`")
    emb = load_file(str(path))["embeddings"]  # (n, D)
    sp = SoftPrompt(load_model(base), emb.shape[0], torch.zeros(emb.shape[0], dtype=torch.long))
    with torch.no_grad():
        sp.embeddings.copy_(emb)
    return sp.eval()


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Fold a LoRA adapter into its base: an ordinary checkpoint every backend deploys."""
    from peft import PeftModel

    from ..model.tokenizer import Tokenizer

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter}: no adapter_config.json", hint="pass the --out of `deploykit sft --method lora`")
    dest = Destination(Path(out), what="merged checkpoint", force=force, is_own=has_file("config.json"),
                       sources=(Path(base), adapter))
    dest.check()
    merged = PeftModel.from_pretrained(load_model(base), str(adapter)).merge_and_unload()
    with dest.write() as tmp:
        save_model(merged, tmp, Tokenizer.load(base), overwrite=True)
    return dest.path


# ---------------------------------------------------------------------------------------------
# evaluation and the run
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Any, template: Template, examples: Sequence[SftExample],
                max_new_tokens: int) -> dict[str, float]:
    """Greedy completion of each templated prompt (no KV cache: works the same for every method);
    the text before the first newline or eos, stripped, must equal the output."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for ex in examples:
        ids = prompt_ids(tokenizer, template.prompt(ex.instruction, ex.input))
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == tokenizer.eos_id:
                break
            new.append(nxt)
            if "\n" in tokenizer.decode(new):
                break
        hits.setdefault(ex.task, []).append(int(tokenizer.decode(new).split("\n", 1)[0].strip() == ex.output))
    scores = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    scores["overall"] = sum(sum(h) for h in hits.values()) / max(1, len(examples))
    return scores


@dataclass(frozen=True)
class SftResult:
    out: Path
    method: str
    steps: int
    train_loss: float
    before: dict[str, float]
    after: dict[str, float]
    params: dict[str, Any]
    seconds: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of its window)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _summed_loss(model: nn.Module, rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the labelled tokens of ``rows``, their count)."""
    inputs, targets = collate(rows, pad_id)  # (B, T) each
    logits = _logits(model, inputs)  # (B, T, V)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    return total, int((targets != IGNORE).sum())


def train_steps(model: nn.Module, mixer: TaskMixer, cfg: SftConfig, pad_id: int, *, progress: bool = False,
                curve: list[tuple[int, float]] | None = None) -> float:
    """The optimizer loop (pretrain's AdamW groups and warmup+cosine lr); returns the last loss.

    ``curve`` receives (step, mean loss of the window ending there) for about 20 windows: one batch's
    loss is too noisy to tell a run that learns from one that does not. ``progress`` shows a tqdm
    bar on stderr."""
    from tqdm import tqdm

    opt = build_adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.tensor(float("nan"))
    window, window_losses = max(1, cfg.steps // 20), []
    bar = tqdm(total=cfg.steps, disable=not progress, unit="step", dynamic_ncols=True, file=sys.stderr,
               desc=f"sft {cfg.method}")
    model.train()
    for step in range(1, cfg.steps + 1):
        lr = lr_at(step, lr=cfg.learning_rate, min_lr=cfg.learning_rate / 10, warmup=cfg.warmup, total=cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        # The mean over every labelled token of the batch, its two groups padded apart.
        parts = [_summed_loss(model, rows, pad_id) for rows in mixer.batch_groups(cfg.batch_size) if rows]
        loss = sum(total for total, _ in parts) / max(1, sum(n for _, n in parts))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        window_losses.append(float(loss.detach()))
        if step % window == 0 or step == cfg.steps:
            mean = sum(window_losses) / len(window_losses)
            if curve is not None:
                curve.append((step, mean))
            bar.set_postfix(loss=f"{mean:.3f}", refresh=False)
            window_losses = []
        bar.update(1)
    bar.close()
    model.eval()
    return float(loss.detach())


def load_data(cfg: SftConfig) -> tuple[list[SftExample], list[SftExample]]:
    if cfg.data == EMBEDDED:
        return (embedded_examples(cfg.train_per_task, split="train", seed=cfg.seed),
                embedded_examples(cfg.eval_per_task, split="eval", seed=cfg.seed + 1))
    return split_per_task(read_jsonl(Path(cfg.data)), cfg.eval_per_task, cfg.seed)


def sft(cfg: SftConfig, *, progress: bool = False) -> SftResult:
    """Fine-tune ``cfg.base`` as ``cfg`` says and write ``cfg.out`` (see the module docstring);
    ``progress`` shows a bar with the running loss on stderr."""
    from ..model.tokenizer import Tokenizer

    t0 = time.perf_counter()
    sources = (cfg.base,) + (() if cfg.data == EMBEDDED else (Path(cfg.data),))
    dest = Destination(cfg.out, what="sft run", force=cfg.force, is_own=has_file(SFT_REPORT), sources=sources)
    dest.check()
    torch.manual_seed(cfg.seed)
    tokenizer = Tokenizer.load(cfg.base)
    model = load_model(cfg.base)
    train, held = load_data(cfg)
    encoded: dict[str, list[tuple[list[int], list[int]]]] = {}
    for ex in train:
        encoded.setdefault(ex.task, []).append(encode_example(tokenizer, cfg.template, ex, cfg.max_len))
    wrapped, params = attach_method(model, cfg)
    before = exact_match(wrapped, tokenizer, cfg.template, held, cfg.max_new_tokens)
    curve: list[tuple[int, float]] = []
    # Replayed prose: enough distinct blocks that few repeat (capped: generating text costs time too).
    replay = replay_blocks(tokenizer, min(4096, int(cfg.steps * cfg.batch_size * cfg.replay) + 1), cfg.replay_len,
                           cfg.seed) if cfg.replay else []
    mixer = TaskMixer(encoded, cfg.temperature, cfg.seed, replay, cfg.replay)
    loss = train_steps(wrapped, mixer, cfg, tokenizer.pad_id, progress=progress, curve=curve)
    after = exact_match(wrapped, tokenizer, cfg.template, held, cfg.max_new_tokens)
    result = SftResult(dest.path, cfg.method, cfg.steps, loss, before, after, params, time.perf_counter() - t0,
                       loss_curve=curve)
    with dest.write() as tmp:
        _save(wrapped, cfg, tokenizer, tmp)
        (tmp / SFT_REPORT).write_text(json.dumps({**result.to_dict(), "base": str(cfg.base), "data": cfg.data,
                                                   "template": asdict(cfg.template), "replay": cfg.replay}, indent=2) + "\n")
    return result


def _save(wrapped: nn.Module, cfg: SftConfig, tokenizer: Any, folder: Path) -> None:
    """full: a checkpoint; lora: PEFT's adapter format; prompt: the soft prompt (base named in the report)."""
    from safetensors.torch import save_file

    if cfg.method == "full":
        save_model(wrapped, folder, tokenizer, overwrite=True)  # type: ignore[arg-type]
    elif cfg.method == "lora":
        wrapped.peft_config["default"].base_model_name_or_path = str(cfg.base)  # type: ignore[union-attr,index]
        wrapped.save_pretrained(str(folder), save_embedding_layers=False)  # type: ignore[operator]
        tokenizer.save(folder)
    else:
        save_file({"embeddings": wrapped.embeddings.detach().contiguous()}, str(folder / SOFT_PROMPT_NAME))  # type: ignore[union-attr]
