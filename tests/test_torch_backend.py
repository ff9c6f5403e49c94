"""The torch backend: every scheme passes parity on trained nano and nano-moe, pickle-free, honest sizes."""
from __future__ import annotations

import json

import pytest
import torch

import deploykit
from deploykit.errors import ConfigError, ParityError

SCHEMES = ["fp32", "bf16", "int8-dynamic", "int8-static", "int8-qat", "prune-l1", "prune-structured"]
PICKLE = (".bin", ".pt", ".pth", ".pt2", ".ckpt", ".pkl", ".pickle")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Convert lazily, once per (model, scheme), for all tests of this module."""
    root, done = tmp_path_factory.mktemp("torch-art"), {}

    def get(checkpoint, scheme):
        key = (checkpoint.name, scheme)
        if key not in done:
            done[key] = deploykit.convert(checkpoint, "torch", scheme, root / f"{checkpoint.name}-{scheme}")
        return done[key]
    return get


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model", ["nano_checkpoint", "nano_moe_checkpoint"])
def test_scheme_passes_parity(request, artifacts, model, scheme):
    result = artifacts(request.getfixturevalue(model), scheme)
    report = result.report
    assert report.passed(), report.violations()
    files = list(result.path.iterdir())
    assert not [f.name for f in files if f.name.endswith(PICKLE)], "artifacts must be pickle-free"
    runner = deploykit.load(result.path)
    assert runner.info.quant == scheme and runner.info.kv_cache is True
    assert isinstance(runner.generate("Once upon a time", 4), str)


def _bytes(result):
    return result.manifest["files"]["model.safetensors"]["bytes"]


def test_sizes_reflect_the_scheme(nano_checkpoint, artifacts):
    fp32 = _bytes(artifacts(nano_checkpoint, "fp32"))
    assert _bytes(artifacts(nano_checkpoint, "bf16")) < 0.55 * fp32
    assert _bytes(artifacts(nano_checkpoint, "int8-dynamic")) < 0.6 * fp32  # embeddings stay fp32
    l1 = artifacts(nano_checkpoint, "prune-l1")
    assert _bytes(l1) < 0.9 * fp32 and l1.manifest["backend_info"]["pruned_fraction"] == pytest.approx(0.3, abs=0.01)
    st = artifacts(nano_checkpoint, "prune-structured")
    assert _bytes(st) < fp32 and st.manifest["backend_info"]["ffn_dim"] == [384, 288]


def test_bf16_runs_in_bf16(nano_checkpoint, artifacts):
    runner = deploykit.load(artifacts(nano_checkpoint, "bf16").path)
    assert runner.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_int8_schemes_run_int8_modules(nano_moe_checkpoint, artifacts):
    from deploykit_plugins.torch_backend import PerTokenInt8Linear, StaticInt8Linear

    dyn = deploykit.load(artifacts(nano_moe_checkpoint, "int8-dynamic").path).model
    static = deploykit.load(artifacts(nano_moe_checkpoint, "int8-static").path).model
    assert isinstance(dyn.model.layers[0].block_sparse_moe.experts[0].w1, PerTokenInt8Linear)
    assert isinstance(static.model.layers[0].block_sparse_moe.experts[0].w2, StaticInt8Linear)
    assert isinstance(static.model.layers[0].block_sparse_moe.gate, torch.nn.Linear)  # router stays fp32


def test_qat_improves_or_keeps_fakequant_kl(nano_checkpoint, artifacts):
    qat = artifacts(nano_checkpoint, "int8-qat").manifest["backend_info"]["qat"]
    assert qat["steps"] == 10 and qat["kl_fakequant_kept"] <= qat["kl_fakequant_start"]


def test_prune_structured_loads_in_transformers(nano_checkpoint, artifacts):
    transformers = pytest.importorskip("transformers")
    result = artifacts(nano_checkpoint, "prune-structured")
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.path).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    ours = deploykit.load(result.path).forward(ids)
    with torch.no_grad():
        theirs = hf(ids).logits.numpy()
    assert abs(ours - theirs).max() < 1e-3
    assert json.loads((result.path / "config.json").read_text())["intermediate_size"] == 288


def test_broken_quantizer_fails_parity(nano_checkpoint, tmp_path, monkeypatch):
    """The INT8 tolerance must catch a real bug: per-channel scales off by 2x."""
    from deploykit_plugins.torch_backend import modules as tb  # where the conversions look it up

    real = tb.quantize_int8
    monkeypatch.setattr(tb, "quantize_int8", lambda w: (lambda q, s: (q, s * 2))(*real(w)))
    with pytest.raises(ParityError):
        deploykit.convert(nano_checkpoint, "torch", "int8-dynamic", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_options_are_validated(nano_checkpoint, tmp_path):
    with pytest.raises(ConfigError) as e:
        deploykit.convert(nano_checkpoint, "torch", "prune-l1", tmp_path / "x", options={"sparsty": "0.5"})
    assert "sparsity" in e.value.hint
    with pytest.raises(ConfigError, match=r"torch/prune-l1: sparsity=1.5 must be in \[0, 1\)"):
        deploykit.convert(nano_checkpoint, "torch", "prune-l1", tmp_path / "x", options={"sparsity": "1.5"})
    with pytest.raises(ConfigError, match="qat_steps='many' must be an integer; unknown option 'steps'|"
                                          "unknown option 'steps'; qat_steps='many' must be an integer"):
        deploykit.convert(nano_checkpoint, "torch", "int8-qat", tmp_path / "x", options={"qat_steps": "many", "steps": 1})
    with pytest.raises(ConfigError, match="unknown option"):
        deploykit.convert(nano_checkpoint, "torch", "fp32", tmp_path / "x", options={"sparsity": "0.5"})
    assert not (tmp_path / "x").exists()


def test_per_token_int8_linear_scales_each_token_alone():
    """int8-dynamic's activations: one scale per token, so an outlier token leaves the others exact to
    their own int8 resolution, and a row alone equals the row inside a batch."""
    from deploykit.deploy.torchgraph import quantize_int8
    from deploykit_plugins.torch_backend import PerTokenInt8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    q, s = quantize_int8(lin.weight)
    mod = PerTokenInt8Linear(q, s, lin.bias)
    x = torch.randn(5, 64)
    x[2] *= 100  # an outlier token
    y = mod(x)
    w = q.float() * s[:, None]  # the int8 weights, dequantised
    for t in range(5):
        st = x[t].abs().max() / 127
        want = (torch.round(x[t] / st) * st) @ w.t() + lin.bias
        assert torch.allclose(y[t], want, rtol=1e-5, atol=1e-4)
        assert torch.equal(mod(x[t:t + 1])[0], y[t])
    assert (y[0] - lin(x[:1])[0]).abs().max() < 0.05 * lin(x[:1]).abs().max()  # not crushed by token 2
