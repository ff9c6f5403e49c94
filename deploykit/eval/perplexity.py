"""Perplexity with a sliding window: every token after the first is scored exactly once, each with
as much left context as the window allows.

Windows start every ``stride`` tokens and span up to ``window`` tokens; a window scores only the
targets the previous window did not reach, so with ``stride == window`` the text is cut into
blocks that overlap by one token (the cheapest, least context) and with a small stride each token
sees at least ``window - stride`` tokens of context (closer to the model's true perplexity, more
compute).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # targets scored: len(stream) - 1
    windows: int
    window: int
    stride: int


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., V) float64 log-probabilities, stable for large logits."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` per window over a stream of n tokens: the window feeds tokens
    [begin, end) and scores the targets at positions [first_target, end), each position once."""
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(f"window={window}, stride={stride}: need window >= 2 and 1 <= stride <= window",
                          hint="e.g. --window 256 --stride 128")
    out, scored_to = [], 1  # position 0 has no left context: never a target
    begin = 0
    while scored_to < n:
        # A window's first token is context only (nothing in the window predicts it), so a window
        # must start before the first unscored target: disjoint blocks would drop one token per
        # block (the usual off-by-one of "stride = window"); they overlap by one token instead.
        begin = min(begin, scored_to - 1)
        end = min(begin + window, n)
        if end > scored_to:
            out.append((begin, end, scored_to))
            scored_to = end
        begin += stride
    return out


def sliding_perplexity(forward: Any, stream: Sequence[int], *, window: int, stride: int) -> Perplexity:
    """``forward(ids (1, T)) -> logits (1, T, V)`` over ``stream``; the perplexity of its tokens.

    ``window`` is the number of tokens fed per forward (at most the model's max length): a window
    spans ``window + 1`` tokens, since its last token is only a target.
    """
    ids = np.asarray(stream, dtype=np.int64)
    if len(ids) < 2:
        raise DataError(f"perplexity needs at least 2 tokens, got {len(ids)}", hint="pass more held-out text")
    if window < 1 or not 1 <= stride <= window:
        raise ConfigError(f"window={window}, stride={stride}: need 1 <= stride <= window",
                          hint="e.g. --window 256 --stride 128")
    total, count, spans = 0.0, 0, windows(len(ids), window + 1, stride)
    for begin, end, first in spans:
        logits = np.asarray(forward(ids[None, begin:end - 1]))[0]  # (T, V): row t predicts token begin + t + 1
        logp = log_softmax(logits[first - begin - 1: end - begin - 1])  # rows predicting first..end-1
        total -= float(logp[np.arange(end - first), ids[first:end]].sum())
        count += end - first
    assert count == len(ids) - 1  # every target once: the accounting the windows promise
    nll = total / count
    return Perplexity(math.exp(min(nll, 700.0)), nll, count, len(spans), window, stride)
