"""TFLite backend: deploykit's decoder rewritten in TensorFlow ops, converted by ``tf.lite.TFLiteConverter``,
run by the LiteRT interpreter (``ai_edge_litert``) or, without it, ``tf.lite.Interpreter``.

The artifact is one flatbuffer, ``model.tflite``, with one signature (``decode``) that carries a
fixed-capacity KV cache as inputs and outputs:

    inputs   input_ids   int32   (batch, seq)                 seq >= 1, dynamic
             past        int32   ()                           positions already in the cache
             k_cache     float32 (layers, batch, kv_heads, C, head_dim)   C = max_seq_len
             v_cache     float32 (layers, batch, kv_heads, C, head_dim)
    outputs  logits      float32 (batch, seq, vocab)
             k_cache / v_cache   the caches with positions past..past+seq-1 written

A prefill is one call with ``past = 0`` and zero caches, each decode step one call with one token
and the previous outputs: the prefix is never recomputed. Cache slots past ``past + seq`` are
masked out of attention, so their contents never matter. The new keys are written with a Gather
and a Select (slot c takes new row c - past where past <= c < past + seq), builtin ops that every
LiteRT build has and that copy values exactly.

Route. FACTS.md lists three that work here: (i) this one, (ii) onnx2tf on the ONNX export (hard pins
old tensorflow/numpy/onnx: only with ``--no-deps``), (iii) litert-torch straight from the torch module
(adds ~0.9 GB of jax/jaxlib and pins typing_extensions/pydantic down, breaking coremltools' cattrs).
(i) keeps to the design card's tensorflow (tensorflow-cpu 2.21: 1.3 GB, already the heaviest
dependency; ai_edge_litert adds 59 MB), needs no version pins and keeps the sequence dynamic. The TF
graph is ~150 lines below, checked against torch by the parity proof of every conversion.

Schemes, measured on the trained nano / nano-moe / nano-legacy test checkpoints (2 cores, see the
table at the end of this docstring for the numbers the tolerances rest on):

- ``fp32``: the graph as is. EXACT tier.
- ``fp16``: weights stored fp16 (``target_spec.supported_types = [tf.float16]``); the CPU kernels
  dequantize them once at load and compute in fp32. HALF tier.
- ``int8-dynamic``: dynamic-range quantization (``Optimize.DEFAULT``): int8 weights per channel in
  every FullyConnected, activations quantized per call by the hybrid kernels. INT8 tier.
- ``int8``: static int8 with a representative dataset drawn from ``ctx.calibration`` (a prefill and a
  decode step per sequence, so the ranges cover both): int8 weights and activations in every
  FullyConnected and the embedding Gather; attention, norms, residual sums and MoE routers stay
  float (measured below: quantizing every op breaks the model). Inputs/outputs stay float32, so the
  runner is the same for every scheme. Also float by default (issue 12): the lm_head, whose int8
  output puts every logit on one per-tensor grid so near-ties flip (``quantize_lm_head=true`` to
  quantize it), and the one layer group whose int8 costs most on the calibration set
  (``keep_fp32=auto``, the shared measurement of deploykit.deploy.calibrate; explicit names work too,
  ``keep_fp32=`` quantizes all). ``smoothquant=true`` runs the shared SmoothQuant rewrite first.
  Gathers that move activations (k/v rows into the cache, cache rows for grouped-query heads, rotary
  rows) stay float (``FLOAT_GATHER_SCOPE``), and the norms apply their gain before the per-row rsqrt so
  the converter cannot fold it (with SmoothQuant's 1/s) into the next FullyConnected's weights. On the
  demo's LoRA-tuned micro int8 stays at held-out top-1 0.976, KL 1.5e-3 (issue 12 asks 0.98): what is
  left is TFLite's int8 FullyConnected itself, whose OUTPUT is int8 on one per-tensor grid too (no
  builtin int8 kernel returns float); a torch simulation of those output roundings alone costs KL
  ~2e-4. SmoothQuant (1.1e-3), auto:2-4 and keep_fp32=mlp_down (5.6e-4, +60 % size) move top-1 within
  ±0.5 %, the noise of 1,024 positions; int8-dynamic (per-row activations, float outputs) is 0.990.

Measured through ``deploykit.convert``'s proof on the trained test checkpoints (nano: 1.3 M
parameters, 4 layers, vocab 2048; probes of issue 12's text), 1 thread, on a shared 2-core machine
(load average 9-11: convert times are upper bounds):

    model        scheme        Δppl      max|Δlogit|  /range  mean KL  top-1  greedy  size MB  convert s
    nano         fp32          +0.000 %  4.8e-6       0.000   1e-13    1.000  1.000   5.29      5.7
    nano         fp16          +0.016 %  0.039        0.004   8.8e-7   1.000  1.000   2.67      2.0
    nano         int8-dynamic  +0.023 %  0.111        0.013   4.3e-5   1.000  0.979   1.45      1.8
    nano         int8          -0.392 %  0.323        0.033   5.6e-4   0.988  0.969   1.48     17.4
    nano-moe     fp32          -0.000 %  4.3e-6       0.000   1e-13    1.000  1.000   9.25      3.6
    nano-moe     fp16          +0.010 %  0.045        0.004   5.6e-7   1.000  1.000   4.66      2.5
    nano-moe     int8-dynamic  -0.162 %  0.262        0.027   1.0e-4   1.000  1.000   2.51      2.5
    nano-moe     int8          +0.274 %  1.82         0.167   2.0e-3   0.993  1.000   4.11     12.0
    nano-legacy  fp32          +0.000 %  3.8e-6       0.000   3e-14    1.000  1.000   4.39      1.8
    nano-legacy  fp16          +0.003 %  5.8e-4       0.000   5.9e-9   1.000  1.000   2.22      1.7
    nano-legacy  int8-dynamic  -0.054 %  0.019        0.002   3.8e-6   1.000  1.000   1.49      1.8
    nano-legacy  int8          -0.066 %  0.041        0.004   6.8e-5   1.000  1.000   1.56      7.1

and on the trained demo models (runs/micro: 7.1 M parameters, vocab 8192, 512 positions; runs/micro-moe):

    micro        fp32          +0.000 %  1.6e-5       0.000   1e-12    1.000  1.000  28.66     42
    micro        fp16          -0.001 %  0.0071       0.000   6.2e-8   1.000  1.000  14.38     29
    micro        int8-dynamic  +0.191 %  0.23         0.014   9.7e-5   0.986  1.000   7.50     30
    micro        int8          +0.529 %  1.55         0.098   3.9e-3   0.950  0.906   7.52     49   (every FC int8)
    micro        int8          +0.037 %  -            -       1.0e-3   0.983  -       -        -    (default now)
    micro-moe    fp32          -0.000 %  1.8e-5       0.000   1e-12    1.000  1.000  85.38     19
    micro-moe    fp16          +0.003 %  0.012        0.001   1.1e-7   1.000  1.000  42.76     14
    micro-moe    int8-dynamic  +0.389 %  1.24         0.079   3.9e-4   0.995  0.990  22.15      5
    micro-moe    int8          -0.327 %  1.79         0.118   2.2e-3   0.956  0.927  41.07     59
    micro-legacy fp32          +0.000 %  7.6e-6       0.000   2e-13    1.000  1.000  27.94     13
    micro-legacy fp16          -0.001 %  0.0011       0.000   4.4e-9   1.000  1.000  14.02      6
    micro-legacy int8-dynamic  -0.021 %  0.049        0.004   6.2e-6   0.998  1.000   7.87      6
    micro-legacy int8          +0.017 %  0.156        0.014   1.1e-4   1.000  1.000   8.12     18

(micro-legacy: the preset trained 60 steps like the test checkpoints; no demo run of it exists.)

micro int8 decomposed (issue 12; proof Δppl / KL / top-1): every FC int8 +0.53 % / 3.9e-3 / 0.950;
lm_head float +0.39 % / 3.7e-3 / 0.977 (the top-1 loss was the int8 logits); block 0's down projection
float (keep_fp32=auto's choice) with an int8 lm_head +0.02 % / 1.3e-3 / 0.947 (the KL was that layer:
its input's outlier channels under one static scale); both (the default) +0.04 % / 1.0e-3 / 0.983.

So fp32 sits at float rounding (EXACT: 1e-3), fp16 weights at 0.4 % of the logit range (HALF: 10 %),
both int8 schemes at ≤ 0.4 % Δppl and ≤ 13 % of the range (INT8: 1 %, 30 %); int8's worst is the MoE,
where a rounding moves a router near a tie (excused positions, ``router_tie``). int8 with every op
quantized (the converter's default for full integer) failed on the RMSNorm models: nano top-1 0.27,
KL 0.96, Δppl +156 %; nano-moe top-1 0.13; which is why attention, norms and routers stay float.
MoE int8 also keeps each expert down projection float: its input is the combine-masked (N, E*F)
activation, zero for E - k experts of every row, whose one static scale cost micro-moe Δppl +1.9 %,
KL 0.014, top-1 0.936 (past INT8); float, it passes, at 0.48x the fp32 size instead of 0.26x.
int8 converts slower: the QuantizationDebugger calibrates on 16 sequences x 2 feeds.

MoE: the router's softmax, ``tf.math.top_k`` and renormalisation are TF ops; the experts run dense
(every expert on every token, weighted by a (N, E) combine matrix that is zero off the top-k), as
one FullyConnected per projection over the concatenated experts: the same function as the sorted
torch dispatch at E/k times the expert FLOPs.
"""
from __future__ import annotations

