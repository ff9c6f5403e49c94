"""Core ML backend: an ML program (``model.mlpackage``) converted by coremltools from a traced torch
decoder with a fixed-capacity KV cache.

    inputs   input_ids   int32   (1, seq)            seq ranged 1..max_seq_len (ct.RangeDim), or fixed
                                                     with --option seq_len=N (the runner pads chunks)
             past        int32   (1,)                positions already in the cache
             k_cache     float32 (layers, 1, kv_heads, C, head_dim)   C = max_seq_len
             v_cache     float32 (layers, 1, kv_heads, C, head_dim)
    outputs  logits (1, seq, vocab), k_out / v_out: the caches with slots past..past+seq-1 written

The cache is a pair of tensors in and out, the same design as the tflite backend, rather than Core ML
states (iOS 18 ``ct.StateType``): states need in-place slice writes at a runtime offset in the traced
graph, which this issue did not get to, and cannot be checked on Linux at all (no runtime). The
deployment target is iOS 18 / macOS 15 anyway, which palette4's per-grouped-channel lookup tables need.
Batch is fixed at 1; the runner runs a batch row by row.

Why a graph of our own and not ``CausalLM.forward``: coremltools cannot convert Python ints taken
from tensor shapes (``B, T = ids.shape`` feeding ``view``) or buffer slicing by sequence length
(FACTS.md). The traced decoder below computes positions with a cumsum, writes the cache with a
gather + select and reshapes with -1, so the sequence stays a ranged dimension.

Schemes (coremltools 9.0, ``coremltools.optimize.coreml`` for the compressed ones):

- ``fp16`` (default): weights and compute fp16 (``compute_precision=FLOAT16``), what the ANE runs.
- ``fp32``: fp32 weights and compute (CPU/GPU only on device).
- ``int8``: ``linear_quantize_weights``, symmetric int8 per output channel, on the fp16 program.
- ``palette4``: ``palettize_weights``, 4-bit k-means lookup tables per group of 16 output channels.

Parity without macOS. Core ML prediction needs macOS (coremltools' ``predict`` raises "only supported
on macOS" elsewhere), so on Linux the proof has three parts, all recorded in the manifest:

1. The spec of the saved package: inputs, outputs, the op set, the deployment target.
2. Every weight of the source model found in the package by name and compared after materialising
   it (dequantization / palette lookup: coremltools' own ``constexpr_*`` ops) within the scheme's error.
3. The numerics: coremltools has no Linux runtime, but every MIL op it defines carries a numpy
   reference (``value_inference``, what its constant folding runs). ``MilReference`` evaluates the
   saved program op by op with them, in the program's dtypes (fp16 programs in numpy fp16), so the
   parity proof runs on the converted program itself. It is not the Core ML runtime: kernels, op
   fusion and ANE accumulation differ; on macOS the runner uses ``MLModel.predict``. A handful of ops
   whose reference reads static shapes (not defined for the ranged dimension) are evaluated here.

Measured through ``deploykit.convert``'s proof (MIL reference numerics, Linux) on the trained test
checkpoints, 1 thread, shared 2-core machine (load average 9-11: convert times are upper bounds):

    model        scheme    Δppl      max|Δlogit|  /range  mean KL  top-1  greedy  size MB  convert s
    nano         fp16      -0.001 %  0.0093       0.001   1.1e-7   1.000  1.000   2.26     16.4
    nano         fp32      -0.000 %  4.8e-6       0.000   1e-13    1.000  1.000   4.38      5.4
    nano         int8      +0.003 %  0.107        0.013   1.7e-5   0.998  0.990   1.22      8.6
    nano         palette4  -0.291 %  1.67         0.167   7.4e-3   0.933  0.906   0.69     11.6
    nano-moe     fp16      -0.028 %  0.202        0.022   6.9e-6   1.000  1.000   4.26     17.1
    nano-moe     fp32      -0.000 %  4.8e-6       0.000   1e-13    1.000  1.000   8.34     11.4
    nano-moe     int8      -0.092 %  0.131        0.012   2.5e-5   1.000  1.000   2.24     31.8
    nano-moe     palette4  +1.035 %  1.82         0.167   7.7e-3   0.960  0.969   1.22     78.6
    nano-legacy  fp16      +0.003 %  6.6e-4       0.000   6.1e-9   1.000  1.000   2.27     17.8
    nano-legacy  fp32      +0.000 %  4.3e-6       0.000   1e-13    1.000  1.000   4.44     17.7
    nano-legacy  int8      -0.035 %  0.0090       0.001   2.4e-6   1.000  1.000   1.21     22.7
    nano-legacy  palette4  -0.267 %  0.186        0.019   7.5e-4   1.000  1.000   0.67     37.5
    micro        fp16      -0.003 %  0.011        0.001   8.8e-8   1.000  1.000  14.53      9.6
    micro        int8      +0.074 %  0.141        0.010   3.4e-5   0.995  1.000   7.45      9.0
    micro        palette4  -1.086 %  1.62         0.136   7.8e-3   0.896  0.854   3.88     33.6
    micro-moe    fp16      +0.008 %  0.32         0.019   4.0e-7   1.000  1.000  42.92     16.0
    micro-moe    fp32      +0.000 %  1.8e-5       0.000   1e-12    1.000  1.000  85.53     15.7
    micro-moe    int8      +0.350 %  1.29         0.083   2.7e-4   0.997  0.979  21.76     16.8
    micro-moe    palette4  +0.971 %  3.18         0.233   1.9e-2   0.904  0.917  11.11     33.6
    micro-legacy fp16      -0.001 %  0.0011       0.000   5.0e-9   1.000  1.000  14.11     10.7
    micro-legacy fp32      -0.000 %  3.8e-6       0.000   6e-14    1.000  1.000  28.04      4.0
    micro-legacy int8      -0.011 %  0.030        0.003   3.1e-6   0.998  1.000   7.22      7.8
    micro-legacy palette4  -0.172 %  0.436        0.039   9.6e-4   0.944  0.979   3.75     18.9

fp16 and int8 sit well inside HALF and INT8; fp32 at float rounding (EXACT). palette4 gets its own
tier (PALETTE4 below, about 2x the worst measured). Weight errors measured: fp16 4.7e-4 of the row
max (one rounding: 4.9e-4), int8 4.7e-3-5.0e-3, palette4 relative RMS 0.098-0.101.

Outside a conversion's proof, loading on Linux is refused (no latency to measure: "needs macOS").
"""
from __future__ import annotations

