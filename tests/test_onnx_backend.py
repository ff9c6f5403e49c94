"""The ONNX backend: export, every scheme's parity against torch, the KV-cache graph, the runner.

Models: tiny dense and MoE decoders trained for a few seconds on noisy permutation chains (token
t+1 = perm_k[token t] 90% of the time, k = first token mod 2), so their logits are confident and
top-1 / greedy agreement means something (random-weight models have near-ties everywhere and
exaggerate quantization error), and the next token depends on the start of the sequence, so a
decoder that loses its KV cache is visibly wrong. Each model is exported once per module; every scheme is derived from that
export exactly as ``OnnxBackend.convert`` does after its own export.

The end-to-end tests at the bottom go through ``deploykit.convert`` / ``deploykit.load`` (its parity
proof included) on the shared trained ``nano`` / ``nano-moe`` checkpoints from conftest.py.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from deploykit_plugins import onnx_backend as ob  # noqa: E402

from deploykit.deploy.backend import ConvertContext, Scheme  # noqa: E402
from deploykit.deploy.parity import compare_logits  # noqa: E402
from deploykit.errors import ConfigError  # noqa: E402
from deploykit.model.config import ModelConfig  # noqa: E402
from deploykit.model.generation import generate as torch_generate  # noqa: E402
from deploykit.model.graph import CausalLM  # noqa: E402

VOCAB = 320
PERMS = torch.stack([torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed)) for seed in (123, 456)])
SCHEMES = [s.name for s in ob.OnnxBackend.schemes]
BACKEND = ob.OnnxBackend()


def chain(n: int, T: int, seed: int) -> torch.Tensor:
    """(n, T) token ids: a chain through perm_k, k = first token mod 2, with 10% uniform noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(3, VOCAB, (n,), generator=g)
    perm = PERMS[x[:, 0] % 2]  # (n, V)
    for t in range(1, T):
        noise = torch.rand(n, generator=g) < 0.1
        nxt = perm.gather(1, x[:, t - 1:t])[:, 0]  # (n,)
        x[:, t] = torch.where(noise, torch.randint(3, VOCAB, (n,), generator=g), nxt)
    return x


def tiny_config(variant: str) -> ModelConfig:
    return ModelConfig(variant=variant, vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=2 if variant != "legacy" else 4, ffn_dim=128, max_seq_len=64,
                       n_experts=4 if variant == "moe" else 0, tie_embeddings=variant != "moe")


def train_tiny(variant: str, steps: int = 160) -> CausalLM:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: more threads only add contention on a shared CI box
    try:
        torch.manual_seed(0)
        model = CausalLM(tiny_config(variant))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(steps):
            x = chain(16, 33, seed=step)
            logits = model(x[:, :-1])  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            if model.aux_loss() is not None:
                loss = loss + 0.01 * model.aux_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def parity(ref: np.ndarray, got: np.ndarray, ids: np.ndarray | None = None) -> dict[str, float]:
    """The proof's own numbers (deploykit.deploy.parity.compare_logits): max |Δlogit| (absolute and per
    logit range), mean KL(p_ref ‖ p_got) per position, top-1 agreement, Δ perplexity of ``ids``' next tokens."""
    r = compare_logits("probe", ref, got, ids=ids)
    dppl = math.expm1((r.nll_sum - r.nll_ref_sum) / r.nll_tokens) if r.nll_tokens else 0.0
    return {"max_abs": r.max_abs_logit, "rel": r.max_rel_logit, "kl": r.mean_kl, "top1": r.top1, "dppl": dppl}


def within(scheme: Scheme, p: dict[str, float]) -> bool:
    t = scheme.tolerance
    return ((t.max_abs_logit is None or p["max_abs"] <= t.max_abs_logit)
            and (t.max_rel_logit is None or p["rel"] <= t.max_rel_logit)
            and (t.max_delta_ppl is None or abs(p["dppl"]) <= t.max_delta_ppl)
            and p["kl"] <= t.max_kl and p["top1"] >= t.min_top1)


