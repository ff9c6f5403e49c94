"""Fuzzed parsers: every JSON file deploykit reads either parses or fails as a DeploykitError.

The files are config.json (deploykit's own block and the transformers Llama/Qwen2/Mixtral/GPT-2
flavour), model.safetensors.index.json, the artifact manifest deploykit.json, the torch and native
layout files, the ONNX graph's config metadata and the trainer state. Each gets arbitrary JSON,
arbitrary bytes, truncated or byte-spliced copies of a real file and, most usefully, *near-valid*
mutations of a real file (a key dropped, a type changed, a value nested or negated): those reach the
code behind the first check, where the real bugs were. Every file is read the way a user's command
reads it (load_model, deploykit.load, read_state and the optimizer it feeds), and every error must be
one line naming the folder.

A bounded number of examples runs in ``make test`` (``FAST``); ``-m slow`` runs many more. Plain
example tests below pin each case issue 9 names, with the error type and the key in the message,
and the CLI's exit code 2 without a traceback.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deploykit
from deploykit.errors import ArtifactError, CheckpointError, ConfigError, DeploykitError
from deploykit.model.checkpoint import load_config, load_model, save_model, to_hf_state_dict
from deploykit.model.config import ModelConfig
from deploykit.model.graph import CausalLM

FAST = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# -m slow: 600 per property; DEPLOYKIT_FUZZ_EXAMPLES=5000 for a longer hunt
SLOW = settings(FAST, max_examples=int(os.environ.get("DEPLOYKIT_FUZZ_EXAMPLES", "600")))
BUDGETS = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]
VOCAB = 64


def tiny_config(variant: str, **kw: Any) -> ModelConfig:
    return ModelConfig(variant=variant, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2,
                       n_kv_heads=2 if variant == "legacy" else 1, ffn_dim=64, max_seq_len=32,
                       n_experts=4 if variant == "moe" else 0, tie_embeddings=variant != "moe", **kw)


def tiny_model(variant: str, **kw: Any) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(tiny_config(variant, **kw)).eval()


# ---------------------------------------------------------------------------------------------
# strategies: junk, and near-valid mutations of real files
# ---------------------------------------------------------------------------------------------
# Strings that have broken parsers before: paths out of the folder, NUL, a lone surrogate, numbers as text.
ODD_STRINGS = st.sampled_from(["", "../outside.safetensors", "/etc/passwd", "a\x00b", "model.safetensors",
                               "pytorch_model.bin", "\udc80", "\u00e9\U0001f642", "x" * 300, "1", "-1", "true",
                               "null", "NaN", "model.layers.0", "lm_head", "int8", "sparse", "moe"])
ODD_NUMBERS = st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**63, -2**63, 10**30, 0.5, -0.0, 1e308, 1e-308,
                               float("nan"), float("inf"), float("-inf")])
SCALARS = (st.none() | st.booleans() | st.integers() | ODD_NUMBERS | st.floats() | st.text(max_size=12)
           | ODD_STRINGS)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6) | ODD_STRINGS, inner, max_size=4), max_leaves=10)


def _paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every place in ``doc`` a mutation may hit; long lists (an RNG state) only at a few indices."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i in sorted({0, 1, len(doc) - 1} & set(range(len(doc)))):
            yield from _paths(doc[i], (*prefix, i))


def _variants(v: Any) -> list[Any]:
    """Type changes and edge values for ``v``: what a hand edit or another tool writes."""
    out: list[Any] = [None, [], {}, "", "x", 0, -1, 1.5, True, 10**30, [v], {"x": v}]
    if isinstance(v, bool):
        out += [int(v), str(v).lower()]
    elif isinstance(v, int):
        out += [str(v), float(v), v + 0.5, -v, -v - 1, v * 10**12, bool(v), v + 1, v - 1]
    elif isinstance(v, float):
        out += [int(v) if math.isfinite(v) else 0, str(v), -v, float("nan"), float("inf"), 0.0]
    elif isinstance(v, str):
        out += [v + "x", v[:1], v.upper(), "../" + v, "/" + v, v + ".bin", 1]
    elif isinstance(v, list):
        out += [v[:1], v[1:], v + v, {str(i): x for i, x in enumerate(v)}, v[0] if v else None, [str(x) for x in v]]
    elif isinstance(v, dict):
        out += [list(v.values()), dict(list(v.items())[1:]), {**v, "extra": 1}, {k: str(x) for k, x in v.items()}]
    return out


@st.composite
def near_valid(draw: st.DrawFn, docs: list[Any]) -> tuple[int, Any]:
    """(which doc, the doc after 1-3 mutations): drop a key, change a type, nest, negate, junk."""
    which = draw(st.integers(0, len(docs) - 1))
    doc = copy.deepcopy(docs[which])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        current = parent[path[-1]] if path else doc
        if path and draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
            continue
        new = draw(st.sampled_from(_variants(current)) | JSON_VALUES)
        if path:
            parent[path[-1]] = new
        else:
            doc = new
    return which, doc


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@st.composite
def file_bytes(draw: st.DrawFn, docs: list[Any]) -> tuple[int, bytes]:
    """(which doc the bytes derive from, the file's bytes): near-valid twice as often as junk."""
    kind = draw(st.sampled_from(["near", "near", "near", "json", "bytes", "cut", "splice"]))
    if kind == "near":
        which, doc = draw(near_valid(docs))
        return which, _dumps(doc)
    which = draw(st.integers(0, len(docs) - 1))
    valid = _dumps(docs[which])
    if kind == "json":
        return which, _dumps(draw(JSON_VALUES))
    if kind == "bytes":
        return which, draw(st.binary(max_size=80))
    at = draw(st.integers(0, len(valid)))
    if kind == "cut":
        return which, valid[:at]
    return which, valid[:at] + draw(st.binary(min_size=1, max_size=3)) + valid[at:]  # often not UTF-8


# ---------------------------------------------------------------------------------------------
# the property
# ---------------------------------------------------------------------------------------------
def parses_or_fails_cleanly(read: Callable[[Path], Any], folder: Path) -> DeploykitError | None:
    """Run ``read(folder)``: success, or a DeploykitError with a one-line message naming the folder.
    Any other exception propagates, and hypothesis shrinks it to the smallest file that raises it."""
    try:
        read(folder)
    except DeploykitError as e:
        message = e.args[0]
        assert "\n" not in message, message
        assert str(folder) in message, message
        assert "Traceback" not in str(e)
        return e
    return None


class Workspace:
    """A fresh copy of a valid folder per example, with one file replaced by the fuzzed bytes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, base: Path, name: str, data: bytes, read: Callable[[Path], Any]) -> None:
        work = Path(tempfile.mkdtemp(dir=self.root)) / base.name
        try:
            shutil.copytree(base, work)
            (work / name).write_bytes(data)
            parses_or_fails_cleanly(read, work)
        finally:
            shutil.rmtree(work.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("fuzz"))


# ---------------------------------------------------------------------------------------------
# valid files to start from
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folders of tiny dense, Qwen2-style, MoE and legacy models (random weights)."""
    root = tmp_path_factory.mktemp("checkpoints")
    models = {"dense": tiny_model("dense"), "qwen2": tiny_model("dense", attn_bias=True),
              "moe": tiny_model("moe"), "legacy": tiny_model("legacy")}
    return {name: save_model(m, root / name) for name, m in models.items()}


def _transformers_flavour(folder: Path, root: Path) -> Path:
    """The same checkpoint with a config.json as transformers writes it (no deploykit block, all of
    transformers' defaults when it is installed)."""
    out = root / f"{folder.name}-hf"
    shutil.copytree(folder, out)
    hf = json.loads((folder / "config.json").read_text())
    del hf["deploykit"]
    try:
        import transformers

        cls = transformers.CONFIG_MAPPING[hf["model_type"]]
        hf = {**cls(**{k: v for k, v in hf.items() if k != "model_type"}).to_dict(), "model_type": hf["model_type"]}
    except ImportError:
        pass
    (out / "config.json").write_text(json.dumps(hf))
    return out


@pytest.fixture(scope="module")
def hf_checkpoints(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: _transformers_flavour(folder, root) for name, folder in checkpoints.items()}


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory) -> Path:
    """A dense checkpoint split into two shards with a model.safetensors.index.json."""
    from safetensors.torch import save_file

    folder = save_model(tiny_model("dense"), tmp_path_factory.mktemp("sharded") / "ck")
    (folder / "model.safetensors").unlink()
    sd = to_hf_state_dict(tiny_model("dense"))
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(load_model(folder).lm_head.weight, tiny_model("dense").lm_head.weight)
    return folder


