"""The plugin system: entry-point discovery, broken plugins, hooks (each documented and tested)."""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import install_fake_dist
from tolerances import assert_same_greedy

import deploykit
from deploykit.cli.main import main
from deploykit.deploy import hookspecs
from deploykit.deploy.backend import EXACT, Backend, Runner, RunnerInfo, Scheme
from deploykit.errors import BackendError

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("deploykit_"))


class Fake(Backend):
    name = "fake"
    description = "test double"
    schemes = (Scheme("fp32", "x", EXACT),)
    artifact_files = ()

    def convert(self, model, scheme, out, ctx):
        (out / "x.txt").write_text("x")
        return {}

    def load(self, artifact, manifest, **options):
        raise NotImplementedError


def plugin_with(*backends):
    class P:
        @deploykit.hookimpl
        def deploykit_backends(self):
            return list(backends)
    return P()


# -- discovery -------------------------------------------------------------------------------------
def test_builtin_torch_registers_through_entry_point(fresh_plugins):
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="deploykit.backends")}
    assert eps.get("torch") == "deploykit_plugins.torch_backend"
    reg = fresh_plugins.registry()
    assert "torch" in reg.backends() and reg.plugin_of("torch") == "torch"
    assert fresh_plugins.get_backend("torch").default_scheme == "fp32"


def test_registry_is_not_built_at_import():
    import importlib

    from deploykit.deploy import registry as plugins
    plugins.reset()
    importlib.reload(plugins)
    assert plugins._REGISTRY is None


def test_unknown_backend_lists_valid(fresh_plugins):
    with pytest.raises(BackendError) as e:
        fresh_plugins.get_backend("tensorflow-lite")
    assert "unknown backend 'tensorflow-lite'" in str(e.value) and "torch" in e.value.hint


def test_unknown_scheme_lists_valid(fresh_plugins):
    with pytest.raises(BackendError) as e:
        fresh_plugins.get_backend("torch").scheme("int3")
    assert "int8-dynamic" in e.value.hint and "prune-l1" in e.value.hint


def test_broken_plugin_import_is_reported_and_others_load(fresh_plugins, tmp_path, monkeypatch, capsys):
    site = install_fake_dist(tmp_path, "broken-plugin", {"broken": "broken_mod"},
                             {"broken_mod": "raise ImportError('needs libfoo: pip install foo')\n"})
    monkeypatch.syspath_prepend(str(site))
    errors = fresh_plugins.plugin_errors()
    assert any(e.plugin == "broken" and e.stage == "import" and "libfoo" in e.error for e in errors)
    assert "torch" in fresh_plugins.backends()
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "torch" in [b["name"] for b in data["backends"]]
    assert data["plugin_errors"][0]["plugin"] == "broken"


def test_plugin_raising_in_backends_hook_is_isolated(fresh_plugins):
    class Raising:
        @deploykit.hookimpl
        def deploykit_backends(self):
            raise RuntimeError("boom")

    reg = fresh_plugins.registry()
    reg.register(Raising(), "raiser")
    assert "torch" in reg.backends()
    assert [e.stage for e in reg.plugin_errors() if e.plugin == "raiser"] == ["deploykit_backends"]


def test_duplicate_backend_name_names_both_plugins(fresh_plugins):
    class Torch2(Fake):
        name = "torch"

    reg = fresh_plugins.registry()
    reg.register(plugin_with(Torch2()), "impostor")
    assert type(reg.get_backend("torch")).__name__ == "TorchBackend"  # the first registration is kept
    (err,) = [e for e in reg.plugin_errors() if e.plugin == "impostor"]
    assert "'torch'" in err.error and "plugin 'torch'" in err.error and "impostor" in err.error


def test_invalid_backend_objects_are_rejected(fresh_plugins):
    class Upper(Fake):
        name = "Fancy Name"

    reg = fresh_plugins.registry()
    reg.register(plugin_with(Upper(), "not a backend"), "sloppy")
    msgs = [e.error for e in reg.plugin_errors() if e.plugin == "sloppy"]
    assert any("lowercase" in m for m in msgs) and any("not a deploykit.deploy.backend.Backend" in m for m in msgs)


def test_unknown_hook_rejected_by_check_pending(fresh_plugins):
    class Typo:
        @deploykit.hookimpl
        def deploykit_backend(self):  # missing "s"
            return []

    reg = fresh_plugins.registry()
    assert reg.register(Typo(), "typo") is False
    assert "deploykit_backend" in reg.plugin_errors()[-1].error
    assert reg.pm.get_plugin("typo") is None


def test_trace_env_prints_hook_calls(monkeypatch, capsys):
    from deploykit.deploy.registry import PluginRegistry

    monkeypatch.setenv("DEPLOYKIT_TRACE_HOOKS", "1")
    PluginRegistry().backends()
    assert "deploykit_backends" in capsys.readouterr().err