# -- fixtures: one trained model, one export and every derived scheme per variant --------------------
@pytest.fixture(scope="module", params=["dense", "moe"])
def variant(request) -> str:
    return request.param


_MODELS: dict[str, CausalLM] = {}


@pytest.fixture(scope="module")
def model(variant) -> CausalLM:
    if variant not in _MODELS:
        _MODELS[variant] = train_tiny(variant)
    return _MODELS[variant]


@pytest.fixture(scope="module")
def artifacts(variant, model, tmp_path_factory) -> dict[str, Path]:
    """scheme name -> artifact folder. fp32 via Backend.convert, the others derived from its graph."""
    root = tmp_path_factory.mktemp(f"onnx-{variant}")
    out = {"fp32": root / "fp32"}
    out["fp32"].mkdir()
    ctx = ConvertContext(source=None, tokenizer=None)
    facts = BACKEND.convert(model, BACKEND.scheme("fp32"), out["fp32"], ctx)
    assert facts["graph"].startswith("merged") and facts["opset"] >= 17
    calibration = [s.tolist() for s in chain(8, 32, seed=999)]
    for name in SCHEMES[1:]:
        out[name] = root / name
        out[name].mkdir()
        ob.derive_scheme(out["fp32"] / ob.MODEL_FILE, out[name] / ob.MODEL_FILE, name, calibration)
    return out


_RUNNERS: dict[tuple[str, str], ob.OnnxRunner] = {}


def runner_for(artifacts: dict[str, Path], variant: str, scheme: str) -> ob.OnnxRunner:
    key = (variant, scheme)
    if key not in _RUNNERS:
        _RUNNERS[key] = BACKEND.load(artifacts[scheme], {}, threads=1)
    return _RUNNERS[key]


PROBE = chain(4, 40, seed=10_007)  # (4, 40): seeds 0..119 are the training batches


# -- requirements and registration (no onnx needed) ---------------------------------------------------
def test_missing_requirements_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    missing = ob.OnnxBackend().missing_requirements()
    assert missing == ["onnxruntime is not installed: pip install 'deploykit[onnx]'"]


def test_available_here_and_registered_through_the_hook():
    assert BACKEND.missing_requirements() == []
    (backend,) = ob.deploykit_backends()
    assert backend.name == "onnx" and backend.default_scheme == "fp32"
    assert SCHEMES == ["fp32", "fp16", "int8-dynamic", "int8-static"]
    assert set(backend.versions()) == {"onnx", "onnxruntime", "onnxscript"}