CALIBRATION = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Artifacts of every layout kind: torch fp32 (plain checkpoint), int8-dynamic, int8-static (MoE),
    prune-l1 (sparse) and, when the kernels are built, native int8 and int8-moe."""
    from deploykit import native

    root = tmp_path_factory.mktemp("artifacts")
    jobs = {"torch-fp32": ("dense", "torch", "fp32"), "torch-int8-dynamic": ("dense", "torch", "int8-dynamic"),
            "torch-int8-static": ("moe", "torch", "int8-static"), "torch-prune-l1": ("dense", "torch", "prune-l1")}
    if native.available():
        jobs |= {"native-int8": ("legacy", "native", "int8"), "native-int8-moe": ("moe", "native", "int8-moe")}
    out = {}
    for name, (variant, backend, quant) in jobs.items():
        out[name] = deploykit.convert(tiny_model(variant), backend, quant, root / name, verify=False,
                                      calibration=CALIBRATION).path
    return out


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# fuzzed properties
# ---------------------------------------------------------------------------------------------
def _fuzz(budget: settings, bases: list[Path], name: str, read: Callable[[Path], Any], workspace: Workspace) -> None:
    docs = [_json(b / name) for b in bases]

    @budget
    @given(file_bytes(docs))
    def run(case: tuple[int, bytes]) -> None:
        which, data = case
        workspace.run(bases[which], name, data, read)

    run()


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_deploykit_config_json(budget, checkpoints, workspace):
    _fuzz(budget, list(checkpoints.values()), "config.json", load_model, workspace)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_transformers_config_json(budget, hf_checkpoints, workspace):
    _fuzz(budget, list(hf_checkpoints.values()), "config.json", load_model, workspace)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_safetensors_index(budget, sharded_checkpoint, workspace):
    _fuzz(budget, [sharded_checkpoint], "model.safetensors.index.json", load_model, workspace)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_manifest(budget, artifacts, workspace):
    # deploykit.load as a user calls it: manifest, then every listed file hashed, then the backend.
    _fuzz(budget, [artifacts["torch-fp32"], artifacts["torch-int8-dynamic"]], "deploykit.json", deploykit.load,
          workspace)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_torch_layout(budget, artifacts, workspace):
    bases = [artifacts[k] for k in ("torch-int8-dynamic", "torch-int8-static", "torch-prune-l1", "torch-fp32")]
    _fuzz(budget, bases, "torch_quant.json", lambda f: deploykit.load(f, verify_files=False), workspace)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_native_layout(budget, artifacts, workspace):
    if "native-int8" not in artifacts:
        pytest.skip("the native kernels are not built")
    bases = [artifacts["native-int8"], artifacts["native-int8-moe"]]
    _fuzz(budget, bases, "native_layout.json", lambda f: deploykit.load(f, verify_files=False), workspace)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_artifact_config_json(budget, artifacts, workspace):
    # An artifact's own config.json is read by rebuild(): the graph the packed tensors go into.
    bases = [artifacts[k] for k in ("torch-int8-dynamic", "torch-prune-l1")]
    _fuzz(budget, bases, "config.json", lambda f: deploykit.load(f, verify_files=False), workspace)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_onnx_config_metadata(budget):
    from deploykit_plugins.onnx_backend import META_CONFIG, config_from_metadata

    docs = [tiny_config(v).to_dict() for v in ("dense", "moe", "legacy")]
    path = Path("model.onnx")

    @budget
    @given(file_bytes(docs))
    def run(case: tuple[int, bytes]) -> None:
        _, data = case
        text = data.decode("utf-8", errors="surrogateescape")  # ORT hands the metadata over as str
        parses_or_fails_cleanly(lambda _: config_from_metadata({META_CONFIG: text}, path), path)

    run()


# -- trainer state -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A real `deploykit train` folder, two steps of a tiny model, stopped with its training state."""
    from deploykit.data import english_documents
    from deploykit.model.tokenizer import Tokenizer
    from deploykit.train import TrainConfig, pretrain

    root = tmp_path_factory.mktemp("run")
    docs = english_documents(8_000, seed=0)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    Tokenizer.train(docs, 300).save(root / "tok")
    cfg = TrainConfig(out=root / "run", model=tiny_config("dense"), data=str(data), tokenizer=root / "tok",
                      steps=4, stop_at=2, batch_size=2, block_size=16, eval_interval=0, eval_iters=1,
                      checkpoint_interval=0, threads=1, peak_flops=1e11, sample_tokens=1)
    pretrain(cfg, progress=False, stream=None)
    return root / "run"


