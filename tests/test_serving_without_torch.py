"""Serving a native, onnx or gguf artifact never imports torch.

``import deploykit`` and ``deploykit.load(artifact).generate(...)`` run in a fresh interpreter that has
torch blocked (a meta-path finder that refuses it), so any import of torch on that path — the core's,
a plugin's, the registry loading every entry point — fails the test with the importing module's
traceback, and the logits the torch-free process computes are those of a process that has torch.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import deploykit
from deploykit import native

# What the child runs: torch (and anything under it) raises on import, then the artifact is served.
CHILD = r"""
import importlib.abc, json, sys
import numpy as np

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this process (imported as {name!r})")
        return None

sys.meta_path.insert(0, NoTorch())
import deploykit

artifact, ids_file, out_file = sys.argv[1:4]
runner = deploykit.load(artifact, threads=1)
text = runner.generate("Once upon a time", max_new_tokens=8)
session = runner.new_session()
stepped = [session.feed([t]).tolist() for t in [1, 5, 9]]
np.save(out_file, runner.forward(np.load(ids_file)))
from deploykit.deploy.registry import registry  # a plugin that needed torch would be recorded here
errors = [str(e) for e in registry().plugin_errors()]
print(json.dumps({"text": text, "torch": "torch" in sys.modules, "backend": runner.info.backend,
                  "stepped": len(stepped), "plugin_errors": errors}))
"""

CASES = [("onnx", "int8-dynamic"), ("gguf", "q8_0")] + ([("native", "int8"), ("native", "int4")]
                                                         if native.available() else [])


def _missing(backend: str) -> list[str]:
    from deploykit.deploy.registry import registry

    return registry().get_backend(backend).missing_requirements()


@pytest.mark.parametrize("backend,quant", CASES)
def test_an_artifact_is_served_without_torch(nano_checkpoint, tmp_path, backend, quant):
    if _missing(backend):
        pytest.skip(f"{backend} is unavailable here: {_missing(backend)[0]}")
    artifact = deploykit.convert(nano_checkpoint, backend, quant, tmp_path / "a").path
    ids = np.array([[1, 17, 42, 99, 5, 7, 64, 3]], dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(artifact), str(tmp_path / "ids.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"text": report["text"], "torch": False, "backend": backend, "stepped": 3, "plugin_errors": []}
    assert isinstance(report["text"], str) and report["text"]
    # The same artifact in this process (torch loaded, threads 1) gives the same logits.
    here = deploykit.load(artifact, threads=1).forward(ids)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), here, rtol=0, atol=1e-5)


def test_the_blocker_catches_a_torch_import(tmp_path):
    """The child's finder really refuses torch: a load that needs it (a torch artifact) fails there."""
    proc = subprocess.run([sys.executable, "-c", CHILD.split("import deploykit\n")[0] + "import deploykit.model.graph"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch is blocked in this process" in proc.stderr


def test_torch_names_still_resolve_on_first_use():
    """The lazy top-level names are the real objects (PEP 562), torch imported when they are reached."""
    from deploykit.model import graph

    assert deploykit.CausalLM is graph.CausalLM
    assert deploykit.model.CausalLM is graph.CausalLM
    if native.available():
        from deploykit.native import kernels

        assert native.Int8Linear is kernels.Int8Linear and native.moe_ffn is kernels.moe_ffn
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        deploykit.nope  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        native.nope  # noqa: B018


def test_registering_the_builtin_backends_imports_no_torch():
    code = ("import sys, deploykit\nfrom deploykit.deploy.registry import registry\n"
            "names = sorted(registry().backends())\nprint(names, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    names, has_torch = out.rsplit(" ", 1)
    assert has_torch.strip() == "False", out
    assert "'torch'" in names and "'native'" in names and "'onnx'" in names
