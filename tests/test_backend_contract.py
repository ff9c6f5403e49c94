"""The plumbing every backend shares: scheme options parsed once by the host, the module vocabulary
(roles) that decides what int8 schemes quantize, the torch-graph artifact helpers, typed runner info
with the same keys for every backend, and load options validated in one place."""
from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass

import numpy as np
import pytest
import torch

import deploykit
from deploykit import native
from deploykit.deploy import torchgraph
from deploykit.deploy.artifact import model_files
from deploykit.deploy.backend import RunnerInfo
from deploykit.deploy.options import Int8Options, NoOptions, SchemeOptions, option
from deploykit.deploy.roles import QUANTIZED, Role, by_parent, linear_roles, select
from deploykit.errors import ArtifactError, ConfigError
from deploykit.model import CausalLM, preset


def tiny(name: str) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(preset(name, vocab_size=320, max_seq_len=64)).eval()


# -- scheme options ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opts(SchemeOptions):
    sparsity: float = option(0.3, "share removed, in [0, 1)")
    steps: int = option(10, "steps")
    lm_head: bool = option(True, "quantize the lm_head")
    note: str = option("x", "free text")

    def check(self) -> list[str]:
        return [] if 0 <= self.sparsity < 1 else [f"sparsity={self.sparsity} must be in [0, 1)"]


def test_options_parse_cli_strings_into_typed_fields():
    o = Opts.parse({"sparsity": "0.5", "steps": "3", "lm_head": "no", "note": "y"}, where="b/s")
    assert o == Opts(sparsity=0.5, steps=3, lm_head=False, note="y")
    assert Opts.parse(None, where="b/s") == Opts() and Opts.parse({"steps": 4}, where="b/s").steps == 4
    with pytest.raises(FrozenInstanceError):
        o.steps = 1  # type: ignore[misc]
    assert o.to_dict() == {"sparsity": 0.5, "steps": 3, "lm_head": False, "note": "y"}


def test_every_problem_in_one_error_with_the_valid_options():
    with pytest.raises(ConfigError) as e:
        Opts.parse({"sparsty": "0.5", "steps": "1.5", "lm_head": "maybe", "sparsity": "nan"}, where="b/s")
    msg = str(e.value).split("\nHINT")[0]
    for part in ("b/s: ", "unknown option 'sparsty'", "steps='1.5' must be an integer",
                 "lm_head='maybe' must be true or false", "sparsity='nan' must be a finite number"):
        assert part in msg, msg
    assert "sparsity (float, default 0.3): share removed" in e.value.hint and "steps (int, default 10)" in e.value.hint


def test_rules_across_values_and_python_types_are_checked_on_construction():
    with pytest.raises(ConfigError, match=r"b/s: sparsity=1.5 must be in \[0, 1\)"):
        Opts.parse({"sparsity": 1.5}, where="b/s")
    with pytest.raises(ConfigError, match="steps=True must be an integer"):
        Opts(steps=True)  # a bool is not an int here
    with pytest.raises(ConfigError, match="lm_head='yes' must be true or false"):
        Opts(lm_head="yes")  # type: ignore[arg-type]
    assert Opts(sparsity=0).sparsity == 0  # an int is a fine float


def test_a_scheme_without_options_refuses_any():
    assert NoOptions.parse({}, where="b/s") == NoOptions()
    with pytest.raises(ConfigError, match="unknown option 'x'") as e:
        NoOptions.parse({"x": "1"}, where="b/s")
    assert "takes no options" in e.value.hint


def test_convert_parses_options_before_the_slow_part(nano_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="onnx/fp32: unknown option 'sparsity'"):
        deploykit.convert(nano_checkpoint, "onnx", "fp32", tmp_path / "x", options={"sparsity": "0.5"})
    with pytest.raises(ConfigError, match="native/int8: quantize_lm_head='sometimes' must be true or false"):
        deploykit.convert(nano_checkpoint, "native", "int8", tmp_path / "x", options={"quantize_lm_head": "sometimes"})
    assert not (tmp_path / "x").exists()


def test_convert_records_the_parsed_options(nano_checkpoint, tmp_path):
    r = deploykit.convert(nano_checkpoint, "torch", "int8-dynamic", tmp_path / "a", verify=False,
                          options={"quantize_lm_head": "false"})
    assert r.manifest["options"] == {"quantize_lm_head": False, "smoothquant": False, "smoothquant_alpha": -1.0,
                                     "keep_fp32": ""}  # every option, the defaults included
    assert r.manifest["backend_info"]["fp32_kept"].endswith("lm_head")