import importlib.util
import json
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
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
    Tolerance,
    installed_versions,
)
from deploykit.deploy.hookspecs import hookimpl
from deploykit.deploy.options import SchemeOptions, option
from deploykit.deploy.runtime import check_threads
from deploykit.errors import (
    ArtifactError,
    BackendError,
    BackendUnavailable,
    ConfigError,
)

from .ct_import import _PROBED_UNUSED, _coremltools  # noqa: F401 (_PROBED_UNUSED: tests)
from .mil_reference import MilReference

if TYPE_CHECKING:
    from deploykit.model.config import ModelConfig
    from deploykit.model.graph import CausalLM

PACKAGE = "model.mlpackage"
CONFIG_FILE = "coreml_config.json"
INSTALL_HINT = "pip install 'deploykit[coreml]'"
INPUTS = ("input_ids", "past", "k_cache", "v_cache")
OUTPUTS = ("logits", "k_out", "v_out")
SPEC_VERSION = 9  # iOS 18 / macOS 15
NEEDS_MACOS = "Core ML prediction needs macOS (coremltools refuses predict elsewhere)"

# 4-bit palettes (16 values per group of 16 output channels) are the lossiest scheme: measured worst
# over the nano and micro checkpoints (module docstring), max |Δlogit| 23 % of the logit range
# (micro-moe), |Δppl| 1.1 %, KL 1.9e-2 (micro-moe), top-1 0.896, greedy 0.854 (micro): the bounds
# leave 1.5x room on range and KL, 3x on Δppl.
PALETTE4 = Tolerance(max_abs_logit=None, max_rel_logit=0.35, max_delta_ppl=0.03, min_top1=0.85, max_kl=0.03,
                     min_greedy_match=0.75, router_tie=0.2)
