"""The onnx backend's graph passes: each rewrites the exported fp32 graph into a derived scheme's.

- ``_to_fp16``: onnxruntime's float16 converter, keeping the rotary-angle subgraph and the ops in
  ``_FP16_BLOCKED_OPS`` fp32 (see the package docstring for why);
- ``_expose_weights``: make every weight a plain initializer operand of a MatMul, which is all ORT's
  quantizers quantize (a tied lm_head's Transpose folded, MoE Einsum -> batched MatMul);
- ``_weight_nodes`` / ``_kept_nodes``: which MatMuls to quantize, and which ``keep_fp32`` leaves float
  (found through the exporter's node metadata);
- ``_quantize_dynamic`` (+ ``_per_token_activations``, ``_per_expert_scales``) and ``_quantize_static``
  (QDQ with MinMax ranges from ``_CalibrationFeeds``).

``derive_scheme`` in the package picks the passes for a scheme; nothing here knows the Backend.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.deploy.onnx_graph import toposort
from deploykit.deploy.roles import QUANTIZED, Role, linear_roles
from deploykit.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from deploykit.model.graph import CausalLM


def _weight_bytes(proto: Any) -> int:
    return sum(int(np.prod(t.dims)) * 4 for t in proto.graph.initializer)


def _save(proto: Any, dst: Path, external: bool) -> None:
    import onnx

    onnx.save(proto, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
              location=dst.name + ".data" if external else None)


def _rotary_nodes(proto: Any) -> list[str]:
    """Names of Cos/Sin nodes and everything upstream of them (the rotary-angle computation)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    todo = [n for n in proto.graph.node if n.op_type in ("Cos", "Sin")]
    seen: dict[str, Any] = {}
    while todo:
        node = todo.pop()
        if node.name not in seen:
            seen[node.name] = node
            todo.extend(producer[i] for i in node.input if i in producer)
    return list(seen)


# RMSNorm statistics (mean of squares) and softmax run in fp32; matmuls and elementwise ops in fp16.
_FP16_BLOCKED_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "LayerNormalization", "TopK"]


def _to_fp16(proto: Any, dst: Path, external: bool) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked_nodes = _rotary_nodes(proto)
    blocked_ops = DEFAULT_OP_BLOCK_LIST + _FP16_BLOCKED_OPS
    proto = convert_float_to_float16(proto, keep_io_types=True, op_block_list=blocked_ops,
                                     node_block_list=blocked_nodes)
    round_trips = _drop_fp16_round_trips(proto.graph, set(blocked_ops), set(blocked_nodes))
    toposort(proto.graph)  # the converter appends its input casts at the end of the node list
    # Some intermediate value_info entries keep their pre-conversion types, which full_check rejects;
    # they are only hints, and shape inference recomputes them.
    del proto.graph.value_info[:]
    _save(proto, dst, external)
    return {"fp32_nodes": len(blocked_nodes), "fp16_round_trips_dropped": round_trips}


def _drop_fp16_round_trips(graph: Any, blocked_ops: set[str], blocked_nodes: set[str]) -> int:
    """Wire ``Cast(fp32)(Cast(fp16)(x))`` back to ``x`` where ``x`` is fp32; returns how many.

    onnxruntime's converter casts every blocked node's output to fp16 and every blocked node's input
    back to fp32, so a value passing from one blocked node to the next is rounded to fp16 on the
    way: the rotary angle (position x frequency, ~0.06 rad off at position 256), and the squares
    that RMSNorm's mean is taken of (inf past 256). Block lists keep nothing fp32 until the
    round trip is gone. Only the consumers' wiring changes; a Cast left unused is removed.
    """
    from onnx import TensorProto

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {o: n for n in graph.node for o in n.output}
    fp32_sources = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    fp32_sources |= {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}

    def is_fp32(value: str) -> bool:
        node = producer.get(value)
        if node is None:
            return value in fp32_sources
        if node.op_type == "Cast":
            return cast_to(node) == TensorProto.FLOAT
        return node.op_type in blocked_ops or node.name in blocked_nodes

    rewire: dict[str, str] = {}
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        half = producer.get(node.input[0])
        if half is not None and cast_to(half) == TensorProto.FLOAT16 and is_fp32(half.input[0]):
            rewire[node.output[0]] = half.input[0]
            node.input[0] = half.input[0]  # an fp32 -> fp32 Cast: what a graph output keeps
    for node in graph.node:
        node.input[:] = [rewire.get(name, name) for name in node.input]
    # Drop the Casts nothing reads any more (a graph output keeps its producer); twice, since a fp16
    # Cast may have fed only fp32 Casts that went in the first sweep.
    outputs = {o.name for o in graph.output}
    for _ in range(2):
        used = {i for n in graph.node for i in n.input} | outputs
        live = [n for n in graph.node if n.op_type != "Cast" or any(o in used for o in n.output)]
        del graph.node[:]
        graph.node.extend(live)
    return len(rewire)


