"""deploykit bench: the harness end to end on the trained nano model, plus its planning and reporting rules.

One module-scoped bench run (two real backends, tiny lengths, one thread) feeds most tests. Two fake
backends come from a plugin installed the way a third party's is, through an entry point on the path
(so the worker subprocesses see it too): ``ghost`` is never available here, and ``crashy`` converts
fine but its bench worker dies with SIGABRT, like a native runtime crashing mid-measurement. Two more
entry points of that module only add bench metrics: ``bench-later`` (its equal key must win) and
``bench-broken`` (raises: the row must survive it).
"""
from __future__ import annotations

import csv
import importlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from deploykit.bench import COLUMN_NAMES, BenchConfig, run_bench
from deploykit.bench.schema import SCHEMA_VERSION

FAKE_PLUGIN = '''
"""Test-only backends for tests/test_bench.py."""
import os
from pathlib import Path

import deploykit
from deploykit.deploy.backend import EXACT, Backend, Scheme
from deploykit.model.checkpoint import load_model, save_model
from deploykit.deploy.runtime import ModelRunner


class Ghost(Backend):
    name = "ghost"
    description = "needs hardware this machine lacks"
    schemes = (Scheme("fp32", "plain", EXACT), Scheme("int4", "packed", EXACT))
    artifact_files = ("ghost.bin",)
    platforms = "Ghost NPU"

    def missing_requirements(self):
        return ["no Ghost NPU found on this machine"]

    def convert(self, model, scheme, out, ctx):
        raise AssertionError("an unavailable backend must never be asked to convert")

    def load(self, artifact, manifest, **options):
        raise AssertionError("an unavailable backend must never be asked to load")


class Crashy(Backend):
    name = "crashy"
    description = "converts fine; its bench worker dies"
    schemes = (Scheme("fp32", "plain", EXACT),)
    artifact_files = ("model/*",)

    def convert(self, model, scheme, out, ctx):
        save_model(model, Path(out) / "model")
        return {}

    def load(self, artifact, manifest, **options):
        return ModelRunner(load_model(Path(artifact) / "model"), backend="crashy", quant="fp32")


class Wobbly(Backend):
    """Converts a model that computes something else (lm_head scaled): it fails its parity proof."""

    name = "wobbly"
    description = "an artifact past its tolerance"
    schemes = (Scheme("fp32", "plain", EXACT),)
    artifact_files = ("model/*",)

    def convert(self, model, scheme, out, ctx):
        import torch

        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
        save_model(model, Path(out) / "model")
        return {}

    def load(self, artifact, manifest, **options):
        return ModelRunner(load_model(Path(artifact) / "model"), backend="wobbly", quant="fp32")


class Macish(Backend):
    """Converts and proves here, but its runtime only runs elsewhere (as Core ML's needs macOS)."""

    name = "macish"
    description = "converts anywhere, predicts on macOS only"
    schemes = (Scheme("fp32", "plain", EXACT),)
    artifact_files = ("model/*",)

    def convert(self, model, scheme, out, ctx):
        save_model(model, Path(out) / "model")
        return {}

    def load(self, artifact, manifest, **options):
        if "files" not in manifest:  # convert's own proof runs before the manifest is sealed (as coreml's)
            return ModelRunner(load_model(Path(artifact) / "model"), backend="macish", quant="fp32")
        raise deploykit.BackendUnavailable("macish prediction needs macOS", hint="run it on a Mac")


@deploykit.hookimpl
def deploykit_backends():
    return [Ghost(), Crashy(), Wobbly(), Macish()]


@deploykit.hookimpl
def deploykit_bench_metrics(runner, row):
    if row["backend"] == "crashy":
        os.abort()  # a native runtime dying mid-measurement: SIGABRT, no Python traceback
    return {"fake_metric": 42.0}


class LaterMetrics:
    """Registered after bench-fakes (entry points load in name order): on the equal key it wins."""

    @deploykit.hookimpl
    def deploykit_bench_metrics(self, runner, row):
        return {"fake_metric": 43.0, "later_metric": 1.0}


class BrokenMetrics:
    @deploykit.hookimpl
    def deploykit_bench_metrics(self, runner, row):
        raise RuntimeError("metrics sensor unplugged")


LATER, BROKEN = LaterMetrics(), BrokenMetrics()
'''