import copy
import importlib.util
import re
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
    installed_versions,
)
from deploykit.deploy.hookspecs import hookimpl
from deploykit.deploy.options import SmoothQuantOptions, option
from deploykit.deploy.roles import QUANTIZED, Role, linear_roles
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

MODEL_FILE = "model.tflite"
CONFIG_FILE = "tflite_config.json"  # the ModelConfig and the signature's layout, beside the flatbuffer
SIGNATURE = "decode"
ROUTER_SCOPE = "router"
EXPERT_DOWN_SCOPE = "expert_down"
# The Gathers that move activations (the new k/v rows into the cache, the cache's rows for grouped-query
# heads, the rotary tables' rows) stay float under int8; only the embedding's Gather is a weight lookup.
# GATHER is not denylisted as an op type (the embedding would go float), so these carry a name scope.
FLOAT_GATHER_SCOPE = "float_gather"
INSTALL_HINT = "pip install 'deploykit[tflite]'"


@dataclass(frozen=True)
class TFLiteInt8Options(SmoothQuantOptions):
    """Options of the static int8 scheme: the shared SmoothQuant / keep_fp32 rewrite (deploykit.deploy.calibrate)."""

    quantize_lm_head: bool = option(False, "quantize the lm_head FullyConnected too (default false: its int8 "
                                           "output rounds the logits onto one grid, near-ties flip)")
    keep_fp32: str = option("auto", SmoothQuantOptions.__dataclass_fields__["keep_fp32"].metadata["help"]
                            + " (tflite int8 default: auto, the one costliest group; empty: none)")


