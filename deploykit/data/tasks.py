"""Verifiable tasks written as plain text, for training and for exact-match evaluation.

Every example has one fixed template, ``"Q: 23+58=? A: 81"``: the model is given the prompt
(``"Q: 23+58=? A:"``), completes it greedily, and the text up to the first newline (or eos),
stripped, must equal the answer.

Train and eval examples can never coincide, whatever seeds are used: each possible prompt belongs
to exactly one split, decided by a stable hash of its text (1 in ``EVAL_BUCKETS`` goes to eval).
Seeds only choose which examples of a split are drawn.
"""
from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from deploykit.errors import ConfigError, DataError

Split = Literal["train", "eval"]
TASK_KINDS: tuple[str, ...] = ("add", "sub", "mul", "reverse", "sort", "recall")
EVAL_BUCKETS = 10  # 1/10 of all prompts are reserved for evaluation
DEFAULT_EVAL_SEED = 1  # conventional seed for the held-out eval set (any seed is disjoint from train)

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class TaskExample:
    kind: str
    prompt: str  # ends with "A:"; the model continues with " " + answer
    answer: str

    @property
    def text(self) -> str:
        """The full training line."""
        return f"{self.prompt} {self.answer}"


# ---- generators: each returns (prompt body, answer) ---------------------------------------------


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=?", str(a + b)


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)  # non-negative results keep the task small-model friendly
    return f"{a}-{b}=?", str(a - b)


def _mul(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"{a}*{b}=?", str(a * b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    # Letters are space-separated so each is its own token: the task is about order, not spelling.
    letters = [rng.choice(_LETTERS) for _ in range(rng.randint(3, 6))]
    return f"reverse {' '.join(letters)}", " ".join(reversed(letters))


def _sort(rng: random.Random) -> tuple[str, str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    return f"sort {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))


def _recall(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(_LETTERS, rng.randint(2, 4))
    values = [rng.randint(0, 9) for _ in keys]
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    i = rng.randrange(len(keys))
    return f"{pairs} ; {keys[i]}=?", str(values[i])


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "reverse": _reverse,
    "sort": _sort,
    "recall": _recall,
}


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to; fixed forever by a stable hash (crc32, not ``hash()``,
    which is salted per process)."""
    return "eval" if zlib.crc32(prompt.encode("utf-8")) % EVAL_BUCKETS == 0 else "train"


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return TASK_KINDS
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = [k for k in kinds if k not in _GENERATORS]
    if unknown or not kinds:
        raise ConfigError(
            f"task kinds {list(kinds)!r}: unknown or empty {unknown!r}",
            hint=f"choose from {list(TASK_KINDS)}",
        )
    return tuple(kinds)


def task_examples(
    n: int, seed: int, kinds: Sequence[str] | None = None, *, split: Split = "eval"
) -> list[TaskExample]:
    """``n`` examples cycling through ``kinds`` (balanced), deterministic in ``seed``.

    ``split="eval"`` (the default, for evaluation) draws only held-out prompts; the training corpus
    uses ``split="train"``. The two never share a prompt.
    """
    if n < 0:
        raise ConfigError(f"n={n} must be >= 0", hint="pass the number of examples wanted")
    if split not in ("train", "eval"):
        raise ConfigError(f"split={split!r} must be 'train' or 'eval'", hint="pass split='eval'")
    kinds_t = _check_kinds(kinds)
    # Mix the split into the seed so train and eval with the same seed are unrelated streams.
    rng = random.Random(f"{seed}:{split}")
    out: list[TaskExample] = []
    for i in range(n):
        kind = kinds_t[i % len(kinds_t)]
        gen = _GENERATORS[kind]
        # Rejection sampling: ~1/EVAL_BUCKETS of draws fit eval, so 10_000 tries is ample.
        for _ in range(10_000):
            body, answer = gen(rng)
            prompt = f"Q: {body} A:"
            if split_of(prompt) == split:
                out.append(TaskExample(kind, prompt, answer))
                break
        else:  # pragma: no cover - only if a kind's prompt space had no prompt in this split
            raise DataError(
                f"task kind {kind!r} has no {split} prompts", hint="report this as a bug"
            )
    return out


def task_documents(n_chars: int, seed: int = 0, *, split: Split = "train") -> list[str]:
    """Documents of 1-6 task lines (newline-separated, mixed kinds) totalling >= ``n_chars``.

    Several lines per document teach the model that an answer ends at a newline; the last line
    of a document ends at eos, which the packer inserts.
    """
    rng = random.Random(f"docs:{seed}:{split}")
    docs: list[str] = []
    total = 0
    chunk = 0
    while total < n_chars:
        # Draw examples in chunks with a derived seed so documents do not depend on n_chars.
        examples = task_examples(600, seed=seed * 100_003 + chunk, split=split)
        rng.shuffle(examples)
        chunk += 1
        i = 0
        while i < len(examples) and total < n_chars:
            k = rng.randint(1, 6)
            doc = "\n".join(e.text for e in examples[i : i + k])
            docs.append(doc)
            total += len(doc)
            i += k
    return docs


def extract_answer(completion: str) -> str:
    """The answer part of a greedy completion: text before the first newline, stripped."""
    return completion.split("\n", 1)[0].strip()


def score_exact_match(
    examples: Sequence[TaskExample], completions: Sequence[str]
) -> dict[str, float]:
    """Exact-match accuracy: ``{"overall": ..., "<kind>": ...}`` for each kind present.

    ``completions[i]`` is the model's continuation of ``examples[i].prompt`` (without the prompt).
    """
    if len(examples) != len(completions):
        raise DataError(
            f"score_exact_match got {len(examples)} examples but {len(completions)} completions",
            hint="pass one completion per example, in the same order",
        )
    if not examples:
        raise DataError("score_exact_match got no examples", hint="pass at least one example")
    hits: dict[str, list[int]] = {}
    for ex, comp in zip(examples, completions):
        hits.setdefault(ex.kind, []).append(int(extract_answer(comp) == ex.answer))
    scores = {"overall": sum(sum(h) for h in hits.values()) / len(examples)}
    for kind in sorted(hits):
        scores[kind] = sum(hits[kind]) / len(hits[kind])
    return scores
