"""A multiple-choice harness (MMLU-style): each option scored by its log-likelihood after the prompt.

The embedded set comes from the verifiable tasks' held-out split: the right answer and three
plausible wrong ones (a near number, a wrong order, another key's value), in a seeded order. A
model is right when the right option has the highest summed log-probability; the length-normalised
variant (mean per token) is reported too, since options differ in length. Chance is 1/4.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .perplexity import log_softmax

N_OPTIONS = 4


@dataclass(frozen=True)
class Choice:
    kind: str
    prompt: str  # "Q: ... A:"
    options: tuple[str, ...]
    answer: int  # index of the right option


def _distractors(kind: str, body: str, answer: str, rng: random.Random) -> list[str]:
    """Wrong answers near the right one, all distinct and never equal to it."""
    if kind in ("add", "sub", "mul"):
        n = int(answer)
        pool = [str(n + d) for d in range(-6, 7) if d and n + d >= 0]
    elif kind in ("reverse", "sort"):
        items = answer.split()
        shown = body.split()[1:]
        pool = [" ".join(shown)] + [" ".join(rng.sample(items, len(items))) for _ in range(20)]
    else:  # recall: the other keys' values, then other digits
        values = [p.split("=")[1] for p in body.split(" ; ")[0].split()]
        pool = values + [str(d) for d in range(10)]
    wrong = list(dict.fromkeys(w for w in pool if w != answer))
    rng.shuffle(wrong)
    return wrong[: N_OPTIONS - 1]


def embedded_choices(n: int, seed: int = 1) -> list[Choice]:
    """``n`` questions from the tasks' eval split (kinds balanced), each with 4 options."""
    from ..data.tasks import task_examples

    rng = random.Random(f"choices:{seed}")
    out = []
    for ex in task_examples(n * 2, seed=seed, split="eval"):
        body = ex.prompt.removeprefix("Q: ").removesuffix(" A:")
        wrong = _distractors(ex.kind, body, ex.answer, rng)
        if len(wrong) < N_OPTIONS - 1:  # e.g. reverse of 3 equal letters: no 3 distinct wrong orders
            continue
        options = [ex.answer, *wrong]
        rng.shuffle(options)
        out.append(Choice(ex.kind, ex.prompt, tuple(options), options.index(ex.answer)))
        if len(out) == n:
            break
    return out


def option_logprob(forward: Any, tokenizer: Any, prompt: str, option: str) -> tuple[float, int]:
    """Summed log-prob of the option's tokens (the continuation ``" " + option``) and their count."""
    context = tokenizer.encode(prompt, add_bos=True)
    full = tokenizer.encode(prompt + " " + option, add_bos=True)
    # BPE may merge across the seam; score every token past the shared prefix
    start = next((i for i, (a, b) in enumerate(zip(context, full)) if a != b), min(len(context), len(full)))
    start = max(start, 1)
    logits = np.asarray(forward(np.asarray([full], dtype=np.int64)))[0]  # (T, V)
    logp = log_softmax(logits[start - 1: len(full) - 1])  # rows predicting tokens start..end-1
    return float(logp[np.arange(len(full) - start), full[start:]].sum()), len(full) - start


def score_choices(forward: Any, tokenizer: Any, choices: Sequence[Choice]) -> dict[str, dict[str, float]]:
    """Accuracy per kind and overall, by summed and by per-token log-likelihood."""
    hits: dict[str, list[tuple[int, int]]] = {}
    for c in choices:
        scored = [option_logprob(forward, tokenizer, c.prompt, o) for o in c.options]
        total = int(np.argmax([s for s, _ in scored]))
        mean = int(np.argmax([s / max(n, 1) for s, n in scored]))
        hits.setdefault(c.kind, []).append((int(total == c.answer), int(mean == c.answer)))
    out: dict[str, dict[str, float]] = {"accuracy": {}, "accuracy_per_token": {}}
    every = [h for v in hits.values() for h in v]
    for kind, h in [("overall", every), *sorted(hits.items())]:
        out["accuracy"][kind] = sum(a for a, _ in h) / len(h)
        out["accuracy_per_token"][kind] = sum(b for _, b in h) / len(h)
    return out
