"""The quiet-machine rule (deploykit.bench.quiet) through the CLI, the harness and the benchmark scripts.

The load average is faked (``os.getloadavg``) and the CPU count fixed at 2 (threshold 1.5), so these
tests mean the same on a busy machine and an idle one. Folders called ``benchmarks/results`` under
tmp_path stand for the committed one: the rule matches any such folder, so nothing here writes into
the repository's own benchmarks/results/. Refusals happen before measuring; the one full measurement
uses the smallest settings, the other allow paths stub the row measurement (``harness.bench_row``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from deploykit.bench import BenchConfig, harness, machine, quiet, run_bench
from deploykit.bench.quiet import BusyMachineError, QuietGuard, is_committed_results, load_lines
from deploykit.cli.main import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
CPUS = 2  # threshold 0.75 * 2 = 1.5
QUIET, BUSY = 0.2, 6.0  # BUSY stays over the threshold after discounting a run's 1 or 2 threads


class FakeLoad:
    """Stands in for os.getloadavg: ``value`` is the 1-minute load (5 and 15 follow it loosely)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> tuple[float, float, float]:
        return self.value, self.value * 0.9, self.value * 0.8


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeLoad:
    fake = FakeLoad(QUIET)
    # Reports diverted off benchmarks/results/ go to a fresh temporary folder: keep those in tmp_path.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(os, "getloadavg", fake)
    monkeypatch.setattr(quiet, "available_cpus", lambda: CPUS)
    monkeypatch.setattr(machine, "available_cpus", lambda: CPUS)  # the machine block and busy_warning
    return fake


@pytest.fixture
def committed(tmp_path: Path) -> Path:
    return tmp_path / "checkout" / "benchmarks" / "results"


