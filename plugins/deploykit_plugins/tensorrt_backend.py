"""TensorRT backend: an engine built with the ``tensorrt`` Python API from deploykit's merged KV-cache
ONNX export (``deploykit.deploy.onnx_graph``), run on an NVIDIA GPU through torch CUDA tensors.

The engine keeps the export's signature (input_ids + past_key_values.{i}.key/value -> logits +
present.{i}.key/value) and has two optimization profiles, chosen per call by the runner:

    profile 0 "prefill": batch 1..max_batch, seq 1..max_seq_len, past 0 (empty cache tensors)
    profile 1 "decode":  batch 1..max_batch, seq 1,               past 1..max_seq_len-1

so a prefill and every decode step get kernels tuned for their shapes, and the cache stays on the GPU
between steps (present tensors are fed back as the next past).

Schemes:

- ``fp16`` (default): ``BuilderFlag.FP16``; TensorRT keeps fp32 where its fp16 kernels lose accuracy.
- ``fp32``: no reduced-precision flags (TF32 disabled too, so the proof is against true fp32).
- ``int8``: explicit quantization: QuantizeLinear/DequantizeLinear pairs inserted in the ONNX graph in
  front of every weight MatMul, weights symmetric per output channel, activations per tensor with
  ranges (max |x|) measured by onnxruntime on ``ctx.calibration`` (a prefill and a decode step each).
  TensorRT 10 deprecates implicit calibrators; Q/DQ is its recommended path, and the quantized graph
  can be checked on a CPU (onnxruntime runs it with fake quantization: tests do).
- ``fp8``: the same Q/DQ with FLOAT8E4M3FN (scale max |x| / 448), built with ``BuilderFlag.FP8``;
  needs compute capability 8.9+ (Ada, Hopper), refused with that reason elsewhere.

An engine is specific to the TensorRT version and the GPU's compute capability: both are recorded
in the manifest and ``tensorrt_config.json``, and loading elsewhere is refused with that reason
before the engine is deserialized.

Not runnable on machines without an NVIDIA GPU; TensorRT's libraries come from NVIDIA's own index
(``pip install 'deploykit[tensorrt]' --extra-index-url https://pypi.nvidia.com``).
``missing_requirements`` says which of the two is missing, in one line. benchmarks/cuda/tensorrt_check.py
runs the whole path (every scheme's convert and proof, decode speed) on a GPU machine.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.deploy.backend import (
    EXACT,
    HALF,
    INT8,
    Backend,
    ConvertContext,
    Runner,
    RunnerInfo,
    Scheme,
    installed_versions,
)
from deploykit.deploy.hookspecs import hookimpl
from deploykit.deploy.onnx_graph import export_onnx, io_names, toposort
from deploykit.deploy.runtime import check_threads
from deploykit.errors import (
    ArtifactError,
    BackendError,
    BackendUnavailable,
    ConfigError,
)

if TYPE_CHECKING:
    from deploykit.model.config import ModelConfig
    from deploykit.model.graph import CausalLM

ENGINE_FILE = "model.engine"
CONFIG_FILE = "tensorrt_config.json"
CONFIG_FORMAT = 1
NVIDIA_INDEX = "https://pypi.nvidia.com"
INSTALL_HINT = f"pip install 'deploykit[tensorrt]' --extra-index-url {NVIDIA_INDEX}"
MAX_BATCH = 4
FP8_MIN_CAPABILITY = (8, 9)
QDQ = {"int8": (127.0, "INT8"), "fp8": (448.0, "FLOAT8E4M3FN")}  # scheme -> (max |q|, onnx element type)
WORKSPACE_BYTES = 1 << 30


class TensorRTBackend(Backend):
    name = "tensorrt"
    description = "TensorRT engine built from the KV-cache ONNX export, run on an NVIDIA GPU"
    schemes = (
        Scheme("fp16", "fp16 kernels where TensorRT keeps accuracy, fp32 elsewhere", HALF),
        Scheme("fp32", "fp32 kernels (TF32 off)", EXACT),
        Scheme("int8", "explicit Q/DQ int8: weights per channel, activations calibrated per tensor", INT8),
        Scheme("fp8", "explicit Q/DQ FP8 E4M3 (compute capability 8.9+)", INT8),
    )
    artifact_files = (ENGINE_FILE, CONFIG_FILE)
    platforms = "NVIDIA GPU"

    def missing_requirements(self) -> list[str]:
        reasons = []
        if importlib.util.find_spec("tensorrt") is None:
            reasons.append(f"tensorrt is not installed (its libraries come from NVIDIA's index: {INSTALL_HINT})")
        gpu = gpu_unavailable()
        if gpu:
            reasons.append(gpu)
        return ["; ".join(reasons)] if reasons else []

    def unsupported(self, scheme: Scheme, config: ModelConfig) -> str | None:
        if scheme.name == "fp8":
            cc = current_gpu().get("compute_capability")
            if cc is not None and tuple(int(x) for x in cc.split(".")) < FP8_MIN_CAPABILITY:
                return f"FP8 needs compute capability 8.9+ (Ada/Hopper); this GPU is {cc}"
        return None

    def versions(self) -> dict[str, str]:
        return installed_versions(("tensorrt", "onnx"))

    def convert(self, model: CausalLM, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        out = Path(out)
        work = out / ".onnx"  # the export and its Q/DQ rewrite; removed below
        work.mkdir(parents=True, exist_ok=True)
        try:
            ctx.progress("exporting (torch.onnx dynamo)")
            t0 = time.perf_counter()
            graph = work / "model.onnx"
            facts = export_onnx(model, graph)
            if scheme.name in QDQ:
                ctx.progress(f"inserting {scheme.name} Q/DQ, ranges from the calibration set")
                facts["qdq"] = quantize_graph(graph, graph, scheme.name, ctx.calibration, model.config)
            facts["export_seconds"] = round(time.perf_counter() - t0, 2)
            ctx.progress(f"building the TensorRT engine ({scheme.name})")
            t0 = time.perf_counter()
            engine = build_engine(graph, scheme.name, model.config)
            facts["build_seconds"] = round(time.perf_counter() - t0, 2)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        (out / ENGINE_FILE).write_bytes(engine)
        layout = engine_config(model.config, scheme.name, current_gpu())
        (out / CONFIG_FILE).write_text(json.dumps(layout, indent=1) + "\n")
        facts.update({"engine_bytes": len(engine), "tensorrt": layout["tensorrt"], "gpu": layout["gpu"],
                      "compute_capability": layout["compute_capability"], "profiles": layout["profiles"]})
        return facts

    def load(self, artifact: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        return TensorRTRunner(Path(artifact), threads=threads)


@hookimpl
def deploykit_backends() -> list[Backend]:
    return [TensorRTBackend()]


# -- where it can run ----------------------------------------------------------------------------------
def gpu_unavailable() -> str | None:
    """Why there is no CUDA GPU for torch here (None: there is one). Reads files only: no torch import."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "torch is not installed"
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    text = version.read_text() if version.is_file() else ""
    if "cuda: Optional[str] = None" in text or "cuda = None" in text:
        return "no CUDA: this torch is a CPU build (install a CUDA build of torch)"
    if not Path("/proc/driver/nvidia/version").exists() and not Path("/dev/nvidia0").exists():
        return "no NVIDIA GPU or driver on this machine"
    return None


