"""The Core ML backend on any OS: the saved .mlpackage's spec, its weights against the source, the
converted MIL program's numerics through coremltools' op references (the parity proof off macOS),
the KV cache, and damaged packages. Prediction by the Core ML runtime needs macOS: that test is
skipped elsewhere with that reason.

coremltools imports in ~9 s (it imports torch and tensorflow); the artifacts are converted once per module.
"""
from __future__ import annotations

import importlib.util
import platform
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from deploykit_plugins import coreml_backend as cb

import deploykit
from deploykit.deploy.backend import ConvertContext
from deploykit.errors import ArtifactError, BackendError, BackendUnavailable
from deploykit.model.checkpoint import load_model
from deploykit.model.config import ModelConfig
from deploykit.model.generation import generate as torch_generate
from deploykit.model.graph import CausalLM

BACKEND = cb.CoreMLBackend()
ON_MAC = platform.system() == "Darwin"


@pytest.fixture(scope="module")
def fp16(nano_checkpoint, tmp_path_factory):
    return deploykit.convert(nano_checkpoint, "coreml", out=tmp_path_factory.mktemp("coreml") / "fp16", threads=1)


@pytest.fixture(scope="module")
def runner(fp16):
    return BACKEND.load(fp16.path, {})  # as the proof opens it (the sealed manifest is refused off macOS)


def test_missing_requirements_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real(name, *a))
    assert cb.CoreMLBackend().missing_requirements() == ["coremltools is not installed: pip install 'deploykit[coreml]'"]


def test_coremltools_is_imported_without_the_frameworks_it_only_probes():
    """tensorflow & co. are most of `import coremltools` and a torch conversion uses none of them; the
    process can still import them afterwards (no None left in sys.modules)."""
    import subprocess
    import sys

    code = ("import sys, importlib.util\n"
            "from deploykit_plugins import coreml_backend as cb\n"
            "ct = cb._coremltools()\n"
            "assert cb._coremltools() is ct and ct.__name__ == 'coremltools'\n"
            "assert not [m for m in cb._PROBED_UNUSED if m in sys.modules], [m for m in cb._PROBED_UNUSED if m in sys.modules]\n"
            "assert importlib.util.find_spec('tensorflow') is not None\n"
            "import sklearn\n"  # the lightest of them: importable again
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_registered_with_fp16_first():
    (backend,) = cb.deploykit_backends()
    assert [s.name for s in backend.schemes] == ["fp16", "fp32", "int8", "palette4"] and backend.default_scheme == "fp16"
    assert BACKEND.missing_requirements() == [] and "coremltools" in BACKEND.versions()


# -- the proof off macOS: spec, weights, MIL numerics ----------------------------------------------------
def test_fp16_proof_and_what_the_manifest_says(fp16):
    info = fp16.manifest["backend_info"]
    assert fp16.report.passed() and fp16.report.greedy_match == 1.0
    assert info["spec"]["inputs"] == list(cb.INPUTS) and info["spec"]["outputs"] == list(cb.OUTPUTS)
    assert info["spec"]["specification_version"] >= cb.SPEC_VERSION and "softmax" in info["spec"]["ops"]
    cfg = fp16.manifest["model_config"]
    assert info["weights"]["compared"] == cfg["n_layers"] * 7 + 1  # 7 linears a layer + the (tied) embedding
    assert 0 < info["weights"]["worst_error"] <= cb.FP16_ROUNDING
    assert info["numerics"] == cb.numerics_mode() and ("MIL op reference" in info["numerics"]) != ON_MAC
    assert any(f.startswith(cb.PACKAGE + "/") for f in fp16.manifest["files"])
    # Core ML's weight file is a raw blob that happens to end in .bin, which the manifest's pickle list
    # counts by suffix; nothing else may be listed there.
    assert all(f.startswith(cb.PACKAGE + "/Data/") and f.endswith("weight.bin") for f in fp16.manifest["pickle_files"])


def test_the_mil_program_decodes_the_greedy_tokens_of_torch_with_its_cache(runner, nano_checkpoint):
    model = load_model(nano_checkpoint)
    prompt = [1, 40, 7, 300, 12]
    want = torch_generate(model, prompt, 12, eos_token_id=None)
    session = runner.new_session()
    logits, got = session.feed(prompt), []
    for _ in range(12):
        got.append(int(np.argmax(logits)))
        logits = session.feed([got[-1]])
    assert got == want and session.inner.past == len(prompt) + 12


def test_cached_steps_equal_the_full_forward(runner):
    ids = np.asarray([[1, 5, 9, 200, 7, 7, 31, 64, 2, 11]])
    session = runner.new_session()
    steps = np.stack([session.feed(ids[0, :4].tolist())] + [session.feed([t]) for t in ids[0, 4:]])  # (7, V)
    full = runner.forward(ids)[0, 3:]
    assert np.abs(steps - full).max() < 0.05  # fp16 compute; a lost cache moves logits by O(1)


def test_a_changed_weight_is_caught(fp16, nano_checkpoint):
    model = load_model(nano_checkpoint)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] *= 1.01  # 1 % of one element: 20x fp16's rounding
    with pytest.raises(BackendError, match="a weight differs from the source"):
        cb.compare_weights(fp16.path / cb.PACKAGE, model, "fp16")