# -- every scheme, dense and MoE ----------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_artifact_is_a_checked_onnx_graph(artifacts, scheme):
    folder = artifacts[scheme]
    assert sorted(p.name for p in folder.iterdir()) == [ob.MODEL_FILE]  # no pickle, no leftovers
    onnx.checker.check_model(str(folder / ob.MODEL_FILE), full_check=True)
    proto = onnx.load(str(folder / ob.MODEL_FILE), load_external_data=False)
    assert [i.name for i in proto.graph.input][:3] == ["input_ids", "past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in proto.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    assert {p.key: p.value for p in proto.metadata_props}[ob.META_QUANT] == scheme


@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_match_torch_within_the_scheme_tolerance(artifacts, model, variant, scheme):
    runner = runner_for(artifacts, variant, scheme)
    with torch.no_grad():
        ref = model(PROBE).numpy()  # (4, 40, V) with the model's own (sorted) MoE dispatch
    got = runner.forward(PROBE.numpy())
    assert got.shape == ref.shape and got.dtype == np.float32
    p = parity(ref, got, PROBE.numpy())
    print(f"{variant} {scheme}: {p}")
    assert within(BACKEND.scheme(scheme), p), p
    if scheme == "fp32":
        assert p["max_abs"] < 1e-4  # the export itself is exact up to float reordering


# |cached step - full forward| per scheme. fp32/fp16/int8-static: the same function, only the GEMM
# shapes differ (1 new row vs the whole sequence), so float reordering (and for int8-static, a rare
# activation crossing a rounding boundary; scales are fixed). int8-dynamic quantizes activations per
# token, so a one-token step gets the very scale its row gets in the whole sequence (per tensor, it
# differed by design and needed 1.0). A cache bug (wrong past, lost positions) moves logits by O(1).
KV_ATOL = {"fp32": 1e-4, "fp16": 5e-2, "int8-static": 0.1, "int8-dynamic": 0.1}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_kv_cache_decoding_equals_full_recompute(artifacts, model, variant, scheme):
    runner = runner_for(artifacts, variant, scheme)
    prompt = PROBE[0, :6].tolist()
    # Teacher-forced: the fp32 model's greedy continuation, fed to the cached session step by step
    # and to one full forward, so both sides see the same tokens whatever they would pick.
    reference = torch_generate(model, prompt, 16, eos_token_id=None)
    session = runner.new_session()
    steps = np.stack([session.feed(prompt)] + [session.feed([t]) for t in reference[:-1]])  # (16, V)
    full = runner.forward([prompt + reference[:-1]])[0, len(prompt) - 1:]  # (16, V)
    err = np.abs(steps - full).max(-1)  # (16,)
    print(f"\n{variant} {scheme}: cached vs full max {err.max():.2e} median {np.median(err):.2e}")
    assert err.max() < KV_ATOL[scheme], err
    assert (steps.argmax(-1) == full.argmax(-1)).mean() >= 0.9
    # Free-running, the artifact decodes what the torch model decodes, to its scheme's greedy tolerance
    # (EXACT for fp32: every token).
    cached = runner.generate(prompt, max_new_tokens=16)
    want = torch_generate(model, prompt, 16, eos_token_id=model.config.eos_token_id)
    match = np.mean([a == b for a, b in zip(cached, want)]) if want else 1.0
    assert match >= BACKEND.scheme(scheme).tolerance.min_greedy_match, (cached, want)


def test_int8_artifacts_are_smaller_than_fp32(artifacts, variant):
    size = {s: (artifacts[s] / ob.MODEL_FILE).stat().st_size for s in SCHEMES}
    print(f"{variant} sizes vs fp32: " + ", ".join(f"{s} {size[s] / size['fp32']:.2f}" for s in SCHEMES))
    assert size["fp16"] < 0.8 * size["fp32"]
    assert size["int8-dynamic"] < 0.7 * size["fp32"]
    assert size["int8-static"] < 0.7 * size["fp32"]


# -- fp16: what stays fp32 stays fp32 ------------------------------------------------------------------
def _casts_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


@pytest.mark.parametrize("scheme", ["fp16"])
def test_fp16_artifact_keeps_rotary_angles_and_squares_fp32(artifacts, scheme):
    graph = onnx.load(str(artifacts[scheme] / ob.MODEL_FILE)).graph
    producer = {o: n for n in graph.node for o in n.output}
    assert not [n.name for n in graph.node if _casts_to(n) == onnx.TensorProto.FLOAT and n.input[0] in producer
                and _casts_to(producer[n.input[0]]) == onnx.TensorProto.FLOAT16]
    todo = [n for n in graph.node if n.op_type in ("Cos", "Sin")]
    assert todo
    while todo:  # nothing upstream of the angles is ever fp16
        node = todo.pop()
        assert _casts_to(node) != onnx.TensorProto.FLOAT16, node.name
        todo.extend(producer[i] for i in node.input if i in producer)
    means = [n for n in graph.node if n.op_type == "ReduceMean"]
    assert means and all(producer[n.input[0]].op_type == "Pow" for n in means)


# -- the KV graph, dynamic shapes ---------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 17, 64])
def test_dynamic_batch_and_sequence(artifacts, model, variant, T):
    runner = runner_for(artifacts, variant, "fp32")
    ids = chain(2, T, seed=T)  # (2, T)
    with torch.no_grad():
        ref = model(ids).numpy()
    np.testing.assert_allclose(runner.forward(ids), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(runner.forward(ids[1]), ref[1:], atol=1e-4, rtol=0)  # (T,) input


def test_chunked_prefill_with_past_zero_and_positive(artifacts, model, variant):
    """Past lengths 0, 5, 9 and chunks of 5, 4, 1, batch 2: presents and logits equal the full pass."""
    runner = runner_for(artifacts, variant, "fp32")
    ids = PROBE[:2, :10].numpy()
    past, logits = None, []
    for a, b in [(0, 5), (5, 9), (9, 10)]:
        out, past = runner.run(ids[:, a:b], past)
        logits.append(out)
    full, present = runner.run(ids, None)
    np.testing.assert_allclose(np.concatenate(logits, axis=1), full, atol=1e-4, rtol=0)
    assert list(past) == list(present) and past["past_key_values.1.value"].shape == (2, 2, 10, 16)
    for name in past:
        np.testing.assert_allclose(past[name], present[name], atol=1e-5, rtol=0)


def test_tier_catches_a_decoder_that_ignores_its_past(artifacts, model, variant):
    """The declared tolerances are not vacuous: dropping the KV cache fails even the int8 tier."""
    runner = runner_for(artifacts, variant, "fp32")
    ids = PROBE[:1, :20].numpy()
    forgetful = np.concatenate([runner.run(ids[:, t:t + 1], None)[0] for t in range(20)], axis=1)  # (1, 20, V)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    assert not within(BACKEND.scheme("int8-static"), parity(ref, forgetful, ids))


# -- the runner -------------------------------------------------------------------------------------
def test_runner_info(artifacts, variant):
    info = runner_for(artifacts, variant, "int8-dynamic").info
    assert info.backend == "onnx" and info.quant == "int8-dynamic" and info.kv_cache is True
    assert info.files == {ob.MODEL_FILE: (artifacts["int8-dynamic"] / ob.MODEL_FILE).stat().st_size}
    assert info.details["providers"] == ["CPUExecutionProvider"] and info.threads == 1 and info.details["opset"] >= 17


def test_runner_is_thread_safe(artifacts, variant):
    runner = BACKEND.load(artifacts["fp32"], {}, threads=2)
    inputs = [chain(1 + i % 2, 3 + i % 7, seed=i).numpy() for i in range(20)]
    serial = [runner.forward(x) for x in inputs]
    results: dict[tuple[int, int], np.ndarray] = {}

    def work(t: int) -> None:
        for i, x in enumerate(inputs):
            results[t, i] = runner.forward(x)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 * 20
    for (t, i), got in results.items():
        # Exact on purpose: the same session, input shape and thread count as the serial call, so only
        # a data race (threads sharing scratch buffers) could change a bit.
        np.testing.assert_array_equal(got, serial[i])


def test_bad_input_is_named(artifacts, variant, tmp_path):
    from deploykit.errors import ArtifactError, ConfigError

    runner = runner_for(artifacts, variant, "fp32")
    with pytest.raises(ConfigError, match="65 tokens per sequence, more than this model's max_length=64"):
        runner.forward(np.zeros((1, 65), dtype=np.int64))
    with pytest.raises(ConfigError, match=r"input_ids must be token ids in \[0, 320\)"):
        runner.forward([[1, -1]])  # ONNX Runtime's Gather would wrap it to the last row
    with pytest.raises(ConfigError, match="threads"):
        BACKEND.load(artifacts["fp32"], {}, threads=-1)
    with pytest.raises(ArtifactError, match="no model.onnx"):
        BACKEND.load(tmp_path, {})
    with pytest.raises(ConfigError, match="calibration"):
        ob.derive_scheme(artifacts["fp32"] / ob.MODEL_FILE, tmp_path / ob.MODEL_FILE, "int8-static", [])


def test_tokenizer_in_the_artifact_enables_text_generation(artifacts, variant, tmp_path):
    if importlib.util.find_spec("deploykit.model.tokenizer") is None:
        pytest.skip("deploykit.model.tokenizer has not landed")
    from deploykit.model.tokenizer import Tokenizer

    folder = tmp_path / "with-tokenizer"
    shutil.copytree(artifacts["fp32"], folder)
    Tokenizer.train(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300).save(folder)
    runner = BACKEND.load(folder, {}, threads=1)
    assert isinstance(runner.generate("the quick", max_new_tokens=5), str)


# -- end to end: deploykit.convert (with its parity proof) and deploykit.load ----------------------------
@pytest.mark.parametrize("which, quant", [("nano", "int8-static"), ("nano-moe", "int8-dynamic")])
def test_deploykit_convert_and_load(request, tmp_path, which, quant):
    import deploykit

    checkpoint = request.getfixturevalue({"nano": "nano_checkpoint", "nano-moe": "nano_moe_checkpoint"}[which])
    result = deploykit.convert(checkpoint, backend="onnx", quant=quant, out=tmp_path / "artifact")
    print(f"{which} {quant}: max {result.report.max_abs_logit:.3g} kl {result.report.mean_kl:.3g} "
          f"top1 {result.report.top1:.3f} greedy {result.report.greedy_match:.3f}")
    assert result.report.passed()
    assert {ob.MODEL_FILE, "tokenizer.json"} <= set(result.manifest["files"]) and not result.manifest["pickle_files"]
    runner = deploykit.load(tmp_path / "artifact", threads=1)
    assert runner.info.quant == quant and runner.info.kv_cache is True
    assert isinstance(runner.generate("The", max_new_tokens=8), str)


@pytest.mark.slow
@pytest.mark.parametrize("quant", SCHEMES)
@pytest.mark.parametrize("which", ["nano", "nano-moe"])
def test_deploykit_convert_every_scheme(request, tmp_path, which, quant):
    import deploykit

    checkpoint = request.getfixturevalue({"nano": "nano_checkpoint", "nano-moe": "nano_moe_checkpoint"}[which])
    result = deploykit.convert(checkpoint, backend="onnx", quant=quant, out=tmp_path / "artifact")
    assert result.report.passed(), result.report.per_probe_lines()


# -- slower: full convert() of a derived scheme, the legacy variant -------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant_name", ["legacy", "dense"])
def test_convert_end_to_end(tmp_path, variant_name):
    model = train_tiny(variant_name, steps=60)
    stages: list[str] = []
    ctx = ConvertContext(source=None, tokenizer=None, calibration=[s.tolist() for s in chain(8, 32, seed=5)],
                         progress=stages.append)
    for scheme in ("fp32", "int8-static"):
        out = tmp_path / scheme
        out.mkdir()
        facts = BACKEND.convert(model, BACKEND.scheme(scheme), out, ctx)
        assert sorted(p.name for p in out.iterdir()) == [ob.MODEL_FILE]  # the .export work folder is gone
        assert facts["files"][ob.MODEL_FILE] > 0 and facts["export_seconds"] > 0
        with torch.no_grad():
            ref = model(PROBE).numpy()
        assert within(BACKEND.scheme(scheme), parity(ref, BACKEND.load(out, {}, threads=1).forward(PROBE.numpy())))
    assert stages[0].startswith("exporting")


def test_export_traces_the_model_in_eval_mode(tmp_path, recwarn):
    """The exported graph is the inference graph: no module is traced in training mode (torch warns
    "Exporting a model while it is in training mode" when one is), and the caller's model is untouched."""
    from deploykit import preset

    model = CausalLM(preset("nano", vocab_size=256, max_seq_len=32))
    model.train()
    ob.export_onnx(model, tmp_path / ob.MODEL_FILE)
    assert not [w for w in recwarn if "training mode" in str(w.message)]
    assert model.training


def test_lm_head_can_stay_fp32(artifacts, variant):
    """quantize_lm_head=false leaves exactly the MatMul that produces the logits out of the int8 nodes."""
    import onnx

    proto, _ = ob._expose_weights(onnx.load(str(artifacts["fp32"] / ob.MODEL_FILE)))
    every, kept = ob._weight_nodes(proto), ob._weight_nodes(proto, quantize_lm_head=False)
    head = [n.name for n in proto.graph.node if "logits" in n.output]
    assert head and head[0] in every and head[0] not in kept and len(kept) == len(every) - 1


def test_int8_options_are_parsed():
    opts = BACKEND.scheme("int8-dynamic").parse_options({"smoothquant": "true", "quantize_lm_head": "false",
                                                         "keep_fp32": "lm_head", "per_channel": "false"},
                                                        backend="onnx")
    assert opts.smoothquant is True and opts.quantize_lm_head is False and opts.smoothquant_alpha == -1.0
    assert opts.keep_list() == ["lm_head"] and opts.per_channel is False
    assert BACKEND.scheme("int8-static").parse_options({}, backend="onnx").per_channel is True  # the default


# -- per-channel weights and keep_fp32 ---------------------------------------------------------------
def _int8_weights(proto) -> list[tuple[str, tuple[int, ...], np.ndarray, int]]:
    """(name, dims, scale, output axis) of every int8 MatMul/Gemm weight initializer of a quantized graph:
    the B operand of a MatMulInteger (dynamic) or the x of a DequantizeLinear feeding a MatMul/Gemm (QDQ;
    the embedding's Gather table is quantized like an activation, per tensor, and is not listed). The
    output axis is the last one of a MatMul weight (K, N) / (E, K, N), the first of a Gemm's transB (N, K)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    consumer = {i: n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
    out = []
    for n in proto.graph.node:
        if n.op_type == "MatMulInteger" and n.input[1] in inits:
            w, scale, out_axis = n.input[1], inits[n.input[1].removesuffix("_quantized") + "_scale"], -1
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits and n.output[0] in consumer:
            w, scale = n.input[0], inits[n.input[1]]
            user = consumer[n.output[0]]
            trans_b = user.op_type == "Gemm" and any(a.name == "transB" and a.i for a in user.attribute)
            out_axis = 0 if trans_b else -1
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if numpy_helper.to_array(scale).size > 1:
                assert axis % len(inits[w].dims) == out_axis % len(inits[w].dims), (w, axis)
        else:
            continue
        dims = tuple(inits[w].dims)
        if len(dims) >= 2 and inits[w].data_type == onnx.TensorProto.INT8:
            out.append((w, dims, numpy_helper.to_array(scale), out_axis))
    return out


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-static"])
def test_int8_weights_have_one_scale_per_output_channel(artifacts, variant, scheme):
    """The default: one scale per output channel (the last axis of a MatMul weight (K, N)); the stacked
    experts' (E, K, N) get one per expert and channel in int8-dynamic (E, 1, N) and one per tensor in
    int8-static (see onnx_backend._quantize_static why); per_channel=false gives one per tensor."""
    weights = _int8_weights(onnx.load(str(artifacts[scheme] / ob.MODEL_FILE)))
    assert len(weights) >= (7 if variant == "dense" else 6) * 2  # per layer: q k v o + gate up down | w1 w3
    for name, dims, scale, out_axis in weights:
        if len(dims) == 3 and scheme == "int8-dynamic":
            assert scale.shape == (dims[0], 1, dims[2]), (name, dims, scale.shape)
        elif len(dims) == 3:
            assert scale.size == 1, (name, scale.shape)
            continue
        else:
            assert scale.shape == (dims[out_axis],), (name, dims, scale.shape)
        assert np.unique(scale).size > 1, name  # real per-channel scales, not one value repeated
    if variant == "moe":  # the experts are quantized too, except their down projections (float)
        assert sum(len(dims) == 3 for _, dims, _, _ in weights) == 2 * 2  # (w1, w3) x 2 layers


def _matmul_graph(path: Path, w: np.ndarray) -> None:
    """A one-MatMul graph y = x @ w, x (1, T, K) float."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", w.shape[1]])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))