def resume_state(folder: Path) -> None:
    """What `deploykit train --resume` does with the state before its first step."""
    from deploykit.train.config import TrainConfig
    from deploykit.train.optim import LrSchedule, build_adamw
    from deploykit.train.state import optimizer_from_flat, read_state, rng_from_flat

    tensors, meta = read_state(folder)
    train = TrainConfig.from_dict({**meta["train_config"], "out": folder, "resume": False, "force": False})
    if "schedule" in meta:
        LrSchedule.from_dict(meta["schedule"], lr=train.lr, min_lr=train.min_lr)
    model = load_model(folder).train()
    optimizer = build_adamw(model, lr=train.lr, weight_decay=train.weight_decay, betas=train.betas)
    optimizer_from_flat(optimizer, tensors, meta["optimizer"], folder)
    python_rng = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            rng_from_flat(tensors, meta["rng"])
        finally:
            random.setstate(python_rng)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_trainer_state_json(budget, run_folder, workspace):
    resume_state(run_folder)  # the valid state resumes
    _fuzz(budget, [run_folder], "trainer_state.json", resume_state, workspace)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_trainer_state_tensors(budget, run_folder, workspace):
    valid = (run_folder / "trainer_state.safetensors").read_bytes()

    @budget
    @given(st.integers(0, len(valid)), st.binary(max_size=16), st.booleans())
    def run(at: int, junk: bytes, cut: bool) -> None:
        data = valid[:at] if cut else valid[:at] + junk + valid[at + len(junk):]
        workspace.run(run_folder, "trainer_state.safetensors", data, resume_state)

    run()