def current_gpu() -> dict[str, str | None]:
    """This machine's GPU name, compute capability and TensorRT version (None where absent)."""
    facts: dict[str, str | None] = {"gpu": None, "compute_capability": None, "tensorrt": None}
    if importlib.util.find_spec("tensorrt") is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            facts["tensorrt"] = version("tensorrt")
        except PackageNotFoundError:
            pass
    if gpu_unavailable() is None:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            facts.update(gpu=torch.cuda.get_device_name(0), compute_capability=f"{major}.{minor}")
    return facts


# -- optimization profiles ---------------------------------------------------------------------------
def profiles(cfg: ModelConfig, max_batch: int = MAX_BATCH) -> list[dict[str, list[list[int]]]]:
    """[prefill, decode]: per input name, its [min, opt, max] shapes (see the module docstring)."""
    if max_batch < 1:
        raise ConfigError(f"max_batch={max_batch} must be >= 1")
    inputs, _ = io_names(cfg.n_layers)
    C, KV, hd = cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim
    prefill = {"input_ids": [[1, 1], [1, min(128, C)], [max_batch, C]]}
    decode = {"input_ids": [[1, 1], [1, 1], [max_batch, 1]]}
    for name in inputs[1:]:
        prefill[name] = [[1, KV, 0, hd], [1, KV, 0, hd], [max_batch, KV, 0, hd]]
        decode[name] = [[1, KV, 1, hd], [1, KV, C // 2, hd], [max_batch, KV, C - 1, hd]]
    return [prefill, decode]


def engine_config(cfg: ModelConfig, scheme: str, gpu: dict[str, str | None]) -> dict[str, Any]:
    return {"format": CONFIG_FORMAT, "quant": scheme, "tensorrt": gpu.get("tensorrt"), "gpu": gpu.get("gpu"),
            "compute_capability": gpu.get("compute_capability"), "max_batch": MAX_BATCH,
            "profiles": ["prefill", "decode"], "model_config": cfg.to_dict()}


def check_portable(path: Path, layout: dict[str, Any], here: dict[str, str | None]) -> None:
    """Refuse an engine built for another GPU or TensorRT version, naming both, before deserializing it."""
    built = f"compute capability {layout.get('compute_capability')} ({layout.get('gpu')}) with TensorRT {layout.get('tensorrt')}"
    if here.get("compute_capability") is None:
        raise BackendUnavailable(f"{path}: engine built for {built}; this machine has no CUDA GPU",
                                 hint="run it on the GPU it was built for, or convert again on the target machine")
    if (here.get("compute_capability"), here.get("tensorrt")) != (layout.get("compute_capability"), layout.get("tensorrt")):
        raise ArtifactError(f"{path}: engine built for {built}, this machine has compute capability "
                            f"{here.get('compute_capability')} ({here.get('gpu')}) with TensorRT {here.get('tensorrt')}: "
                            "TensorRT engines are not portable across GPUs or TensorRT versions",
                            hint="convert again on this machine (deploykit convert --backend tensorrt)")


def read_config(artifact: Path) -> dict[str, Any]:
    from deploykit.model.config import ModelConfig

    path = artifact / CONFIG_FILE
    if not path.is_file() or not (artifact / ENGINE_FILE).is_file():
        raise ArtifactError(f"{artifact}: no {CONFIG_FILE} and {ENGINE_FILE}", hint="re-run deploykit convert --backend tensorrt")
    try:
        layout = json.loads(path.read_text())
        if layout.get("format") != CONFIG_FORMAT:
            raise ValueError(f"format {layout.get('format')!r}, this deploykit reads {CONFIG_FORMAT}")
        layout["config"] = ModelConfig.from_dict(layout["model_config"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})", hint="re-run deploykit convert --backend tensorrt") from e
    return layout


# -- explicit quantization: Q/DQ in the ONNX graph -------------------------------------------------------
def weight_matmuls(proto: Any) -> list[Any]:
    """MatMul nodes whose second input is a 2-D initializer (x @ W, W (in, out)): the layers to quantize."""
    inits = {t.name: t for t in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]


def activation_ranges(path: Path, tensors: list[str], calibration: Sequence[Sequence[int]], cfg: ModelConfig) -> dict[str, float]:
    """max |x| of each named tensor over ``calibration`` (a prefill and a decode step per sequence), by onnxruntime."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    known = {o.name for o in proto.graph.output}
    for name in tensors:
        if name not in known:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs, _ = io_names(cfg.n_layers)
    amax = dict.fromkeys(tensors, 0.0)
    wanted = [o.name for o in session.get_outputs()]
    L = len(inputs) - 1
    for seq in calibration:
        ids = np.asarray([list(seq)[:cfg.max_seq_len]], np.int64)  # (1, T)
        empty = {n: np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32) for n in inputs[1:]}
        first = dict(zip(wanted, session.run(wanted, {"input_ids": ids[:, :-1], **empty})))
        past = dict(zip(inputs[1:], [first[f"present.{i // 2}.{'key' if i % 2 == 0 else 'value'}"] for i in range(L)]))
        step = dict(zip(wanted, session.run(wanted, {"input_ids": ids[:, -1:], **past})))
        for run in (first, step):
            for name in tensors:
                amax[name] = max(amax[name], float(np.abs(run[name]).max(initial=0.0)))
    return amax


def quantize_graph(src: Path, dst: Path, scheme: str, calibration: Sequence[Sequence[int]], cfg: ModelConfig) -> dict[str, Any]:
    """Insert Q/DQ pairs (``scheme`` int8 or fp8) in front of both inputs of every weight MatMul of ``src``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    seqs = [s for s in calibration if len(s) >= 2]
    if not seqs:
        raise ConfigError(f"tensorrt/{scheme} needs calibration token sequences (ctx.calibration), got none of length >= 2",
                          hint="pass calibration data (deploykit convert draws it from the eval corpus) or use fp16")
    proto = onnx.load(str(src))
    nodes = weight_matmuls(proto)
    amax = activation_ranges(src, sorted({n.input[0] for n in nodes}), seqs, cfg)
    qmax, elem = QDQ[scheme]
    qtype = getattr(TensorProto, elem)
    inits = {t.name: t for t in proto.graph.initializer}
    added: list[Any] = []
    done: dict[str, str] = {}  # a tensor read by several MatMuls (q/k/v share their input) gets one pair

    def qdq(name: str, scale: np.ndarray, axis: int | None) -> str:
        if name in done:
            return done[name]
        done[name] = f"{name}.dq"
        zero = helper.make_tensor(f"{name}.zp", qtype, list(scale.shape), np.zeros(scale.size, np.int32).tolist())
        proto.graph.initializer.extend([numpy_helper.from_array(scale.astype(np.float32), f"{name}.scale"), zero])
        kw = {} if axis is None else {"axis": axis}
        added.append(helper.make_node("QuantizeLinear", [name, f"{name}.scale", f"{name}.zp"], [f"{name}.q"], **kw))
        added.append(helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.scale", f"{name}.zp"], [f"{name}.dq"], **kw))
        return f"{name}.dq"

    for node in nodes:
        w = numpy_helper.to_array(inits[node.input[1]])  # (in, out)
        w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / qmax  # (out,) per output channel
        x_scale = np.asarray(max(amax[node.input[0]], 1e-12) / qmax)  # () per tensor
        node.input[1] = qdq(node.input[1], w_scale, axis=1)
        node.input[0] = qdq(node.input[0], x_scale, axis=None)
    proto.graph.node.extend(added)
    toposort(proto.graph)
    for o in proto.opset_import:  # FLOAT8 Q/DQ (and per-axis int8 ones) need opset 19
        if o.domain in ("", "ai.onnx") and o.version < 19:
            o.version = 19
    onnx.save(proto, str(dst))
    return {"quantized_matmuls": len(nodes), "element_type": elem, "calibration_sequences": len(seqs)}


# -- engine building ---------------------------------------------------------------------------------
def build_engine(onnx_path: Path, scheme: str, cfg: ModelConfig) -> bytes:
    """Parse the ONNX graph, add the two profiles, build and serialize the engine for this GPU."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser rejected the graph: {errors}", hint="report this with the model config")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if scheme == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(trt.BuilderFlag.FP16)
    if scheme == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if scheme == "fp8":
        config.set_flag(trt.BuilderFlag.FP8)
    for shapes in profiles(cfg):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BackendError(f"TensorRT failed to build the {scheme} engine (see its log above)",
                           hint="rerun with --debug; try fp16 or fp32")
    return bytes(engine)


# -- runtime -------------------------------------------------------------------------------------------
class TensorRTRunner(Runner):
    """An engine in one execution context; buffers are torch CUDA tensors. Calls take a lock (one context)."""

    def __init__(self, artifact: Path, *, threads: int | None = None) -> None:
        check_threads(threads)
        layout = read_config(artifact)
        check_portable(artifact, layout, current_gpu())
        import tensorrt as trt
        import torch

        from deploykit.deploy.artifact import model_files

        self.config: ModelConfig = layout["config"]
        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine((artifact / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{artifact / ENGINE_FILE}: TensorRT could not deserialize the engine",
                                hint="the file is damaged or from another TensorRT build; convert again")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = io_names(self.config.n_layers)
        self._lock = threading.Lock()
        self.eos_token_id, self.max_length = self.config.eos_token_id, self.config.max_seq_len
        self.tokenizer = None
        if (artifact / "tokenizer.json").is_file():
            from deploykit.model.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.load(artifact)
        files = model_files(artifact)
        self.info = RunnerInfo(backend="tensorrt", quant=str(layout.get("quant")), kv_cache=True,
                               size_bytes=sum(files.values()), files=files, threads=threads,
                               parameters=self.config.num_params(), vocab_size=self.config.vocab_size,
                               max_length=self.config.max_seq_len,
                               details={"tensorrt": layout.get("tensorrt"), "gpu": layout.get("gpu"),
                                        "compute_capability": layout.get("compute_capability"),
                                        "profiles": layout.get("profiles")})

    def run(self, input_ids: Any, past: list[Any] | None) -> tuple[Any, list[Any]]:
        """ids (B, T) cuda int64, past (B, kv, P, hd) cuda per input (None: empty) -> logits, presents (on the GPU)."""
        torch, cfg = self.torch, self.config
        B, T = input_ids.shape
        if past is None:
            past = [torch.zeros(B, cfg.n_kv_heads, 0, cfg.head_dim, device="cuda") for _ in self.inputs[1:]]
        P = past[0].shape[2]
        if P + T > cfg.max_seq_len or B > MAX_BATCH or (P > 0 and T != 1):
            raise ConfigError(f"batch {B}, {T} new token(s) after {P}: outside the engine's profiles (batch <= "
                              f"{MAX_BATCH}; a prefill from an empty cache, or one token at a time after it; "
                              f"max_seq_len={cfg.max_seq_len})", hint="feed the prompt in one call, then one token per step")
        # torch's current stream: the input tensors were written on it, so the engine runs after them
        stream = torch.cuda.current_stream()
        with self._lock:
            self.context.set_optimization_profile_async(0 if P == 0 else 1, stream.cuda_stream)
            feeds = dict(zip(self.inputs, [input_ids.contiguous(), *[p.contiguous() for p in past]]))
            for name, tensor in feeds.items():
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            results = []
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                results.append(torch.empty(shape, dtype=torch.float32, device="cuda"))
                self.context.set_tensor_address(name, results[-1].data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise BackendError("TensorRT execution failed", hint="rerun with --debug")
            stream.synchronize()
        return results[0], results[1:]

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        ids = self.torch.from_numpy(input_ids).cuda()
        logits, _ = self.run(ids, None)
        return logits.cpu().numpy()

    def new_session(self) -> TensorRTSession:
        return TensorRTSession(self)


class TensorRTSession:
    """One sequence whose KV cache stays on the GPU: a prefill, then one token per feed."""

    def __init__(self, runner: TensorRTRunner) -> None:
        self.runner, self.past = runner, None

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        torch = self.runner.torch
        if self.past is not None and len(token_ids) > 1:  # the decode profile takes one token: step through
            logits = None
            for t in token_ids:
                logits = self.feed([t])
            return logits
        ids = torch.tensor([list(token_ids)], dtype=torch.int64, device="cuda")  # (1, T)
        logits, self.past = self.runner.run(ids, self.past)
        return logits[0, -1].float().cpu().numpy()  # (V,)