def test_per_token_activations_match_a_numpy_reference_and_beat_per_tensor(tmp_path):
    """The rewrite computes round(x / s_row) (int8) @ w_q * s_row * s_col, with s_row = max|x_row| / 127,
    exactly (int32 accumulation); a token with an outlier channel then leaves the others' grids alone."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    K, N, T = 64, 48, 6
    w = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((1, T, K)).astype(np.float32)
    x[0, 2, 5] = 80.0  # one token's outlier channel
    _matmul_graph(tmp_path / "f.onnx", w)
    out = {}
    for per_token in (True, False):
        dst = tmp_path / f"q{per_token}.onnx"
        facts = ob._quantize_dynamic(onnx.load(str(tmp_path / "f.onnx")), dst, False, ["mm"], per_channel=True,
                                     per_token=per_token)
        ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
        assert ("DynamicQuantizeLinear" in ops) is (not per_token) and ("per token" in facts["activations"]) is per_token
        sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        out[per_token] = sess.run(None, {"x": x})[0]
    s_col = np.abs(w).max(axis=0) / 127.0  # (N,) ORT's symmetric per-channel weights
    w_q = np.clip(np.rint(w / s_col), -127, 127)
    s_row = np.abs(x).max(axis=-1, keepdims=True) / 127.0  # (1, T, 1)
    x_q = np.clip(np.rint(x / s_row), -127, 127)
    ref = (x_q @ w_q) * s_row * s_col
    np.testing.assert_allclose(out[True], ref, rtol=1e-5, atol=1e-4)
    exact = x @ w
    others = [t for t in range(T) if t != 2]
    err = {k: np.abs(v - exact)[0, others].max() for k, v in out.items()}
    assert err[True] < 0.25 * err[False], err  # per tensor, the outlier sets every token's step


def test_int8_dynamic_graph_quantizes_per_token_unless_asked(artifacts, tmp_path):
    ops = [n.op_type for n in onnx.load(str(artifacts["int8-dynamic"] / ob.MODEL_FILE)).graph.node]
    assert "DynamicQuantizeLinear" not in ops and ops.count("ReduceMax") >= 7 and "MatMulInteger" in ops
    ob.derive_scheme(artifacts["fp32"] / ob.MODEL_FILE, tmp_path / ob.MODEL_FILE, "int8-dynamic", per_token=False)
    ops = [n.op_type for n in onnx.load(str(tmp_path / ob.MODEL_FILE)).graph.node]
    assert "DynamicQuantizeLinear" in ops and "ReduceMax" not in ops
    assert BACKEND.scheme("int8-dynamic").parse_options({"per_token": "false"}, backend="onnx").per_token is False


def test_per_tensor_weights_on_request(artifacts, tmp_path):
    calibration = [s.tolist() for s in chain(8, 32, seed=999)]
    ob.derive_scheme(artifacts["fp32"] / ob.MODEL_FILE, tmp_path / ob.MODEL_FILE, "int8-static", calibration,
                     per_channel=False)
    weights = _int8_weights(onnx.load(str(tmp_path / ob.MODEL_FILE)))
    assert weights and all(scale.size == 1 for _, _, scale, _ in weights)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-static"])
def test_keep_fp32_layers_stay_float_matmuls(artifacts, model, variant, scheme, tmp_path):
    """keep_fp32 takes the torch backend's names (a block prefix here); that block's weight MatMuls
    (and the MoE router / experts) stay float MatMul/Gemm nodes reading float initializers, and the
    artifact is closer to fp32 than... at least still within the scheme's tolerance."""
    from deploykit.deploy.calibrate import kept_fp32

    modules = ob.weight_modules(model)
    keep = sorted(kept_fp32(list(modules), modules, ["model.layers.0"], where="test"))
    calibration = [s.tolist() for s in chain(8, 32, seed=999)]
    facts = ob.derive_scheme(artifacts["fp32"] / ob.MODEL_FILE, tmp_path / ob.MODEL_FILE, scheme, calibration,
                             keep_fp32=keep)
    kept = facts["kept_fp32"]["nodes"]
    # dense block: q k v o gate up down; MoE block: q k v o, the router, the experts' w1 w3 w2
    assert len(kept) == (7 if variant == "dense" else 8)
    proto = onnx.load(str(tmp_path / ob.MODEL_FILE))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    for name in kept:
        # a quantized node is replaced (dynamic: NAME_quant) or fed by DequantizeLinear; quantize_dynamic
        # rewrites every Gemm (the MoE router) as NAME_MatMul on a transposed float weight
        node = nodes.get(name) or nodes[name + "_MatMul"]
        assert node.op_type in ("MatMul", "Gemm"), (name, node.op_type)
        assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT, name
    every = _int8_weights(onnx.load(str(artifacts[scheme] / ob.MODEL_FILE)))
    assert 0 < len(_int8_weights(proto)) < len(every)  # block 1 (and the lm_head) are still int8
    with torch.no_grad():
        ref = model(PROBE).numpy()
    got = BACKEND.load(tmp_path, {}, threads=1).forward(PROBE.numpy())
    assert within(BACKEND.scheme(scheme), parity(ref, got, PROBE.numpy()))


