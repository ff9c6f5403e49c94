"""The TensorRT backend: everything that runs without a GPU (why it is unavailable, the optimization
profiles, the Q/DQ graph TensorRT builds int8/fp8 engines from, run here by onnxruntime, the engine's
portability check), and, marked ``gpu``, the engine itself (skipped without an NVIDIA GPU)."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from deploykit_plugins import tensorrt_backend as trb

import deploykit
from deploykit.errors import ArtifactError, BackendUnavailable, ConfigError
from deploykit.model.config import preset

BACKEND = trb.TensorRTBackend()
HAVE_GPU = BACKEND.missing_requirements() == []
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.3.0"}
A10 = {"gpu": "NVIDIA A10G", "compute_capability": "8.6", "tensorrt": "10.3.0"}


# -- why it cannot run here -----------------------------------------------------------------------------
def test_registered_with_its_schemes():
    (backend,) = trb.deploykit_backends()
    assert backend.name == "tensorrt" and [s.name for s in backend.schemes] == ["fp16", "fp32", "int8", "fp8"]
    assert backend.platforms == "NVIDIA GPU"


@pytest.mark.skipif(HAVE_GPU, reason="this machine can run TensorRT")
def test_missing_requirements_is_one_line_naming_nvidias_index():
    (reason,) = BACKEND.missing_requirements()
    assert "\n" not in reason
    if importlib.util.find_spec("tensorrt") is None:
        assert "https://pypi.nvidia.com" in reason and "pip install 'deploykit[tensorrt]'" in reason
    assert ("CPU build" in reason or "no NVIDIA GPU" in reason) == (trb.gpu_unavailable() is not None)


@pytest.mark.skipif(HAVE_GPU, reason="this machine can run TensorRT")
def test_convert_is_refused_with_exit_4_and_writes_nothing(nano_checkpoint, tmp_path):
    from deploykit.cli.main import main

    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' cannot run here"):
        deploykit.convert(nano_checkpoint, "tensorrt", out=tmp_path / "x")
    assert main(["convert", str(nano_checkpoint), "--backend", "tensorrt", "--out", str(tmp_path / "x")]) == 4
    assert not (tmp_path / "x").exists()


def test_fp8_is_not_applicable_below_compute_capability_8_9(monkeypatch):
    cfg = preset("nano")
    monkeypatch.setattr(trb, "current_gpu", lambda: A10)
    assert "8.9" in BACKEND.unsupported(BACKEND.scheme("fp8"), cfg)
    assert BACKEND.unsupported(BACKEND.scheme("int8"), cfg) is None
    monkeypatch.setattr(trb, "current_gpu", lambda: H100)
    assert BACKEND.unsupported(BACKEND.scheme("fp8"), cfg) is None


# -- optimization profiles ------------------------------------------------------------------------------
def test_profiles_cover_prefill_and_decode():
    cfg = preset("nano-moe")
    prefill, decode = trb.profiles(cfg)
    names = ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(cfg.n_layers) for kv in ("key", "value")]
    assert list(prefill) == list(decode) == names
    assert prefill["input_ids"] == [[1, 1], [1, 128], [trb.MAX_BATCH, cfg.max_seq_len]]
    assert decode["input_ids"] == [[1, 1], [1, 1], [trb.MAX_BATCH, 1]]
    kv, hd = cfg.n_kv_heads, cfg.head_dim
    assert prefill["past_key_values.0.key"] == [[1, kv, 0, hd]] * 2 + [[trb.MAX_BATCH, kv, 0, hd]]
    assert decode["past_key_values.3.value"] == [[1, kv, 1, hd], [1, kv, 128, hd], [trb.MAX_BATCH, kv, 255, hd]]
    for profile in (prefill, decode):  # TensorRT's rule: min <= opt <= max in every dimension
        for lo, opt, hi in profile.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    with pytest.raises(ConfigError, match="max_batch=0"):
        trb.profiles(cfg, max_batch=0)


# -- the Q/DQ graph, run by onnxruntime on the CPU ----------------------------------------------------------
@pytest.fixture(scope="module")
def exported(nano_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from deploykit.deploy.onnx_graph import export_onnx
    from deploykit.model.checkpoint import load_model

    model = load_model(nano_checkpoint)
    path = tmp_path_factory.mktemp("trt") / "model.onnx"
    export_onnx(model, path)
    return model, path


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_qdq_graph_is_valid_and_within_the_int8_tier(exported, tmp_path, scheme):
    import onnx
    import onnxruntime as ort

    from deploykit.deploy.onnx_graph import io_names
    from deploykit.deploy.parity import calibration_sequences, compare_logits

    model, src = exported
    cfg = model.config
    facts = trb.quantize_graph(src, tmp_path / "q.onnx", scheme, calibration_sequences(cfg, None, n=4), cfg)
    assert facts["quantized_matmuls"] == cfg.n_layers * 7  # q, k, v, o, gate, up, down; the tied head stays
    proto = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("QuantizeLinear") == kinds.count("DequantizeLinear") > facts["quantized_matmuls"]
    zero_points = {t.data_type for t in proto.graph.initializer if t.name.endswith(".zp")}
    assert zero_points == {getattr(onnx.TensorProto, trb.QDQ[scheme][1])}
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    empty = {n: np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32) for n in io_names(cfg.n_layers)[0][1:]}
    got = session.run(["logits"], {"input_ids": ids.numpy(), **empty})[0]
    with torch.no_grad():
        ref = model(ids).numpy()
    r = compare_logits("probe", ref, got, ids=ids.numpy())
    tol = BACKEND.scheme(scheme).tolerance
    print(f"{scheme} Q/DQ on onnxruntime: max {r.max_abs_logit:.3g} rel {r.max_rel_logit:.3f} kl {r.mean_kl:.2e} top1 {r.top1:.3f}")
    assert r.max_rel_logit <= tol.max_rel_logit and r.mean_kl <= tol.max_kl
    assert r.max_abs_logit > 1e-4  # it is quantized: not the fp32 graph
    assert math.isfinite(r.nll_sum)


def test_qdq_without_calibration_is_refused(exported, tmp_path):
    model, src = exported
    with pytest.raises(ConfigError, match="tensorrt/int8 needs calibration"):
        trb.quantize_graph(src, tmp_path / "q.onnx", "int8", [], model.config)
    assert not (tmp_path / "q.onnx").exists()


# -- the engine's portability, checked before TensorRT is touched ------------------------------------------
def fake_artifact(folder, built):
    folder.mkdir()
    (folder / trb.ENGINE_FILE).write_bytes(b"not an engine")
    layout = trb.engine_config(preset("nano"), "fp16", built)
    (folder / trb.CONFIG_FILE).write_text(json.dumps(layout))
    return folder


def test_an_engine_for_another_gpu_is_refused_naming_both(tmp_path, monkeypatch):
    art = fake_artifact(tmp_path / "a", H100)
    monkeypatch.setattr(trb, "current_gpu", lambda: A10)
    with pytest.raises(ArtifactError) as e:
        BACKEND.load(art, {})
    message = str(e.value).split("\nHINT")[0]
    assert "\n" not in message and "compute capability 9.0 (NVIDIA H100" in message and "8.6 (NVIDIA A10G)" in message
    assert "not portable" in message and e.value.exit_code == 2
    monkeypatch.setattr(trb, "current_gpu", lambda: {**H100, "tensorrt": "10.5.0"})
    with pytest.raises(ArtifactError, match="with TensorRT 10.5.0"):
        BACKEND.load(art, {})
    monkeypatch.setattr(trb, "current_gpu", lambda: {"gpu": None, "compute_capability": None, "tensorrt": None})
    with pytest.raises(BackendUnavailable, match="this machine has no CUDA GPU"):
        BACKEND.load(art, {})


def test_a_damaged_config_is_one_line(tmp_path):
    art = fake_artifact(tmp_path / "a", H100)
    (art / trb.CONFIG_FILE).write_text('{"format": 7}')
    with pytest.raises(ArtifactError, match="format 7, this deploykit reads 1"):
        trb.read_config(art)
    (art / trb.ENGINE_FILE).unlink()
    with pytest.raises(ArtifactError, match="no tensorrt_config.json and model.engine"):
        trb.read_config(art)


# -- on an NVIDIA GPU -------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAVE_GPU, reason=f"needs an NVIDIA GPU and TensorRT: {'; '.join(BACKEND.missing_requirements())}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("scheme", ["fp16", "fp32", "int8", "fp8"])
def test_engine_passes_its_proof(nano_checkpoint, tmp_path, scheme):
    if BACKEND.unsupported(BACKEND.scheme(scheme), preset("nano")):
        pytest.skip(BACKEND.unsupported(BACKEND.scheme(scheme), preset("nano")))
    result = deploykit.convert(nano_checkpoint, "tensorrt", scheme, out=tmp_path / "a")
    assert result.report.passed(), result.report.violations()
    info = result.manifest["backend_info"]
    assert info["compute_capability"] == trb.current_gpu()["compute_capability"] and info["tensorrt"]
    runner = deploykit.load(tmp_path / "a")
    assert runner.info.kv_cache and isinstance(runner.generate("The", max_new_tokens=8), str)


@pytest.mark.skipif(HAVE_GPU, reason="this machine can run TensorRT")
def test_the_bench_reports_its_rows_as_unavailable_with_the_reason():
    from deploykit.bench.harness import plan_rows
    from deploykit.deploy.registry import backends

    rows = plan_rows(backends(), ("torch", "tensorrt", "tflite", "coreml"), None, preset("nano"))
    trt = [r for r in rows if r.backend == "tensorrt"]
    assert len(trt) == 1 and trt[0].scheme == "fp16,fp32,int8,fp8" and trt[0].reason == BACKEND.missing_requirements()[0]
    assert {r.backend for r in rows if r.reason is None} >= {"tflite", "coreml"}  # converted and measured here


@pytest.mark.skipif(HAVE_GPU, reason="this machine can run TensorRT")
def test_deploykit_backends_explains_the_absence_in_one_line(capsys):
    from deploykit.cli.main import main

    assert main(["backends", "--json"]) == 0
    (entry,) = [b for b in json.loads(capsys.readouterr().out)["backends"] if b["name"] == "tensorrt"]
    assert entry["available"] is False and entry["missing"] == BACKEND.missing_requirements()
    assert len(entry["missing"]) == 1 and "\n" not in entry["missing"][0]
