"""deploykit.deploy.calibrate: SmoothQuant is an exact rewrite in fp32, the keep_fp32 option is parsed,
validated and honoured, and the simulated-int8 sensitivity names the layers that cost most."""
from __future__ import annotations

import copy

import pytest
import torch

import deploykit
from deploykit.deploy.calibrate import SmoothQuantOptions, apply_smoothing, input_absmax, kept_fp32, smooth_quant
from deploykit.deploy.parity import calibration_sequences
from deploykit.deploy.roles import QUANTIZED, Role, linear_roles, select
from deploykit.errors import ConfigError
from deploykit.model import CausalLM, preset

from tolerances import assert_close_reordered


def _model(name: str, **over) -> CausalLM:
    torch.manual_seed(0)
    m = CausalLM(preset(name).replace(**over)).eval()
    with torch.no_grad():  # outlier channels, as trained models have: what smoothing exists for
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.rand_like(p) * 3)
        m.model.embed_tokens.weight[:, :3] *= 30
    return m


@pytest.mark.parametrize("name,over", [("nano", {}), ("nano-moe", {}), ("nano", {"variant": "legacy", "n_kv_heads": 4}),
                                       ("nano", {"tie_embeddings": True})])
def test_smoothquant_leaves_fp32_outputs_unchanged(name, over):
    model = _model(name, **over)
    cal = calibration_sequences(model.config, None, n=4, length=32)
    ids = torch.tensor(cal[:2])
    with torch.no_grad():
        ref = model(ids)
        smoothed = copy.deepcopy(model)
        stats = input_absmax(smoothed, ["model.layers.0.self_attn.q_proj"], cal)
        assert stats["model.layers.0.self_attn.q_proj"].shape == (model.config.d_model,)
        facts = smooth_quant(smoothed, cal, alpha=0.8)
        out = smoothed(ids)
    assert facts["sites"] > 0 and facts["alpha"] == 0.8
    # exact up to float rounding (the scales are not powers of two, so each product rounds once more)
    assert_close_reordered(out, ref, what=f"{name} {over} smoothed")
    q0 = smoothed.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q0, model.model.layers[0].self_attn.q_proj.weight)  # something did move


def test_smoothing_flattens_the_outlier_channels():
    model = _model("nano")
    cal = calibration_sequences(model.config, None, n=4, length=32)
    name = "model.layers.0.self_attn.q_proj"
    before = input_absmax(model, [name], cal)[name]
    act_max = input_absmax(model, [s for s in [name]], cal)
    smoothed = copy.deepcopy(model)
    apply_smoothing(smoothed, act_max, 0.5)
    after = input_absmax(smoothed, [name], cal)[name]
    assert after.max() / after.median() < before.max() / before.median()


def test_alpha_is_chosen_on_the_calibration_set():
    model = _model("nano")
    cal = calibration_sequences(model.config, None, n=4, length=32)
    facts = smooth_quant(model, cal, activations="per-tensor", alphas=(0.0, 0.5))
    assert set(facts["simulated_kl"]) == {"0", "0.5"}
    assert facts["alpha"] == min((0.0, 0.5), key=lambda a: facts["simulated_kl"][f"{a:g}"])


def test_keep_fp32_option_is_parsed_and_validated():
    opts = SmoothQuantOptions.parse({"keep_fp32": "lm_head, model.layers.0"}, where="t/int8")
    assert opts.keep_list() == ["lm_head", "model.layers.0"] and opts.smoothquant is False
    with pytest.raises(ConfigError, match="not a module name"):
        SmoothQuantOptions.parse({"keep_fp32": "layers[0]"}, where="t/int8")
    with pytest.raises(ConfigError, match="smoothquant_alpha=2.0"):
        SmoothQuantOptions.parse({"smoothquant_alpha": "2"}, where="t/int8")
    model = _model("nano")
    names = list(select(model, QUANTIZED))
    roles = linear_roles(model)
    kept = kept_fp32(names, roles, ["model.layers.0", "mlp_down"], where="t")
    assert {n for n in kept if n.startswith("model.layers.0.")} == {n for n in names if n.startswith("model.layers.0.")}
    assert all(f"model.layers.{i}.mlp.down_proj" in kept for i in range(model.config.n_layers))
    with pytest.raises(ConfigError, match="names no quantized module") as e:
        kept_fp32(names, roles, ["model.layer.0"], where="t")
    assert "lm_head" in e.value.hint


