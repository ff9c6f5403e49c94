"""Token generation shared by every runtime: one sampler, one decoding loop.

A backend only has to provide a :class:`DecodeSession` — "feed these new tokens, give me the logits
of the last position" — and carries its KV cache inside it (or recomputes, if it cannot). The same
sampler then makes greedy/temperature/top-k/top-p decisions for torch, ONNX Runtime, llama.cpp...,
so a given seed picks the same tokens on every backend whenever their logits agree.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import ConfigError
from .inputs import (check_max_new_tokens, check_prompt_length, check_seed, check_stop, check_temperature,
                     check_top_k, check_top_p, token_list)

if TYPE_CHECKING:  # the sampler and decode loop are numpy: serving a non-torch artifact imports no torch
    from .graph import CausalLM, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters; seed None draws a fresh one.

    Validated on construction (``deploykit.model.inputs``): a finite temperature >= 0, an integer
    top_k >= 0, a finite top_p in (0, 1], a seed that is None or an integer >= 0.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_top_k(self.top_k)
        check_top_p(self.top_p)
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_next(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """Pick the next token from one position's logits (V,)."""
    logits = np.asarray(logits, dtype=np.float64)
    if cfg.greedy:
        return int(np.argmax(logits))
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.size:
        kth = np.partition(logits, -cfg.top_k)[-cfg.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        keep = order[: int(np.searchsorted(cumulative, cfg.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))


class DecodeSession(Protocol):
    """Incremental decoding state for one sequence."""

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens to the sequence; return the logits (V,) of its last position."""
        ...


def decode_loop(
    session: DecodeSession,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_id: int | None = None,
    max_length: int | None = None,
    stop: Sequence[str] = (),
    detokenize: Callable[[list[int]], str] | None = None,
) -> list[int]:
    """Generate up to ``max_new_tokens`` after the prompt; returns only the new token ids.

    Stops at eos (not included), at ``max_length`` total tokens, or once the decoded continuation
    contains a ``stop`` string (needs ``detokenize``; the ids up to and including that token are kept).
    A prompt longer than ``max_length``, or filling it while new tokens are asked for, is refused.
    """
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    stop = check_stop(stop)
    prompt_ids = token_list(prompt_ids, name="prompt")
    check_prompt_length(len(prompt_ids), max_new_tokens, max_length)
    if stop and detokenize is None:
        raise ConfigError("stop strings need a detokenize function",
                          hint="pass detokenize=tokenizer.decode, or no stop strings")
    rng = np.random.default_rng(sampling.seed)
    budget = max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(prompt_ids))
    new: list[int] = []
    logits = session.feed(list(prompt_ids))
    for _ in range(max(budget, 0)):
        token = sample_next(logits, sampling, rng)
        if token == eos_token_id:
            break
        new.append(token)
        if stop and any(s in detokenize(new) for s in stop):
            break
        if len(new) == budget:
            break
        logits = session.feed([token])
    return new


class TorchSession:
    """DecodeSession over a deploykit CausalLM with its KV cache."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.cache: KVCache = model.new_cache()
        self.device = next(model.parameters()).device

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        import torch  # already loaded (the model is a torch module): a dict lookup

        with torch.inference_mode():
            ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)  # (1, T)
            logits = self.model(ids, kv_cache=self.cache)  # (1, T, V)
            return logits[0, -1].float().cpu().numpy()


def generate(
    model: CausalLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    stop: Sequence[str] = (),
    detokenize: Callable[[list[int]], str] | None = None,
) -> list[int]:
    """Generate from a deploykit model with its KV cache; returns the new token ids."""
    model.eval()
    prompt_ids = token_list(prompt_ids, vocab_size=model.config.vocab_size, name="prompt")
    return decode_loop(
        TorchSession(model), prompt_ids, max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        eos_token_id=model.config.eos_token_id if eos_token_id is None else eos_token_id,
        max_length=model.config.max_seq_len, stop=stop, detokenize=detokenize,
    )