def _expose_weights(proto: Any) -> tuple[Any, dict[str, int]]:
    """Rewrite the graph so every weight is a plain initializer operand of a MatMul (see module doc)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    keep, folded, einsums = [], 0, 0
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            # Tied lm_head: MatMul(x, Transpose(embedding)). Store the transposed copy: int8 it costs a
            # quarter of the fp32 embedding, and MatMul can then be quantized.
            w = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), node.output[0]))
            folded += 1
            continue
        if node.op_type == "Einsum" and len(node.input) == 2 and node.input[1] in inits:
            equation = next(a.s.decode() for a in node.attribute if a.name == "equation")
            m = re.fullmatch(r"(\w+),(\w)(\w)(\w)->(\w+)", equation)
            if m:
                lhs, e, o, i, rhs = m.groups()
                n = lhs.replace(e, "").replace(i, "")
                # Per-expert linear: lhs (N, I) or (E, N, I) times W (E, O, I) -> (E, N, O) equals
                # matmul(lhs, W^T) with W^T (E, I, O), lhs broadcast over experts.
                if lhs[-1] == i and len(n) == 1 and lhs in (n + i, e + n + i) and rhs == e + n + o:
                    w = numpy_helper.to_array(inits[node.input[1]])
                    name = node.input[1] + ".T"
                    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.transpose(0, 2, 1)), name))
                    keep.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
                    einsums += 1
                    continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    return proto, {"folded_transposes": folded, "einsum_to_matmul": einsums}


def _weight_nodes(proto: Any, *, quantize_lm_head: bool = True) -> list[str]:
    """MatMul/Gemm/Gather nodes whose weight is an initializer: the layers worth quantizing.

    Activation x activation MatMuls (attention scores, attention x values) stay fp32; so does the
    lm_head (the MatMul that produces ``logits``) when ``quantize_lm_head`` is false.
    """
    inits = {t.name for t in proto.graph.initializer}
    lm_head = {n.name for n in proto.graph.node if "logits" in n.output and n.op_type in ("MatMul", "Gemm")}
    names = []
    for n in proto.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits and (quantize_lm_head or n.name not in lm_head):
            names.append(n.name)
        elif n.op_type == "Gather" and n.input[0] in inits:
            names.append(n.name)
    return names


# A MatMul weight is (K, N) (or (E, K, N) for the stacked experts): its output channels are the LAST
# axis. ORT's dynamic MatMulInteger quantizes along axis -1 (its quantize_weight default); its QDQ
# MatMul defaults to axis 1, which for the experts' (E, K, N) is the input axis K, so the static
# scheme names -1 explicitly ("QDQOpTypePerChannelSupportToAxis", onnxruntime >= 1.14).
WEIGHT_CHANNEL_AXIS = -1
OUTPUT_FLOAT_OPS = ["MatMul", "Gemm"]


def weight_modules(model: CausalLM) -> dict[str, Role]:
    """The modules the onnx int8 schemes can keep fp32, by the names ``keep_fp32`` takes: the torch
    backend's (deploykit.deploy.roles) with a layer's stacked experts as its three batched MatMuls
    (``...block_sparse_moe.experts.w1`` / ``w3`` / ``w2``): one MatMul serves every expert, so a single
    expert cannot be kept alone."""
    out: dict[str, Role] = {}
    for name, role in linear_roles(model).items():
        if role is Role.EXPERTS:
            out |= {f"{name}.w1": Role.EXPERT_GATE, f"{name}.w3": Role.EXPERT_UP, f"{name}.w2": Role.EXPERT_DOWN}
        elif role in QUANTIZED | {Role.LM_HEAD, Role.ROUTER}:
            out[name] = role
    return out


_FX_PARAM = re.compile(r"%p_lm_(\w+)")  # a parameter operand in the exporter's fx_node text: p_lm_<dotted name, _ for .>


def _kept_nodes(proto: Any, modules: Sequence[str]) -> set[str]:
    """Names of the export's weight nodes (MatMul/Gemm/Einsum) whose weight belongs to one of ``modules``.

    The dynamo exporter's constant folding renames weight initializers (``val_61``), but every node
    keeps the fx node it came from in its metadata (``pkg.torch.onnx.fx_node``), whose operands name
    the torch parameters (``%p_lm_model_layers_0_self_attn_q_proj_weight``). The lm_head is also the
    node producing ``logits`` (a tied lm_head reads the embedding's parameter)."""
    if not modules:
        return set()
    mangled = {}
    for m in modules:
        for param in (f"{m}.weight", m):  # a Linear's weight, or a stacked expert tensor (experts.w1)
            mangled[param.replace(".", "_")] = m
    found: dict[str, set[str]] = {m: set() for m in modules}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Einsum"):
            continue
        if "lm_head" in found and "logits" in node.output:
            found["lm_head"].add(node.name)
        fx = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
        for arg in _FX_PARAM.findall(fx):
            if arg in mangled:
                found[mangled[arg]].add(node.name)
    missing = [m for m, nodes in found.items() if not nodes]
    if missing:
        raise BackendError(f"onnx: keep_fp32 {', '.join(missing)}: no MatMul of the exported graph reads its weight",
                           hint="the exporter's node metadata (pkg.torch.onnx.fx_node) is missing or renamed; "
                                "report this with the torch version")
    return set().union(*found.values())


def _quantize_dynamic(proto: Any, dst: Path, external: bool, nodes: list[str], *, per_channel: bool,
                      per_token: bool = True) -> dict[str, Any]:
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    inits = {t.name: t for t in proto.graph.initializer}
    experts = {n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in proto.graph.node
               if n.name in nodes and n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 3}
    quantize_dynamic(proto, str(dst), op_types_to_quantize=["MatMul", "Gemm", "Gather"], nodes_to_quantize=nodes,
                     per_channel=per_channel, weight_type=QuantType.QInt8, use_external_data_format=external)
    if per_channel and experts:
        _per_expert_scales(dst, experts, external)
    facts = {"quantized_nodes": len(nodes), "weights": "per output channel" if per_channel else "per tensor"}
    if per_token:
        facts["activations"] = f"per token (symmetric, {_per_token_activations(dst, external)} inputs)"
    else:
        facts["activations"] = "per tensor (ORT's DynamicQuantizeLinear, asymmetric uint8)"
    return facts


def _per_token_activations(path: Path, external: bool) -> int:
    """Give every dynamically quantized MatMul input one int8 scale per token (row), not one per tensor.

    ORT's DynamicQuantizeLinear picks one uint8 scale over the whole input, so one token's outlier
    channel coarsens every token's grid; ORT has no per-row dynamic quantizer. Each DynamicQuantizeLinear
    becomes the same computation with a per-row scale, from standard ops (its three outputs keep their
    names, so the MatMulInteger / scale-Mul consumers ORT wrote are untouched):

        s = max(ReduceMax(|x|, axis -1, keepdims), tiny) / 127     (..., T, 1)
        q = Cast<uint8>(Clip(Round(x / s) + 128, 1, 255))           (..., T, K)    zero point: uint8 128

    The consumers' Mul(x_scale, w_scale) then broadcasts (..., T, 1) x (N,) to (..., T, N). The
    scheme of LLM.int8()'s and SmoothQuant's per-token activations, and of the torch backend's
    int8-dynamic. Returns how many inputs were rewritten.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    # uint8 with a fixed zero point of 128 holds the symmetric int8 grid (-127..127 -> 1..255): ORT's
    # x86 MatMulInteger is fast for u8 x s8 and several times slower for s8 x s8 (decode 1,060 vs
    # 290 tok/s on the demo model), and it takes a scalar zero point only, so a per-row one is out.
    consts = {"pt_axis": np.array([-1], np.int64), "pt_tiny": np.array(np.finfo(np.float32).tiny, np.float32),
              "pt_127": np.array(127.0, np.float32), "pt_lo": np.array(1.0, np.float32),
              "pt_hi": np.array(255.0, np.float32), "pt_128": np.array(128.0, np.float32)}
    nodes: list[Any] = []
    zero_points: list[str] = []
    rewritten = 0
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        (x,), (q, scale, zero) = node.input, node.output
        t = f"{node.name}_pt"
        nodes += [
            helper.make_node("Abs", [x], [f"{t}_abs"], name=f"{t}_Abs"),
            helper.make_node("ReduceMax", [f"{t}_abs", "pt_axis"], [f"{t}_max"], name=f"{t}_ReduceMax", keepdims=1),
            helper.make_node("Max", [f"{t}_max", "pt_tiny"], [f"{t}_safe"], name=f"{t}_Max"),
            helper.make_node("Div", [f"{t}_safe", "pt_127"], [scale], name=f"{t}_Scale"),
            helper.make_node("Div", [x, scale], [f"{t}_div"], name=f"{t}_Div"),
            helper.make_node("Round", [f"{t}_div"], [f"{t}_round"], name=f"{t}_Round"),
            helper.make_node("Add", [f"{t}_round", "pt_128"], [f"{t}_shift"], name=f"{t}_Shift"),
            helper.make_node("Clip", [f"{t}_shift", "pt_lo", "pt_hi"], [f"{t}_clip"], name=f"{t}_Clip"),
            helper.make_node("Cast", [f"{t}_clip"], [q], name=f"{t}_Cast", to=TensorProto.UINT8),
        ]
        zero_points.append(zero)  # a constant now: an initializer under the name its consumers read
        rewritten += 1
    if rewritten:
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        graph.initializer.extend(numpy_helper.from_array(np.array(128, np.uint8), z) for z in zero_points)
        del graph.node[:]
        graph.node.extend(nodes)
        _save(proto, path, external)
    return rewritten


def _per_expert_scales(path: Path, weights: dict[str, np.ndarray], external: bool) -> None:
    """Requantize the stacked experts' (E, K, N) weights with one scale per expert and output channel.

    ORT's per-channel quantizer gives a batched MatMul weight one (N,) scale shared by every expert,
    which its MatMulInteger kernel refuses ("b zero point is not valid": a batched B takes a scale and
    zero point of shape (E, 1, N) or a scalar). (E, 1, N) is also the finer grid: experts differ in range.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    for name, w in weights.items():  # w (E, K, N) float32
        scale = np.maximum(np.abs(w).max(axis=1, keepdims=True) / 127.0, np.finfo(np.float32).tiny)  # (E, 1, N)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)  # (E, K, N)
        for suffix, value in (("_quantized", q), ("_scale", scale.astype(np.float32)),
                              ("_zero_point", np.zeros(scale.shape, np.int8))):
            if name + suffix not in inits:
                raise BackendError(f"onnx int8-dynamic: ORT did not write {name + suffix!r} for the expert weight {name!r}",
                                   hint="this onnxruntime names quantized weights differently; use per_channel=false")
            inits[name + suffix].CopyFrom(numpy_helper.from_array(value, name + suffix))
    _save(proto, path, external)


class _CalibrationFeeds:
    """A CalibrationDataReader over token sequences: each gives one prefill feed (empty past) and
    one decode feed (the last token, with the past of the rest computed by the fp32 graph)."""

    def __init__(self, fp32_path: Path, sequences: Sequence[Sequence[int]], max_len: int) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
        self.sequences = [list(s)[:max_len] for s in sequences if len(s) >= 2]
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for seq in self.sequences:
            ids = np.asarray([seq], dtype=np.int64)  # (1, T)
            empty = _empty_past(self.session, 1)
            yield {"input_ids": ids} | empty
            present = self.session.run(None, {"input_ids": ids[:, :-1]} | empty)[1:]
            yield {"input_ids": ids[:, -1:]} | dict(zip(empty, present))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._feeds()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def _quantize_static(proto: Any, fp32_path: Path, dst: Path, external: bool,
                     calibration: Sequence[Sequence[int]], config: dict[str, Any], nodes: list[str], *,
                     per_channel: bool, float_outputs: bool = True) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not any(len(s) >= 2 for s in calibration):
        raise ConfigError("int8-static needs calibration token sequences (ctx.calibration), got none of length >= 2",
                          hint="pass calibration data (deploykit convert draws it from the eval corpus) or use int8-dynamic")
    feeds = _CalibrationFeeds(fp32_path, calibration, config["max_seq_len"])
    # The stacked experts' (E, K, N) weights stay per tensor: a QDQ per-axis scale is 1-D, and ORT fuses
    # DequantizeLinear + MatMul (float output) into MatMulIntegerToFloat, which refuses an (N,) scale on a
    # batched B ("b zero point is not valid"; it takes a scalar or (E, 1, N), which QDQ cannot express).
    inits = {t.name: t for t in proto.graph.initializer}
    experts = sorted({n.input[1] for n in proto.graph.node if n.name in nodes and n.op_type == "MatMul"
                      and n.input[1] in inits and len(inits[n.input[1]].dims) == 3})
    reader = type("Reader", (CalibrationDataReader,), {"get_next": lambda s: feeds.get_next(), "rewind": lambda s: feeds.rewind()})()
    quantize_static(proto, str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                    nodes_to_quantize=nodes, per_channel=per_channel, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    use_external_data_format=external,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                   "QDQOpTypePerChannelSupportToAxis": {"MatMul": WEIGHT_CHANNEL_AXIS},
                                   # QDQ would also round every MatMul's OUTPUT to int8, the logits and
                                   # the values entering the KV cache included: see the module doc
                                   "OpTypesToExcludeOutputQuantization": OUTPUT_FLOAT_OPS if float_outputs else [],
                                   "TensorQuantOverrides": {w: [{"symmetric": True}] for w in experts}})
    return {"quantized_nodes": len(nodes), "calibration_sequences": len(feeds.sequences),
            "weights": "per output channel" if per_channel else "per tensor"}


# -- runtime ---------------------------------------------------------------------------------------
def _empty_past(session: Any, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past for every past_key_values input: (batch, kv_heads, 0, head_dim) float32."""
    feeds = {}
    for i in session.get_inputs()[1:]:
        kv_heads, head_dim = i.shape[1], i.shape[3]
        feeds[i.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=np.float32)
    return feeds