# Weight error allowed per scheme, max |Δw| / max |w| of the tensor's output row: fp16 is one rounding
# (2^-11); int8 is half a step of 127 levels plus three fp16 roundings (the weight is cast to fp16 before
# quantization, the scale is stored fp16, the dequantized product is fp16; 5.0e-3 was measured on the
# legacy nano). Palettes have no per-element bound: the relative RMS error of the whole tensor
# (measured 0.098-0.101 for 4 bits).
FP16_ROUNDING = 2.0 ** -11
WEIGHT_ERROR = {"fp32": 0.0, "fp16": FP16_ROUNDING, "int8": 0.5 / 127 + 3 * FP16_ROUNDING, "palette4": 0.2}


@dataclass(frozen=True)
class CoreMLOptions(SchemeOptions):
    """The sequence shape of ``input_ids``: ranged (one model for prefill and decode) or fixed."""

    seq_len: int = option(0, "0: input_ids ranged 1..max_seq_len; N: fixed at N tokens a call (the runner "
                             "pads the last chunk; N=1 is a pure decode model)")

    def check(self) -> list[str]:
        return [] if self.seq_len >= 0 else [f"seq_len={self.seq_len} must be >= 0"]


class CoreMLBackend(Backend):
    name = "coreml"
    description = "Core ML ML program (.mlpackage) with a KV cache; predicts on macOS, proven on Linux by spec, weights, MIL reference"
    schemes = (
        Scheme("fp16", "fp16 weights and compute (ANE-ready)", HALF, CoreMLOptions),
        Scheme("fp32", "fp32 weights and compute", EXACT, CoreMLOptions),
        Scheme("int8", "int8 per-channel weights (linear_quantize_weights), fp16 compute", INT8, CoreMLOptions),
        Scheme("palette4", "4-bit palettized weights, k-means per 16 output channels, fp16 compute", PALETTE4, CoreMLOptions),
    )
    artifact_files = (f"{PACKAGE}/*", CONFIG_FILE)
    platforms = "Apple (macOS/iOS); converts anywhere"

    def missing_requirements(self) -> list[str]:
        if importlib.util.find_spec("coremltools") is None:
            return [f"coremltools is not installed: {INSTALL_HINT}"]
        return []

    def versions(self) -> dict[str, str]:
        return installed_versions(("coremltools", "scikit-learn"))

    def convert(self, model: CausalLM, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        out = Path(out)
        ctx.progress("tracing the cache decoder")
        t0 = time.perf_counter()
        seq_len = ctx.options.seq_len if isinstance(ctx.options, CoreMLOptions) else 0
        if seq_len > model.config.max_seq_len:
            raise ConfigError(f"coreml seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}",
                              hint="choose seq_len <= max_seq_len, or 0 for a ranged shape")
        mlmodel = convert_model(model, scheme.name, seq_len=seq_len)
        mlmodel.save(str(out / PACKAGE))
        seconds = round(time.perf_counter() - t0, 2)
        cfg = model.config
        (out / CONFIG_FILE).write_text(json.dumps({"format": 1, "quant": scheme.name, "seq_len": seq_len,
                                                   "model_config": cfg.to_dict()}, indent=1) + "\n")
        ctx.progress("checking the package's spec and weights")
        spec = check_package(out / PACKAGE, cfg, seq_len=seq_len)
        weights = compare_weights(out / PACKAGE, model, scheme.name)
        facts: dict[str, Any] = {
            "convert_seconds": seconds, "deployment_target": "iOS18/macOS15", "spec": spec, "weights": weights,
            "kv_cache": f"tensors in/out, fixed capacity {cfg.max_seq_len} (not Core ML states)",
            "numerics": numerics_mode(),
            "parity_note": ("logits of the parity proof come from " + numerics_mode())}
        if cfg.is_moe:
            facts["parity_note"] += "; MoE converted with dense dispatch (top-k routing as MIL ops)"
        return facts

    def load(self, artifact: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        proving = "files" not in manifest  # convert's proof runs before the manifest is sealed
        if platform.system() != "Darwin" and not proving:
            raise BackendUnavailable(f"{artifact}: {NEEDS_MACOS}; its parity was proven at conversion by spec, "
                                     "weights and coremltools' MIL reference (see the manifest)",
                                     hint="run the artifact on macOS 15+ / iOS 18+")
        return CoreMLRunner(Path(artifact), threads=threads)


@hookimpl
def deploykit_backends() -> list[Backend]:
    return [CoreMLBackend()]


def numerics_mode() -> str:
    if platform.system() == "Darwin":
        return "the Core ML runtime (MLModel.predict)"
    return "coremltools' MIL op reference in numpy (not the Core ML runtime: prediction needs macOS)"


# -- the traced decoder ----------------------------------------------------------------------------
def cache_decoder(model: Any) -> Any:
    """A torch module over ``model``'s weights with the signature of the module docstring."""
    import torch
    import torch.nn.functional as F

    from deploykit.model.graph import rope_inv_freq, rotary_cos_sin

    class CacheDecoder(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm, cfg = lm, lm.config
            if cfg.variant != "legacy":
                cos, sin = rotary_cos_sin(torch.arange(cfg.max_seq_len), rope_inv_freq(cfg))  # (C, hd)
                self.register_buffer("cos", cos)
                self.register_buffer("sin", sin)
            if cfg.is_moe:  # experts concatenated: one linear per projection (as the tflite backend)
                for i, block in enumerate(lm.model.layers):
                    w = block.block_sparse_moe.experts
                    E, Fd, D = w.w1.shape
                    self.register_buffer(f"w1cat_{i}", w.w1.detach().reshape(E * Fd, D))
                    self.register_buffer(f"w3cat_{i}", w.w3.detach().reshape(E * Fd, D))
                    self.register_buffer(f"w2cat_{i}", w.w2.detach().permute(1, 0, 2).reshape(D, E * Fd))

        def forward(self, input_ids, past, k_cache, v_cache):
            cfg, lm = self.lm.config, self.lm
            C = cfg.max_seq_len
            pos = torch.cumsum(torch.ones_like(input_ids[0]), 0) - 1 + past  # (T,) no int from a shape
            last = pos[-1:]  # (1,)
            x = lm.model.embed_tokens(input_ids)  # (1, T, D)
            rotary = None
            if cfg.variant == "legacy":
                x = x + lm.model.embed_positions(pos)[None]
            else:
                rotary = (self.cos[pos], self.sin[pos])  # (T, hd) each
            slots = torch.arange(C, dtype=torch.int32)  # (C,)
            new = (slots >= past) & (slots <= last)  # (C,) slots this call writes
            rows = torch.minimum(torch.clamp(slots - past, min=0), last - past).long()  # (C,) source row per slot
            mask = slots[None, :] <= pos[:, None]  # (T, C)
            keys, values = [], []
            for i, block in enumerate(lm.model.layers):
                a, k_all, v_all = self._attention(block, block.input_layernorm(x), rotary, k_cache[i], v_cache[i],
                                                  new, rows, mask)
                x = x + a
                h = block.post_attention_layernorm(x)
                x = x + (self._moe(h, i) if cfg.is_moe else block.mlp(h))
                keys.append(k_all)
                values.append(v_all)
            return lm.lm_head(lm.model.norm(x)), torch.stack(keys), torch.stack(values)

        def _attention(self, block, x, rotary, k_cache, v_cache, new, rows, mask):
            cfg, att = self.lm.config, block.self_attn
            H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
            q = att.q_proj(x).view(1, -1, H, hd).transpose(1, 2)  # (1, h, T, hd)
            k = att.k_proj(x).view(1, -1, KV, hd).transpose(1, 2)  # (1, kv, T, hd)
            v = att.v_proj(x).view(1, -1, KV, hd).transpose(1, 2)
            if rotary is not None:
                cos, sin, half = rotary[0], rotary[1], hd // 2
                q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
                k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            k_all = torch.where(new[None, None, :, None], k[:, :, rows], k_cache)  # (1, kv, C, hd)
            v_all = torch.where(new[None, None, :, None], v[:, :, rows], v_cache)
            k_rep = k_all.repeat_interleave(H // KV, dim=1)  # (1, h, C, hd)
            v_rep = v_all.repeat_interleave(H // KV, dim=1)
            scores = (q @ k_rep.transpose(-1, -2)) * (1.0 / hd ** 0.5)  # (1, h, T, C)
            y = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v_rep  # (1, h, T, hd)
            return att.o_proj(y.transpose(1, 2).reshape(1, -1, H * hd)), k_all, v_all

        def _moe(self, x, i):
            cfg, moe = self.lm.config, self.lm.model.layers[i].block_sparse_moe
            E, Fd = cfg.n_experts, cfg.ffn_dim
            probs = torch.softmax(moe.gate(x), dim=-1)  # (1, T, E)
            top_p, top_i = torch.topk(probs, cfg.top_k, dim=-1)  # (1, T, k)
            weights = top_p / top_p.sum(-1, keepdim=True)
            chosen = (top_i[..., None] == torch.arange(E)).to(x.dtype)  # (1, T, k, E)
            combine = (chosen * weights[..., None]).sum(2)  # (1, T, E), zero off the top k
            h = F.silu(F.linear(x, getattr(self, f"w1cat_{i}"))) * F.linear(x, getattr(self, f"w3cat_{i}"))
            h = (h.view(1, -1, E, Fd) * combine[..., None]).reshape(1, -1, E * Fd)  # (1, T, E*F)
            return F.linear(h, getattr(self, f"w2cat_{i}"))  # (1, T, D)

    return CacheDecoder(model).eval()


def empty_cache(cfg: ModelConfig) -> np.ndarray:
    return np.zeros((cfg.n_layers, 1, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim), np.float32)


def convert_model(model: Any, scheme: str, *, seq_len: int = 0) -> Any:
    """The ct.models.MLModel of ``model`` under ``scheme`` (not saved); ``seq_len`` 0: ranged, N: fixed."""
    import torch

    ct = _coremltools()

    cfg = model.config
    decoder = cache_decoder(model)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len or 8), dtype=torch.int32)
    cache = torch.from_numpy(empty_cache(cfg))
    past = torch.tensor([0], dtype=torch.int32)
    with torch.no_grad():
        traced = torch.jit.trace(decoder, (ids, past, cache, cache), check_trace=False)
    seq = seq_len or ct.RangeDim(1, cfg.max_seq_len, default=8)
    inputs = [ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32),
              ct.TensorType(name="past", shape=(1,), dtype=np.int32),
              ct.TensorType(name="k_cache", shape=tuple(cache.shape), dtype=np.float32),
              ct.TensorType(name="v_cache", shape=tuple(cache.shape), dtype=np.float32)]
    precision = ct.precision.FLOAT32 if scheme == "fp32" else ct.precision.FLOAT16
    try:
        mlmodel = ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=n) for n in OUTPUTS],
                             convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                             compute_precision=precision, skip_model_load=True)
        return _compress(mlmodel, scheme)
    except (BackendError, ArtifactError):
        raise
    except Exception as e:
        from deploykit.errors import first_line

        raise BackendError(f"coremltools failed to convert to {scheme}: {type(e).__name__}: {first_line(e)}",
                           hint="rerun with --debug for the converter's traceback") from e