def test_keep_fp32_refuses_a_name_that_is_no_layer(nano_checkpoint, tmp_path):
    import deploykit

    with pytest.raises(ConfigError, match="keep_fp32 'model.layers.99' names no quantized module"):
        deploykit.convert(nano_checkpoint, "onnx", "int8-dynamic", tmp_path / "x", options={"keep_fp32": "model.layers.99"})
    assert not (tmp_path / "x").exists()



def test_keep_fp32_auto_keeps_the_measured_costliest_group_float(nano_checkpoint, tmp_path):
    # The shared calibration layer measures every layer group's int8 cost with this scheme's
    # activations; onnx keeps the costliest group's MatMuls float and records what it measured.
    import deploykit

    r = deploykit.convert(nano_checkpoint, "onnx", "int8-static", tmp_path / "a", options={"keep_fp32": "auto"})
    assert r.report.passed(), r.report.per_probe_lines()
    info = r.manifest["backend_info"]
    auto = info["keep_fp32_auto"]
    ((group, cost),) = auto["kept_groups"].items()
    assert cost == max(auto["costliest"].values()) and auto["activations"] == "static"
    assert info["kept_fp32"]["modules"] == auto["modules"] and all(m.startswith(group.rsplit(".", 1)[0])
                                                                   for m in auto["modules"])
    assert len(info["kept_fp32"]["nodes"]) == len(auto["modules"])  # one float MatMul per kept linear

def test_trained_nano_int8_with_a_kept_block_passes_its_proof(nano_checkpoint, tmp_path):
    import deploykit

    r = deploykit.convert(nano_checkpoint, "onnx", "int8-dynamic", tmp_path / "a",
                          options={"keep_fp32": "model.layers.0,lm_head"})
    assert r.report.passed(), r.report.per_probe_lines()
    kept = r.manifest["backend_info"]["kept_fp32"]
    assert kept["modules"][0] == "lm_head" and len(kept["nodes"]) == 7 + 1
    assert r.manifest["backend_info"]["weights"] == "per output channel"