@pytest.fixture(scope="module")
def fake_plugin(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Install the fake plugin through an entry point, visible to this process and to the workers."""
    from deploykit.deploy import registry as plugins

    root = tmp_path_factory.mktemp("fake_plugin")
    (root / "bench_fake_backends.py").write_text(FAKE_PLUGIN)
    dist = root / "bench_fake_backends-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-fake-backends\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[deploykit.backends]\nbench-fakes = bench_fake_backends\n"
                                           "bench-later = bench_fake_backends:LATER\n"
                                           "bench-broken = bench_fake_backends:BROKEN\n")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    importlib.invalidate_caches()
    plugins.reset()
    yield root
    mp.undo()
    sys.modules.pop("bench_fake_backends", None)
    importlib.invalidate_caches()
    plugins.reset()


def _second_backend() -> str:
    """The second real backend: onnx where it is installed and registered, else another torch scheme."""
    from deploykit.deploy import registry as plugins

    found = plugins.backends()
    return "onnx:fp32" if "onnx" in found and not found["onnx"].missing_requirements() else "torch:bf16"


def tiny_config(model: Path, out: Path, cache: Path, schemes: tuple[str, ...], **kw: Any) -> BenchConfig:
    # One thread: the suite shares two cores with other tests, and oversubscribed OpenMP threads
    # spin-wait; these tests check the harness, not speed.
    return BenchConfig(model=model, out=out, cache_dir=cache, schemes=schemes, prompt_len=8, gen_len=4, batch=2,
                       threads=1, repeat=2, warmup=1, eval_tokens=64, n_tasks=6, timeout_s=300, **kw)


@pytest.fixture(scope="module")
def bench(nano_checkpoint: Path, fake_plugin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bench")
    second = _second_backend()
    backends = ("torch", second.split(":")[0], "ghost", "crashy", "wobbly", "macish")
    cfg = tiny_config(nano_checkpoint, tmp / "out", tmp / "cache", ("torch:fp32", second, "ghost:fp32",
                      "ghost:int4", "crashy:fp32", "wobbly:fp32", "macish:fp32"),
                      backends=tuple(dict.fromkeys(backends)), convert_jobs=2)  # conversions ahead, 2 at once
    results = run_bench(cfg)
    return {"results": results, "cfg": cfg, "second": second}


def _row(results: dict[str, Any], backend: str, scheme: str) -> dict[str, Any]:
    return next(r for r in results["rows"] if r["backend"] == backend and r["scheme"] == scheme)


# -- the harness end to end -------------------------------------------------------------------------------------
def test_results_json_schema_and_every_column(bench: dict[str, Any]) -> None:
    results, out = bench["results"], bench["cfg"].out
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["columns"] == list(COLUMN_NAMES)
    for key in ("model", "settings", "machine", "versions", "rows", "created", "outputs"):
        assert key in on_disk, key
    machine = on_disk["machine"]
    for key in ("cpu_model", "cpu_flags", "physical_cores", "available_cpus", "threads", "allocator_env"):
        assert key in machine, key
    assert {"avx2", "avx512_vnni"} <= set(machine["cpu_flags"])
    assert machine["threads"] == 1 and on_disk["settings"]["threads"] == 1
    assert "torch" in on_disk["versions"]
    for row in on_disk["rows"]:
        missing = [c for c in COLUMN_NAMES if c not in row]
        assert not missing, f"{row['backend']}/{row['scheme']} lacks {missing}"
    assert len(on_disk["rows"]) == len(results["rows"]) == 6  # fp32, second backend, ghost, crashy, wobbly, macish


def test_measured_rows_have_numbers(bench: dict[str, Any]) -> None:
    results = bench["results"]
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert [(r["backend"], r["scheme"]) for r in ok][0] == ("torch", "fp32")
    assert len(ok) == 3  # fp32, the second backend, wobbly (measured though it failed its proof)
    for r in ok:
        for col in ("size_bytes", "bits_per_weight", "load_s", "prefill_ms", "prefill_tok_s", "decode_tok_s",
                    "peak_rss_bytes", "parity_max_abs_logit", "parity_top1", "parity_kl", "perplexity",
                    "task_accuracy"):
            assert isinstance(r[col], (int, float)) and math.isfinite(r[col]) and r[col] >= 0, (r["backend"], col)
        assert r["kv_cache"] is True and r["decode_recomputed"] is False
        assert r["prefill_ms_min"] <= r["prefill_ms"] <= r["prefill_ms_max"]
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["peak_rss_bytes"] >= r["base_rss_bytes"] > 0
        assert r["moe_routing_agreement"] is None and "dense" in r["moe_routing_note"]
        # deploykit_bench_metrics columns joined the row; on an equal key the later plugin won, and the
        # plugin that raised is named while the row keeps its measurements.
        assert r["fake_metric"] == 43.0 and r["later_metric"] == 1.0
        assert r["plugin_metric_errors"] == {"bench-broken": "RuntimeError: metrics sensor unplugged"}
    base = ok[0]
    # The fp32 torch artifact is the reference itself.
    assert base["parity_max_abs_logit"] < 1e-4 and base["parity_top1"] == 1.0 and base["parity_kl"] < 1e-8
    # Bits per weight of an fp32 artifact: 32 plus a little for config files.
    assert 32.0 <= base["bits_per_weight"] < 33.0


def test_ratios_are_consistent_with_the_medians(bench: dict[str, Any]) -> None:
    results, cfg = bench["results"], bench["cfg"]
    base = results["rows"][0]
    assert (base["backend"], base["scheme"]) == ("torch", "fp32")
    for r in (r for r in results["rows"] if r["status"] == "ok"):
        samples = r["samples"]
        assert len(samples["prefill_s"]) == len(samples["decode_s"]) == cfg.repeat
        # Medians come from the raw timed runs...
        med_prefill = sorted(samples["prefill_s"])[cfg.repeat // 2 - 1: cfg.repeat // 2 + 1]
        assert r["prefill_ms"] == pytest.approx(1e3 * sum(med_prefill) / len(med_prefill))
        assert r["prefill_tok_s"] == pytest.approx(cfg.batch * cfg.prompt_len / (r["prefill_ms"] / 1e3))
        tok_s = sorted(cfg.gen_len / s for s in samples["decode_s"])
        assert r["decode_tok_s"] == pytest.approx(sum(tok_s[cfg.repeat // 2 - 1: cfg.repeat // 2 + 1]) / 2)
        # ...and every ratio is that row's median over the fp32 torch row's, from the same run.
        assert r["decode_speedup"] == pytest.approx(r["decode_tok_s"] / base["decode_tok_s"])
        assert r["prefill_speedup"] == pytest.approx(r["prefill_tok_s"] / base["prefill_tok_s"])
        assert r["size_ratio"] == pytest.approx(r["size_bytes"] / base["size_bytes"])
        assert r["ppl_delta_pct"] == pytest.approx(100 * (r["perplexity"] / base["perplexity"] - 1))
        assert r["task_accuracy_delta"] == pytest.approx(100 * (r["task_accuracy"] - base["task_accuracy"]))
    assert base["decode_speedup"] == 1.0 and base["size_ratio"] == 1.0 and base["ppl_delta_pct"] == 0.0


def test_a_runtime_that_cannot_run_here_is_unavailable_not_an_error(bench: dict[str, Any]) -> None:
    mac = _row(bench["results"], "macish", "fp32")
    assert mac["status"] == "unavailable" and "needs macOS" in mac["reason"]
    assert mac["size_bytes"] and mac["convert_parity_ok"] is True  # converted and proven; only speed is elsewhere
    assert mac["decode_tok_s"] is None


def test_unavailable_backend_is_a_row_with_its_reason(bench: dict[str, Any]) -> None:
    ghost = _row(bench["results"], "ghost", "fp32,int4")
    assert ghost["status"] == "unavailable"
    assert "no Ghost NPU found" in ghost["reason"]
    assert ghost["platform"] == "Ghost NPU"
    assert ghost["decode_tok_s"] is None and ghost["artifact"] is None


def test_crashing_worker_is_an_error_row_and_the_bench_goes_on(bench: dict[str, Any]) -> None:
    results = bench["results"]
    crashy = _row(results, "crashy", "fp32")
    assert crashy["status"] == "error"
    assert crashy["reason"].startswith("measure: worker crashed (SIGABRT)")
    assert crashy["decode_tok_s"] is None
    # Rows are ordered torch, crashy, ghost, onnx: a row after the crash was still measured.
    names = [r["backend"] for r in results["rows"]]
    assert names.index("crashy") < names.index("ghost")
    if bench["second"].startswith("onnx"):
        assert names.index("crashy") < names.index("onnx")
        assert _row(results, "onnx", "fp32")["status"] == "ok"


def test_report_files(bench: dict[str, Any]) -> None:
    out = bench["cfg"].out
    md = (out / "report.md").read_text()
    assert "| Method | Speedup (decode) | Size reduction | Δ perplexity | Platform | Best for |" in md
    assert "| torch fp32 | 1.00× | 1.00× | +0.00 % | CPU | reference" in md
    assert "no Ghost NPU found" in md and "SIGABRT" in md
    assert "deploykit_bench_metrics of plugin 'bench-broken' failed (RuntimeError: metrics sensor unplugged)" in md
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[: len(COLUMN_NAMES)] == list(COLUMN_NAMES) and "fake_metric" in rows[0]
    assert [r["backend"] for r in rows] == [r["backend"] for r in bench["results"]["rows"]]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("bench-*")), "the temporary work folder must be removed"


def test_a_row_that_failed_its_proof_is_marked_everywhere_and_never_recommended(bench: dict[str, Any]) -> None:
    from deploykit.bench.report import FAILED_MARK, notes, rich_table

    results, out = bench["results"], bench["cfg"].out
    row = _row(results, "wobbly", "fp32")
    assert row["status"] == "ok" and row["convert_parity_ok"] is False
    assert "max |Δlogit|" in row["parity_violations"] or "top-1" in row["parity_violations"]
    assert row["best_for"] == "failed its parity proof"
    assert all(r["best_for"] is None or "wobbly" not in str(r["best_for"]) for r in results["rows"])
    md = (out / "report.md").read_text()
    assert md.count(f"wobbly fp32 **{FAILED_MARK}**") == 2  # the summary and the measurements table
    assert row["parity_violations"] in md
    with open(out / "results.csv", newline="") as f:
        csv_row = next(r for r in csv.DictReader(f) if r["backend"] == "wobbly")
    assert csv_row["convert_parity_ok"] == "False" and csv_row["parity_violations"] == row["parity_violations"]
    assert json.loads((out / "results.json").read_text())["rows"][results["rows"].index(row)]["convert_parity_ok"] is False
    assert any(line.startswith(f"wobbly fp32: {FAILED_MARK}") for line in notes(results))
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(rich_table(results))
    assert f"wobbly fp32 {FAILED_MARK}" in console.export_text()
    others = [r for r in results["rows"] if r["status"] == "ok" and r["backend"] != "wobbly"]
    assert others and all(r["convert_parity_ok"] is not False and not r["parity_violations"] for r in others)


def test_artifacts_are_reused_then_rebuilt_when_the_checkpoint_changes(bench: dict[str, Any], tmp_path: Path) -> None:
    import torch

    from deploykit.bench import cache
    from deploykit.bench.harness import Context, ensure_artifact
    from deploykit.deploy import registry as plugins
    from deploykit.model.checkpoint import load_model, save_model
    from deploykit.model.tokenizer import Tokenizer

    cfg = bench["cfg"]
    first = _row(bench["results"], "torch", "fp32")
    assert first["cached"] is False and first["convert_s"] > 0  # converted in the bench run

    def ctx_for(model: Path) -> Context:
        from deploykit.bench.harness import _Silent

        return Context(BenchConfig(model=model, out=tmp_path / "out", cache_dir=cfg.cache_dir, threads=1),
                       plugins.backends(), cache.source_sha256(model), model.name, tmp_path, _Silent())

    # Nothing changed: the same folder comes back without a conversion.
    path, info = ensure_artifact(ctx_for(cfg.model), "torch", "fp32")
    assert info["cached"] is True and str(path) == first["artifact"]

    # Same name, different weights: a new key, so a fresh conversion into a new folder.
    changed = tmp_path / cfg.model.name
    model = load_model(cfg.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    save_model(model, changed, Tokenizer.load(cfg.model))
    new_path, new_info = ensure_artifact(ctx_for(changed), "torch", "fp32")
    assert new_info["ok"] and new_info["cached"] is False
    assert new_path != path and (new_path / "deploykit.json").is_file()
    assert json.loads((new_path / "deploykit.json").read_text())["source"]["sha256"] != \
        json.loads((path / "deploykit.json").read_text())["source"]["sha256"]
    shutil.rmtree(new_path.parent)


# -- planning and reporting rules (no subprocesses) ---------------------------------------------------------------
class _FakeBackend:
    def __init__(self, name: str, schemes: list[str], missing: list[str] | None = None) -> None:
        from deploykit.deploy.backend import EXACT, Scheme

        self.name, self.platforms = name, "CPU"
        self.schemes = tuple(Scheme(s, s, EXACT) for s in schemes)
        self._missing = missing or []

    def missing_requirements(self) -> list[str]:
        return self._missing


REGISTERED = {"torch": _FakeBackend("torch", ["fp32", "bf16", "int8-dynamic"]),
              "onnx": _FakeBackend("onnx", ["fp32", "fp16", "int8-dynamic"]),
              "tensorrt": _FakeBackend("tensorrt", ["fp16", "int8"], ["no CUDA GPU"])}


def _plan(backends: tuple[str, ...] | None, schemes: tuple[str, ...] | None) -> list[tuple[str, str, str | None]]:
    from deploykit.bench.harness import plan_rows

    return [(p.backend, p.scheme, p.reason) for p in plan_rows(REGISTERED, backends, schemes)]


def test_plan_puts_fp32_torch_first_and_keeps_declared_order() -> None:
    assert _plan(("onnx",), ("int8-dynamic", "fp32")) == [
        ("torch", "fp32", None), ("onnx", "fp32", None), ("onnx", "int8-dynamic", None)]
    assert _plan(None, None) == [
        ("torch", "fp32", None), ("torch", "bf16", None), ("torch", "int8-dynamic", None),
        ("onnx", "fp32", None), ("onnx", "fp16", None), ("onnx", "int8-dynamic", None),
        ("tensorrt", "fp16,int8", "no CUDA GPU")]
    assert _plan(("all",), ("torch:bf16", "onnx:fp16")) == [
        ("torch", "fp32", None), ("torch", "bf16", None), ("onnx", "fp16", None)]


def test_plan_rejects_unknown_names_listing_valid_ones() -> None:
    from deploykit.errors import BackendError, ConfigError

    with pytest.raises(BackendError, match="unknown backend.*gguf") as e:
        _plan(("gguf",), None)
    assert "onnx" in str(e.value) and "torch" in str(e.value)
    with pytest.raises(ConfigError, match="no selected backend offers scheme 'int4'") as e:
        _plan(("torch", "onnx"), ("int4",))
    assert "onnx:fp16" in str(e.value)
    with pytest.raises(ConfigError, match="not among --backends"):
        _plan(("torch",), ("onnx:fp32",))


def test_best_for_is_derived_from_the_measurements() -> None:
    from deploykit.bench.report import best_for

    def row(decode: float, size: int, ppl: float, rss: int = 100) -> dict[str, Any]:
        return {"status": "ok", "decode_tok_s": decode, "prefill_tok_s": decode, "size_bytes": size,
                "size_ratio": size / 400, "ppl_delta_pct": ppl, "peak_rss_bytes": rss, "load_s": 1.0}

    rows = [row(100, 400, 0.0), row(300, 100, 0.5, rss=90), row(400, 80, 8.0), {"status": "unavailable"}]
    tags = best_for(rows)
    assert tags[0].startswith("reference")
    assert "fastest decode" in tags[2] and "smallest" in tags[2]
    assert "fastest decode within 1 % Δppl" in tags[1] and "smallest within 1 % Δppl" in tags[1]
    assert "most accurate compressed" in tags[1] and "least memory" in tags[1]
    assert tags[3] == ""
    # The fastest, smallest row failed its parity proof: it is recommended for nothing, and the
    # picks go to the rows that passed.
    failed = {**row(900, 50, 0.1), "convert_parity_ok": False}
    tags = best_for([row(100, 400, 0.0), row(300, 100, 0.5), failed])
    assert tags[2] == "failed its parity proof"
    assert "fastest decode" in tags[1] and "smallest" in tags[1]


def test_cli_help_teaches_with_examples() -> None:
    import argparse

    from deploykit.cli import bench as bench_cli

    parser = argparse.ArgumentParser(prog="deploykit")
    p = bench_cli.register(parser.add_subparsers())
    text = p.format_help()
    for needle in ("examples:", "deploykit bench runs/micro", "--backends", "--schemes", "--prompt-len",
                   "--gen-len", "--batch", "--threads", "--repeat", "--eval-data", "--out", "--json", "--cache"):
        assert needle in text, needle


def test_plan_marks_schemes_that_do_not_apply_to_the_model() -> None:
    from deploykit import preset
    from deploykit.bench.harness import plan_rows
    from deploykit.deploy import registry as plugins

    native = plugins.backends().get("native")
    if native is None or native.missing_requirements():
        pytest.skip("the native extension is not built here")
    dense = {(p.backend, p.scheme): p.reason for p in plan_rows(plugins.backends(), ("native",), None, preset("nano"))}
    assert dense[("native", "int8")] is None
    assert dense[("native", "int8-moe")].startswith("not applicable: native/int8-moe runs moe models")
    moe = {(p.backend, p.scheme): p.reason for p in plan_rows(plugins.backends(), ("native",), None, preset("nano-moe"))}
    assert moe[("native", "int8-moe")] is None and "not applicable" in moe[("native", "int8")]


# -- deploykit_bench_metrics: the merge the worker runs ----------------------------------------------------------
def _metrics_plugin(result: Any) -> object:
    import deploykit

    class Plugin:
        @deploykit.hookimpl
        def deploykit_bench_metrics(self, runner: Any, row: dict[str, Any]) -> Any:
            if isinstance(result, Exception):
                raise result
            return result

    return Plugin()


def test_plugin_metrics_later_plugins_win_and_failures_are_named() -> None:
    from deploykit.bench.worker import plugin_metrics
    from deploykit.deploy.registry import PluginRegistry

    reg = PluginRegistry(entry_points=False)
    reg.register(_metrics_plugin({"score": 1.0, "only_first": 1.0}), "first")
    reg.register(_metrics_plugin(None), "silent")
    reg.register(_metrics_plugin(RuntimeError("sensor unplugged")), "broken")
    reg.register(_metrics_plugin(["not", "a", "dict"]), "confused")
    reg.register(_metrics_plugin({"score": 2.0}), "second")
    merged, errors = plugin_metrics(None, {"backend": "torch"}, reg)
    assert merged == {"score": 2.0, "only_first": 1.0}
    assert errors == {"broken": "RuntimeError: sensor unplugged",
                      "confused": "returned list, expected a dict of metrics or None"}

    # The order is registration, not the names: the same two registered the other way round.
    reg = PluginRegistry(entry_points=False)
    reg.register(_metrics_plugin({"score": 2.0}), "second")
    reg.register(_metrics_plugin({"score": 1.0}), "first")
    assert plugin_metrics(None, {}, reg) == ({"score": 1.0}, {})


def test_run_measure_merges_plugin_metrics_in_process(fresh_plugins: Any, nano_checkpoint: Path, tmp_path: Path) -> None:
    """run_measure itself, in this process, on a tiny torch artifact: the worker's real code path."""
    import torch

    import deploykit
    from deploykit.bench.inputs import InputSpec, prepare_inputs
    from deploykit.bench.worker import run_measure

    artifact = deploykit.convert(nano_checkpoint, "torch", "fp32", tmp_path / "artifact", verify=False).path
    prepare_inputs(nano_checkpoint, InputSpec(prompt_len=8, gen_len=4, batch=1, eval_tokens=64, n_tasks=2,
                                              eval_data=None), tmp_path)
    reg = fresh_plugins.registry()
    reg.register(_metrics_plugin({"probe": 1.0, "from_early": 1.0}), "early")
    reg.register(_metrics_plugin(RuntimeError("boom")), "raises")
    reg.register(_metrics_plugin({"probe": 2.0}), "late")
    threads = torch.get_num_threads()
    try:
        result = run_measure({"backend": "torch", "scheme": "fp32", "artifact": str(artifact), "threads": 1,
                              "repeat": 1, "warmup": 0, "inputs": str(tmp_path / "inputs.npz"),
                              "tasks": str(tmp_path / "tasks.json")})
    finally:
        torch.set_num_threads(threads)  # run_measure pins the thread count of its (normally own) process
    # This module's fake plugins are registered too (entry points) and add columns of their own.
    extra, errors = result["extra"], result["extra_errors"]
    assert (extra["probe"], extra["from_early"]) == (2.0, 1.0)
    assert errors["raises"] == "RuntimeError: boom"
    assert result["decode_tok_s"] > 0 and result["perplexity"] > 0  # the row kept its measurements


def test_a_changed_backend_module_never_reuses_old_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """deploykit's version string stays 0.1.0 across commits: the cache key must follow the code."""
    from deploykit.bench import cache

    (tmp_path / "cachetest_backend.py").write_text("VERSION = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = cache.code_fingerprint("cachetest_backend")
    (tmp_path / "cachetest_backend.py").write_text("VERSION = 2\n")
    cache.code_fingerprint.cache_clear()
    after = cache.code_fingerprint("cachetest_backend")
    assert before != after
    key = lambda fp: cache.artifact_key("s" * 64, "b", "fp32", {"code": fp})  # noqa: E731
    assert key(before) != key(after)


def test_progress_lines_show_plugin_text_verbatim():
    # A row's reason is a plugin's text: rich must print "deploykit[tensorrt]" as written, not eat
    # it as a markup tag (the demo once told users to "pip install 'deploykit'").
    import io

    from rich.console import Console

    from deploykit.bench.progress import RichReporter

    buf = io.StringIO()
    rep = RichReporter(Console(file=buf, width=300, color_system=None))
    rep.start(3)
    rep.stage(0, "tensorrt/[fp16]", "converting")
    rep.done(0, {"backend": "tensorrt", "scheme": "fp16", "status": "unavailable",
                 "reason": "pip install 'deploykit[tensorrt]' --extra-index-url https://pypi.nvidia.com"})
    rep.done(1, {"backend": "onnx", "scheme": "int8", "status": "ok"})
    rep.done(2, {"backend": "coreml", "scheme": "fp16", "status": "unavailable", "artifact": "/cache/coreml-fp16-abc",
                 "reason": "/cache/coreml-fp16-abc: Core ML prediction needs macOS"})
    rep.stop()
    out = buf.getvalue()
    assert "  tensorrt/fp16: unavailable pip install 'deploykit[tensorrt]' --extra-index-url" in out
    assert "  onnx/int8: ok\n" in out
    assert "  coreml/fp16: unavailable Core ML prediction needs macOS\n" in out  # the path is not the reason


def test_a_converted_row_that_cannot_run_here_still_shows_its_size() -> None:
    """Core ML converts (and is proven) anywhere but predicts only on macOS: its size is measured,
    and its reason reads without the cache path that the artifact column already holds."""
    from deploykit.bench.report import full_table, seed_table

    art = "/cache/demo-1234/coreml-fp16-abcd"
    row = {"backend": "coreml", "scheme": "fp16", "status": "unavailable", "platform": "Apple",
           "reason": f"{art}: Core ML prediction needs macOS", "artifact": art, "size_bytes": 3 * 2**20,
           "size_ratio": 0.5, "bits_per_weight": 16.0, "convert_parity_ok": True}
    never = {"backend": "ghost", "scheme": "fp32", "status": "unavailable", "platform": "NPU",
             "reason": "no Ghost NPU found", "artifact": None}
    summary = seed_table({"rows": [row, never]}).splitlines()
    assert summary[2] == "| coreml fp16 | n/a | 2.00× | n/a | Apple | unavailable: Core ML prediction needs macOS |"
    assert summary[3] == "| ghost fp32 | n/a | n/a | n/a | NPU | unavailable: no Ghost NPU found |"
    full = full_table({"rows": [row]}).splitlines()[2]
    assert full.startswith("| coreml fp16 | 3.00 MiB; unavailable: Core ML prediction needs macOS | 16.00 | n/a |")