def _compress(mlmodel: Any, scheme: str) -> Any:
    import coremltools.optimize.coreml as cto

    if scheme in ("fp16", "fp32"):
        return mlmodel
    if scheme == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=2048)
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    if scheme == "palette4":
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16,
                                    weight_threshold=2048)
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    raise BackendError(f"coreml backend has no scheme {scheme!r}",
                       hint=f"valid schemes: {', '.join(s.name for s in CoreMLBackend.schemes)}")


# -- the package: spec, program, weights ------------------------------------------------------------
def open_package(path: Path) -> tuple[Any, Any]:
    """(MLModel without a runtime, its MIL program) of a saved .mlpackage; ArtifactError if a part is missing."""
    ct = _coremltools()
    from coremltools.converters.mil.frontend.milproto import load as milproto

    manifest = path / "Manifest.json"
    if not manifest.is_file():
        raise ArtifactError(f"{path}: not an .mlpackage (no Manifest.json)", hint="convert again")
    try:
        info = json.loads(manifest.read_text())["itemInfoEntries"]
        for entry in info.values():
            part = path / "Data" / entry["path"]
            if not part.exists():
                raise ArtifactError(f"{path}: the package lists {entry['path']} but it is missing",
                                    hint="the package was copied incompletely; copy it again or convert again")
        mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
        spec = mlmodel.get_spec()
        program = milproto.load(spec, spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)
    except ArtifactError:
        raise
    except Exception as e:
        from deploykit.errors import first_line

        raise ArtifactError(f"{path}: not a readable Core ML package ({type(e).__name__}: {first_line(e)})",
                            hint="the package is damaged; convert again") from e
    return mlmodel, program


