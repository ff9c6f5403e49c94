"""A fresh process's ``deploykit.load`` of a native artifact (int8, int8-moe, int4) and its first steps import
nothing they do not need: not torch (the engine reads the artifact with numpy; building the torch graph on
the meta device once imported torch._dynamo, 1.5 s of a first load) and no other backend's runtime.
Discovery imports every plugin module by design (pluggy reads their hooks), so this also holds each plugin
to importing its runtime inside functions only.

A property of the load path, not a timing: the seconds are measured in benchmarks/native_e2e.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import deploykit
from deploykit import native
from deploykit.model.checkpoint import save_model
from deploykit.model.config import preset
from deploykit.model.graph import CausalLM

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"deploykit.native._native not built: {native.unavailable_reason()}")

# Top-level names: a package is in sys.modules as soon as any of its submodules is.
NOT_NEEDED = ("torch", "torch._dynamo", "torch._inductor", "torch.onnx", "tensorflow", "onnx", "onnxruntime", "onnxscript",
              "coremltools", "llama_cpp", "gguf", "tensorrt", "transformers", "peft", "torchao", "ai_edge_litert",
              "litert_torch")
CASES = (("nano", "int8", None), ("nano", "int4", {"rounding": "rtn"}), ("nano-moe", "int8-moe", None))

_WORKER = """
import json, sys
import numpy as np
import deploykit
paths, not_needed = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for scheme, path in paths.items():
    runner = deploykit.load(path, threads=1)
    session = runner.new_session()
    session.feed([1, 2, 3])
    logits = session.feed([4])
    runner.forward(np.array([[1, 2, 3]], dtype=np.int64))
    out[scheme] = {"runs": runner.info.details.get("runs"), "vocab": int(logits.shape[-1]),
                   "imported": sorted(m for m in not_needed if m in sys.modules)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def native_artifacts(tmp_path_factory) -> dict[str, str]:
    """Random-weight nano / nano-moe converted without the proof: which modules a load imports does not
    depend on the weights."""
    root, out = tmp_path_factory.mktemp("native-load"), {}
    for name, scheme, options in CASES:
        ckpt = root / f"ckpt-{name}"
        if not ckpt.exists():
            torch.manual_seed(0)
            save_model(CausalLM(preset(name)).eval(), ckpt)
        out[scheme] = str(deploykit.convert(ckpt, "native", scheme, root / f"{name}-{scheme}", options=options,
                                            verify=False).path)
    return out


def test_fresh_load_imports_no_compiler_and_no_other_runtime(native_artifacts):
    p = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(native_artifacts), json.dumps(NOT_NEEDED)],
                       check=False, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    found = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(found) == {scheme for _, scheme, _ in CASES}
    for scheme, r in found.items():
        assert r["runs"] == "native C++ decode engine", (scheme, r)  # the engine path was the one loaded
        assert r["vocab"] == preset("nano").vocab_size
        assert r["imported"] == [], f"{scheme}: a fresh load and two steps imported {r['imported']}"