def tiny(variant: str) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, vocab_size=320, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=2 if variant != "legacy" else 4, ffn_dim=128, max_seq_len=64,
                      n_experts=4 if variant == "moe" else 0)
    return CausalLM(cfg).eval()


@pytest.mark.parametrize("variant, scheme", [("moe", "int8"), ("legacy", "palette4")])
def test_variants_convert_and_their_program_matches_torch(tmp_path, variant, scheme):
    """MoE's top-k routing converts to MIL ops (topk in the spec); legacy's GPT-2 block too."""
    model = tiny(variant)
    facts = BACKEND.convert(model, BACKEND.scheme(scheme), tmp_path, ConvertContext(source=None, tokenizer=None))
    assert ("topk" in facts["spec"]["ops"]) == (variant == "moe")
    assert facts["weights"]["worst_error"] <= cb.WEIGHT_ERROR[scheme]
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).numpy()
    got = BACKEND.load(tmp_path, {}).forward(ids.numpy())
    assert got.shape == ref.shape and np.abs(got - ref).max() < 0.1 * (ref.max() - ref.min())


def test_a_fixed_sequence_shape_pads_its_last_chunk_exactly(tmp_path):
    """seq_len=4: every call takes 4 tokens; prefill in chunks, decode steps padded, logits unchanged."""
    from deploykit.errors import ConfigError

    model = tiny("dense")
    scheme = BACKEND.scheme("fp32")
    ctx = ConvertContext(source=None, tokenizer=None, options=scheme.parse_options({"seq_len": "4"}, backend="coreml"))
    facts = BACKEND.convert(model, scheme, tmp_path, ctx)
    assert facts["spec"]["input_ids"] == "fixed (1, 4)"
    runner = BACKEND.load(tmp_path, {})
    ids = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).numpy()
    session = runner.new_session()
    steps = np.stack([session.feed(ids[0, :7].tolist())] + [session.feed([int(t)]) for t in ids[0, 7:]])  # (4, V)
    assert np.abs(runner.forward(ids.numpy()) - ref).max() < 1e-4 and np.abs(steps - ref[0, 6:]).max() < 1e-4
    with pytest.raises(ConfigError, match="seq_len=-1 must be >= 0"):
        scheme.parse_options({"seq_len": "-1"}, backend="coreml")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [s.name for s in cb.CoreMLBackend.schemes])
@pytest.mark.parametrize("which", ["nano_checkpoint", "nano_moe_checkpoint"])
def test_every_scheme_passes_its_proof(request, tmp_path, which, scheme):
    result = deploykit.convert(request.getfixturevalue(which), "coreml", scheme, out=tmp_path / "a", threads=1)
    assert result.report.passed(), result.report.violations()


# -- off macOS: no runtime, said so --------------------------------------------------------------------
@pytest.mark.skipif(ON_MAC, reason="on macOS the artifact loads and predicts")
def test_loading_off_macos_says_it_needs_macos_exit_4(fp16):
    from deploykit.cli.main import main

    with pytest.raises(BackendUnavailable, match="Core ML prediction needs macOS"):
        deploykit.load(fp16.path)
    assert main(["generate", str(fp16.path), "--prompt", "The", "--max-new-tokens", "2"]) == 4


@pytest.mark.skipif(not ON_MAC, reason="Core ML prediction needs macOS (coremltools refuses predict elsewhere)")
def test_core_ml_runtime_predicts_what_the_proof_measured(fp16, nano_checkpoint):
    runner = deploykit.load(fp16.path)
    assert runner.info.details["numerics"].startswith("the Core ML runtime")
    assert runner.generate([1, 40, 7], max_new_tokens=8) == torch_generate(load_model(nano_checkpoint), [1, 40, 7], 8,
                                                                           eos_token_id=None)


# -- damaged packages ----------------------------------------------------------------------------------
def test_a_missing_part_of_the_package_is_one_line(fp16, tmp_path):
    from deploykit.cli.main import main

    bad = tmp_path / "bad"
    shutil.copytree(fp16.path, bad)
    weights = next((bad / cb.PACKAGE).rglob("weight.bin"))
    weights.unlink()
    with pytest.raises(ArtifactError, match="not a readable Core ML package|is missing") as e:
        cb.open_package(bad / cb.PACKAGE)
    assert "\n" not in str(e.value).split("\nHINT")[0]
    assert main(["generate", str(bad), "--prompt", "The", "--max-new-tokens", "2"]) == 2  # the manifest's sha256 first
    (bad / cb.PACKAGE / "Manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not an .mlpackage"):
        BACKEND.load(bad, {})