def check_package(path: Path, cfg: ModelConfig, *, seq_len: int = 0) -> dict[str, Any]:
    """The saved package's inputs, outputs, target and ops, checked against the signature; returns them."""
    mlmodel, program = open_package(path)
    spec = mlmodel.get_spec()
    inputs = [i.name for i in spec.description.input]
    outputs = [o.name for o in spec.description.output]
    problems = []
    if inputs != list(INPUTS):
        problems.append(f"inputs {inputs}, expected {list(INPUTS)}")
    if outputs != list(OUTPUTS):
        problems.append(f"outputs {outputs}, expected {list(OUTPUTS)}")
    if spec.specificationVersion < SPEC_VERSION:
        problems.append(f"specification version {spec.specificationVersion} < {SPEC_VERSION} (iOS 18)")
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append("not an ML program")
    ids = spec.description.input[0].type.multiArrayType
    if seq_len and list(ids.shape) != [1, seq_len]:
        problems.append(f"input_ids has shape {list(ids.shape)}, expected [1, {seq_len}]")
    if not seq_len and (len(ids.shapeRange.sizeRanges) != 2 or ids.shapeRange.sizeRanges[1].upperBound != cfg.max_seq_len):
        problems.append(f"input_ids is not ranged 1..{cfg.max_seq_len}")
    if problems:
        raise ArtifactError(f"{path}: the Core ML spec does not match deploykit's signature: {'; '.join(problems)}",
                            hint="convert again")
    ops = sorted({op.op_type for op in program.functions["main"].operations})
    return {"inputs": inputs, "outputs": outputs, "specification_version": spec.specificationVersion, "ops": ops,
            "input_ids": f"fixed (1, {seq_len})" if seq_len else f"ranged (1, 1..{cfg.max_seq_len})"}


