"""benchmarks/timing.py's round-robin block timing: which calls are timed, in which order."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timing  # noqa: E402


def test_blocks_run_each_contender_back_to_back_and_time_all_but_the_first_call(monkeypatch):
    log: list[str] = []
    clock = iter(range(10_000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))  # every timed call "takes" 1
    out = timing.timeit_blocks({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, rounds=2, block=3,
                               warmup=1, with_min=True)
    assert log == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # warm-up, then rounds of blocks
    assert out == {"a": 1, "b": 1, "a_min": 1, "b_min": 1}


def test_a_block_needs_room_for_its_untimed_first_call():
    with pytest.raises(ValueError, match="block must be >= 2"):
        timing.timeit_blocks({"a": lambda: None}, rounds=1, block=1)