# -- roles -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nano", "nano-moe", "nano-legacy"])
def test_every_weight_of_the_graph_has_a_role(name):
    model = tiny(name)
    roles = linear_roles(model)
    cfg = model.config
    covered = {n for n in roles}
    # every parameter belongs to a module with a role, except norms (and biases of role modules)
    params = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    no_role = {p for p in params - covered if not p.endswith(("norm", "layernorm"))}
    assert not no_role, no_role
    count = {r: sum(1 for v in roles.values() if v is r) for r in Role}
    assert count[Role.ATTN_Q] == count[Role.ATTN_O] == cfg.n_layers and count[Role.LM_HEAD] == 1
    if name == "nano-moe":
        assert count[Role.ROUTER] == count[Role.EXPERTS] == cfg.n_layers and count[Role.MLP_DOWN] == 0
    elif name == "nano-legacy":
        assert count[Role.MLP_GATE] == 0 and count[Role.MLP_UP] == cfg.n_layers
        assert count[Role.POSITION_EMBEDDING] == 1
    else:
        assert count[Role.MLP_GATE] == count[Role.MLP_DOWN] == cfg.n_layers


def test_unstacked_experts_get_one_role_per_expert_weight():
    model = tiny("nano-moe")
    torchgraph.unstack_experts(model)
    roles = linear_roles(model)
    cfg = model.config
    n = cfg.n_layers * cfg.n_experts
    assert sum(r is Role.EXPERT_GATE for r in roles.values()) == n and Role.EXPERTS not in roles.values()
    assert roles["model.layers.0.block_sparse_moe.experts.1.w2"] is Role.EXPERT_DOWN
    assert all(isinstance(m, torch.nn.Linear) for m in select(model, QUANTIZED).values())
    group = by_parent(roles)["model.layers.0.block_sparse_moe.experts.0"]
    assert set(group) == {Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN}


@pytest.mark.skipif(not native.available(), reason=f"native kernels not built: {native.unavailable_reason()}")
@pytest.mark.parametrize("name", ["nano", "nano-moe", "nano-legacy"])
def test_torch_and_native_quantize_the_same_weights(name):
    """The rule that used to be written twice, by string matching, is one rule now."""
    from deploykit_plugins.native_backend import plan

    model = tiny(name)
    native_plan = plan(model, lm_head=True)
    covered = set()
    for module, kind in native_plan.items():
        prefix = module + (".experts" if kind == "moe" else "")
        covered |= {n for n in linear_roles(model) if n == prefix or n.startswith(prefix + ".")}
    assert covered == set(select(model, QUANTIZED | {Role.EXPERTS, Role.LM_HEAD}))


# -- torch-graph plumbing ------------------------------------------------------------------------------
@pytest.mark.skipif(not native.available(), reason=f"native kernels not built: {native.unavailable_reason()}")
def test_quantize_int8_matches_the_native_kernels_contract():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    w[3] = 0.0
    q, s = torchgraph.quantize_int8(w)
    qn, sn = native.quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(q, qn)  # integer outputs: the same rounding on every machine
    mask = torch.arange(64) != 3
    torch.testing.assert_close(s[mask], sn[mask], rtol=1e-6, atol=0)  # one division vs one reciprocal
    assert s[3] > 0  # a zero row keeps a tiny scale: no 0/0 in runtimes that divide by it


def test_save_and_rebuild_round_trip(tmp_path):
    model = tiny("nano-moe")
    torchgraph.unstack_experts(model)
    replaced = ["model.layers.0.self_attn.q_proj"]
    tensors = torchgraph.plain_state(model, replaced)
    assert "lm_head.weight" not in tensors  # tied: stored once as the embedding
    assert not any(k.startswith(replaced[0] + ".") for k in tensors)
    tensors["model.layers.0.self_attn.q_proj.packed"] = torch.zeros(3)
    torchgraph.save_artifact(tmp_path, model.config, tensors, weights="w.safetensors", layout_file="l.json",
                             layout={"modules": replaced}, layout_format=7, dtype="int8")
    assert torchgraph.read_layout(tmp_path, "l.json", 7) == {"format": 7, "modules": replaced}
    loaded = torchgraph.load_tensors(tmp_path, "w.safetensors")
    rebuilt = torchgraph.rebuild(tmp_path, loaded, replaced, prepare=torchgraph.unstack_experts)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    w = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    assert torch.equal(rebuilt.state_dict()[w], model.state_dict()[w])
    with pytest.raises(ArtifactError, match="format 7, this deploykit reads 8"):
        torchgraph.read_layout(tmp_path, "l.json", 8)
    del loaded["model.norm.weight"]
    with pytest.raises(ArtifactError, match="missing.*model.norm.weight"):
        torchgraph.rebuild(tmp_path, loaded, replaced, prepare=torchgraph.unstack_experts)


# -- runner info and load options ------------------------------------------------------------------------
@pytest.mark.parametrize("backend,scheme", [("torch", "int8-dynamic"), ("native", "int8"), ("onnx", "fp32"),
                                            ("gguf", "f16"), ("checkpoint", "fp32")])
