"""The bench's pre-imported worker launcher (deploykit.bench.zygote) and its conversions ahead of time.

Jobs are real bench workers. One whose inputs are a FIFO blocks in np.load until the test writes to
it, so the test can look at the running child: forked from the zygote, in a session of its own, with
the workers' environment; then a byte of garbage makes the worker fail, write its result and exit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from deploykit.bench.harness import (
    BenchConfig,
    Context,
    Planned,
    _Silent,
    conversion_order,
    convert_ahead,
    run_worker,
    worker_env,
)
from deploykit.bench.zygote import Launcher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote runs on Linux only")


def _blocking_spec(tmp: Path, name: str) -> tuple[Path, Path]:
    """A measure spec whose inputs are a FIFO: the worker blocks opening it until someone writes."""
    fifo = tmp / f"{name}.fifo"
    os.mkfifo(fifo)
    spec = tmp / f"{name}.spec.json"
    spec.write_text(json.dumps({"phase": "measure", "backend": "torch", "scheme": "fp32", "artifact": str(tmp),
                                "threads": 1, "inputs": str(fifo), "result": str(tmp / f"{name}.result.json")}))
    return spec, fifo


def _children(launcher: Launcher, n: int, timeout: float = 120.0) -> list[psutil.Process]:
    zygote = psutil.Process(launcher.zygote_pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = zygote.children()
        if len(kids) >= n:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"the zygote forked {len(zygote.children())} of {n} jobs in {timeout:.0f} s")


def _release(fifo: Path) -> None:
    with open(fifo, "wb") as f:  # opening the write end unblocks the worker's open; garbage fails np.load
        f.write(b"not an npz")


def test_a_job_is_a_forked_child_in_its_own_session_with_the_workers_env(tmp_path: Path) -> None:
    env = {**worker_env(1, tmp_path), "DEPLOYKIT_ZYGOTE_TEST": "seen"}
    spec, fifo = _blocking_spec(tmp_path, "job")
    with Launcher(env) as launcher:
        assert launcher.zygote_alive
        with ThreadPoolExecutor(1) as pool:
            rc = pool.submit(launcher.run, spec, tmp_path / "job.log", 120)
            (child,) = _children(launcher, 1)
            deadline = time.monotonic() + 60  # setsid is the forked child's first step; it may not have run yet
            while os.getsid(child.pid) != child.pid and time.monotonic() < deadline:
                time.sleep(0.02)
            assert child.pid != launcher.zygote_pid and os.getsid(child.pid) == child.pid
            assert child.environ().get("DEPLOYKIT_ZYGOTE_TEST") == "seen"
            assert child.environ().get("OMP_NUM_THREADS") == "1"
            _release(fifo)
            assert rc.result(timeout=120) == 1
    result = json.loads((tmp_path / "job.result.json").read_text())
    assert result["ok"] is False and "np.load" in result["traceback"]  # it failed reading the FIFO, as arranged


def test_two_jobs_at_once_each_get_their_own_exit(tmp_path: Path) -> None:
    specs = [_blocking_spec(tmp_path, f"j{i}") for i in range(2)]
    with Launcher(worker_env(1, tmp_path)) as launcher, ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(launcher.run, s, tmp_path / f"j{i}.log", 120) for i, (s, _) in enumerate(specs)]
        assert len(_children(launcher, 2)) == 2
        _release(specs[1][1])
        assert futures[1].result(timeout=120) == 1 and not futures[0].done()  # the second ends alone
        _release(specs[0][1])
        assert futures[0].result(timeout=120) == 1


def test_a_timed_out_job_is_killed_with_its_session_and_the_zygote_goes_on(tmp_path: Path) -> None:
    spec, _ = _blocking_spec(tmp_path, "slow")
    with Launcher(worker_env(1, tmp_path)) as launcher:
        result = run_worker(json.loads(spec.read_text()), tmp_path, "slow", 20, 1, launcher)
        assert result["ok"] is False and result["error"].startswith("timed out after 20 s")
        assert psutil.Process(launcher.zygote_pid).children() == []  # killed and reaped
        bad = {"phase": "measure", "artifact": str(tmp_path), "threads": 1, "inputs": str(tmp_path / "none.npz")}
        after = run_worker(bad, tmp_path, "after", 120, 1, launcher)
        assert after["ok"] is False and "none.npz" in after["traceback"] and launcher.zygote_alive


def test_a_dead_zygote_falls_back_to_plain_subprocesses(tmp_path: Path) -> None:
    with Launcher(worker_env(1, tmp_path)) as launcher:
        os.kill(launcher.zygote_pid, 9)
        deadline = time.monotonic() + 30
        while launcher.zygote_alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not launcher.zygote_alive
        bad = {"phase": "measure", "artifact": str(tmp_path), "threads": 1, "inputs": str(tmp_path / "none.npz")}
        result = run_worker(bad, tmp_path, "plain", 120, 1, launcher)
        assert result["ok"] is False and "none.npz" in result["traceback"]  # a real worker ran and reported


def test_convert_ahead_starts_each_backends_first_scheme_first_with_a_share_of_the_threads(
        nano_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deploykit.bench import harness

    calls: list[tuple[str, str, int, int | None]] = []
    lock = threading.Lock()

    def fake_ensure(ctx: Any, backend: str, scheme: str, index: int = 0, threads: int | None = None) -> Any:
        with lock:
            calls.append((backend, scheme, index, threads))
        return Path(f"/art/{backend}-{scheme}"), {"ok": True, "cached": False, "convert_s": 1.0}

    monkeypatch.setattr(harness, "ensure_artifact", fake_ensure)
    planned = [Planned("torch", "fp32"), Planned("torch", "bf16"), Planned("onnx", "fp32"), Planned("onnx", "fp16"),
               Planned("ghost", "fp32", reason="no Ghost NPU"), Planned("gguf", "q8_0")]
    cfg = BenchConfig(model=nano_checkpoint, out=tmp_path / "out", threads=4, convert_jobs=2)
    ctx = Context(cfg, {}, "sha", "nano", tmp_path, _Silent())
    done = convert_ahead(ctx, planned)
    assert sorted(done) == [0, 1, 2, 3, 5]  # every runnable row, none for the unavailable one
    assert conversion_order(planned) == [0, 2, 5, 3, 1]  # each backend's first, then the last declared first
    assert {c[3] for c in calls} == {2}  # 4 threads shared by 2 jobs
    assert done[3][0] == Path("/art/onnx-fp16")
    one = Context(BenchConfig(model=nano_checkpoint, out=tmp_path / "o", convert_jobs=1), {}, "sha", "nano", tmp_path,
                  _Silent())
    assert convert_ahead(one, planned) == {}  # one job: each row converts just before it is measured


def test_convert_jobs_is_validated_and_shown_in_the_report(nano_checkpoint: Path, tmp_path: Path) -> None:
    from deploykit.bench.report import _convert_jobs
    from deploykit.errors import ConfigError

    with pytest.raises(ConfigError, match="--convert-jobs 0"):
        BenchConfig(model=nano_checkpoint, out=tmp_path / "o", convert_jobs=0)
    assert _convert_jobs({"convert_jobs": 1, "threads": 2}) == ""
    assert "2 at a time with 1 thread each" in _convert_jobs({"convert_jobs": 2, "threads": 2})


def test_the_cli_passes_convert_jobs(nano_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deploykit.bench import progress
    from deploykit.cli.main import main

    seen: list[BenchConfig] = []

    def fake_run(cfg: BenchConfig, **kw: Any) -> dict[str, Any]:
        seen.append(cfg)
        return {"rows": [{"status": "ok"}]}

    monkeypatch.setattr(progress, "run_bench_with_progress", fake_run)
    assert main(["bench", str(nano_checkpoint), "--out", str(tmp_path / "o"), "--convert-jobs", "2", "--json"]) == 0
    assert seen and seen[0].convert_jobs == 2
    out = subprocess.run([sys.executable, "-m", "deploykit", "bench", "--help"], capture_output=True, text=True)
    assert "--convert-jobs" in out.stdout