def test_torch_honours_keep_fp32_and_smoothquant(nano_checkpoint, tmp_path):
    from deploykit_plugins.torch_backend import PerTokenInt8Linear

    result = deploykit.convert(nano_checkpoint, "torch", "int8-dynamic", tmp_path / "a",
                               options={"keep_fp32": "model.layers.0,lm_head", "smoothquant": "true"})
    assert result.report.passed(), result.report.violations()
    info = result.manifest["backend_info"]
    assert info["smoothquant"]["sites"] > 0 and "model.layers.0.self_attn.q_proj" in info["kept_fp32"]
    model = deploykit.load(result.path).model
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, PerTokenInt8Linear)
    assert isinstance(model.lm_head, torch.nn.Linear)


# -- keep_fp32=auto: measured sensitivity ------------------------------------------------------------
def _costly(name: str, layer: int) -> CausalLM:
    """A model where block ``layer``'s MLP down projection reads one outlier channel 1000x its peers: an
    exact fp32 rewrite (up's row c times 1000, down's column c divided by 1000), so only int8 sees it."""
    model = _model(name)
    with torch.no_grad():
        block = model.model.layers[layer]
        if hasattr(block, "block_sparse_moe"):
            ex = block.block_sparse_moe.experts
            ex.w3[:, 5].mul_(1000.0)  # (E, F, D): row 5 of every expert's up
            ex.w2[:, :, 5].div_(1000.0)  # (E, D, F): the column that reads it
        else:
            block.mlp.up_proj.weight[5].mul_(1000.0)
            block.mlp.down_proj.weight[:, 5].div_(1000.0)
    return model


@pytest.mark.parametrize("name", ["nano", "nano-moe"])
def test_auto_keep_fp32_keeps_the_layer_made_costly(name):
    from deploykit.deploy.calibrate import group_costs, resolve_keep_fp32

    model = _costly(name, layer=2)
    cal = calibration_sequences(model.config, None, n=8, length=32)
    base, costs = group_costs(model, cal, activations="static")
    assert max(costs, key=costs.__getitem__) == "model.layers.2.mlp_down" and base > 0
    assert costs["model.layers.2.mlp_down"] > 3 * max(v for g, v in costs.items() if g != "model.layers.2.mlp_down")
    from deploykit.deploy.torchgraph import unstack_experts

    flat = copy.deepcopy(model)
    unstack_experts(flat)
    roles = linear_roles(flat)
    names = list(select(flat, QUANTIZED | {Role.LM_HEAD}))
    opts = SmoothQuantOptions.parse({"keep_fp32": "auto, lm_head"}, where="t/int8")
    keep, facts = resolve_keep_fp32(flat, names, roles, opts, cal, activations="static", where="t/int8")
    downs = {n for n in names if n.startswith("model.layers.2.") and roles[n].value in ("mlp_down", "expert_down")}
    assert keep == downs | {"lm_head"} and facts["modules"] == sorted(downs)  # lm_head: named, not measured
    assert list(facts["kept_groups"]) == ["model.layers.2.mlp_down"] and facts["mode"] == "auto:1"
    # auto:2 adds the next costliest group; nothing without calibration
    opts2 = SmoothQuantOptions.parse({"keep_fp32": "auto:2"}, where="t/int8")
    keep2, facts2 = resolve_keep_fp32(flat, names, roles, opts2, cal, activations="static", where="t/int8")
    assert len(facts2["kept_groups"]) == 2 and "model.layers.2.mlp_down" in facts2["kept_groups"] and keep2 > downs
    with pytest.raises(ConfigError, match="calibration sequences"):
        resolve_keep_fp32(flat, names, roles, opts, [], activations="static", where="t/int8")