# ---------------------------------------------------------------------------------------------
# the cases issue 9 names, one by one
# ---------------------------------------------------------------------------------------------
def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _raises(error: type[DeploykitError], read: Callable[[Path], Any], folder: Path, *needles: str) -> str:
    with pytest.raises(error) as e:
        read(folder)
    message = e.value.args[0]
    assert "\n" not in message and str(folder) in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert e.value.hint, "every error says how to fix it"
    return message


@pytest.mark.parametrize("data,needle", [
    (b"[]", "must be a JSON object {...}, got a list"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "not UTF-8 text"),
    (b'{"vocab_size": 64,', "not valid JSON (line 1"),
    (b"", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),  # nested past Python's recursion limit
    (b'{"vocab_size": ' + b"9" * 5000 + b"}", "not valid JSON"),  # past int()'s digit limit
    (b'"config"', "got a string"),
])
def test_config_json_that_is_not_an_object(checkpoints, tmp_path, data, needle):
    folder = _copy(checkpoints["dense"], tmp_path)
    (folder / "config.json").write_bytes(data)
    _raises(ConfigError, load_config, folder, "config.json", needle)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"])
def test_transformers_config_missing_a_size(hf_checkpoints, tmp_path, key):
    folder = _copy(hf_checkpoints["dense"], tmp_path)
    hf = _json(folder / "config.json")
    del hf[key]
    (folder / "config.json").write_text(json.dumps(hf))
    _raises(ConfigError, load_config, folder, "config.json", f"{key} is missing (it must be an integer)")


