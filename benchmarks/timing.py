"""Timing discipline shared by the benchmark scripts: one allocator setting, one way to time.

Scripts run as ``python benchmarks/X.py``, so this folder is on sys.path and they import it as
``timing``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from deploykit.bench.machine import ALLOCATOR_ENV


def use_bench_allocator() -> dict[str, str]:
    """Re-exec this script with the bench's malloc settings unless they are already set.

    glibc reads them at start-up only. Without them, large freed blocks go back to the OS and every
    call faults them in again, which decides small benchmarks here (see FACTS.md).
    """
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})
    return dict(ALLOCATOR_ENV)


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeat: int, *, warmup: int = 3,
                       with_min: bool = False) -> dict[str, float]:
    """Median seconds per contender, timed round-robin so that load changes on a shared machine hit
    every contender alike. ``with_min`` adds ``<name>_min`` (the best run) for each contender."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in ts.items()}
    if with_min:
        out |= {f"{k}_min": min(v) for k, v in ts.items()}
    return out


def timeit_blocks(fns: dict[str, Callable[[], object]], rounds: int, block: int, *, warmup: int = 3,
                  with_min: bool = False, raw: bool = False) -> dict[str, Any]:
    """Median seconds per call per contender, timed in round-robin *blocks*: each round runs every
    contender ``block`` times back to back and keeps the calls after the first.

    One call per turn (``timeit_interleaved``) charges each contender for its neighbour's idle
    threads: after an OpenMP call (fbgemm, oneDNN) the workers spin for a while, and a kernel with
    its own thread pool that runs next finds its second core taken (on 2 CPUs this tripled the
    mid-sized native GEMMs). Dropping each block's first call leaves that hand-over out, while the
    rounds still spread slow load changes over every contender alike. ``raw`` returns every timed
    call's seconds per contender instead of the median."""
    if block < 2:
        raise ValueError(f"block must be >= 2 (its first call is the hand-over), got {block}")
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()  # the hand-over call, untimed
            for _ in range(block - 1):
                t0 = time.perf_counter()
                f()
                ts[k].append(time.perf_counter() - t0)
    if raw:
        return ts
    out = {k: statistics.median(v) for k, v in ts.items()}
    if with_min:
        out |= {f"{k}_min": min(v) for k, v in ts.items()}
    return out


def decode_once(runner, prompt: list[int], tokens: list[int]) -> float:
    """Tokens/s of one decode run: fixed tokens fed one at a time through the runner's KV cache."""
    session = runner.new_session()
    session.feed(prompt)
    t0 = time.perf_counter()
    for t in tokens:
        session.feed([t])
    return len(tokens) / (time.perf_counter() - t0)


def prefill_once(runner, ids: list[int]) -> float:
    """Tokens/s of one prefill: a fresh session fed the whole prompt at once (last position's logits)."""
    session = runner.new_session()
    t0 = time.perf_counter()
    session.feed(ids)
    return len(ids) / (time.perf_counter() - t0)


def rates_interleaved(fns: dict[str, Callable[[], float]], repeat: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Rates (each call returns tokens/s) per contender: warm-up, then ``repeat`` round-robin rounds;
    median, min, max and n."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            runs[k].append(f())
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for k, v in runs.items()}