def package_weights(program: Any) -> dict[str, np.ndarray]:
    """Every const and materialised constexpr (dequantized, palette looked up) of the program, by name."""
    ops = program.functions["main"].operations
    parts = {v.name for op in ops if op.op_type.startswith("constexpr_") for v in op.inputs.values()}  # data, scales, luts
    out = {}
    for op in ops:
        if op.outputs[0].name in parts:
            continue
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray) and op.outputs[0].val.ndim >= 2:
            out[op.outputs[0].name] = op.outputs[0].val
        elif op.op_type.startswith("constexpr_"):
            out[op.outputs[0].name] = np.asarray(op.materialized_val_inference())
    return out


def _mil_name(torch_name: str) -> str:
    return "lm_" + torch_name.replace(".", "_")


def compare_weights(path: Path, model: Any, scheme: str) -> dict[str, Any]:
    """Each ≥ 2-D weight of ``model`` against the package's, materialised; refuses one past WEIGHT_ERROR."""
    _, program = open_package(path)
    found = package_weights(program)
    worst, compared, missing = 0.0, 0, []
    for name, w in model.state_dict().items():
        w = w.detach().float().numpy()
        if w.ndim < 2 or name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            continue  # experts travel concatenated (w*cat_i buffers), checked through them below
        key = _mil_name(name)
        # The const keeps the torch name, + "_to_fp16" after the precision cast, + "_quantized" /
        # "_palettized" once compressed (its data, scales and palettes are left out of ``found``).
        match = found.get(key)
        if match is None:
            match = next((v for n, v in found.items() if n.startswith(key + "_to_fp16") and v.size == w.size), None)
        if match is None:
            if name == "lm_head.weight" and model.config.tie_embeddings:
                continue  # tied: the embedding's const serves both
            missing.append(name)
            continue
        worst = max(worst, weight_error(w, match.astype(np.float32).reshape(w.shape), scheme))
        compared += 1
    for i in range(model.config.n_layers if model.config.is_moe else 0):  # the experts, concatenated
        experts = model.model.layers[i].block_sparse_moe.experts
        E, F, D = experts.w1.shape
        sources = {f"w1cat_{i}": experts.w1.detach().reshape(E * F, D), f"w3cat_{i}": experts.w3.detach().reshape(E * F, D),
                   f"w2cat_{i}": experts.w2.detach().permute(1, 0, 2).reshape(D, E * F)}
        for name, w in sources.items():
            match = next((v for n, v in found.items() if n.startswith(name + "_to_fp16") or n == name), None)
            if match is None:
                missing.append(name)
                continue
            worst = max(worst, weight_error(w.float().numpy(), match.astype(np.float32).reshape(w.shape), scheme))
            compared += 1
    if missing:
        raise BackendError(f"{path}: weights not found in the package: {', '.join(missing[:5])}",
                           hint="report this with the model config")
    if worst > WEIGHT_ERROR[scheme] * 1.01:
        raise BackendError(f"{path}: a weight differs from the source by {worst:.3g} > {WEIGHT_ERROR[scheme]:.3g} "
                           f"allowed for {scheme}", hint="report this with the model config")
    return {"compared": compared, "worst_error": worst, "allowed": WEIGHT_ERROR[scheme],
            "measure": "relative RMS" if scheme == "palette4" else "max |Δw| / max |w| per output row"}


