"""What a valid model input is: token ids and generation settings, one rule each, one error each.

Every path into a model goes through these rules — ``Runner.forward``, decode sessions and
``Runner.generate`` for every backend (``deploykit.deploy.backend`` applies them in the contract),
``deploykit.generate`` and ``deploykit generate`` — so a bad input gets the same one-line
:class:`~deploykit.errors.ConfigError` everywhere instead of whatever a runtime does with it (ONNX
Runtime's Gather wraps negative ids, torch raises a bare IndexError, numpy's sampler crashes on a
negative seed). Each rule takes the input's ``name`` so the message says what the caller typed:
``temperature=nan`` from Python, ``--temperature nan`` from the CLI.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError

_INT64_MAX = int(np.iinfo(np.int64).max)
_IDS_HINT = "pass integer token ids from this model's tokenizer, e.g. [[1, 40, 41]] or np.array(ids, dtype=np.int64)"
_SHAPES_HINT = "one sequence: shape (T,); a batch of equal-length sequences: shape (B, T)"


def _given(name: str, value: object) -> str:
    """How the caller wrote the input: ``--seed -1`` for a CLI flag, ``seed=-1`` for an argument."""
    return f"{name} {value!r}" if name.startswith("--") else f"{name}={value!r}"


def _integer_array(values: Any, name: str) -> np.ndarray:
    """``values`` as a non-empty numpy array of Python-int or integer dtype (any shape), else a ConfigError
    naming what it holds instead. Range and shape are the callers' to check."""
    if isinstance(values, (str, bytes)):
        raise ConfigError(f"{name} must be token ids, got text {values[:40]!r}",
                          hint="encode it first (runner.tokenizer.encode(text)), or pass the text to generate()")
    if hasattr(values, "detach"):  # a torch tensor: numpy has no bfloat16, so refuse by torch's dtype name
        try:
            values = values.detach().cpu().numpy()
        except (TypeError, RuntimeError):
            raise ConfigError(f"{name} must hold integer token ids, got a tensor of {values.dtype}",
                              hint=_IDS_HINT) from None
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError):  # ragged nested lists: numpy refuses inhomogeneous shapes
        raise ConfigError(f"{name} must be a rectangular array of token ids; its rows have different lengths "
                          "or it mixes numbers and sequences",
                          hint=_SHAPES_HINT + "; pad rows or call once per row") from None
    if arr.size == 0:
        raise ConfigError(f"{name} is empty (shape {arr.shape})",
                          hint="pass at least one token id (e.g. the bos token)")
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype == object and all(type(v) is int for v in arr.flat):
        return arr  # Python ints too large for int64: the range check names them
    if arr.dtype == object:
        odd = next(v for v in arr.flat if type(v) is not int)
        what = f"a {type(odd).__name__} ({odd!r:.40})"
    else:
        kind = {"b": " (bool is not a token id)", "U": " (text)", "S": " (bytes)"}.get(arr.dtype.kind, "")
        what = f"dtype {arr.dtype}{kind}"
    raise ConfigError(f"{name} must hold integer token ids, got {what}", hint=_IDS_HINT)


def _shape(arr: np.ndarray) -> str:
    return "a single id" if arr.ndim == 0 else f"shape {arr.shape}"


def _check_range(arr: np.ndarray, vocab_size: int | None, name: str) -> None:
    """Every id in [0, vocab_size) (just >= 0 and int64 when the vocabulary is unknown)."""
    lo, hi = int(arr.min()), int(arr.max())
    limit = _INT64_MAX + 1 if vocab_size is None else vocab_size
    if lo < 0 or hi >= limit:
        bound = f"[0, {vocab_size}) (vocab_size={vocab_size})" if vocab_size is not None else "non-negative int64"
        got = f"id {lo}" if lo == hi else f"ids from {lo} to {hi}"
        raise ConfigError(f"{name} must be token ids in {bound}, got {got}",
                          hint="ids come from this model's tokenizer; a negative id or one >= vocab_size "
                          "is never valid")


