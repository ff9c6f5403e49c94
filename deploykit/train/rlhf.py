"""RLHF with PPO: ``rlhf(RlhfConfig) -> dict`` tunes an SFT policy against a reward model.

One iteration, top to bottom:

1. **rollout** — one response per prompt sampled from the policy (temperature sampling over the
   KV cache) until its eos or ``max_new_tokens``;
2. **score** — the reward model reads prompt + response as it was trained to (the response text
   re-encoded with the eos); a response that never emitted the eos loses ``no_eos_penalty``;
3. **per-token quantities on the sampled ids themselves** (never a re-tokenization): log-probs under
   the policy and the frozen reference, and the value head's estimates, all (B, T) aligned on the
   targets of the response tokens — the seed's sketch averages mis-aligned slices instead;
4. **rewards** — the score on the last response token, ``-kl_coef * (logp - ref_logp)`` on every
   response token; GAE advantages (whitened over the batch's response tokens) and returns;
5. **PPO epochs** over minibatches: clipped policy objective + ``vf_coef`` × clipped value loss;
6. the adaptive KL controller moves ``kl_coef`` towards ``target_kl`` (``None``: fixed).

The value head is a zero-initialised linear layer on the policy's final hidden state (shared
backbone, as in most RLHF code); only the policy is saved, an ordinary checkpoint every backend
converts. The embedded tasks know their answers, so each iteration also logs how many sampled
answers were right: a check on the reward model that the reward model cannot game.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data.loading import jsonl_records
from ..errors import CheckpointError, ConfigError, DataError
from ..fsutil import Destination, has_file
from ..model.checkpoint import RLHF_FILES, RLHF_REPORT, load_model, save_model
from ..model.graph import CausalLM
from ..model.tokenizer import TOKENIZER_FILE, Tokenizer
from .ppo import AdaptiveKL, clipped_policy_loss, clipped_value_loss, gae, kl_penalized_rewards, masked_entropy, \
    token_logps, whiten
from .preference import RewardModel, load_reward_model
from .sft import EMBEDDED, IGNORE, SftExample, Template, collate, embedded_examples, encode_prompt_response, exact_match, \
    prompt_ids

RLHF_LOG, RLHF_PLOT = RLHF_FILES[1], RLHF_FILES[2]


@dataclass(frozen=True)
class RlhfConfig:
    policy: Path  # the SFT checkpoint to tune (also the frozen reference)
    reward: Path  # a `deploykit reward` folder
    out: Path
    data: str = EMBEDDED  # or JSONL with "prompt" (templated) and optionally "task", "answer"
    steps: int = 30  # PPO iterations: one rollout and its update each
    batch_size: int = 16  # prompts per rollout
    minibatch_size: int = 8
    ppo_epochs: int = 2
    lr: float = 1e-5
    kl_coef: float = 0.05
    target_kl: float | None = 1.0  # nats per response; None keeps kl_coef fixed
    kl_horizon: int = 1000  # the controller's time constant, in rollout samples
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    max_new_tokens: int = 8
    no_eos_penalty: float = 1.0
    prompts_per_task: int = 200
    eval_per_task: int = 20
    seed: int = 0
    template: Template = field(default_factory=Template)  # embedded prompts' layout: the one SFT used
    force: bool = False

    def __post_init__(self) -> None:
        for name in ("policy", "reward", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("steps", "batch_size", "minibatch_size", "ppo_epochs", "kl_horizon", "max_new_tokens",
                     "prompts_per_task", "eval_per_task"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1", hint=f"pass a positive {name}")
        if self.minibatch_size > self.batch_size:
            raise ConfigError(f"minibatch_size={self.minibatch_size} exceeds batch_size={self.batch_size}",
                              hint="a minibatch is a slice of one rollout batch")
        for name in ("lr", "temperature", "clip", "value_clip"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a finite number > 0")
        for name in ("kl_coef", "vf_coef", "no_eos_penalty"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a finite number >= 0")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ConfigError(f"target_kl={self.target_kl!r} must be > 0", hint="or None for a fixed kl_coef")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be in [0, 1]")


@dataclass(frozen=True)
class Prompt:
    task: str
    text: str  # templated: ends where the response starts
    answer: str | None  # known for the embedded tasks: the verified accuracy of samples


class PolicyWithValue(nn.Module):
    """The policy and a scalar value head on its final hidden state: ``forward -> (logits, values)``."""

    def __init__(self, policy: CausalLM) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self._hidden: torch.Tensor | None = None
        policy.model.norm.register_forward_hook(lambda m, a, out: setattr(self, "_hidden", out))

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(inputs)  # (B, T, V)
        return logits, self.value_head(self._hidden).squeeze(-1)  # (B, T)


# ---------------------------------------------------------------------------------------------
# prompts and rollouts
# ---------------------------------------------------------------------------------------------
def load_prompts(cfg: RlhfConfig, template: Template) -> tuple[list[Prompt], list[SftExample]]:
    """Rollout prompts, and the held-out examples for exact-match before/after (embedded tasks only)."""
    if cfg.data == EMBEDDED:
        train = [Prompt(e.task, template.prompt(e.instruction, e.input), e.output)
                 for e in embedded_examples(cfg.prompts_per_task, split="train", seed=cfg.seed)]
        return train, embedded_examples(cfg.eval_per_task, split="eval", seed=cfg.seed + 1)
    out = []
    for n, rec in jsonl_records(Path(cfg.data), missing_hint=f"pass a JSONL file of prompts or {EMBEDDED}"):
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and rec["prompt"]):
            raise DataError(f"{cfg.data}:{n}: needs a non-empty string field 'prompt'",
                            hint='e.g. {"prompt": "### Instruction:\\n...\\n\\n### Response:\\n"}')
        answer = rec.get("answer")
        out.append(Prompt(str(rec.get("task", "default")), rec["prompt"], answer if isinstance(answer, str) else None))
    if not out:
        raise DataError(f"{cfg.data}: no prompts", hint="one JSON object per line")
    return out, []


@torch.no_grad()
def sample_response(model: CausalLM, prompt: Sequence[int], *, max_new_tokens: int, temperature: float,
                    eos_id: int, generator: torch.Generator) -> list[int]:
    """Token ids sampled after the ``prompt`` ids over the KV cache, the eos included when it came."""
    cache = model.new_cache()
    logits = model(torch.tensor([list(prompt)]), cache)[0, -1]  # (V,)
    out: list[int] = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(nxt)
        if nxt == eos_id:
            break
        logits = model(torch.tensor([[nxt]]), cache)[0, -1]
    return out


def response_text(tokenizer: Tokenizer, response: Sequence[int]) -> str:
    return tokenizer.decode([t for t in response if t != tokenizer.eos_id])


def is_correct(text: str, answer: str | None) -> bool | None:
    """The exact-match rule of SFT's evaluation: the text before the first newline, stripped."""
    return None if answer is None else text.split("\n", 1)[0].strip() == answer