# -- every hook documented and tested (datasette's two honesty tests) --------------------------------
def test_every_hook_is_documented():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    undocumented = [h for h in HOOKS if f"### {h}" not in doc]
    assert not undocumented, f"add a '### name' section to docs/plugins.md for: {undocumented}"


def test_every_hook_has_a_test():
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names |= set(re.findall(r"def (test_hook_\w+)", path.read_text()))
    untested = [h for h in HOOKS if f"test_hook_{h}" not in names]
    assert not untested, f"write test_hook_<name> tests for: {untested}"


def test_hook_deploykit_backends(fresh_plugins):
    reg = fresh_plugins.registry()
    reg.register(plugin_with(Fake()), "fakeplugin")
    assert reg.get_backend("fake").description == "test double" and reg.plugin_of("fake") == "fakeplugin"


def test_hook_deploykit_load_artifact(fresh_plugins, nano_checkpoint, tmp_path):
    class Constant(Runner):
        info = RunnerInfo(backend="remote", quant="fp32", kv_cache=False)

        def forward(self, input_ids):
            return np.zeros((1, 1, 4), np.float32)

    seen = []

    class Taker:
        @deploykit.hookimpl
        def deploykit_load_artifact(self, path, manifest, options):
            seen.append(manifest["backend"])
            return Constant() if options.get("remote") else None

    deploykit.convert(nano_checkpoint, "torch", out=tmp_path / "a", verify=False)
    fresh_plugins.registry().register(Taker(), "taker")
    assert deploykit.load(tmp_path / "a", remote=True).info.backend == "remote"
    assert deploykit.load(tmp_path / "a").info.backend == "torch"  # None: falls through to the built-in
    assert seen == ["torch", "torch"]


def test_hook_deploykit_after_convert(fresh_plugins, nano_checkpoint, tmp_path):
    calls = []

    class Watcher:
        @deploykit.hookimpl
        def deploykit_after_convert(self, artifact, manifest):
            calls.append((artifact, manifest["quant"], (artifact / "deploykit.json").is_file()))

    class Failing:
        @deploykit.hookimpl
        def deploykit_after_convert(self, artifact, manifest):
            raise RuntimeError("upload failed")

    reg = fresh_plugins.registry()
    reg.register(Watcher(), "watcher")
    reg.register(Failing(), "failing")
    with pytest.warns(UserWarning, match="upload failed"):
        deploykit.convert(nano_checkpoint, "torch", "fp32", tmp_path / "b", verify=False)
    assert calls == [(tmp_path / "b", "fp32", True)]
    assert (tmp_path / "b" / "deploykit.json").is_file()  # a failing observer does not undo the convert


def test_hook_deploykit_bench_metrics(fresh_plugins):
    class A:
        @deploykit.hookimpl
        def deploykit_bench_metrics(self, runner, row):
            return {"rss_mb": 10.0, "score": 1.0}

    class B:
        @deploykit.hookimpl
        def deploykit_bench_metrics(self, runner, row):
            return None if row.get("skip") else {"score": 2.0}

    from deploykit.bench.worker import plugin_metrics  # what every bench row's worker calls

    reg = fresh_plugins.registry()
    reg.register(A(), "a")
    reg.register(B(), "b")
    assert plugin_metrics(None, {}, reg) == ({"rss_mb": 10.0, "score": 2.0}, {})  # later plugins win
    assert plugin_metrics(None, {"skip": True}, reg) == ({"rss_mb": 10.0, "score": 1.0}, {})  # None adds nothing


# -- the example third-party plugin, through real entry-point discovery ---------------------------
def test_example_echo_plugin(fresh_plugins, nano_checkpoint, tmp_path, monkeypatch, capsys):
    site = install_fake_dist(tmp_path / "site", "deploykit-echo", {"echo": "deploykit_echo"})
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "deploykit-echo"))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "deploykit_echo", raising=False)
    assert main(["backends", "--json"]) == 0
    rows = {b["name"]: b for b in json.loads(capsys.readouterr().out)["backends"]}
    assert rows["echo"]["available"] and rows["echo"]["plugin"] == "echo" and "torch" in rows
    assert main(["convert", str(nano_checkpoint), "--backend", "echo", "--out", str(tmp_path / "e"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parity_passed"] and summary["backend"] == "echo"
    runner = deploykit.load(tmp_path / "e")
    assert runner.info.kv_cache is False
    ref = deploykit.load(nano_checkpoint)
    # numpy recompute vs torch with a KV cache: equal tokens, or parting only at a near tie
    assert_same_greedy(runner.generate([1, 50, 60], 8), ref.generate([1, 50, 60], 8),
                       lambda ids: ref.forward([ids])[0, -1], [1, 50, 60])