@pytest.mark.parametrize("flavour,key,value,needle", [
    ("hf", "vocab_size", "64", "vocab_size must be an integer, got a string '64'"),
    ("hf", "hidden_size", 32.0, "hidden_size must be an integer, got a number 32.0"),
    ("hf", "num_hidden_layers", True, "num_hidden_layers must be an integer, got true"),
    ("hf", "num_attention_heads", -2, "num_attention_heads = -2 must be > 0"),
    ("hf", "rms_norm_eps", "1e-5", "rms_norm_eps must be a finite number, got a string"),
    ("hf", "rope_scaling", [1], "rope_scaling must be an object, got a list"),
    ("hf", "eos_token_id", [2, "x"], "eos_token_id must be an integer or a list of integers"),
    ("hf", "tie_word_embeddings", "false", "tie_word_embeddings must be true or false"),
    ("own", "d_model", {"x": 1}, "deploykit.model_config.d_model must be an integer, got an object"),
    ("own", "rope_theta", None, "deploykit.model_config.rope_theta must be a finite number, got null"),
    ("own", "colour", "red", "deploykit.model_config has unknown field(s) colour"),
    ("own", "n_kv_heads", 3, "deploykit.model_config: ModelConfig.n_kv_heads=3 must divide n_heads=2"),
])
def test_config_json_with_a_wrong_type(checkpoints, hf_checkpoints, tmp_path, flavour, key, value, needle):
    folder = _copy((hf_checkpoints if flavour == "hf" else checkpoints)["dense"], tmp_path)
    doc = _json(folder / "config.json")
    (doc if flavour == "hf" else doc["deploykit"]["model_config"])[key] = value
    (folder / "config.json").write_text(json.dumps(doc))
    _raises(ConfigError, load_model, folder, "config.json", needle)


@pytest.mark.parametrize("variant,key,value,needle", [
    ("dense", "n_layers", 10**9, "n_layers=1000000000, the weights hold 2 layer(s)"),  # would build 10**9 blocks
    ("dense", "vocab_size", 2**60, "parameters, the weights hold"),  # overflowed torch's size arithmetic
    ("moe", "n_experts", 10**9, "config says n_experts=1000000000"),
    ("legacy", "n_layers", 4, "GPT-2 checkpoint lacks tensor 'h.2.ln_1.weight'"),
])
def test_config_json_whose_sizes_do_not_fit_the_weights_is_refused_before_building(checkpoints, tmp_path, variant,
                                                                                   key, value, needle):
    folder = _copy(checkpoints[variant], tmp_path)
    doc = _json(folder / "config.json")
    doc["deploykit"]["model_config"][key] = value
    (folder / "config.json").write_text(json.dumps(doc))
    _raises(CheckpointError, load_model, folder, needle)


@pytest.mark.parametrize("index,needle", [
    ([], "the safetensors index must be a JSON object"),
    ({"metadata": {}}, "weight_map is missing (it must be an object)"),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, "weight_map must be an object, got a list"),
    ({"weight_map": {"lm_head.weight": 1}}, "weight_map.lm_head.weight must be a string, got an integer 1"),
    ({"weight_map": {}}, "weight_map is empty"),
    ({"weight_map": {"lm_head.weight": "model-00009-of-00009.safetensors"}}, "model-00009-of-00009.safetensors"),
    ({"weight_map": {"lm_head.weight": "../ck/model-00001-of-00002.safetensors"}}, "inside the folder"),
    ({"weight_map": {"lm_head.weight": "/etc/passwd.safetensors"}}, "inside the folder"),
    ({"weight_map": {"lm_head.weight": "pytorch_model.bin"}}, "must name a .safetensors file"),
])
def test_broken_safetensors_index(sharded_checkpoint, tmp_path, index, needle):
    folder = _copy(sharded_checkpoint, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(CheckpointError, load_model, folder, "model.safetensors.index.json", needle)


@pytest.mark.parametrize("change,needle", [
    (lambda m: m.update(files=sorted(m["files"])), "files must be an object, got a list"),
    (lambda m: m.update(files={}), "files is empty"),
    (lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), "inside the folder"),
    (lambda m: m["files"]["config.json"].update(sha256=None), "files.config.json.sha256 must be a string, got null"),
    (lambda m: m["files"]["config.json"].update(bytes="12"), "files.config.json.bytes must be an integer"),
    (lambda m: m["files"]["config.json"].update(sha256="xyz"), "must be 64 lowercase hex digits"),
    (lambda m: m.update(backend=["torch"]), "backend must be a string, got a list"),
    (lambda m: m.pop("quant"), "quant is missing"),
    (lambda m: m.update(format_version=True), "format_version True, this deploykit reads 1"),
    (lambda m: m.update(parity_passed="yes"), "parity_passed must be true or false or null"),
])
def test_broken_manifest(artifacts, tmp_path, change, needle):
    folder = _copy(artifacts["torch-fp32"], tmp_path)
    manifest = _json(folder / "deploykit.json")
    change(manifest)
    (folder / "deploykit.json").write_text(json.dumps(manifest))
    _raises(ArtifactError, deploykit.load, folder, "deploykit.json", needle)