def token_batch(values: Any, *, vocab_size: int | None = None, max_length: int | None = None,
                name: str = "input_ids") -> np.ndarray:
    """``values`` (numpy array, torch tensor or nested list; (B, T) or (T,)) as a C-contiguous int64
    array (B, T) with every id in [0, vocab_size) and T <= max_length (None: that limit is unknown)."""
    arr = _integer_array(values, name)
    if arr.ndim == 1:
        arr = arr[None, :]  # (1, T)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must have shape (B, T) or (T,), got {_shape(arr)}", hint=_SHAPES_HINT)
    _check_range(arr, vocab_size, name)
    if max_length is not None and arr.shape[1] > max_length:
        raise ConfigError(f"{name} has {arr.shape[1]} tokens per sequence, more than this model's "
                          f"max_length={max_length}", hint=f"keep at most the last {max_length} tokens")
    return np.ascontiguousarray(arr, dtype=np.int64)


def token_list(values: Any, *, vocab_size: int | None = None, name: str = "token_ids") -> list[int]:
    """One sequence of token ids ((T,), T >= 1, each in [0, vocab_size)) as a list of Python ints."""
    if type(values) in (list, tuple) and values and all(type(v) is int for v in values):
        # The decode loop feeds one plain int per step: checked in ~0.4 µs here, ~3 µs through numpy.
        lo, hi = min(values), max(values)
        if lo >= 0 and hi < (vocab_size if vocab_size is not None else _INT64_MAX + 1):
            return list(values)
    arr = _integer_array(values, name)
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be one sequence of token ids (shape (T,)), got {_shape(arr)}",
                          hint="e.g. [1, 40, 41]; for a batch call forward() instead")
    _check_range(arr, vocab_size, name)
    return [int(v) for v in arr]


def check_prompt_length(prompt_len: int, max_new_tokens: int, max_length: int | None, name: str = "prompt") -> None:
    """The prompt fits the model's context and, when new tokens are asked for, leaves room for one."""
    if max_length is None:
        return
    if prompt_len > max_length:
        raise ConfigError(f"{name} has {prompt_len} tokens, more than this model's max_length={max_length}",
                          hint=f"shorten it to at most {max_length - 1} tokens so that new tokens fit")
    if prompt_len == max_length and max_new_tokens > 0:
        raise ConfigError(f"{name} has {prompt_len} tokens and fills this model's max_length={max_length}, "
                          "leaving no room for new tokens", hint=f"shorten it to at most {max_length - 1} tokens")


# -- generation settings ---------------------------------------------------------------------------
def _finite(value: object, name: str, rule: str, example: str) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise ConfigError(f"{_given(name, value)} must be a finite number {rule}",
                          hint=f"e.g. {_example(name, example)}")
    return float(value)


def _integer(value: object, name: str, rule: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{_given(name, value)} must be an integer {rule}", hint=f"e.g. {_example(name, example)}")
    return int(value)


def _example(name: str, example: str) -> str:
    return f"{name} {example}" if name.startswith("--") else f"{name}={example}"


def check_temperature(value: object, name: str = "temperature") -> float:
    t = _finite(value, name, ">= 0 (0 = greedy)", "0.8")
    if t < 0:
        raise ConfigError(f"{_given(name, value)} must be >= 0 (0 = greedy)", hint=f"e.g. {_example(name, '0.8')}")
    return t


def check_top_p(value: object, name: str = "top_p") -> float:
    p = _finite(value, name, "in (0, 1] (1 = off)", "0.9")
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"{_given(name, value)} must be in (0, 1] (1 = off)", hint=f"e.g. {_example(name, '0.9')}")
    return p


def check_top_k(value: object, name: str = "top_k") -> int:
    return _integer(value, name, ">= 0 (0 = off)", "50")


def check_seed(value: object, name: str = "seed") -> int | None:
    if value is None:
        return None
    fresh = "leave it out" if name.startswith("--") else "None"
    return _integer(value, name, f">= 0 ({fresh} for a fresh random seed)", "1")


def check_max_new_tokens(value: object, name: str = "max_new_tokens") -> int:
    return _integer(value, name, ">= 0", "64")


def check_stop(value: object, name: str = "stop") -> tuple[str, ...]:
    """Stop strings as a tuple; a single string is one stop string, not one per character."""
    example = _example(name, "'.'" if name.startswith("--") else repr(["\n"]))
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence):
        raise ConfigError(f"{_given(name, value)} must be a list of strings", hint=f"e.g. {example}")
    for s in value:
        if not isinstance(s, str) or not s:
            what = "empty" if s == "" else "not a string"
            raise ConfigError(f"{_given(name, s)} is {what}: each stop string must be non-empty text "
                              "(an empty one would match before the first token)",
                              hint=f"remove it, or give the text to stop at, e.g. {example}")
    return tuple(value)