class TFLiteBackend(Backend):
    name = "tflite"
    description = "TF-ops rewrite converted by TFLiteConverter, KV cache as signature tensors, LiteRT interpreter"
    schemes = (
        Scheme("fp32", "fp32 weights and compute", EXACT),
        Scheme("fp16", "fp16 weights (dequantized at load), fp32 compute", HALF),
        Scheme("int8-dynamic", "int8 per-channel weights, activations quantized per call (dynamic range)", INT8),
        Scheme("int8", "int8 weights and activations of every matmul layer (static ranges from the calibration "
               "set); attention, norms, routers, lm_head and the costliest layer group float", INT8,
               TFLiteInt8Options),
    )
    artifact_files = (MODEL_FILE, CONFIG_FILE)
    platforms = "CPU (edge)"

    def missing_requirements(self) -> list[str]:
        if importlib.util.find_spec("tensorflow") is None:
            return [f"tensorflow is not installed (it converts; ai_edge_litert alone only runs artifacts): {INSTALL_HINT}"]
        return []

    def versions(self) -> dict[str, str]:
        return installed_versions(("tensorflow-cpu", "tensorflow", "ai-edge-litert"))

    def convert(self, model: CausalLM, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        import json

        cfg = model.config
        int8: dict[str, Any] = {}
        keep: list[str] = []
        if isinstance(ctx.options, TFLiteInt8Options):
            model, keep, int8 = _int8_rewrite(model, ctx)
        ctx.progress("building the TF graph")
        t0 = time.perf_counter()
        module = DecoderModule(model)
        ctx.progress(f"converting to TFLite ({scheme.name})")
        flatbuffer = convert_module(module, scheme.name, ctx.calibration, keep_fp32=keep)
        seconds = round(time.perf_counter() - t0, 2)
        (Path(out) / MODEL_FILE).write_bytes(flatbuffer)
        layout = {"format": 1, "signature": SIGNATURE, "capacity": cfg.max_seq_len, "quant": scheme.name,
                  "model_config": cfg.to_dict()}
        (Path(out) / CONFIG_FILE).write_text(json.dumps(layout, indent=1) + "\n")
        facts: dict[str, Any] = {"route": "TF-ops rewrite + tf.lite.TFLiteConverter", "signature": SIGNATURE,
                                 "interpreter": interpreter_name(),
                                 "kv_cache": f"fixed capacity {cfg.max_seq_len}, signature inputs/outputs",
                                 "convert_seconds": seconds, "bytes": len(flatbuffer)}
        if cfg.is_moe:
            facts["parity_note"] = ("MoE converted with dense dispatch: top-k routing in TF ops, every expert runs "
                                    "on every token and a combine matrix keeps the chosen k")
        if scheme.name == "int8":
            facts["calibration_sequences"] = len(_calibration(ctx.calibration, cfg))
        return facts | int8

    def load(self, artifact: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        return TFLiteRunner(Path(artifact), threads=threads)


@hookimpl
def deploykit_backends() -> list[Backend]:
    return [TFLiteBackend()]


def weight_modules(model: Any) -> dict[str, Role]:
    """The FullyConnected layers int8 may quantize, by the names ``keep_fp32`` takes: the torch
    backend's (deploykit.deploy.roles), a layer's concatenated experts as ``...experts.w1|w3|w2``."""
    out: dict[str, Role] = {}
    for name, role in linear_roles(model).items():
        if role is Role.EXPERTS:
            out |= {f"{name}.w1": Role.EXPERT_GATE, f"{name}.w3": Role.EXPERT_UP, f"{name}.w2": Role.EXPERT_DOWN}
        elif role in QUANTIZED | {Role.LM_HEAD}:
            out[name] = role
    return out


def _int8_rewrite(model: Any, ctx: ConvertContext) -> tuple[Any, list[str], dict[str, Any]]:
    """SmoothQuant (opt-in) on a copy, then the modules kept float: (model, kept names, manifest facts)."""
    from deploykit.deploy.calibrate import resolve_keep_fp32, smooth_quant

    opts, facts = ctx.options, {}
    if not _calibration(ctx.calibration, model.config):
        raise ConfigError("tflite/int8 needs calibration token sequences (ctx.calibration), got none of length >= 2",
                          hint="pass calibration data (deploykit convert draws it from the eval corpus) or use "
                          "int8-dynamic")
    if opts.smoothquant:
        ctx.progress("SmoothQuant: choosing α on the calibration set")
        model = copy.deepcopy(model)
        facts["smoothquant"] = smooth_quant(model, ctx.calibration, alpha=opts.smoothquant_alpha,
                                            activations="static", quantize_lm_head=opts.quantize_lm_head)
    modules = weight_modules(model)
    if opts.auto_groups():
        ctx.progress("measuring each layer group's int8 cost on the calibration set (keep_fp32=auto)")
    # MoE expert down projections are always float here (EXPERT_DOWN_SCOPE): auto must not spend its pick
    # on them (it did on micro-moe, and their names carry no module scope: the conversion failed)
    float_roles = frozenset({Role.EXPERT_DOWN}) if model.config.is_moe else frozenset()
    keep, auto = resolve_keep_fp32(model, list(modules), modules, opts, ctx.calibration, activations="static",
                                   where="tflite/int8", float_roles=float_roles)
    if not opts.quantize_lm_head:
        keep.add("lm_head")
    facts["kept_fp32"] = sorted(keep)
    if auto:
        facts["keep_fp32_auto"] = auto
    return model, sorted(keep), facts


# -- the decoder in TF ops --------------------------------------------------------------------------
def _weights(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


class DecoderModule:
    """deploykit's CausalLM as a ``tf.function`` over a fixed-capacity cache (the module docstring's signature).

    Built from the torch model's weights (copied into TF constants); nothing of torch is traced.
    """

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        self.tf = tf
        self.cfg = cfg = model.config
        w = _weights(model)
        # Variables, not constants: the SavedModel keeps them beside the graph (no 2 GB GraphDef limit)
        # and the converter freezes them into the flatbuffer.
        self.w = {k: tf.Variable(v, trainable=False) for k, v in w.items()}
        if cfg.tie_embeddings:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        if cfg.variant != "legacy":
            # cos/sin tables for every cache slot, gathered by position. Computing them in the graph
            # (positions * inv_freq, then Cos/Sin) is exact in fp32 but not under full-integer int8: the
            # angles, up to max_seq_len radians, get one int8 scale and sin() of them is noise.
            import torch

            from deploykit.model.graph import rope_inv_freq, rotary_cos_sin

            cos, sin = rotary_cos_sin(torch.arange(cfg.max_seq_len), rope_inv_freq(cfg))  # (C, hd) each
            self.cos_table, self.sin_table = tf.constant(cos.numpy()), tf.constant(sin.numpy())
        if cfg.is_moe:  # experts concatenated so each projection is one FullyConnected (see module doc)
            for i in range(cfg.n_layers):
                p = f"model.layers.{i}.block_sparse_moe.experts."
                E, F, D = w[p + "w1"].shape
                self.w[p + "w1cat"] = tf.Variable(w[p + "w1"].reshape(E * F, D), trainable=False)  # (E*F, D)
                self.w[p + "w3cat"] = tf.Variable(w[p + "w3"].reshape(E * F, D), trainable=False)
                self.w[p + "w2cat"] = tf.Variable(w[p + "w2"].transpose(1, 0, 2).reshape(D, E * F),  # (D, E*F)
                                                  trainable=False)
        L, KV, C, hd = cfg.n_layers, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim
        self.decode = tf.function(self._decode, input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="input_ids"), tf.TensorSpec([], tf.int32, name="past"),
            tf.TensorSpec([L, None, KV, C, hd], tf.float32, name="k_cache"),
            tf.TensorSpec([L, None, KV, C, hd], tf.float32, name="v_cache")])

    def _linear(self, x: Any, name: str) -> Any:
        # x (N, in) @ W^T with W (out, in): TFLite's FullyConnected takes (out, in) weights as they are.
        # Under the module's name scope, so int8 can keep it float by name (keep_fp32).
        tf = self.tf
        with tf.name_scope(name):
            y = tf.matmul(x, self.w[name + ".weight"], transpose_b=True)
            bias = self.w.get(name + ".bias")
            return y if bias is None else y + bias

    def _norm(self, x: Any, name: str) -> Any:
        tf, eps = self.tf, self.cfg.norm_eps
        if self.cfg.variant == "legacy":  # LayerNorm
            mean = tf.reduce_mean(x, -1, keepdims=True)
            var = tf.reduce_mean(tf.square(x - mean), -1, keepdims=True)
            return (x - mean) * tf.math.rsqrt(var + eps) * self.w[name + ".weight"] + self.w[name + ".bias"]
        # The gain multiplies x BEFORE the per-row rsqrt: TFLite's converter folds a constant Mul that
        # directly feeds a FullyConnected into the FC's weights, which would undo SmoothQuant (its 1/s
        # lives in this gain) and hand the int8 FC the unsmoothed activations again.
        inv_rms = tf.math.rsqrt(tf.reduce_mean(tf.square(x), -1, keepdims=True) + eps)  # (N, 1)
        return (x * self.w[name + ".weight"]) * inv_rms

    def _rotary(self, x: Any, cos: Any, sin: Any) -> Any:
        # x (B, h, T, hd); cos/sin (T, hd). Llama's rotate-half layout.
        half = self.cfg.head_dim // 2
        rotated = self.tf.concat([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def _attention(self, x: Any, i: int, B: Any, T: Any, past: Any, rotary: Any, k_cache: Any, v_cache: Any,
                   mask: Any) -> tuple[Any, Any, Any]:
        tf, cfg = self.tf, self.cfg
        H, KV, hd, C = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.max_seq_len
        p = f"model.layers.{i}.self_attn."
        q = tf.transpose(tf.reshape(self._linear(x, p + "q_proj"), [B, T, H, hd]), [0, 2, 1, 3])  # (B, h, T, hd)
        k = tf.transpose(tf.reshape(self._linear(x, p + "k_proj"), [B, T, KV, hd]), [0, 2, 1, 3])  # (B, kv, T, hd)
        v = tf.transpose(tf.reshape(self._linear(x, p + "v_proj"), [B, T, KV, hd]), [0, 2, 1, 3])
        if rotary is not None:
            q, k = self._rotary(q, *rotary), self._rotary(k, *rotary)
        # Write the new rows into slots past..past+T-1: slot c takes row clip(c - past) where it is new.
        slots = tf.range(C)  # (C,)
        new = (slots >= past) & (slots < past + T)  # (C,)
        rows = tf.clip_by_value(slots - past, 0, T - 1)  # (C,)
        with tf.name_scope(FLOAT_GATHER_SCOPE):
            k_all = tf.where(new[None, None, :, None], tf.gather(k, rows, axis=2), k_cache[i])  # (B, kv, C, hd)
            v_all = tf.where(new[None, None, :, None], tf.gather(v, rows, axis=2), v_cache[i])
        if KV != H:  # grouped-query attention: query head j reads kv head j // (H / KV)
            heads = tf.constant(np.arange(H) // (H // KV), tf.int32)
            with tf.name_scope(FLOAT_GATHER_SCOPE):
                k_rep, v_rep = tf.gather(k_all, heads, axis=1), tf.gather(v_all, heads, axis=1)  # (B, h, C, hd)
        else:
            k_rep, v_rep = k_all, v_all
        scores = tf.matmul(q, k_rep, transpose_b=True) * (1.0 / float(np.sqrt(hd)))  # (B, h, T, C)
        scores = tf.where(mask[None, None], scores, tf.fill(tf.shape(scores), -np.inf))
        y = tf.matmul(tf.nn.softmax(scores, axis=-1), v_rep)  # (B, h, T, hd)
        y = tf.reshape(tf.transpose(y, [0, 2, 1, 3]), [B * T, H * hd])
        return self._linear(y, p + "o_proj"), k_all, v_all

    def _mlp(self, x: Any, i: int) -> Any:
        tf, cfg = self.tf, self.cfg
        if cfg.variant == "legacy":
            p = f"model.layers.{i}.mlp."
            return self._linear(tf.nn.gelu(self._linear(x, p + "up_proj"), approximate=False), p + "down_proj")
        if not cfg.is_moe:
            p = f"model.layers.{i}.mlp."
            return self._linear(tf.nn.silu(self._linear(x, p + "gate_proj")) * self._linear(x, p + "up_proj"),
                                p + "down_proj")
        return self._moe(x, i)

    def _moe(self, x: Any, i: int) -> Any:
        """Mixtral routing (softmax over E, top k, renormalised) and dense experts. x (N, D) -> (N, D)."""
        tf, cfg = self.tf, self.cfg
        E, K, F = cfg.n_experts, cfg.top_k, cfg.ffn_dim
        p = f"model.layers.{i}.block_sparse_moe."
        with tf.name_scope(ROUTER_SCOPE):  # named, so int8 can keep the router float (see _int8_float_ops)
            probs = tf.nn.softmax(self._linear(x, p + "gate"), axis=-1)  # (N, E)
        top_p, top_i = tf.math.top_k(probs, k=K)  # (N, k)
        weights = top_p / tf.reduce_sum(top_p, -1, keepdims=True)  # (N, k)
        combine = tf.reduce_sum(tf.one_hot(top_i, E) * weights[..., None], axis=1)  # (N, E), k non-zeros a row
        N = tf.shape(x)[0]
        with tf.name_scope(p + "experts.w1"):
            gate = tf.matmul(x, self.w[p + "experts.w1cat"], transpose_b=True)  # (N, E*F)
        with tf.name_scope(p + "experts.w3"):
            up = tf.matmul(x, self.w[p + "experts.w3cat"], transpose_b=True)
        h = tf.reshape(tf.nn.silu(gate) * up, [N, E, F]) * combine[..., None]  # (N, E, F), zero off the top k
        with tf.name_scope(EXPERT_DOWN_SCOPE):  # float under int8 too: its input is masked per expert
            return tf.matmul(tf.reshape(h, [N, E * F]), self.w[p + "experts.w2cat"], transpose_b=True)  # (N, D)

    def _decode(self, input_ids: Any, past: Any, k_cache: Any, v_cache: Any) -> dict[str, Any]:
        tf, cfg = self.tf, self.cfg
        B, T = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
        D, C = cfg.d_model, cfg.max_seq_len
        positions = past + tf.range(T)  # (T,)
        x = tf.gather(self.w["model.embed_tokens.weight"], input_ids)  # (B, T, D)
        rotary = None
        if cfg.variant == "legacy":
            x = x + tf.gather(self.w["model.embed_positions.weight"], positions)[None]
        else:
            with tf.name_scope(FLOAT_GATHER_SCOPE):
                rotary = (tf.gather(self.cos_table, positions), tf.gather(self.sin_table, positions))  # (T, hd) each
        mask = tf.range(C)[None, :] <= positions[:, None]  # (T, C): query t sees slots 0..past+t
        x = tf.reshape(x, [B * T, D])  # (N, D): FullyConnected layers see rows
        keys, values = [], []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            a, k_all, v_all = self._attention(self._norm(x, p + "input_layernorm"), i, B, T, past, rotary,
                                              k_cache, v_cache, mask)
            x = x + a
            x = x + self._mlp(self._norm(x, p + "post_attention_layernorm"), i)
            keys.append(k_all)
            values.append(v_all)
        logits = self._linear(self._norm(x, "model.norm"), "lm_head")  # (N, V)
        return {"logits": tf.reshape(logits, [B, T, cfg.vocab_size]), "k_cache": tf.stack(keys),
                "v_cache": tf.stack(values)}


# -- conversion -------------------------------------------------------------------------------------
def _calibration(sequences: Sequence[Sequence[int]], cfg: ModelConfig) -> list[list[int]]:
    return [list(s)[:cfg.max_seq_len] for s in sequences if len(s) >= 2]


def empty_cache(cfg: ModelConfig, batch: int) -> np.ndarray:
    return np.zeros((cfg.n_layers, batch, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim), np.float32)


def convert_module(module: DecoderModule, scheme: str, calibration: Sequence[Sequence[int]] = (), *,
                   keep_fp32: Sequence[str] = ()) -> bytes:
    """The flatbuffer of ``module``'s decode signature under ``scheme`` (int8: the FullyConnected layers
    of the modules ``keep_fp32`` names stay float).

    Through a SavedModel in a temporary folder: the converter names signatures only from one (the
    concrete-function route calls every signature ``serving_default``).
    """
    import shutil
    import tempfile

    tf = module.tf
    root = tf.Module()
    root.weights = list(module.w.values())  # tracked, so the SavedModel holds them
    root.decode = module.decode
    folder = tempfile.mkdtemp(prefix="deploykit-tflite-")
    try:
        tf.saved_model.save(root, folder, signatures={SIGNATURE: module.decode.get_concrete_function()})
        return _convert_saved(tf, folder, module, scheme, calibration, keep_fp32)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# int8 keeps these float (measured, see the module docstring): everything but the
# FullyConnected layers and the embedding Gather. Quantizing them all with one static int8 scale per
# tensor (the attention scores, softmax, norms' squares, residual sums) gave the trained nano
# top-1 0.13 and KL 1.5; with only the matmul layers int8, top-1 0.98 and KL 4e-4.
_INT8_FLOAT_OPS = ["ADD", "SUB", "MUL", "DIV", "BATCH_MATMUL", "SOFTMAX", "SELECT_V2", "SQUARE", "MEAN", "RSQRT",
                   "CONCATENATION", "LOGISTIC", "GELU", "TRANSPOSE", "RESHAPE", "NEG", "STRIDED_SLICE", "PACK",
                   "SUM", "TOPK_V2", "ONE_HOT", "MAXIMUM", "MINIMUM", "FILL"]


def _convert_saved(tf: Any, folder: str, module: DecoderModule, scheme: str,
                   calibration: Sequence[Sequence[int]], keep_fp32: Sequence[str] = ()) -> bytes:
    converter = tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=[SIGNATURE])
    try:
        if scheme == "fp32":
            return converter.convert()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if scheme == "fp16":
            converter.target_spec.supported_types = [tf.float16]
            return converter.convert()
        if scheme == "int8-dynamic":
            return converter.convert()
        if scheme == "int8":
            return _full_int8(tf, converter, folder, module, calibration, keep_fp32)
    except (BackendError, ConfigError):
        raise
    except Exception as e:  # the converter's errors are multi-line MLIR dumps: keep the first line
        from deploykit.errors import first_line

        raise BackendError(f"TFLiteConverter failed for {scheme}: {type(e).__name__}: {first_line(e)}",
                           hint="rerun with --debug for the converter's full message") from e
    raise BackendError(f"tflite backend has no scheme {scheme!r}",
                       hint=f"valid schemes: {', '.join(s.name for s in TFLiteBackend.schemes)}")


def _full_int8(tf: Any, converter: Any, folder: str, module: DecoderModule, calibration: Sequence[Sequence[int]],
               keep_fp32: Sequence[str] = ()) -> bytes:
    """int8 weights and activations in every FullyConnected and the embedding, ranges calibrated on
    ``calibration``; the ops of ``_INT8_FLOAT_OPS``, the MoE routers and expert down projections and
    the modules of ``keep_fp32`` stay float.

    Selective quantization is LiteRT's QuantizationDebugger (``denylisted_ops`` / ``denylisted_nodes``):
    the kept layers are FullyConnected too, found by their name scopes in the float model's tensors.
    """
    seqs = _calibration(calibration, module.cfg)
    if not seqs:
        raise ConfigError("tflite/int8 needs calibration token sequences (ctx.calibration), got none of length >= 2",
                          hint="pass calibration data (deploykit convert draws it from the eval corpus) or use "
                          "int8-dynamic")
    scopes = ([re.escape(n) for n in keep_fp32] + [FLOAT_GATHER_SCOPE]
              + ([ROUTER_SCOPE, EXPERT_DOWN_SCOPE] if module.cfg.is_moe else []))
    denied: list[str] = []
    if scopes:
        float_model = tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=[SIGNATURE]).convert()
        pattern = re.compile(rf"(^|;)({'|'.join(scopes)})(_\d+)?/")
        denied = [d["name"] for d in tf.lite.Interpreter(model_content=float_model).get_tensor_details()
                  if pattern.search(d["name"])]
        found = {n for n in keep_fp32 if any(re.search(rf"(^|;){re.escape(n)}(_\d+)?/", d) for d in denied)}
        if module.cfg.is_moe:  # an expert down projection asked for by name is float already (EXPERT_DOWN_SCOPE)
            found |= {n for n in keep_fp32 if n.endswith(".block_sparse_moe.experts.w2")}
        if missing := sorted(set(keep_fp32) - found):
            raise BackendError(f"tflite/int8: keep_fp32 {', '.join(missing)}: no tensor of the converted graph "
                               "carries its name scope", hint="report this with the tensorflow version")
    converter.representative_dataset = lambda: _representative(module, seqs)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=_INT8_FLOAT_OPS, denylisted_nodes=denied)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: _representative(module, seqs[:1]), debug_options=options)
    return debugger.get_nondebug_quantized_model()