@pytest.mark.parametrize("artifact,change,needle", [
    ("torch-int8-dynamic", lambda lay: lay.update(quantized=list(lay["quantized"])),
     "quantized must be an object, got a list"),
    ("torch-int8-dynamic", lambda lay: lay.update(kind=8), "kind must be a string, got an integer 8"),
    ("torch-int8-dynamic", lambda lay: lay.update(kind="int4"), "kind = 'int4' must be one of"),
    ("torch-int8-dynamic", lambda lay: lay.update(format="1"), "format '1', this deploykit reads 1"),
    ("torch-int8-dynamic", lambda lay: lay["quantized"].update({"model.layers.7.mlp.up_proj": {}}),
     "names module 'model.layers.7.mlp.up_proj', which this model does not have"),
    ("torch-int8-static", lambda lay: next(iter(lay["quantized"].values())).update(act_scale="0.1"),
     "act_scale must be a finite number, got a string"),
    ("torch-prune-l1", lambda lay: lay["packed"].update({k: [10**12] for k in lay["packed"]}), "does not match"),
    ("torch-prune-l1", lambda lay: lay["packed"].update({k: "32x64" for k in lay["packed"]}),
     "must be a list of integers, got a string"),
    ("native-int8", lambda lay: lay.update(modules=[1]), "modules must be an object, got a list"),
    ("native-int8", lambda lay: lay["modules"].update({"model.layers.0.mlp.up_proj": "swiglu"}),
     "packs 'model.layers.0.mlp.up_proj' as 'swiglu', but it is a Linear"),
    ("native-int8", lambda lay: lay["modules"].update({"model.layers.0.self_attn.q_proj": "int4"}),
     "must be one of 'linear', 'swiglu', 'moe'"),
])
def test_layout_with_wrong_types(artifacts, tmp_path, artifact, change, needle):
    if artifact not in artifacts:
        pytest.skip("the native kernels are not built")
    folder = _copy(artifacts[artifact], tmp_path)
    name = "native_layout.json" if artifact.startswith("native") else "torch_quant.json"
    layout = _json(folder / name)
    change(layout)
    (folder / name).write_text(json.dumps(layout))
    _raises(ArtifactError, lambda f: deploykit.load(f, verify_files=False), folder, name, needle)


def test_onnx_metadata_that_is_not_a_config():
    from deploykit_plugins.onnx_backend import META_CONFIG, config_from_metadata

    path = Path("artifact/model.onnx")
    with pytest.raises(ArtifactError, match=r"metadata deploykit.config\): the model config is not valid JSON"):
        config_from_metadata({META_CONFIG: "{"}, path)
    with pytest.raises(ArtifactError, match="d_model must be an integer, got a string"):
        config_from_metadata({META_CONFIG: json.dumps({**tiny_config("dense").to_dict(), "d_model": "32"})}, path)
    with pytest.raises(ArtifactError, match="no deploykit.config metadata"):
        config_from_metadata({}, path)


@pytest.mark.parametrize("change,needle", [
    (lambda s: s.update(step="2"), "step must be an integer, got a string"),
    (lambda s: s.update(step=-1), "step = -1 must be >= 0"),
    (lambda s: s.pop("loader"), "loader is missing"),
    (lambda s: s["train_config"].update(lr="fast"), "train_config.lr must be a finite number"),
    (lambda s: s["train_config"].update(steps=0), "train_config: TrainConfig.steps=0 must be a positive integer"),
    (lambda s: s["schedule"].update(total=0), "schedule: LrSchedule: total=0 must be >= 1"),
    (lambda s: s["optimizer"].update(param_groups={}), "optimizer.param_groups must be a list of objects"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr="x"), "optimizer.param_groups[0].lr: saved 'x'"),
    (lambda s: s["optimizer"]["param_groups"][0].update(params=[0]), "optimizer.param_groups[0].params: saved [0]"),
    (lambda s: s["rng"]["python"][1].pop(), "rng.python = [3, [") ,
    (lambda s: s.update(version=2), "training state version 2, expected 1"),
    (lambda s: s.update(schedule=None), "schedule must be an object, got null"),
    (lambda s: s["schedule"].pop("total"), "schedule.total is missing (it must be an integer)"),
    (lambda s: s["optimizer"].update(scalars=None), "optimizer.scalars must be an object, got null"),
])
def test_corrupt_trainer_state(run_folder, tmp_path, change, needle):
    folder = _copy(run_folder, tmp_path)
    state = _json(folder / "trainer_state.json")
    change(state)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    _raises(CheckpointError, resume_state, folder, "trainer_state.json", needle)


