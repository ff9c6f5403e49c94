"""Preference learning on (prompt, chosen, rejected) pairs: a Bradley-Terry reward model and DPO.

Pairs come from JSONL (``prompt``, ``chosen``, ``rejected``; or ``prompt`` + ``responses`` ranked
best first, which gives every ordered pair) or from the embedded verifiable tasks, where the
chosen response is the right answer and the rejected one a plausible wrong answer (an off-by-few
number, an unsorted list, the letters in the original order, another key's value).

Both objectives score only response tokens: the boundary is taken from the offsets of the full
text, as in SFT (``encode_prompt_response``), and padding carries no score.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.loading import jsonl_records
from ..errors import CheckpointError, ConfigError, DataError
from ..fsutil import Destination, has_file
from ..model.checkpoint import DPO_REPORT, load_model, save_model
from ..model.graph import CausalLM
from .optim import build_adamw, lr_at
from .ppo import token_logps
from .sft import EMBEDDED, IGNORE, TASK_INSTRUCTIONS, SftExample, Template, collate, encode_prompt_response, exact_match

REWARD_REPORT = "reward_report.json"
REWARD_HEAD = "reward_head.safetensors"


@dataclass(frozen=True)
class PreferencePair:
    task: str
    prompt: str  # templated, ends where the response starts
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------
def plausible_wrong(kind: str, body: str, answer: str, rng: random.Random) -> str:
    """A wrong answer a weak model might give: close to the right one, never equal to it."""
    if kind in ("add", "sub", "mul"):
        n = int(answer)
        wrong = n + rng.choice([d for d in range(-5, 6) if d and n + d >= 0])
        return str(wrong)
    if kind == "reverse":
        letters = body.removeprefix("reverse ")
        return letters if letters != answer else " ".join(answer.split()[1:] + answer.split()[:1])
    if kind == "sort":
        nums = answer.split()
        shown = body.removeprefix("sort ")
        if shown != answer:
            return shown
        return " ".join(nums[::-1]) if nums[::-1] != nums else " ".join(nums + nums[:1])
    # recall: another digit
    return str(rng.choice([d for d in range(10) if str(d) != answer]))


def embedded_pairs(n_per_task: int, *, split: str, seed: int = 0, template: Template = Template()
                   ) -> list[PreferencePair]:
    from ..data.tasks import TASK_KINDS, task_examples

    rng = random.Random(f"pairs:{seed}:{split}")
    out = []
    for ex in task_examples(n_per_task * len(TASK_KINDS), seed=seed, split=split):  # type: ignore[arg-type]
        body = ex.prompt.removeprefix("Q: ").removesuffix(" A:")
        prompt = template.prompt(TASK_INSTRUCTIONS[ex.kind], body)
        out.append(PreferencePair(ex.kind, prompt, ex.answer, plausible_wrong(ex.kind, body, ex.answer, rng)))
    return out


def read_pairs(path: Path) -> list[PreferencePair]:
    """JSONL pairs, or rankings (``responses`` best first) expanded into all ordered pairs."""
    out = []
    for n, rec in jsonl_records(path, missing_hint=f"pass a JSONL file or {EMBEDDED}"):
        task = str(rec.get("task", "default")) if isinstance(rec, dict) else ""
        if isinstance(rec, dict) and isinstance(rec.get("responses"), list) and isinstance(rec.get("prompt"), str):
            r = [str(x) for x in rec["responses"]]
            out += [PreferencePair(task, rec["prompt"], r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]
        elif isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
            out.append(PreferencePair(task, rec["prompt"], rec["chosen"], rec["rejected"]))
        else:
            raise DataError(f"{path}:{n}: needs string fields 'prompt', 'chosen', 'rejected' (or 'responses')",
                            hint='e.g. {"prompt": "...", "chosen": "...", "rejected": "..."}')
    if not out:
        raise DataError(f"{path}: no pairs", hint="one JSON object per line")
    return out


def pair_batch(tokenizer: Any, pairs: Sequence[PreferencePair], max_len: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows: ``(inputs, targets)``, each (2B, T-1), targets IGNORE off-response."""
    rows = [encode_prompt_response(tokenizer, p.prompt, p.chosen, max_len) for p in pairs]
    rows += [encode_prompt_response(tokenizer, p.prompt, p.rejected, max_len) for p in pairs]
    return collate(rows, tokenizer.pad_id)


