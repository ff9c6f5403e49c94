"""The onnx backend's fp16 pass on a hand-built graph: ops kept fp32 pass fp32 values to each other.

(The fp16 artifacts of trained models are checked in tests/test_onnx_backend.py.)
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnx")

from deploykit_plugins import onnx_backend as ob  # noqa: E402


def test_fp16_blocked_values_never_round_trip_through_fp16(tmp_path):
    """Blocked ops pass fp32 to each other directly: onnxruntime's converter casts every blocked output to
    fp16 and back, which makes x**2 of x = 300 inf before RMSNorm's mean and rounds the rotary angle."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq"], ["ms"], name="mean", keepdims=1),
             helper.make_node("Mul", ["x", "freq"], ["angle"], name="angle"),
             helper.make_node("Cos", ["angle"], ["cos"], name="cos")]
    graph = helper.make_graph(
        nodes, "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("ms", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("cos", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(1.0), "freq")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[300.0, 255.3, 200.7, 3.1]], np.float32)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    facts = ob._to_fp16(proto, tmp_path / "h.onnx", external=False)
    got = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert facts["fp16_round_trips_dropped"] >= 2
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)  # 56,000 on average: inf in fp16
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)  # fp16 255.3 is 255.25: cos 0.05 off
