"""One evaluation suite for checkpoints and every artifact, through the Runner API.

``evaluate(path, EvalConfig()) -> dict`` loads ``path`` with ``deploykit.load`` (a checkpoint folder
or any backend's artifact) and measures, on held-out data the model never trained on:

- perplexity with a sliding window and stride (``perplexity.py``);
- generation tasks — greedy completions of the verifiable tasks' eval split (or a JSONL file of
  ``prompt``/``answer``), scored by exact match, token F1, BLEU and ROUGE-L (``metrics.py``);
- multiple choice by log-likelihood on a set built from the same tasks (``choice.py``).

The bench and ``deploykit eval`` call the same functions, so a number means the same everywhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

__all__ = ["EvalConfig", "evaluate", "evaluate_runner"]

DEFAULT_TEXT_SEED = 90_210  # the bench's held-out text seed: never a training seed


@dataclass(frozen=True)
class EvalConfig:
    data: str | None = None  # text file/folder/glob for perplexity; None: the embedded held-out text
    tasks: str | None = None  # JSONL of {"prompt", "answer"[, "task"]}; None: the embedded eval tasks
    ppl_tokens: int = 4096  # tokens of held-out text scored
    window: int = 256
    stride: int = 128
    n_tasks: int = 60  # generation prompts (kinds balanced)
    n_choices: int = 60  # multiple-choice questions
    max_new_tokens: int = 16
    suites: tuple[str, ...] = ("perplexity", "generation", "choice")

    def __post_init__(self) -> None:
        object.__setattr__(self, "suites", tuple(self.suites))
        unknown = set(self.suites) - {"perplexity", "generation", "choice"}
        if unknown or not self.suites:
            raise ConfigError(f"suites {sorted(unknown) or '[]'} unknown or empty",
                              hint="choose from perplexity, generation, choice")
        for name in ("ppl_tokens", "window", "stride", "n_tasks", "n_choices", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1", hint=f"pass a positive {name}")


def _held_out_stream(cfg: EvalConfig, tokenizer: Any) -> list[int]:
    from ..data import english_documents, load_texts, task_documents

    if cfg.data is not None:
        texts = load_texts(cfg.data)
    else:
        prose = english_documents(60_000, seed=DEFAULT_TEXT_SEED)
        texts = [d for pair in zip(prose, task_documents(15_000, seed=DEFAULT_TEXT_SEED, split="eval"))
                 for d in pair]
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_bos=True, add_eos=True)
        if len(stream) >= cfg.ppl_tokens:
            break
    return stream[: cfg.ppl_tokens]


def _task_examples(cfg: EvalConfig) -> list[tuple[str, str, str]]:
    """(kind, prompt, answer) triples."""
    if cfg.tasks is None:
        from ..data.tasks import task_examples

        return [(e.kind, e.prompt, e.answer) for e in task_examples(cfg.n_tasks, seed=1, split="eval")]
    from ..data.loading import jsonl_records

    out = []
    for n, rec in jsonl_records(Path(cfg.tasks), missing_hint="pass a JSONL file of prompts and answers"):
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("answer"), str)):
            raise DataError(f"{cfg.tasks}:{n}: needs string fields 'prompt' and 'answer'",
                            hint='e.g. {"prompt": "Q: 2+2=? A:", "answer": "4", "task": "add"}')
        out.append((str(rec.get("task", "default")), rec["prompt"], rec["answer"]))
    if not out:
        raise DataError(f"{cfg.tasks}: no tasks", hint="one JSON object per line")
    return out


def generation_scores(runner: Any, tokenizer: Any, examples: list[tuple[str, str, str]], max_new_tokens: int
                      ) -> dict[str, Any]:
    from .metrics import corpus_bleu, exact_match, rouge_l, token_f1

    preds = []
    for _, prompt, _ in examples:
        new = runner.generate(tokenizer.encode(prompt, add_bos=True), max_new_tokens, stop=("\n",))
        preds.append(tokenizer.decode(new))
    by_kind: dict[str, list[int]] = {}
    for i, (kind, _, _) in enumerate(examples):
        by_kind.setdefault(kind, []).append(i)
    out: dict[str, Any] = {}
    for kind, idx in [("overall", list(range(len(examples)))), *sorted(by_kind.items())]:
        p = [preds[i] for i in idx]
        r = [examples[i][2] for i in idx]
        out[kind] = {"exact_match": sum(map(exact_match, p, r)) / len(idx),
                     "token_f1": sum(map(token_f1, p, r)) / len(idx),
                     "bleu": corpus_bleu(p, r), "rouge_l": rouge_l(p, r), "n": len(idx)}
    return out


def evaluate_runner(runner: Any, tokenizer: Any, cfg: EvalConfig = EvalConfig()) -> dict[str, Any]:
    """Every suite of ``cfg`` on a loaded runner."""
    from .choice import embedded_choices, score_choices
    from .perplexity import sliding_perplexity

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    max_length = runner.input_limits()[1]
    if "perplexity" in cfg.suites:
        window = min(cfg.window, max_length) if max_length else cfg.window
        p = sliding_perplexity(runner.forward, _held_out_stream(cfg, tokenizer), window=window,
                               stride=min(cfg.stride, window))
        out["perplexity"] = {"ppl": p.ppl, "nll": p.nll, "tokens": p.tokens, "windows": p.windows,
                             "window": p.window, "stride": p.stride, "data": cfg.data or "embedded held-out text"}
    if "generation" in cfg.suites:
        out["generation"] = generation_scores(runner, tokenizer, _task_examples(cfg), cfg.max_new_tokens)
    if "choice" in cfg.suites:
        out["choice"] = {**score_choices(runner.forward, tokenizer, embedded_choices(cfg.n_choices)),
                         "n": cfg.n_choices, "chance": 0.25}
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate(path: str | Path, cfg: EvalConfig = EvalConfig(), *, threads: int | None = None) -> dict[str, Any]:
    """Load a checkpoint or artifact and run :func:`evaluate_runner` on it."""
    from .. import load
    from ..deploy.runtime import load_tokenizer

    path = Path(path)
    runner = load(path, threads=threads) if threads else load(path)
    tokenizer = getattr(runner, "tokenizer", None) or load_tokenizer(path)
    if tokenizer is None:
        raise DataError(f"{path}: no tokenizer.json, so its text cannot be evaluated",
                        hint="convert again from a checkpoint that has its tokenizer")
    return {"path": str(path), "backend": runner.info.backend, "quant": runner.info.quant,
            **evaluate_runner(runner, tokenizer, cfg)}