@dataclass(frozen=True)
class Rollout:
    inputs: torch.Tensor  # (B, T) prompt + response ids, right-padded, without the last token
    targets: torch.Tensor  # (B, T) the next token on response positions, IGNORE elsewhere
    mask: torch.Tensor  # (B, T) float, 1 on response targets
    scores: torch.Tensor  # (B,) reward-model score (after the no-eos penalty)
    correct: list[bool | None]
    texts: list[str]


def rollout(pv: PolicyWithValue, rm: RewardModel, tokenizer: Tokenizer, prompts: Sequence[Prompt],
            cfg: RlhfConfig, generator: torch.Generator) -> Rollout:
    pv.eval()
    rows, score_rows, texts, no_eos = [], [], [], []
    for p in prompts:
        ids = prompt_ids(tokenizer, p.text)
        resp = sample_response(pv.policy, ids, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, eos_id=tokenizer.eos_id, generator=generator)
        rows.append((ids + resp, [IGNORE] * len(ids) + resp))
        text = response_text(tokenizer, resp)
        texts.append(text)
        no_eos.append(resp[-1] != tokenizer.eos_id)
        score_rows.append(encode_prompt_response(tokenizer, p.text, text, rm.backbone.config.max_seq_len))
    inputs, targets = collate(rows, tokenizer.pad_id)  # (B, T) each
    with torch.no_grad():
        s_in, s_tg = collate(score_rows, tokenizer.pad_id)
        scores = rm(s_in, s_tg) - cfg.no_eos_penalty * torch.tensor(no_eos, dtype=torch.float32)  # (B,)
    return Rollout(inputs, targets, (targets != IGNORE).float(), scores,
                   [is_correct(t, p.answer) for t, p in zip(texts, prompts)], texts)