def _representative(module: DecoderModule, seqs: list[list[int]]) -> Any:
    """Feeds for int8 calibration, keyed by signature input: per sequence a prefill with
    an empty cache, then a one-token decode step with the cache the TF graph computed for the rest."""
    cfg = module.cfg
    for seq in seqs:
        ids = np.asarray([seq], np.int32)  # (1, T)
        empty = empty_cache(cfg, 1)
        yield {"input_ids": ids, "past": np.int32(0), "k_cache": empty, "v_cache": empty}
        out = module.decode(ids[:, :-1], np.int32(0), empty, empty)
        yield {"input_ids": ids[:, -1:], "past": np.int32(len(seq) - 1), "k_cache": out["k_cache"].numpy(),
               "v_cache": out["v_cache"].numpy()}


# -- runtime ----------------------------------------------------------------------------------------
def interpreter_name() -> str:
    """The interpreter this machine runs artifacts with (and the parity proof used)."""
    return "ai_edge_litert" if importlib.util.find_spec("ai_edge_litert") is not None else "tf.lite.Interpreter"


def _interpreter(path: Path, threads: int | None) -> tuple[Any, str]:
    """(interpreter, which): LiteRT's when ai_edge_litert is installed, else tensorflow's (deprecated there)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        which = "ai_edge_litert"
    except ImportError:
        try:
            import tensorflow as tf
        except ImportError as e:
            raise BackendUnavailable(f"{path}: neither ai_edge_litert nor tensorflow is installed to run it",
                                     hint=INSTALL_HINT) from e
        Interpreter, which = tf.lite.Interpreter, "tf.lite.Interpreter"
    try:
        return Interpreter(model_path=str(path), num_threads=threads or None), which
    except (ValueError, RuntimeError) as e:
        from deploykit.errors import first_line

        raise ArtifactError(f"{path}: not a loadable TFLite flatbuffer ({first_line(e)})",
                            hint="the file is damaged or not written by deploykit; convert again") from e


class TFLiteRunner(Runner):
    """A .tflite artifact in one interpreter. Interpreters are not thread-safe: calls take a lock."""

    def __init__(self, artifact: Path, *, threads: int | None = None) -> None:
        import json

        from deploykit.deploy.artifact import model_files
        from deploykit.model.config import ModelConfig

        check_threads(threads)
        path = artifact / MODEL_FILE
        for need in (MODEL_FILE, CONFIG_FILE):
            if not (artifact / need).is_file():
                raise ArtifactError(f"{artifact}: no {need}", hint="re-run deploykit convert --backend tflite")
        try:
            layout = json.loads((artifact / CONFIG_FILE).read_text())
            self.config = ModelConfig.from_dict(layout["model_config"])
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{artifact / CONFIG_FILE}: unreadable ({e})",
                                hint="re-run deploykit convert --backend tflite") from e
        self.interpreter, self.which = _interpreter(path, threads)
        try:
            self.signature = self.interpreter.get_signature_runner(SIGNATURE)
        except ValueError as e:
            raise ArtifactError(f"{path}: no {SIGNATURE!r} signature ({e})",
                                hint="not written by deploykit's tflite backend; convert again") from e
        self._lock = threading.Lock()
        self.eos_token_id = self.config.eos_token_id
        self.max_length = self.config.max_seq_len
        self.tokenizer = None
        if (artifact / "tokenizer.json").is_file():
            from deploykit.model.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.load(artifact)
        files = model_files(artifact)
        self.info = RunnerInfo(
            backend="tflite", quant=str(layout.get("quant", "?")), kv_cache=True, size_bytes=sum(files.values()),
            files=files, threads=threads, parameters=self.config.num_params(), vocab_size=self.config.vocab_size,
            max_length=self.config.max_seq_len,
            details={"interpreter": self.which, "signature": SIGNATURE,
                     "kv_cache": f"fixed capacity {self.config.max_seq_len} as signature tensors"})

    def run(self, input_ids: np.ndarray, past: int, k_cache: np.ndarray, v_cache: np.ndarray) -> dict[str, np.ndarray]:
        """One signature call: ids (B, T) at positions past.. -> logits (B, T, V) and the updated caches."""
        if past + input_ids.shape[1] > self.config.max_seq_len:
            raise ConfigError(f"sequence of {past + input_ids.shape[1]} tokens exceeds the cache capacity "
                              f"{self.config.max_seq_len}", hint="shorten the prompt or max_new_tokens")
        with self._lock:
            return self.signature(input_ids=input_ids.astype(np.int32), past=np.int32(past), k_cache=k_cache,
                                  v_cache=v_cache)

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        empty = empty_cache(self.config, input_ids.shape[0])
        return np.asarray(self.run(input_ids, 0, empty, empty)["logits"], np.float32)

    def new_session(self) -> TFLiteSession:
        return TFLiteSession(self)


class TFLiteSession:
    """One sequence: its caches and length; each feed runs only the new tokens."""

    def __init__(self, runner: TFLiteRunner) -> None:
        self.runner, self.past = runner, 0
        self.k = self.v = empty_cache(runner.config, 1)

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray([token_ids], np.int64)  # (1, T_new), checked by CheckedSession
        out = self.runner.run(ids, self.past, self.k, self.v)
        self.k, self.v, self.past = out["k_cache"], out["v_cache"], self.past + ids.shape[1]
        return np.asarray(out["logits"][0, -1], np.float32)  # (V,)