def test_trainer_state_numbers_are_returned_as_checked(run_folder, tmp_path):
    folder = _copy(run_folder, tmp_path)
    state = _json(folder / "trainer_state.json")
    state["train_config"]["betas"] = [0, 0.95]  # a hand edit; AdamW refuses int betas
    (folder / "trainer_state.json").write_text(json.dumps(state))
    resume_state(folder)


def test_corrupt_trainer_state_tensors(run_folder, tmp_path):
    folder = _copy(run_folder, tmp_path)
    path = folder / "trainer_state.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    _raises(CheckpointError, resume_state, folder, "training state is corrupt")


# -- through the CLI: exit 2, one line, no traceback -----------------------------------------------------
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from deploykit.cli.main import main

    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


@pytest.mark.parametrize("data", [b"[]", b"\xff\xfe\x00garbage", b'{"model_type": "llama", "hidden_size": 32}'])
def test_cli_generate_on_a_broken_config_json(checkpoints, tmp_path, capsys, data):
    folder = _copy(checkpoints["dense"], tmp_path)
    (folder / "config.json").write_bytes(data)
    rc, out = _cli(["generate", str(folder), "--prompt", "Hi", "--max-new-tokens", "1"], capsys)
    assert rc == 2 and "Traceback" not in out, out
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    assert str(folder / "config.json") in error, out


def test_cli_generate_on_a_manifest_whose_files_is_a_list(artifacts, tmp_path, capsys):
    folder = _copy(artifacts["torch-fp32"], tmp_path)
    manifest = _json(folder / "deploykit.json")
    manifest["files"] = sorted(manifest["files"])
    (folder / "deploykit.json").write_text(json.dumps(manifest))
    rc, out = _cli(["generate", str(folder), "--prompt", "Hi", "--max-new-tokens", "1"], capsys)
    assert rc == 2 and "Traceback" not in out, out
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    assert "deploykit.json" in error and "files must be an object, got a list" in error, out


def test_cli_convert_on_a_broken_safetensors_index(sharded_checkpoint, tmp_path, capsys):
    folder = _copy(sharded_checkpoint, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1, 2]}))
    rc, out = _cli(["convert", str(folder), "--backend", "torch", "--quant", "fp32", "--out",
                    str(tmp_path / "out")], capsys)
    assert rc == 2 and "Traceback" not in out, out
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    assert "model.safetensors.index.json" in error and "weight_map must be an object" in error, out
    assert not (tmp_path / "out").exists()


def test_cli_convert_on_a_broken_config_json(checkpoints, tmp_path, capsys):
    folder = _copy(checkpoints["moe"], tmp_path)
    doc = _json(folder / "config.json")
    doc["deploykit"]["model_config"]["n_experts"] = "4"
    (folder / "config.json").write_text(json.dumps(doc))
    rc, out = _cli(["convert", str(folder), "--backend", "torch", "--quant", "fp32", "--out",
                    str(tmp_path / "out")], capsys)
    assert rc == 2 and "Traceback" not in out, out
    assert "deploykit.model_config.n_experts must be an integer, got a string '4'" in out, out


def test_sharded_checkpoint_opens_as_a_runner(sharded_checkpoint):
    """`deploykit generate` on a sharded folder: the shards are checkpoint files, not foreign ones."""
    runner = deploykit.load(sharded_checkpoint)
    assert runner.info.backend == "checkpoint" and runner.forward([[1, 2, 3]]).shape[:2] == (1, 3)
