"""ONNX backend: dynamo export with a KV-cache graph, run by ONNX Runtime on the CPU.

The artifact is one graph, ``model.onnx`` (+ ``model.onnx.data`` when the weights pass 2 GB), in the
style of Optimum's "with past" decoder, but merged: it always takes a past and returns the present.

    inputs   input_ids                    int64 (batch, seq)
             past_key_values.{i}.key      float32 (batch, kv_heads, past, head_dim)   i = 0..L-1
             past_key_values.{i}.value    float32 (batch, kv_heads, past, head_dim)
    outputs  logits                       float32 (batch, seq, vocab)
             present.{i}.key / .value     float32 (batch, kv_heads, past + seq, head_dim)

``past`` may be 0: a full forward (prefill) feeds empty past tensors, a decode step feeds the
previous step's present and one new token, so each step costs O(1) new tokens. Why one merged graph
rather than prefill + with-past: deploykit's decoder already computes positions and the causal mask
from ``past`` with no branch on it, so a single trace is exact for every past length (the tests check
0 and > 0), and one graph halves file size, export time and the quantization work.

Schemes, all derived from the one fp32 export:

- ``fp32``: the exported graph as is.
- ``fp16``: weights and compute in fp16 via onnxruntime's float16 converter, inputs and outputs
  stay fp32. The rotary-angle subgraph and the RMSNorm statistics stay fp32 (fp16 angles are off
  by ~0.1 rad at position 256; squares of activations overflow fp16 past 256). The converter
  rounds every value passed between two fp32 nodes to fp16 and back; ``_to_fp16`` wires those round
  trips out, without which the block lists keep nothing fp32 (a trained small's KL was 0.19).
- ``int8-dynamic``: ``quantize_dynamic``, int8 weights of every weight MatMul, one scale per output
  channel, and the embedding Gather; activations are quantized at run time with one scale per token:
  ORT's DynamicQuantizeLinear (one uint8 scale per tensor) is rewritten into standard ops
  (``_per_token_activations``; ``--option per_token=false`` keeps ORT's). On the demo's LoRA-tuned
  micro, the proof's top-1 / KL went from 0.976 / 3.7e-4 per tensor to 0.989 / 8.4e-5 per token
  (held-out: quantization_accuracy.md's "per tensor" rows). The price is eight small ops per
  quantized input: decode 664 vs 789 tok/s on that model (0.84x, 2 threads, median of 7 x 128 steps).
- ``int8-static``: QDQ int8 with MinMax ranges calibrated on ``ctx.calibration``. The calibration
  feeds run the merged graph both ways (prefill with empty past, decode steps with a real past
  computed by the fp32 graph), so one set of ranges covers both uses. Only the inputs of weight
  MatMuls and the embedding are quantized: the MatMul *outputs* stay float
  (``OpTypesToExcludeOutputQuantization``). QDQ's default also rounds every MatMul output to int8 -
  the logits (one per-tensor int8 grid over the whole vocabulary: near-ties flip) and the k/v
  projections entering the KV cache; that alone cost int8-static its top-1 (below). The attention
  products and the KV cache stay fp32. In both int8 schemes the MoE experts' down projections stay
  float (see ``derive_scheme``: micro-moe failed its proof with them int8, as TFLite's int8 did).

Weights are per output channel by default (``--option per_channel=false``: one scale per tensor). A
MatMul weight is (K, N), its output channels the last axis; see ``WEIGHT_CHANNEL_AXIS`` for ORT's
axis handling and ``_per_expert_scales`` / ``_quantize_static`` for the stacked experts (E, K, N):
per expert and channel in int8-dynamic, per tensor in int8-static.

The int8 schemes take the shared int8 options (deploykit.deploy.calibrate): ``smoothquant=true``
(SmoothQuant on the torch model before the export, α chosen on ``ctx.calibration``; on by default in
int8-static, off in int8-dynamic: see ``OnnxStaticOptions``),
``quantize_lm_head=false`` (the MatMul producing ``logits`` stays fp32) and ``keep_fp32=...`` (the
torch backend's module names, prefixes or roles, or ``auto[:N]``, the default: the N costliest layer
groups measured on the calibration set; a layer's stacked experts are its three batched MatMuls
``...experts.w1|w3|w2``): those MatMul nodes are left out of ``nodes_to_quantize``, found through
the exporter's node metadata (``_kept_nodes``).

Measured (issue 12) on held-out text (benchmarks/quantization_accuracy.py's 4 blocks of 256 tokens),
against the fp32 torch model, KL / top-1 / Δppl:

    model      scheme        before (per-tensor W;     per-channel W only      default now (per-channel W,    + keep_fp32=model.layers.0
                             static: int8 outputs)                             float MatMul outputs)
    demo       int8-static   6.0e-4 0.949 +0.14 %      5.9e-4 0.954 +0.20 %    4.2e-4 0.988 +0.12 %           9.2e-5 0.989 -0.03 %
    micro      int8-static   1.2e-3 0.945 +0.18 %      9.2e-4 0.951 +0.34 %    5.8e-4 0.980 +0.20 %           2.1e-4 0.993 +0.12 %
    micro-moe  int8-static   1.0e-3 0.924 -0.22 %      1.1e-3 0.927 +0.06 %    7.7e-5 0.991 +0.01 % (*)       1.5e-4 0.991 -0.10 %
    nano       int8-static   3.0e-4 0.984 +0.05 %      3.0e-4 0.986 +0.18 %    1.3e-4 0.992 +0.08 %           3.3e-5 0.996 -0.01 %
    demo       int8-dynamic  3.4e-4 0.981 +0.10 %      3.4e-4 0.983 +0.10 %    (same)                         8.0e-5 0.986 -0.04 %
    micro      int8-dynamic  7.4e-4 0.980 +0.28 %      7.1e-4 0.984 +0.16 %    (same)                         2.2e-4 0.990 +0.17 %
    micro-moe  int8-dynamic  7.2e-4 0.976 +0.23 %      7.7e-4 0.981 +0.24 %    9.6e-5 0.992 +0.01 % (*)       9.9e-5 0.989 -0.02 % (no *)
    nano       int8-dynamic  1.2e-4 0.994 -0.01 %      1.1e-4 0.995 +0.05 %    (same)                         3.1e-5 0.997 -0.01 %

(*) experts' down projections float; with them int8 (static): 8.0e-4 0.981 -0.11 %, and the proof
failed (Δppl +1.20 %). (nano: conftest's trained fixture, ppl 124; demo/micro/micro-moe: runs/, trained.) Per-channel weights
alone move little: the old "per-channel 10x worse" was not reproduced with the output axis. The
int8-static top-1 loss was the int8 logits. Block 0 is the sensitive layer (as layer_sensitivity
found for torch): keeping it fp32 cuts KL 3-8x. Those rows predate the LoRA-tuned demo micro, on
which the defaults of that time (no keep_fp32) missed top-1 0.98; the defaults now keep the one
costliest group float (``keep_fp32=auto``) and int8-static smooths (``OnnxStaticOptions``): the
current numbers of every model are in benchmarks/results/quantization_accuracy.md.

Before quantizing, two graph rewrites expose weights to ORT's quantizers (which only quantize a
MatMul whose weight is an initializer): a Transpose of an initializer (the tied lm_head) is folded
into a new initializer, and the MoE experts' ``Einsum("nd,efd->enf")`` becomes a batched MatMul.

Layout: this package holds the options, the backend, ``derive_scheme`` and the runner; the graph
passes each derived scheme is made of are in ``passes``.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.deploy.backend import EXACT, HALF, INT8, Backend, ConvertContext, Runner, RunnerInfo, Scheme, installed_versions
from deploykit.deploy.runtime import check_threads
from deploykit.deploy.hookspecs import hookimpl
from deploykit.deploy.onnx_graph import (  # noqa: F401 - re-exported: the export is shared with tensorrt
    EXTERNAL_DATA_BYTES,
    META_CONFIG,
    META_QUANT,
    check_graph,
    config_from_metadata,
    export_onnx,
    io_names,
    shallow_copy,
    stamp_metadata,
    toposort,
)
from deploykit.deploy.options import SmoothQuantOptions, option
from deploykit.deploy.roles import Role
from deploykit.errors import ArtifactError, BackendError, ConfigError

if TYPE_CHECKING:
    from deploykit.model.graph import CausalLM

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights, written only when the graph would pass protobuf's 2 GB
INSTALL_HINT = "pip install 'deploykit[onnx]'"
_REQUIREMENTS = ("onnx", "onnxruntime", "onnxscript")


@dataclass(frozen=True)
class OnnxInt8Options(SmoothQuantOptions):
    """Options of the int8 schemes: SmoothQuant before the export (opt-in: see deploykit.deploy.calibrate),
    the layer group kept fp32 (by default the one whose int8 costs most, measured on the calibration
    set, as in the torch backend) and whether the lm_head MatMul is quantized.

    Why auto by default: on the demo's LoRA-tuned micro, int8-dynamic with every MatMul int8 proved at
    top-1 0.973, KL 3.1e-3, Δppl +0.74 % (held-out top-1 0.966, under issue 12's 0.98); with its
    costliest group fp32 (+7 % size) at top-1 0.982, KL 5.2e-4, Δppl +0.02 %."""

    keep_fp32: str = option("auto", SmoothQuantOptions.__dataclass_fields__["keep_fp32"].metadata["help"]
                            + " (onnx int8 default: auto, the one costliest group; empty: none)")
    quantize_lm_head: bool = option(True, "quantize the lm_head MatMul too (false keeps it fp32)")
    per_channel: bool = option(True, "int8 weights with one scale per output channel (false: one per tensor)")


@dataclass(frozen=True)
class OnnxDynamicOptions(OnnxInt8Options):
    """int8-dynamic's activations are quantized per token by default (``_per_token_activations``)."""

    per_token: bool = option(True, "one activation scale per token (default; false: ORT's one scale per tensor, "
                                   "where one token's outlier coarsens every token)")


@dataclass(frozen=True)
class OnnxStaticOptions(OnnxInt8Options):
    """int8-static also smooths by default: its activation scales are fixed per tensor, so the outlier
    channels of the norms' outputs and of SwiGLU's product set every layer's int8 step. On the demo's
    LoRA-tuned micro (held-out KL / top-1 / Δppl, then the proof's top-1): without 4.9e-4 / 0.982 /
    +0.18 %, proof 0.976; smoothed 3.3e-4 / 0.988 / +0.32 %, proof 0.983. int8-dynamic keeps it off:
    on demo it moved top-1 the wrong way (0.991 -> 0.985) at a lower KL; a user can still ask for it."""

    smoothquant: bool = option(True, "SmoothQuant: move activation outliers into the weights before int8 "
                                     "(int8-static default: true)")


class OnnxBackend(Backend):
    name = "onnx"
    description = "ONNX graph with a KV cache (dynamo export), run by ONNX Runtime on the CPU"
    # Tolerances measured on briefly trained nano / nano-moe models (see tests/test_onnx_backend.py):
    # fp32 ~1e-6, fp16 ~1e-2, int8 ~0.1-0.5 max |Δlogit|.
    schemes = (
        Scheme("fp32", "exported graph, fp32 weights and compute", EXACT),
        Scheme("fp16", "fp16 weights and compute, fp32 inputs/outputs and KV cache", HALF),
        Scheme("int8-dynamic", "int8 weights, activations quantized per token at run time (quantize_dynamic "
               "+ a per-token rewrite)", INT8, OnnxDynamicOptions),
        Scheme("int8-static", "int8 QDQ weights and activations, ranges calibrated on token sequences",
               INT8, OnnxStaticOptions),
    )
    artifact_files = (MODEL_FILE, DATA_FILE)
    platforms = "CPU"

    def missing_requirements(self) -> list[str]:
        return [f"{pkg} is not installed: {INSTALL_HINT}" for pkg in _REQUIREMENTS if importlib.util.find_spec(pkg) is None]

    def versions(self) -> dict[str, str]:
        return installed_versions(_REQUIREMENTS)

    def convert(self, model: CausalLM, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        from deploykit.deploy.calibrate import resolve_keep_fp32, smooth_quant

        out = Path(out)
        work = out / ".export"  # intermediate fp32 graph for derived schemes; removed below
        work.mkdir(parents=True, exist_ok=True)
        try:
            ctx.progress("exporting (torch.onnx dynamo)")
            t0 = time.perf_counter()
            src = work / MODEL_FILE if scheme.name != "fp32" else out / MODEL_FILE
            smoothed: dict[str, Any] | str | None = None
            opts = ctx.options
            if isinstance(opts, OnnxInt8Options) and opts.smoothquant:
                if ctx.calibration:
                    ctx.progress("SmoothQuant: choosing α on the calibration set")
                    model = copy.deepcopy(model)
                    smoothed = smooth_quant(model, ctx.calibration, alpha=opts.smoothquant_alpha,
                                            activations=_activations(opts), quantize_lm_head=opts.quantize_lm_head)
                else:
                    smoothed = "skipped: no calibration sequences"
            facts = export_onnx(model, src)
            if smoothed is not None:
                facts["smoothquant"] = smoothed
            facts["export_seconds"] = round(time.perf_counter() - t0, 2)
            if scheme.name != "fp32":
                ctx.progress(f"converting to {scheme.name}")
                t0 = time.perf_counter()
                int8 = isinstance(opts, OnnxInt8Options)
                keep: list[str] = []
                if int8:  # keep_fp32: names, or auto[:N] measured with the activations this scheme uses
                    mods = weight_modules(model)
                    acts = _activations(opts)
                    # MoE expert down projections are float in both schemes (derive_scheme): never ranked
                    float_roles = frozenset({Role.EXPERT_DOWN}) if model.config.is_moe else frozenset()
                    kept, auto = resolve_keep_fp32(model, list(mods), mods, opts, ctx.calibration, activations=acts,
                                                   where=f"onnx/{scheme.name}", float_roles=float_roles)
                    keep = sorted(kept)
                    if auto:
                        facts["keep_fp32_auto"] = auto
                facts.update(derive_scheme(src, out / MODEL_FILE, scheme.name, ctx.calibration,
                                           quantize_lm_head=not int8 or opts.quantize_lm_head,
                                           per_channel=not int8 or opts.per_channel, keep_fp32=keep,
                                           per_token=getattr(opts, "per_token", True)))
                facts["quantize_seconds"] = round(time.perf_counter() - t0, 2)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ctx.progress("checking the graph (onnx.checker)")
        check_graph(out / MODEL_FILE)
        facts["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name.startswith("model.onnx")}
        return facts

    def load(self, artifact: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        return OnnxRunner(artifact, threads=threads)


def _activations(opts: OnnxInt8Options) -> str:
    """How the scheme quantizes activations, in deploykit.deploy.calibrate's words (for SmoothQuant's α
    search and keep_fp32=auto's ranking, which must measure what the graph will do)."""
    if isinstance(opts, OnnxDynamicOptions):
        return "per-token" if opts.per_token else "per-tensor"
    return "static"


@hookimpl
def deploykit_backends() -> list[Backend]:
    return [OnnxBackend()]


# -- schemes derived from the fp32 graph ------------------------------------------------------------
def derive_scheme(src: Path, dst: Path, scheme: str, calibration: Sequence[Sequence[int]] = (), *,
                  quantize_lm_head: bool = True, per_channel: bool = True,
                  keep_fp32: Sequence[str] = (), per_token: bool = True) -> dict[str, Any]:
    """Write ``scheme``'s graph at ``dst`` from the fp32 graph at ``src``; returns facts for the manifest."""
    import onnx

    proto = onnx.load(str(src))
    config = json.loads({p.key: p.value for p in proto.metadata_props}[META_CONFIG])
    external = _weight_bytes(proto) > EXTERNAL_DATA_BYTES
    if scheme == "fp16":
        facts = _to_fp16(proto, dst, external)
    elif scheme in ("int8-dynamic", "int8-static"):
        kept = _kept_nodes(proto, keep_fp32)  # read before _expose_weights, whose new nodes carry no metadata
        float_down = set()
        if config.get("n_experts"):
            # The experts' down projections stay float: under the export's dense dispatch every expert
            # runs on every token, and one activation scale over all experts' silu(gate)*up inputs cost
            # micro-moe's int8-static its proof (Δppl +1.20 %); held-out KL with them float: static
            # 8.0e-4 -> 7.7e-5, dynamic (one scale per call) 7.7e-4 -> 9.6e-5, top-1 0.981 -> 0.992.
            float_down = _kept_nodes(proto, [f"model.layers.{i}.block_sparse_moe.experts.w2"
                                             for i in range(config["n_layers"])])
            facts_down = {"float_expert_down_nodes": len(float_down)}
        proto, rewrites = _expose_weights(proto)
        facts = {"rewrites": rewrites} | (facts_down if float_down else {})
        nodes = [n for n in _weight_nodes(proto, quantize_lm_head=quantize_lm_head) if n not in kept | float_down]
        if keep_fp32:
            facts["kept_fp32"] = {"modules": list(keep_fp32), "nodes": sorted(kept)}
        if scheme == "int8-dynamic":
            facts |= _quantize_dynamic(proto, dst, external, nodes, per_channel=per_channel, per_token=per_token)
        else:
            facts |= _quantize_static(proto, src, dst, external, calibration, config, nodes, per_channel=per_channel)
    else:
        raise BackendError(f"onnx backend has no scheme {scheme!r}",
                           hint=f"valid schemes: {', '.join(s.name for s in OnnxBackend.schemes)}")
    stamp_metadata(dst, config, scheme)
    return facts


from .passes import (  # noqa: F401 - WEIGHT_CHANNEL_AXIS and the passes are part of the package's surface
    WEIGHT_CHANNEL_AXIS,
    _empty_past,
    _expose_weights,
    _kept_nodes,
    _quantize_dynamic,
    _quantize_static,
    _to_fp16,
    _weight_bytes,
    _weight_nodes,
    weight_modules,
)


class OnnxRunner(Runner):
    """An ONNX artifact opened in one onnxruntime InferenceSession (CPU EP).

    ``InferenceSession.run`` is thread-safe, and each DecodeSession keeps its own past, so one
    runner serves many threads.
    """

    def __init__(self, artifact: Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        artifact = Path(artifact)
        path = artifact / MODEL_FILE
        if not path.is_file():
            raise ArtifactError(f"{artifact}: no {MODEL_FILE}", hint="re-run deploykit convert --backend onnx")
        check_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1  # the graph is a chain; parallelism lives inside ops
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config = config_from_metadata(meta, path)
        self.eos_token_id = self.config.eos_token_id
        self.max_length = self.config.max_seq_len
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.tokenizer = None
        if (artifact / "tokenizer.json").is_file():
            from deploykit.model.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.load(artifact)
        import onnx

        from deploykit.deploy.artifact import model_files

        opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                      if o.domain in ("", "ai.onnx")), 0)
        files = model_files(artifact)
        self.info = RunnerInfo(
            backend="onnx", quant=meta.get(META_QUANT, "fp32"), kv_cache=True, size_bytes=sum(files.values()),
            files=files, threads=threads, parameters=self.config.num_params(), vocab_size=self.config.vocab_size,
            max_length=self.config.max_seq_len,
            details={"providers": self.session.get_providers(), "opset": opset, "onnxruntime": ort.__version__,
                     "graph": "merged: past_key_values (past >= 0) -> present"})

    def run(self, input_ids: np.ndarray, past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One graph call: input_ids (B, T), past (B, kv, P, hd) per name (None = empty) ->
        logits (B, T, V), present keyed by the past input names (B, kv, P+T, hd)."""
        B, T = input_ids.shape
        past = past if past is not None else _empty_past(self.session, B)
        P = next(iter(past.values())).shape[2]
        if P + T > self.max_length:
            raise ConfigError(f"sequence of {P + T} tokens exceeds this model's max_seq_len={self.max_length}",
                              hint="shorten the prompt or max_new_tokens")
        outputs = self.session.run(self.output_names, {"input_ids": input_ids, **past})
        return outputs[0], dict(zip(past, outputs[1:]))

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        # Runner checked input_ids (int64 (B, T), ids in the vocabulary, T <= max_length): ORT's Gather
        # would wrap a negative id into a valid row instead of failing.
        logits, _ = self.run(input_ids, None)
        return logits.astype(np.float32, copy=False)

    def new_session(self) -> OnnxDecodeSession:
        return OnnxDecodeSession(self)


class OnnxDecodeSession:
    """One sequence's KV cache: feed() runs only the new tokens against the cached past."""

    def __init__(self, runner: OnnxRunner) -> None:
        self.runner = runner
        self.past: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()  # a session is one sequence; serialise accidental concurrent feeds

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray([token_ids], dtype=np.int64)  # (1, T_new); Runner's CheckedSession checked the ids
        with self._lock:
            logits, self.past = self.runner.run(ids, self.past)
        return logits[0, -1].astype(np.float32, copy=False)  # (V,)
