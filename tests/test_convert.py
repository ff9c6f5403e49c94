"""The convert contract: bad input, atomic writes, the parity gate, the manifest."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

import deploykit
from deploykit.cli.main import main
from deploykit.deploy.backend import EXACT, Backend, Scheme
from deploykit.errors import BackendError, BackendUnavailable, CheckpointError, ParityError, TargetExistsError

PICKLE = (".bin", ".pt", ".pth", ".pt2", ".ckpt", ".pkl", ".pickle")


def _register(fresh_plugins, *backends, name="testplugin"):
    class P:
        @deploykit.hookimpl
        def deploykit_backends(self):
            return list(backends)
    fresh_plugins.registry().register(P(), name)


class NeedsGPU(Backend):
    name = "needsgpu"
    description = "needs things this machine lacks"
    schemes = (Scheme("fp16", "x", EXACT),)
    artifact_files = ()

    def missing_requirements(self):
        return ["tensorrt is not installed: pip install 'deploykit[tensorrt]'", "no CUDA GPU"]

    def convert(self, model, scheme, out, ctx):  # pragma: no cover - never reached
        raise AssertionError

    def load(self, artifact, manifest, **options):  # pragma: no cover
        raise AssertionError


class Exploding(Backend):
    name = "exploding"
    description = "raises half-way through writing"
    schemes = (Scheme("fp32", "x", EXACT),)
    artifact_files = ("part.bin",)
    error: BaseException = RuntimeError("kaboom")

    def convert(self, model, scheme, out, ctx):
        (out / "part.txt").write_text("half written")
        raise self.error

    def load(self, artifact, manifest, **options):  # pragma: no cover
        raise AssertionError


class Noisy(Backend):
    """Wraps the torch backend and adds logit noise: a conversion that is 'wrong' by a known amount."""

    name = "noisy"
    description = "torch plus noise"
    schemes = (Scheme("fp32", "claims exactness", EXACT),)
    artifact_files = ()

    def convert(self, model, scheme, out, ctx):
        from deploykit.deploy.registry import get_backend

        torch_be = get_backend("torch")
        return torch_be.convert(model, torch_be.scheme("fp32"), out, ctx)

    def load(self, artifact, manifest, **options):
        from deploykit.deploy.registry import get_backend

        runner = get_backend("torch").load(artifact, {**manifest, "quant": "fp32"})
        inner = runner.forward
        runner.forward = lambda ids: inner(ids) + np.random.default_rng(0).normal(0, 0.5, inner(ids).shape).astype(np.float32)
        return runner


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if name in p.name)


# -- bad input -------------------------------------------------------------------------------------
def test_unknown_backend_and_scheme_exit_2(nano_checkpoint, tmp_path, capsys):
    assert main(["convert", str(nano_checkpoint), "--backend", "tflight", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'tflight'" in err and "torch" in err
    assert main(["convert", str(nano_checkpoint), "--backend", "torch", "--quant", "int4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no scheme 'int4'" in err and "int8-dynamic" in err
    assert not (tmp_path / "x").exists()


def test_missing_requirements_exit_4_with_pip_command(fresh_plugins, nano_checkpoint, tmp_path, capsys):
    _register(fresh_plugins, NeedsGPU())
    with pytest.raises(BackendUnavailable) as e:
        deploykit.convert(nano_checkpoint, "needsgpu", out=tmp_path / "x")
    assert "pip install 'deploykit[tensorrt]'" in str(e.value) and "no CUDA GPU" in str(e.value)
    assert main(["convert", str(nano_checkpoint), "--backend", "needsgpu", "--out", str(tmp_path / "x")]) == 4
    assert "pip install" in capsys.readouterr().err
    assert main(["backends", "--json"]) == 0
    row = {b["name"]: b for b in json.loads(capsys.readouterr().out)["backends"]}["needsgpu"]
    assert row["available"] is False and "no CUDA GPU" in row["missing"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(nano_checkpoint, tmp_path, damage, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(nano_checkpoint, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        deploykit.convert(bad, "torch", out=tmp_path / "out")
    assert main(["convert", str(bad), "--backend", "torch", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_config_not_matching_weights(nano_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(nano_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["deploykit"]["model_config"]["ffn_dim"] = 512
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the weights"):
        deploykit.convert(bad, "torch", out=tmp_path / "out")


def test_existing_target_needs_force(nano_checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    deploykit.convert(nano_checkpoint, "torch", out=out, verify=False)
    (out / "extra.txt").write_text("left by hand")
    with pytest.raises(TargetExistsError):
        deploykit.convert(nano_checkpoint, "torch", out=out)
    assert main(["convert", str(nano_checkpoint), "--backend", "torch", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "extra.txt").is_file()
    deploykit.convert(nano_checkpoint, "torch", out=out, force=True, verify=False)  # an artifact: replaced
    assert not (out / "extra.txt").exists() and (out / "deploykit.json").is_file()


def test_force_never_replaces_a_folder_deploykit_did_not_write(nano_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TargetExistsError, match="never replaced"):
        deploykit.convert(nano_checkpoint, "torch", out=out, force=True, verify=False)
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_plugin_raising_names_plugin_leaves_nothing(fresh_plugins, nano_checkpoint, tmp_path, capsys):
    _register(fresh_plugins, Exploding(), name="boomplugin")
    with pytest.raises(BackendError) as e:
        deploykit.convert(nano_checkpoint, "exploding", out=tmp_path / "x")
    assert "boomplugin" in str(e.value) and "exploding" in str(e.value) and "kaboom" in str(e.value)
    assert _leftovers(tmp_path, "x") == []
    # the others are still listed and usable
    assert main(["backends", "--json"]) == 0
    assert "torch" in {b["name"] for b in json.loads(capsys.readouterr().out)["backends"]}
    assert deploykit.convert(nano_checkpoint, "torch", out=tmp_path / "ok").passed


def test_interrupted_convert_leaves_nothing(fresh_plugins, nano_checkpoint, tmp_path):
    boom = Exploding()
    boom.error = KeyboardInterrupt()
    _register(fresh_plugins, boom)
    with pytest.raises(KeyboardInterrupt):
        deploykit.convert(nano_checkpoint, "exploding", out=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# -- the parity gate -------------------------------------------------------------------------------
def test_parity_failure_exit_3_lists_probes(fresh_plugins, nano_checkpoint, tmp_path, capsys):
    _register(fresh_plugins, Noisy())
    with pytest.raises(ParityError) as e:
        deploykit.convert(nano_checkpoint, "noisy", out=tmp_path / "x")
    msg = str(e.value)
    assert "max |Δlogit|" in msg and "len1:" in msg and "max256:" in msg and "greedy0" in msg
    assert _leftovers(tmp_path, "x") == []
    assert main(["convert", str(nano_checkpoint), "--backend", "noisy", "--out", str(tmp_path / "x")]) == 3
    assert not (tmp_path / "x").exists()
    # --allow-mismatch keeps it and says so
    result = deploykit.convert(nano_checkpoint, "noisy", out=tmp_path / "x", allow_mismatch=True)
    m = json.loads((tmp_path / "x" / "deploykit.json").read_text())
    assert result.passed is False and m["allow_mismatch"] is True and m["parity_passed"] is False
    assert m["parity"]["violations"]


def test_no_verify_is_recorded(nano_checkpoint, tmp_path):
    result = deploykit.convert(nano_checkpoint, "torch", out=tmp_path / "x", verify=False)
    assert result.report is None
    m = json.loads((tmp_path / "x" / "deploykit.json").read_text())
    assert m["verified"] is False and m["parity"] is None and m["parity_passed"] is None


# -- the manifest ----------------------------------------------------------------------------------
def test_manifest_contents(nano_checkpoint, tmp_path):
    result = deploykit.convert(nano_checkpoint, "torch", "int8-dynamic", tmp_path / "a")
    m = json.loads((tmp_path / "a" / "deploykit.json").read_text())
    assert m == result.manifest
    assert m["format_version"] == 1 and m["backend"] == "torch" and m["quant"] == "int8-dynamic"
    assert m["plugin"] == "torch" and m["verified"] is True and m["allow_mismatch"] is False
    assert m["source"]["sha256"] == hashlib.sha256((nano_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert m["versions"]["deploykit"] == deploykit.__version__ and "torch" in m["versions"]
    assert m["created_utc"].endswith("+00:00")
    assert m["model_config"]["d_model"] == 128 and m["tokenizer"] is True
    assert {"tokenizer.json", "model.safetensors", "config.json", "torch_quant.json"} <= set(m["files"])
    for name, entry in m["files"].items():
        data = (tmp_path / "a" / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert m["total_bytes"] == sum(f["bytes"] for f in m["files"].values())
    assert m["pickle_files"] == [] and not any(n.endswith(PICKLE) for n in m["files"])
    p = m["parity"]
    assert p["passed"] and {r["name"] for r in p["probes"]} >= {"len1", "len16", "batch2x64", "max256", "greedy0"}
    assert p["probe_source"] == "text" and p["max_len"] == 256 and p["tolerance"]["max_delta_ppl"] == 0.01 and p["tolerance"]["max_abs_logit"] is None


def test_convert_in_memory_model(nano_checkpoint, tokenizer, tmp_path):
    model = deploykit.load_model(nano_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = deploykit.convert(model, "torch", "prune-l1", tmp_path / "m", tokenizer=tokenizer)
    assert result.passed and result.manifest["source"]["path"] is None
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # the caller's model is untouched
    # same weights, same id whether they come from memory or from the folder
    assert result.manifest["source"]["sha256"] == hashlib.sha256(
        (nano_checkpoint / "model.safetensors").read_bytes()).hexdigest()