def test_runner_info_has_the_same_keys_for_every_backend(nano_checkpoint, tmp_path, backend, scheme):
    if backend == "native" and not native.available():
        pytest.skip(f"native kernels not built: {native.unavailable_reason()}")
    if backend == "checkpoint":
        path = nano_checkpoint
    else:
        path = deploykit.convert(nano_checkpoint, backend, scheme, tmp_path / backend, verify=False).path
    info = deploykit.load(path, threads=1).info
    assert isinstance(info, RunnerInfo)
    assert (info.backend, info.quant, info.kv_cache) == (backend, scheme, True)
    assert info.files == model_files(path) and info.size_bytes == sum(info.files.values()) > 0
    assert "deploykit.json" not in info.files and "tokenizer.json" not in info.files
    assert info.threads == 1 and info.vocab_size == 2048 and info.parameters > 0
    assert set(info.to_dict()) == {"backend", "quant", "kv_cache", "size_bytes", "files", "threads", "parameters",
                                   "vocab_size", "max_length", "details"}


def test_load_options_are_validated_in_one_place(nano_checkpoint, tmp_path):
    art = deploykit.convert(nano_checkpoint, "torch", "fp32", tmp_path / "a", verify=False).path
    for path in (art, nano_checkpoint):
        with pytest.raises(ConfigError, match="threads=0 must be a positive integer"):
            deploykit.load(path, threads=0)
        with pytest.raises(ConfigError, match="unknown .*option.*trust_me"):
            deploykit.load(path, trust_me=True)
    assert np.isfinite(deploykit.load(art, threads=2).forward([[1, 2, 3]])).all()


def test_int8_options_are_shared():
    from deploykit_plugins import native_backend, torch_backend

    from deploykit.deploy.calibrate import SmoothQuantOptions

    assert issubclass(native_backend.SCHEMES[0].options, Int8Options)  # + the engine's kv_cache
    # torch runs the shared SmoothQuant / keep_fp32 rewrite: its options extend the shared int8 ones
    assert torch_backend.TorchBackend().scheme("int8-dynamic").options is SmoothQuantOptions
    assert issubclass(SmoothQuantOptions, Int8Options)
    assert issubclass(torch_backend.TorchBackend().scheme("int8-qat").options, SmoothQuantOptions)


def test_unknown_keys_and_broken_rules_come_in_one_error():
    with pytest.raises(ConfigError) as e:
        Opts.parse({"foo": "1", "sparsity": "2"}, where="b/s")
    assert "unknown option 'foo'" in str(e.value) and "sparsity=2.0 must be in [0, 1)" in str(e.value)


def test_backends_json_lists_each_schemes_options(capsys):
    import json

    from deploykit.cli.main import main

    assert main(["backends", "--json"]) == 0
    rows = {b["name"]: b for b in json.loads(capsys.readouterr().out)["backends"]}
    qat = next(s for s in rows["torch"]["schemes"] if s["name"] == "int8-qat")
    assert [o["name"] for o in qat["options"]] == ["quantize_lm_head", "smoothquant", "smoothquant_alpha",
                                                  "keep_fp32", "qat_steps", "qat_lr"]
    assert qat["options"][4] == {"name": "qat_steps", "type": "int", "default": 10,
                                 "help": "fake-quantised distillation steps (0: plain int8-static)"}
    assert next(s for s in rows["onnx"]["schemes"] if s["name"] == "fp32")["options"] == []


def test_load_arrays_maps_the_file_without_copying_it(tmp_path):
    """The torch-free reader (native artifacts) gives read-only views of one mmap of the file, equal to
    safetensors' own arrays, and refuses a truncated file as an ArtifactError naming it."""
    import mmap

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from deploykit.deploy.artifact import load_arrays

    rng = np.random.default_rng(0)
    arrays = {"a.f32": rng.standard_normal((3, 5)).astype(np.float32), "b.i8": np.arange(-7, 9, dtype=np.int8),
              "c.i64": np.array([4, 5, 1], dtype=np.int64), "d.u8": np.zeros((2, 0), dtype=np.uint8),
              "e.i32": np.array([[1], [2]], dtype=np.int32)}
    save_file(arrays, str(tmp_path / "w.safetensors"))
    got, want = load_arrays(tmp_path, "w.safetensors"), load_file(str(tmp_path / "w.safetensors"))
    assert got.keys() == want.keys() == arrays.keys()
    for k, v in got.items():
        assert v.dtype == want[k].dtype and v.shape == want[k].shape and np.array_equal(v, want[k]), k
        assert not v.flags.writeable
    base = got["a.f32"]
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)  # a view of the mapped file
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-10])
    with pytest.raises(ArtifactError, match="w.safetensors: corrupt or truncated safetensors file"):
        load_arrays(tmp_path, "w.safetensors")