def test_auto_keep_fp32_never_spends_its_pick_on_layers_the_backend_keeps_float():
    """tflite and onnx keep MoE expert down projections float whatever keep_fp32 says. auto used to rank
    them anyway: on micro-moe it chose block 0's expert down projections, already float (tflite then
    failed to find them in its graph, onnx kept nothing more)."""
    from deploykit.deploy.calibrate import group_costs, resolve_keep_fp32

    model = _costly("nano-moe", layer=2)
    cal = calibration_sequences(model.config, None, n=8, length=32)
    down = frozenset({Role.EXPERT_DOWN})
    base, costs = group_costs(model, cal, activations="static", float_roles=down)
    assert "model.layers.2.mlp_down" not in costs and base > 0 and costs  # the other groups are ranked
    all_int8, _ = group_costs(model, cal, activations="static")
    assert base < all_int8 / 3  # the costly layer is fp32 in the simulation itself
    names = {f"model.layers.{i}.block_sparse_moe.experts.w{k}": role for i in range(model.config.n_layers)
             for k, role in (("1", Role.EXPERT_GATE), ("3", Role.EXPERT_UP), ("2", Role.EXPERT_DOWN))}
    names |= {n: r for n, r in linear_roles(model).items() if r in QUANTIZED | {Role.LM_HEAD}}
    opts = SmoothQuantOptions.parse({"keep_fp32": "auto"}, where="t/int8")
    keep, facts = resolve_keep_fp32(model, list(names), names, opts, cal, activations="static", where="t/int8",
                                    float_roles=down)
    assert len(facts["kept_groups"]) == 1 and "model.layers.2.mlp_down" not in facts["kept_groups"]
    assert keep == set(facts["modules"]) and not any(names[n] is Role.EXPERT_DOWN for n in keep)
    assert facts["always_float"] == ["expert_down"]


def test_auto_keep_fp32_option_is_validated():
    assert SmoothQuantOptions.parse({"keep_fp32": "auto:3,lm_head"}, where="t").auto_groups() == 3
    opts = SmoothQuantOptions.parse({"keep_fp32": "auto"}, where="t")
    model = _model("nano")
    names, roles = list(select(model, QUANTIZED)), linear_roles(model)
    with pytest.raises(ConfigError, match="keep_fp32=auto .* not supported by this backend"):
        kept_fp32(names, roles, opts.keep_list(), where="t")  # a backend that does not measure refuses it
    for bad in ("auto:0", "auto:x", "auto,auto:2"):
        with pytest.raises(ConfigError, match="keep_fp32"):
            SmoothQuantOptions.parse({"keep_fp32": bad}, where="t")


def test_torch_int8_static_keeps_its_costliest_group_by_default(nano_checkpoint, tmp_path):
    result = deploykit.convert(nano_checkpoint, "torch", "int8-static", tmp_path / "s")
    assert result.report.passed(), result.report.violations()
    info = result.manifest["backend_info"]
    auto = info["keep_fp32_auto"]
    ((_group, cost),) = auto["kept_groups"].items()
    assert cost == max(auto["costliest"].values()) and set(auto["modules"]) <= set(info["kept_fp32"])
    model = deploykit.load(result.path).model
    for name in auto["modules"]:
        assert type(model.get_submodule(name)) is torch.nn.Linear, name
    none = deploykit.convert(nano_checkpoint, "torch", "int8-static", tmp_path / "n", verify=False,
                             options={"keep_fp32": ""})
    assert "keep_fp32_auto" not in none.manifest["backend_info"] and "kept_fp32" not in none.manifest["backend_info"]


def test_static_activation_schemes_smooth_by_default():
    """One fixed activation scale per tensor is where outlier channels hurt: on the demo's LoRA-tuned
    micro torch int8-static / int8-qat and onnx int8-static missed top-1 0.98 without SmoothQuant and
    pass with it (benchmarks/results/quantization_accuracy.md). Per-token / per-call schemes and tflite
    int8 (no measured gain) keep it off."""
    from deploykit.deploy.registry import registry

    want = {("torch", "int8-static"): True, ("torch", "int8-qat"): True, ("onnx", "int8-static"): True,
            ("torch", "int8-dynamic"): False, ("onnx", "int8-dynamic"): False, ("tflite", "int8"): False}
    for (backend, scheme), on in want.items():
        opts = registry().get_backend(backend).scheme(scheme).parse_options({}, backend=backend)
        assert opts.smoothquant is on and opts.smoothquant_alpha == -1.0, (backend, scheme)
        assert opts.keep_fp32 == ("" if scheme == "int8-dynamic" and backend == "torch" else "auto"), (backend, scheme)