@pytest.fixture
def torch_threads() -> Any:
    """Code under test sets torch's thread count for its process; give the suite its own back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _stub_row(ctx: Any, planned: Any, index: int, tokenizer: Any, tasks: Any, converted: Any = None) -> dict[str, Any]:
    """A measured-looking row without a worker: the guard tests are about where reports go."""
    from deploykit.bench.schema import empty_row

    row = empty_row(planned.backend, planned.scheme)
    row.update(size_bytes=1000, decode_tok_s=100.0, prefill_tok_s=1000.0, perplexity=10.0)
    return row


TINY = ["--backends", "torch", "--schemes", "torch:fp32", "--prompt-len", "8", "--gen-len", "4",
        "--repeat", "1", "--warmup", "0", "--eval-tokens", "64", "--tasks", "2", "--threads", "1"]


# -- the rule itself -------------------------------------------------------------------------------------------
def test_committed_results_are_any_benchmarks_results_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_committed_results(ROOT / "benchmarks" / "results")
    assert is_committed_results(tmp_path / "benchmarks" / "results" / "micro")
    assert not is_committed_results(tmp_path / "benchmarks")
    assert not is_committed_results(tmp_path / "results")
    assert not is_committed_results(tmp_path / "bench" / "micro")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks").mkdir()
    assert is_committed_results(Path("benchmarks/results/x"))  # relative paths are resolved first
    monkeypatch.chdir(tmp_path / "benchmarks")
    assert is_committed_results(Path("results"))


def test_busy_start_is_refused_for_committed_results_only(load: FakeLoad, committed: Path, tmp_path: Path) -> None:
    load.value = BUSY
    with pytest.raises(BusyMachineError) as e:
        QuietGuard.begin(committed, allow_busy=False, threads=2)
    text = str(e.value)
    assert "6.00" in text and "1.50" in text and "2 CPUs" in text, text  # the load, the threshold
    assert "--allow-busy" in e.value.hint and "idle machine" in e.value.hint
    assert e.value.exit_code == 75
    assert QuietGuard.begin(committed, allow_busy=True, threads=2).start.busy
    assert QuietGuard.begin(tmp_path / "elsewhere", allow_busy=False, threads=2).start.busy
    load.value = 1.5  # at the threshold is still quiet
    assert not QuietGuard.begin(committed, allow_busy=False, threads=2).start.busy


def test_threshold_scales_with_the_cpus(load: FakeLoad, committed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quiet, "available_cpus", lambda: 8)
    load.value = 5.9  # busy on 2 CPUs, quiet on 8 (threshold 6.0)
    assert QuietGuard.begin(committed, allow_busy=False, threads=2).start.threshold == 6.0
    load.value = 6.1
    with pytest.raises(BusyMachineError, match="6.00"):
        QuietGuard.begin(committed, allow_busy=False, threads=2)


def test_end_load_discounts_the_runs_own_threads_and_diverts_a_busy_run(load: FakeLoad, committed: Path) -> None:
    guard = QuietGuard.begin(committed, allow_busy=False, threads=2)
    load.value = 2.0 + 1.4  # a quiet 2-thread run: its own threads plus a little
    verdict = guard.finish(committed)
    assert not verdict.busy and not verdict.diverted and verdict.write_to == committed
    load.value = 2.0 + 1.6
    verdict = guard.finish(committed)
    assert verdict.end.busy and verdict.diverted and not is_committed_results(verdict.write_to)
    with pytest.raises(BusyMachineError, match="at the end of the run") as e:
        verdict.raise_if_diverted()
    assert str(verdict.write_to) in str(e.value) and "--allow-busy" in e.value.hint
    assert verdict.stamp()["diverted_from"] == str(committed)
    allowed = QuietGuard.begin(committed, allow_busy=True, threads=2).finish(committed)
    assert allowed.busy and not allowed.diverted
    assert not QuietGuard.begin(committed.parent, allow_busy=False, threads=2).finish(committed.parent).diverted


def test_load_lines_always_show_the_loads_and_stamp_a_busy_run(load: FakeLoad, committed: Path) -> None:
    quiet_stamp = QuietGuard.begin(committed, allow_busy=False, threads=1).finish(committed).stamp()
    lines = load_lines(quiet_stamp)
    assert len(lines) == 1 and "0.20/0.18/0.16 at the start" in lines[0] and "quiet below 1.50" in lines[0]
    load.value = BUSY
    stamp = QuietGuard.begin(committed, allow_busy=True, threads=1).finish(committed).stamp()
    assert stamp["measured_on_busy_machine"] and stamp["busy_at_start"] and stamp["busy_at_end"]
    busy = load_lines(stamp)[1]
    assert busy.startswith("> **Measured on a busy machine** (written with --allow-busy)")
    assert "before and during" in busy and "6.00/5.40/4.80" in busy
    assert load_lines(None) == []  # results written before the rule render without these lines


# -- deploykit bench (CLI + harness) ------------------------------------------------------------------------------
def test_cli_refuses_a_busy_machine_before_any_work(load: FakeLoad, committed: Path, nano_checkpoint: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    load.value = BUSY
    monkeypatch.setattr(harness, "machine_info", None)  # the first step of the work: a TypeError if reached
    out = committed / "nano"
    assert cli_main(["bench", str(nano_checkpoint), "--out", str(out), "--cache", str(tmp_path / "c"), *TINY]) == 75
    err = capsys.readouterr().err
    assert "6.00" in err and "1.50" in err and "--allow-busy" in err, err
    assert not committed.exists(), "a refused run must not create its output folder"


def test_cli_allow_busy_measures_and_stamps_the_reports(load: FakeLoad, committed: Path, nano_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    load.value = BUSY
    out = committed / "nano"
    assert cli_main(["bench", str(nano_checkpoint), "--out", str(out), "--cache", str(tmp_path / "c"), *TINY,
                     "--allow-busy"]) == 0
    results = json.loads((out / "results.json").read_text())
    stamp = results["quiet"]
    assert stamp["measured_on_busy_machine"] and stamp["allow_busy"] and stamp["committed_results"]
    assert stamp["load_average_start"] == [6.0, 5.4, 4.8] and stamp["own_threads_discounted_at_end"] == 1
    assert results["settings"]["allow_busy"] is True and results["rows"][0]["status"] == "ok"
    machine = results["machine"]
    assert machine["cpu_model"] and machine["load_average_start"] == 6.0 and machine["load_average_end"] == 6.0
    native = machine["native_cpu_features"]
    assert "selected_isa" in native and "supported_isas" in native or "unavailable" in native
    md = (out / "report.md").read_text()
    assert "> **Measured on a busy machine** (written with --allow-busy)" in md
    assert "Load average (1/5/15 min) on 2 CPUs: 6.00/5.40/4.80 at the start" in md
    assert "native kernels:" in md


def test_cli_never_refuses_another_out_folder(load: FakeLoad, nano_checkpoint: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    load.value = BUSY
    monkeypatch.setattr(harness, "bench_row", _stub_row)
    out = tmp_path / "elsewhere" / "nano"
    assert cli_main(["bench", str(nano_checkpoint), "--out", str(out), "--cache", str(tmp_path / "c"), *TINY]) == 0
    stamp = json.loads((out / "results.json").read_text())["quiet"]
    assert stamp["measured_on_busy_machine"] and not stamp["allow_busy"] and not stamp["committed_results"]
    md = (out / "report.md").read_text()
    assert "(written outside benchmarks/results/)" in md
    assert "> **Warning:** the machine was busy" in md  # the older warning stays


def test_a_run_that_turns_busy_is_kept_out_of_committed_results(load: FakeLoad, committed: Path,
                                                                 nano_checkpoint: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "bench_row", _stub_row)

    class LoadRises:  # someone starts a test run while the rows are measured
        def start(self, total: int) -> None: pass
        def stage(self, index: int, label: str, stage: str) -> None: pass
        def done(self, index: int, row: dict[str, Any]) -> None: load.value = BUSY

    out = committed / "nano"
    cfg = BenchConfig(model=nano_checkpoint, out=out, cache_dir=tmp_path / "c", schemes=("torch:fp32",),
                      prompt_len=8, gen_len=4, threads=1, repeat=1, warmup=0, eval_tokens=64, n_tasks=2)
    with pytest.raises(BusyMachineError, match="at the end of the run") as e:
        run_bench(cfg, LoadRises())
    (kept,) = (tmp_path / "tmp").glob("deploykit-busy-nano-*")
    assert str(kept) in str(e.value)
    assert not out.exists(), "nothing may land in benchmarks/results/"
    stamp = json.loads((kept / "results.json").read_text())["quiet"]
    assert stamp["busy_at_end"] and not stamp["busy_at_start"] and stamp["diverted_from"] == str(out)
    assert f"(kept out of {out})" in (kept / "report.md").read_text()


# -- the benchmark scripts -------------------------------------------------------------------------------------------
def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import benchmarks/<name>.py as `python benchmarks/<name>.py` would (its folder on sys.path), with the
    bench allocator already set so that timing.use_bench_allocator() does not re-execute pytest."""
    from deploykit.bench.machine import ALLOCATOR_ENV

    for key, value in ALLOCATOR_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delitem(sys.modules, "timing", raising=False)
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_refuses_before_training(load: FakeLoad, committed: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_all = _script("run_all", monkeypatch)
    load.value = BUSY
    monkeypatch.setattr(run_all, "ensure_checkpoint", None)  # would be a TypeError if reached
    assert run_all.main(["--models", "micro", "--runs", str(tmp_path / "runs"), "--results", str(committed)]) == 75
    assert "--allow-busy" in capsys.readouterr().err
    assert not committed.exists()


def test_run_all_allow_busy_passes_the_flag_and_the_early_guard(load: FakeLoad, committed: Path, nano_checkpoint: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_all = _script("run_all", monkeypatch)
    monkeypatch.setattr(harness, "bench_row", _stub_row)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "micro").symlink_to(nano_checkpoint)
    load.value = BUSY
    assert run_all.main(["--models", "micro", "--runs", str(tmp_path / "runs"), "--results", str(committed),
                         "--threads", "1", "--backends", "torch", "--schemes", "torch:fp32", "--repeat", "1",
                         "--prompt-len", "8", "--gen-len", "4", "--allow-busy"]) == 0
    results = json.loads((committed / "micro" / "results.json").read_text())
    assert results["quiet"]["measured_on_busy_machine"] and results["settings"]["allow_busy"]
    assert "Measured on a busy machine" in (committed / "micro" / "report.md").read_text()
    # Not this checkout's benchmarks/results/: the committed README is left alone.
    assert "benchmarks/README.md not updated" in capsys.readouterr().out


@pytest.fixture
def kernels_int8(monkeypatch: pytest.MonkeyPatch, torch_threads: Any) -> ModuleType:
    from deploykit import native

    if not native.available():
        pytest.skip("the native extension is not built here")
    return _script("kernels_int8", monkeypatch)


QUICK = ["--quick", "--repeat", "1", "--no-int-mm", "--threads", "1"]


def test_kernels_int8_refuses_before_measuring(load: FakeLoad, committed: Path, kernels_int8: ModuleType,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    load.value = BUSY
    monkeypatch.setattr(kernels_int8, "measure", None)  # would be a TypeError if reached
    assert kernels_int8.main([*QUICK, "--out", str(committed)]) == 75
    assert "1.50" in capsys.readouterr().err and not committed.exists()


def test_kernels_int8_allow_busy_and_elsewhere_write_stamped_reports(load: FakeLoad, committed: Path, tmp_path: Path,
                                                                     kernels_int8: ModuleType) -> None:
    load.value = BUSY
    assert kernels_int8.main([*QUICK, "--out", str(committed), "--allow-busy"]) == 0
    meta = json.loads((committed / "kernels_int8_quick_1t.json").read_text())["meta"]
    assert meta["quiet"]["measured_on_busy_machine"] and meta["quiet"]["allow_busy"]
    assert meta["quiet"]["load_average_start"] == [6.0, 5.4, 4.8] and meta["quiet"]["load_average_end"]
    assert meta["cpu_model"] and meta["native"]["available"] is True
    assert meta["native"]["selected_isa"] in meta["native"]["supported_isas"]
    md = (committed / "kernels_int8_quick_1t.md").read_text()
    assert "> **Measured on a busy machine** (written with --allow-busy)" in md
    assert f"native kernels: ISA `{meta['native']['selected_isa']}` selected" in md and meta["cpu_model"] in md

    elsewhere = tmp_path / "elsewhere"
    assert kernels_int8.main([*QUICK, "--out", str(elsewhere)]) == 0
    assert "(written outside benchmarks/results/)" in (elsewhere / "kernels_int8_quick_1t.md").read_text()


def test_busy_warning_discounts_the_runs_own_threads_at_the_end() -> None:
    from deploykit.bench.machine import busy_warning

    quiet_run = {"available_cpus": 2, "threads": 2, "load_average_start": 0.3, "load_average_end": 2.4}
    assert busy_warning(quiet_run) is None  # its own 2 threads, plus a little
    assert "up to 4.0 on 2 CPUs" in busy_warning({**quiet_run, "load_average_end": 4.0})
    assert busy_warning({**quiet_run, "load_average_start": 2.0}) is not None