# ---------------------------------------------------------------------------------------------
# one PPO iteration
# ---------------------------------------------------------------------------------------------
def ppo_iteration(pv: PolicyWithValue, ref: CausalLM, opt: torch.optim.Optimizer, ro: Rollout,
                  kl_ctl: AdaptiveKL, cfg: RlhfConfig, generator: torch.Generator) -> dict[str, float]:
    """Advantages from the rollout, then ``ppo_epochs`` passes of minibatch updates; the logged stats."""
    with torch.no_grad():
        logits, old_values = pv(ro.inputs)  # (B, T, V), (B, T)
        old_logp = token_logps(logits, ro.targets)  # (B, T)
        ref_logp = token_logps(ref(ro.inputs), ro.targets)
        entropy = masked_entropy(logits, ro.mask)
        rewards, kl = kl_penalized_rewards(old_logp, ref_logp, ro.scores, ro.mask, kl_ctl.coef)
        old_values = old_values * ro.mask
        adv, returns = gae(rewards, old_values, ro.mask, gamma=cfg.gamma, lam=cfg.lam)
        adv = whiten(adv, ro.mask)
    pv.train()
    clip_fracs, value_losses, policy_losses = [], [], []
    B = len(ro.inputs)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, cfg.minibatch_size):
            mb = order[start:start + cfg.minibatch_size]
            logits, values = pv(ro.inputs[mb])
            logp = token_logps(logits, ro.targets[mb])
            pl, cf = clipped_policy_loss(logp, old_logp[mb], adv[mb], ro.mask[mb], cfg.clip)
            vl = clipped_value_loss(values * ro.mask[mb], old_values[mb], returns[mb], ro.mask[mb], cfg.value_clip)
            opt.zero_grad(set_to_none=True)
            (pl + cfg.vf_coef * vl).backward()
            torch.nn.utils.clip_grad_norm_(pv.parameters(), 1.0)
            opt.step()
            clip_fracs.append(float(cf))
            value_losses.append(float(vl.detach()))
            policy_losses.append(float(pl.detach()))
    kl_per_seq = float(kl.sum(-1).mean())
    coef_used = kl_ctl.coef
    kl_ctl.update(kl_per_seq, B)
    verified = [c for c in ro.correct if c is not None]
    return {"reward": float(ro.scores.mean()), "kl": kl_per_seq, "kl_coef": coef_used, "entropy": float(entropy),
            "clip_fraction": sum(clip_fracs) / len(clip_fracs), "value_loss": sum(value_losses) / len(value_losses),
            "policy_loss": sum(policy_losses) / len(policy_losses),
            "response_tokens": float(ro.mask.sum(-1).mean()),
            "sample_accuracy": sum(verified) / len(verified) if verified else float("nan")}


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _check_pair(cfg: RlhfConfig, policy: CausalLM, tokenizer: Tokenizer, prompts: Sequence[Prompt]) -> None:
    """The reward model must read the policy's tokens, and every prompt must leave room to answer."""
    a, b = cfg.policy / TOKENIZER_FILE, cfg.reward / TOKENIZER_FILE
    if a.read_bytes() != b.read_bytes():
        raise CheckpointError(f"{cfg.reward}: its tokenizer differs from the policy's ({cfg.policy})",
                              hint="train the reward model from the same SFT checkpoint (deploykit reward POLICY ...)")
    room = policy.config.max_seq_len - cfg.max_new_tokens
    for p in prompts:
        n = 1 + len(tokenizer.encode(p.text))  # bos + prompt
        if n > room:
            raise DataError(f"{cfg.data}: a prompt of {n} tokens leaves no room for {cfg.max_new_tokens} new tokens "
                            f"within the policy's max_seq_len={policy.config.max_seq_len} ({p.text[:40]!r}...)",
                            hint="shorten the prompts or lower --max-new-tokens")


def rlhf(cfg: RlhfConfig, *, on_iteration: Any = None) -> dict[str, Any]:
    """The PPO run; writes the tuned policy with its report, log and curves; returns the report."""
    import random

    from .plots import plot_rlhf

    t0 = time.perf_counter()
    sources = (cfg.policy, cfg.reward) + (() if cfg.data == EMBEDDED else (Path(cfg.data),))
    dest = Destination(cfg.out, what="rlhf run", force=cfg.force, is_own=has_file(RLHF_REPORT), sources=sources)
    dest.check()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    tokenizer = Tokenizer.load(cfg.policy)
    policy = load_model(cfg.policy)
    ref = load_model(cfg.policy).eval().requires_grad_(False)
    rm = load_reward_model(cfg.reward)
    template = cfg.template
    prompts, held = load_prompts(cfg, template)
    _check_pair(cfg, policy, tokenizer, prompts)
    pv = PolicyWithValue(policy)
    opt = torch.optim.AdamW(pv.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    before = exact_match(policy, tokenizer, template, held, cfg.max_new_tokens) if held else {}
    rng = random.Random(cfg.seed)
    log: list[dict[str, Any]] = []
    for it in range(1, cfg.steps + 1):
        batch = rng.sample(prompts, min(cfg.batch_size, len(prompts)))
        stats = {"iteration": it, **ppo_iteration(pv, ref, opt, rollout(pv, rm, tokenizer, batch, cfg, generator),
                                                  kl_ctl, cfg, generator)}
        log.append(stats)
        if on_iteration is not None:
            on_iteration(stats)
    policy.eval()
    after = exact_match(policy, tokenizer, template, held, cfg.max_new_tokens) if held else {}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    report = {"kind": "rlhf", "config": config, "exact_match_before": before, "exact_match_after": after,
              "first": log[0], "last": log[-1], "seconds": time.perf_counter() - t0}
    with dest.write() as tmp:
        save_model(policy, tmp, tokenizer, overwrite=True)
        (tmp / RLHF_LOG).write_text("".join(json.dumps(r) + "\n" for r in log))
        plot_rlhf(log, tmp / RLHF_PLOT, title=f"PPO on {cfg.policy.name} against {cfg.reward.name}")
        (tmp / RLHF_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