def weight_error(w: np.ndarray, got: np.ndarray, scheme: str) -> float:
    """Error of a materialised weight: relative RMS for palettes, else the worst row's max |Δw| / max |w|."""
    diff = np.abs(got.astype(np.float64) - w)
    if scheme == "palette4":
        return float(np.sqrt((diff ** 2).mean() / max((w.astype(np.float64) ** 2).mean(), 1e-30)))
    rows = diff.reshape(w.shape[0], -1).max(1) / np.maximum(np.abs(w).reshape(w.shape[0], -1).max(1), 1e-30)
    return float(rows.max())


# -- numerics: the Core ML runtime on macOS, the MIL reference (mil_reference.py) elsewhere ------------
class CoreMLRunner(Runner):
    """A .mlpackage: ``MLModel.predict`` on macOS, the MIL reference elsewhere (see the module docstring)."""

    def __init__(self, artifact: Path, *, threads: int | None = None) -> None:
        from deploykit.deploy.artifact import model_files
        from deploykit.model.config import ModelConfig

        check_threads(threads)
        for need in (PACKAGE, CONFIG_FILE):
            if not (artifact / need).exists():
                raise ArtifactError(f"{artifact}: no {need}", hint="re-run deploykit convert --backend coreml")
        try:
            layout = json.loads((artifact / CONFIG_FILE).read_text())
            self.config = ModelConfig.from_dict(layout["model_config"])
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{artifact / CONFIG_FILE}: unreadable ({e})",
                                hint="re-run deploykit convert --backend coreml") from e
        self.seq_len = int(layout.get("seq_len") or 0)  # 0: ranged; N: every call takes exactly N tokens
        _, program = open_package(artifact / PACKAGE)
        if platform.system() == "Darwin":
            model = _coremltools().models.MLModel(str(artifact / PACKAGE))
            self._predict = model.predict
        else:
            self._predict = MilReference(program)
        self._lock = threading.Lock()
        self.eos_token_id, self.max_length = self.config.eos_token_id, self.config.max_seq_len
        self.tokenizer = None
        if (artifact / "tokenizer.json").is_file():
            from deploykit.model.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.load(artifact)
        files = model_files(artifact)
        self.info = RunnerInfo(backend="coreml", quant=str(layout.get("quant", "?")), kv_cache=True,
                               size_bytes=sum(files.values()), files=files, threads=threads,
                               parameters=self.config.num_params(), vocab_size=self.config.vocab_size,
                               max_length=self.config.max_seq_len,
                               details={"numerics": numerics_mode(), "deployment_target": "iOS18/macOS15",
                                        "kv_cache": "tensors in/out (fixed capacity)"})

    def run(self, input_ids: np.ndarray, past: int, k_cache: np.ndarray, v_cache: np.ndarray) -> dict[str, np.ndarray]:
        """ids (1, T) at positions past.. -> logits (1, T, V) and the updated caches.

        A fixed-shape package takes N tokens a call: T is fed in chunks of N, the last one padded.
        Padding is harmless: pads sit in slots after every real token (which the causal mask keeps
        them from seeing) and the next call writes its tokens over them.
        """
        if not self.seq_len:
            return self._call(input_ids, past, k_cache, v_cache)
        N, T, logits = self.seq_len, input_ids.shape[1], []
        if past + -(-T // N) * N > self.config.max_seq_len:
            raise ConfigError(f"{T} token(s) after {past}, in chunks of seq_len={N}, pass the cache capacity "
                              f"{self.config.max_seq_len}", hint="convert with a smaller seq_len, or 0 (ranged)")
        for start in range(0, T, N):
            chunk = input_ids[:, start:start + N]
            real = chunk.shape[1]
            padded = np.pad(chunk, ((0, 0), (0, N - real)), constant_values=self.config.pad_token_id)
            out = self._call(padded, past + start, k_cache, v_cache)
            k_cache, v_cache = out["k_out"], out["v_out"]
            logits.append(out["logits"][:, :real])
        return {"logits": np.concatenate(logits, axis=1), "k_out": k_cache, "v_out": v_cache}

    def _call(self, input_ids: np.ndarray, past: int, k_cache: np.ndarray, v_cache: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids.astype(np.int32), "past": np.asarray([past], np.int32),
                 "k_cache": k_cache, "v_cache": v_cache}
        with self._lock:
            out = self._predict(feeds)
        return {k: np.asarray(v, np.float32) for k, v in out.items()}

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        empty = empty_cache(self.config)
        rows = [self.run(input_ids[b:b + 1], 0, empty, empty)["logits"] for b in range(input_ids.shape[0])]
        return np.concatenate(rows, axis=0)  # (B, T, V): the package's batch is 1

    def new_session(self) -> CoreMLSession:
        return CoreMLSession(self)


class CoreMLSession:
    """One sequence: its caches and length; each feed runs only the new tokens."""

    def __init__(self, runner: CoreMLRunner) -> None:
        self.runner, self.past = runner, 0
        self.k = self.v = empty_cache(runner.config)

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray([token_ids], np.int64)  # (1, T_new), checked by CheckedSession
        out = self.runner.run(ids, self.past, self.k, self.v)
        self.k, self.v, self.past = out["k_out"], out["v_out"], self.past + ids.shape[1]
        return out["logits"][0, -1]  # (V,)