# ---------------------------------------------------------------------------------------------
# objectives
# ---------------------------------------------------------------------------------------------
def response_logps(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs of the response tokens, (B,); prompt and padding contribute 0."""
    return token_logps(model(inputs), targets).sum(-1)  # (B, T, V) -> (B, T) -> (B,)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> torch.Tensor:
    """``-log σ(β((π_c - ref_c) - (π_r - ref_r)))`` over sequence log-probs of the responses."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


class RewardModel(nn.Module):
    """A deploykit backbone and a scalar head read at the last non-pad token (the eos)."""

    def __init__(self, backbone: CausalLM) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._hidden: torch.Tensor | None = None
        # The final norm's output is the hidden state the LM head reads; a hook takes it without a
        # second copy of the graph's forward.
        backbone.model.norm.register_forward_hook(lambda m, a, out: setattr(self, "_hidden", out))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.backbone(inputs)
        hidden = self._hidden  # (B, T, D)
        # The last scored position holds the last response token (its target is the eos): the first
        # position that has seen the whole response, and never a pad.
        last = (targets != IGNORE).long().cumsum(-1).argmax(-1)  # (B,)
        pooled = hidden[torch.arange(len(inputs)), last]  # (B, D)
        return self.head(pooled).squeeze(-1)  # (B,)


def load_reward_model(folder: str | Path) -> RewardModel:
    """A folder written by ``deploykit reward``: the backbone checkpoint and its scalar head."""
    from safetensors.torch import load_file

    folder = Path(folder)
    head = folder / REWARD_HEAD
    if not head.is_file():
        raise CheckpointError(f"{folder}: not a reward model (no {REWARD_HEAD})",
                              hint="train one with: deploykit reward SFT_CHECKPOINT --data embedded-tasks --out DIR")
    rm = RewardModel(load_model(folder))
    state = load_file(str(head))
    expected = {k: tuple(v.shape) for k, v in rm.head.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise CheckpointError(f"{head}: tensors {sorted(state)} do not fit a head for d_model "
                              f"{rm.backbone.config.d_model}", hint="retrain the reward model with deploykit reward")
    rm.head.load_state_dict(state)
    return rm.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceConfig:
    base: Path
    data: str
    out: Path
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    beta: float = 0.1  # DPO only
    pairs_per_task: int = 200
    eval_per_task: int = 20
    max_len: int = 128
    max_new_tokens: int = 16  # DPO's exact-match eval
    seed: int = 0
    template: Template = field(default_factory=Template)  # embedded pairs' layout: the one SFT used
    force: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", Path(self.base))
        object.__setattr__(self, "out", Path(self.out))
        for name in ("steps", "batch_size", "pairs_per_task", "eval_per_task", "max_len", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1", hint=f"pass a positive {name}")
        for name in ("lr", "beta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")


def load_pairs(cfg: PreferenceConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    if cfg.data == EMBEDDED:
        return (embedded_pairs(cfg.pairs_per_task, split="train", seed=cfg.seed, template=cfg.template),
                embedded_pairs(cfg.eval_per_task, split="eval", seed=cfg.seed + 1, template=cfg.template))
    pairs = read_pairs(Path(cfg.data))
    random.Random(cfg.seed).shuffle(pairs)
    k = max(1, min(len(pairs) // 5, cfg.eval_per_task * 6))
    return pairs[k:], pairs[:k]


def _loop(params: list[nn.Parameter], model: nn.Module, cfg: PreferenceConfig, train: list[PreferencePair],
          loss_of: Any) -> float:
    """AdamW over ``params`` (pretrain's groups and lr schedule); ``loss_of(batch_pairs)`` -> loss."""
    opt = build_adamw(model, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(cfg.seed)
    loss = torch.tensor(float("nan"))
    for step in range(1, cfg.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=cfg.lr, min_lr=cfg.lr / 10, warmup=min(10, cfg.steps // 10), total=cfg.steps)
        loss = loss_of(rng.sample(train, min(cfg.batch_size, len(train))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return float(loss.detach())


@torch.no_grad()
def pairwise_accuracy(score: Any, pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Share of pairs whose chosen response scores above the rejected one, per task and overall."""
    hits: dict[str, list[int]] = {}
    for i in range(0, len(pairs), 16):
        chunk = pairs[i:i + 16]
        c, r = score(chunk)
        for p, ok in zip(chunk, (c > r).tolist()):
            hits.setdefault(p.task, []).append(int(ok))
    acc = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    acc["overall"] = sum(sum(h) for h in hits.values()) / max(1, len(pairs))
    return acc


def train_reward(cfg: PreferenceConfig) -> dict[str, Any]:
    """Bradley-Terry reward model; writes backbone + head + report; returns the report."""
    from safetensors.torch import save_file

    from ..model.tokenizer import Tokenizer

    t0 = time.perf_counter()
    dest = _destination(cfg, "reward model", REWARD_REPORT)
    tokenizer = Tokenizer.load(cfg.base)
    torch.manual_seed(cfg.seed)
    rm = RewardModel(load_model(cfg.base))
    train, held = load_pairs(cfg)

    def score(pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = pair_batch(tokenizer, pairs, cfg.max_len)  # (2B, T) each
        r = rm(inputs, targets)  # (2B,)
        return r[: len(pairs)], r[len(pairs):]

    before = pairwise_accuracy(score, held)
    rm.train()
    loss = _loop(list(rm.parameters()), rm, cfg, train, lambda b: bradley_terry_loss(*score(b)))
    rm.eval()
    report = {"kind": "reward", "base": str(cfg.base), "data": cfg.data, "steps": cfg.steps, "train_loss": loss,
              "accuracy_before": before, "accuracy_after": pairwise_accuracy(score, held),
              "seconds": time.perf_counter() - t0}
    with dest.write() as tmp:
        save_model(rm.backbone, tmp, tokenizer, overwrite=True)
        save_file({k: v.contiguous() for k, v in rm.head.state_dict().items()}, str(tmp / REWARD_HEAD))
        (tmp / REWARD_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def train_dpo(cfg: PreferenceConfig) -> dict[str, Any]:
    """DPO against a frozen copy of the base; exact-match and implicit-reward accuracy before/after."""
    from ..model.tokenizer import Tokenizer

    t0 = time.perf_counter()
    dest = _destination(cfg, "dpo run", DPO_REPORT)
    tokenizer = Tokenizer.load(cfg.base)
    torch.manual_seed(cfg.seed)
    policy, ref = load_model(cfg.base), load_model(cfg.base).eval().requires_grad_(False)
    train, held = load_pairs(cfg)

    def logps(pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, ...]:
        inputs, targets = pair_batch(tokenizer, pairs, cfg.max_len)
        n = len(pairs)
        lp = response_logps(policy, inputs, targets)  # (2B,)
        with torch.no_grad():
            lr_ = response_logps(ref, inputs, targets)
        return lp[:n], lp[n:], lr_[:n], lr_[n:]

    def implicit(pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        pc, pr, rc, rr = logps(pairs)
        return pc - rc, pr - rr

    em_before = _prompt_exact_match(policy, tokenizer, held, cfg.max_new_tokens)
    policy.train()
    loss = _loop(list(policy.parameters()), policy, cfg, train, lambda b: dpo_loss(*logps(b), cfg.beta))
    policy.eval()
    report = {"kind": "dpo", "base": str(cfg.base), "data": cfg.data, "steps": cfg.steps, "beta": cfg.beta,
              "train_loss": loss, "implicit_reward_accuracy": pairwise_accuracy(implicit, held),
              "exact_match_before": em_before, "exact_match_after": _prompt_exact_match(policy, tokenizer, held, cfg.max_new_tokens),
              "seconds": time.perf_counter() - t0}
    with dest.write() as tmp:
        save_model(policy, tmp, tokenizer, overwrite=True)
        (tmp / DPO_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _prompt_exact_match(model: nn.Module, tokenizer: Any, pairs: Sequence[PreferencePair],
                        max_new_tokens: int) -> dict[str, float]:
    # exact_match templates (instruction, input); a pair's prompt is already templated, so it goes in
    # as the instruction of a pass-through template.
    tpl = Template(instruction="{instruction}", input="{input}", response="")
    return exact_match(model, tokenizer, tpl, [SftExample(p.task, p.prompt, "", p.chosen) for p in pairs],
                       max_new_tokens)


def _destination(cfg: PreferenceConfig, what: str, marker: str) -> Destination:
    sources = (cfg.base,) + (() if cfg.data == EMBEDDED else (Path(cfg.data),))
    dest = Destination(cfg.out, what=what, force=cfg.force, is_own=has_file(marker), sources=sources)
    dest.check()
    return dest
