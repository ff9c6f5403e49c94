"""The TFLite backend: the TF-ops graph against torch, the KV cache through the signature's tensors,
every scheme's parity proof (deploykit.convert), bad artifacts.

Models are the shared trained nano checkpoints (conftest.py) plus a nano-legacy trained the same way
here. tensorflow is imported once (3.5 s); every artifact is converted once per module.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tensorflow")

from deploykit_plugins import tflite_backend as tb
from tolerances import assert_close_reordered

import deploykit
from deploykit.errors import ArtifactError, ConfigError
from deploykit.model.checkpoint import load_model
from deploykit.model.generation import generate as torch_generate

BACKEND = tb.TFLiteBackend()


@pytest.fixture(scope="module")
def legacy_checkpoint(tmp_path_factory, tokenizer):
    from conftest import train_tiny

    return train_tiny("nano-legacy", tmp_path_factory.mktemp("ckpt") / "nano-legacy", tokenizer)


@pytest.fixture(scope="module")
def fp32(nano_checkpoint, tmp_path_factory):
    return deploykit.convert(nano_checkpoint, "tflite", "fp32", out=tmp_path_factory.mktemp("tfl") / "fp32", threads=1)


@pytest.fixture(scope="module")
def fp32_runner(fp32):
    return deploykit.load(fp32.path, threads=1)


# -- registration, no model needed --------------------------------------------------------------------
def test_missing_requirements_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    (reason,) = tb.TFLiteBackend().missing_requirements()
    assert reason.startswith("tensorflow is not installed") and "pip install 'deploykit[tflite]'" in reason


def test_registered_with_its_schemes():
    (backend,) = tb.deploykit_backends()
    assert backend.name == "tflite" and [s.name for s in backend.schemes] == ["fp32", "fp16", "int8-dynamic", "int8"]
    assert BACKEND.missing_requirements() == [] and "tensorflow-cpu" in BACKEND.versions()


def test_listing_backends_imports_neither_tensorflow_nor_coremltools():
    code = ("import sys; from deploykit.cli.main import main; rc = main(['backends', '--json']); "
            "heavy = [m for m in ('tensorflow', 'coremltools', 'tensorrt', 'ai_edge_litert') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    listed = json.loads(out.stdout[:out.stdout.rindex("HEAVY")])
    assert "tflite" in json.dumps(listed)


# -- fp32: the KV cache, greedy tokens equal to torch ----------------------------------------------------
def test_fp32_proof_is_exact_and_the_manifest_says_how_it_ran(fp32):
    report, info = fp32.report, fp32.manifest["backend_info"]
    assert report.passed() and report.greedy_match == 1.0 and report.max_abs_logit < 1e-4
    assert info["interpreter"] == ("ai_edge_litert" if importlib.util.find_spec("ai_edge_litert") else "tf.lite.Interpreter")
    assert info["signature"] == "decode" and "fixed capacity 256" in info["kv_cache"]
    assert {tb.CONFIG_FILE, tb.MODEL_FILE} <= set(fp32.manifest["files"]) and not fp32.manifest["pickle_files"]


def test_litert_generates_the_greedy_tokens_of_torch(fp32_runner, nano_checkpoint):
    model = load_model(nano_checkpoint)
    prompt = [1, 17, 250, 9, 33]
    want = torch_generate(model, prompt, 24, eos_token_id=None)
    session = fp32_runner.new_session()
    logits = session.feed(prompt)
    got = []
    for _ in range(24):  # free-running through the cache: each step feeds only the new token
        got.append(int(np.argmax(logits)))
        logits = session.feed([got[-1]])
    assert got == want
    assert session.inner.past == len(prompt) + 24 and fp32_runner.info.kv_cache
    assert fp32_runner.info.details["interpreter"] == tb.interpreter_name()


def test_cached_steps_equal_the_full_forward(fp32_runner):
    ids = np.asarray([[1, 5, 9, 200, 7, 7, 31, 64, 2, 11]])
    session = fp32_runner.new_session()
    steps = np.stack([session.feed(ids[0, :4].tolist())] + [session.feed([t]) for t in ids[0, 4:]])  # (7, V)
    full = fp32_runner.forward(ids)[0, 3:]  # (7, V)
    assert_close_reordered(steps, full, what="cached vs full")


@pytest.mark.parametrize("B, T", [(1, 1), (2, 3), (3, 40)])
def test_dynamic_batch_and_length_match_torch(fp32_runner, nano_checkpoint, B, T):
    model = load_model(nano_checkpoint)
    ids = torch.randint(3, 2048, (B, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ref = model(ids).numpy()
    got = fp32_runner.forward(ids.numpy())
    assert got.shape == ref.shape and got.dtype == np.float32
    assert_close_reordered(got, ref, what=f"({B}, {T})")


# -- the other schemes and variants through deploykit.convert's proof -----------------------------------
@pytest.mark.parametrize("which, scheme", [("nano", "int8-dynamic"), ("nano-moe", "fp16"), ("legacy", "int8")])
def test_scheme_passes_its_proof_and_shrinks(request, tmp_path, fp32, which, scheme):
    ck = request.getfixturevalue({"nano": "nano_checkpoint", "nano-moe": "nano_moe_checkpoint",
                                  "legacy": "legacy_checkpoint"}[which])
    result = deploykit.convert(ck, "tflite", scheme, out=tmp_path / "a", threads=1)
    assert result.report.passed(), result.report.violations()
    size = result.manifest["files"][tb.MODEL_FILE]["bytes"]
    if which == "nano":
        assert size < 0.35 * fp32.manifest["files"][tb.MODEL_FILE]["bytes"]
    assert deploykit.load(result.path, threads=1).info.quant == scheme


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [s.name for s in tb.TFLiteBackend.schemes])
@pytest.mark.parametrize("which", ["nano", "nano-moe", "legacy"])
def test_every_scheme_and_variant(request, tmp_path, which, scheme):
    ck = request.getfixturevalue({"nano": "nano_checkpoint", "nano-moe": "nano_moe_checkpoint",
                                  "legacy": "legacy_checkpoint"}[which])
    assert deploykit.convert(ck, "tflite", scheme, out=tmp_path / "a", threads=1).report.passed()


# -- bad input ------------------------------------------------------------------------------------------
def test_corrupt_tflite_is_one_line_and_exit_2(fp32, tmp_path):
    import shutil

    from deploykit.cli.main import main

    bad = tmp_path / "bad"
    shutil.copytree(fp32.path, bad)
    data = (bad / tb.MODEL_FILE).read_bytes()
    (bad / tb.MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a loadable TFLite flatbuffer") as e:
        deploykit.load(bad, verify_files=False)  # the backend's own check, past the manifest's sha256
    assert "\n" not in str(e.value).split("\nHINT")[0]
    assert main(["generate", str(bad), "--prompt", "The", "--max-new-tokens", "2"]) == 2  # the sha256 refuses it
    (bad / tb.CONFIG_FILE).unlink()
    with pytest.raises(ArtifactError, match="no tflite_config.json"):
        BACKEND.load(bad, {})


def test_int8_without_calibration_writes_nothing(nano_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="tflite/int8 needs calibration"):
        deploykit.convert(nano_checkpoint, "tflite", "int8", out=tmp_path / "x", calibration=[])
    assert not (tmp_path / "x").exists()


def test_sequence_past_the_cache_capacity_is_refused(fp32_runner):
    with pytest.raises(ConfigError, match="max_length=256"):
        fp32_runner.forward(np.zeros((1, 257), dtype=np.int64))
    session = fp32_runner.new_session()
    session.feed([1] * 250)
    with pytest.raises(ConfigError, match="max_length=256"):
        session.feed([1] * 7)


# -- int8's float fallbacks: lm_head and the costliest layer group (keep_fp32=auto) ---------------------
def _tensor_types(path) -> dict[str, set[str]]:
    """{name scope of a FullyConnected's module: dtypes of the tensors under it} of a flatbuffer."""
    import tensorflow as tf

    out: dict[str, set[str]] = {}
    for d in tf.lite.Interpreter(model_path=str(path / tb.MODEL_FILE)).get_tensor_details():
        for part in d["name"].split(";"):
            scope = part.split("/")[0]
            if scope.startswith(("model.layers.", "lm_head")):
                out.setdefault(scope, set()).add(np.dtype(d["dtype"]).name)
    return out


def test_int8_keeps_lm_head_and_the_costliest_group_float(nano_checkpoint, tmp_path):
    result = deploykit.convert(nano_checkpoint, "tflite", "int8", out=tmp_path / "a", threads=1)
    assert result.report.passed(), result.report.violations()
    info = result.manifest["backend_info"]
    auto = info["keep_fp32_auto"]
    assert len(auto["kept_groups"]) == 1 and auto["modules"]
    assert set(info["kept_fp32"]) == {"lm_head", *auto["modules"]}
    types = _tensor_types(result.path)
    for name in info["kept_fp32"]:
        assert "int8" not in types[name], (name, types[name])
    quantized = [n for n in types if n not in info["kept_fp32"] and n.startswith("model.layers.")]
    assert quantized and all("int8" in types[n] for n in quantized), {n: types[n] for n in quantized}


def test_int8_keep_fp32_names_and_smoothquant(nano_checkpoint, tmp_path):
    result = deploykit.convert(nano_checkpoint, "tflite", "int8", out=tmp_path / "a", threads=1, verify=False,
                               options={"keep_fp32": "model.layers.1.self_attn.o_proj", "quantize_lm_head": "true",
                                        "smoothquant": "true", "smoothquant_alpha": "0.5"})
    info = result.manifest["backend_info"]
    assert info["kept_fp32"] == ["model.layers.1.self_attn.o_proj"] and info["smoothquant"]["alpha"] == 0.5
    types = _tensor_types(result.path)
    assert "int8" not in types["model.layers.1.self_attn.o_proj"] and "int8" in types["lm_head"]
    with pytest.raises(ConfigError, match="keep_fp32 'model.layers.9' names no quantized module"):
        deploykit.convert(nano_checkpoint, "tflite", "int8", out=tmp_path / "b", options={"keep_fp32": "model.layers.9"})


# -- int8 regressions (issue 12) -----------------------------------------------------------------------------
def test_int8_rounds_only_weights_and_matmul_inputs_never_the_kv_cache(nano_checkpoint, tmp_path):
    """Two things TFLite's converter did behind the graph's back, both fixed:

    - every GATHER ran in int8 (GATHER was not a denylisted op): the new k/v rows written into the cache,
      the cache's rows gathered for the grouped-query heads and the rotary tables were re-rounded onto one
      per-tensor grid (the v rows of all layers even shared one scale). Only the embedding's lookup is int8.
    - a constant Mul feeding a FullyConnected is folded into its weights: ``x * rsqrt(...) * gain`` put
      the norm's gain (where SmoothQuant's 1/s lives) into the FC, undoing the smoothing. The gain now
      multiplies before the per-row rsqrt, so the FC's weights are the module's own.
    """
    import tensorflow as tf

    model = load_model(nano_checkpoint)
    with torch.no_grad():  # gains far from 1, so a folded gain would show in the FC weights
        for block in model.model.layers:
            block.input_layernorm.weight.copy_(torch.linspace(0.5, 2.0, model.config.d_model))
    from deploykit import save_model
    from deploykit.model.tokenizer import Tokenizer

    src = save_model(model, tmp_path / "gains", Tokenizer.load(nano_checkpoint))
    result = deploykit.convert(src, "tflite", "int8", out=tmp_path / "a", threads=1, verify=False,
                               options={"keep_fp32": ""})  # nano's int8 proof: the test above
    it = tf.lite.Interpreter(model_path=str(result.path / tb.MODEL_FILE))
    it.allocate_tensors()
    det = {d["index"]: d for d in it.get_tensor_details()}
    ops = it._get_ops_details()
    gathers = [np.dtype(det[o["outputs"][0]]["dtype"]).name for o in ops if o["op_name"] == "GATHER"]
    assert gathers.count("int8") == 1 and len(gathers) > 1, gathers  # the embedding alone
    fc = next(o for o in ops if o["op_name"] == "FULLY_CONNECTED"
              and "model.layers.1.self_attn.q_proj" in det[o["outputs"][0]]["name"])
    w = det[fc["inputs"][1]]
    scales = w["quantization_parameters"]["scales"][:, None]  # per output channel
    got = it.get_tensor(w["index"]).astype(np.float32) * scales  # (out, in)
    want = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(got - want).max() <= 0.51 * scales.max()  # the module's weight, rounded once
    gain = model.model.layers[1].input_layernorm.weight.detach().numpy()
    assert np.abs(got - want * gain).max() > 10 * scales.max()  # not the gain-folded one


@pytest.mark.slow
def test_moe_int8_auto_never_picks_the_expert_down_projections_kept_float(nano_moe_checkpoint, tmp_path):
    """MoE expert down projections are always float here (EXPERT_DOWN_SCOPE). keep_fp32=auto ranked them
    anyway, chose them on micro-moe and the conversion failed: their tensors carry no module scope."""
    result = deploykit.convert(nano_moe_checkpoint, "tflite", "int8", out=tmp_path / "a", threads=1, verify=False)
    auto = result.manifest["backend_info"]["keep_fp32_auto"]
    assert auto["always_float"] == ["expert_down"] and not any(g.endswith("mlp_down") for g in auto["kept_groups"])
    named = deploykit.convert(nano_moe_checkpoint, "tflite", "int8", out=tmp_path / "b", threads=1, verify=False,
                              options={"keep_fp32": "model.layers.0.block_sparse_moe.experts.w2"})
    assert named.manifest["backend_info"]["kept_fp32"] == ["lm_head", "model.layers.0.block_sparse_moe.experts.w2"]
