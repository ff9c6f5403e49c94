"""GGUF backend: one ``model.gguf`` that llama.cpp runs, written by the ``gguf`` package and quantized
by llama.cpp itself, proven against the fp32 torch model (tokens, logits, perplexity, experts).

Users of llama.cpp run ``convert_hf_to_gguf.py``, then ``llama-quantize``, then ``llama-perplexity``
by hand, and learn that a conversion was wrong from garbage output. Here one ``convert`` does it:

1. ``gguf.GGUFWriter`` writes an F32 file: deploykit's tensors under llama.cpp's names
   (:data:`LLAMA_LAYER`, :data:`GPT2_LAYER`), the ``{arch}.*`` hyper-parameters, the tokenizer
   (``tokenizer.ggml.*``) and deploykit's exact ``ModelConfig`` under :data:`CONFIG_KEY`.
2. Every other scheme is that file through ``llama_cpp.llama_model_quantize`` (llama.cpp's own
   quantizer, with its own per-tensor type mixture: e.g. Q4_0 keeps ``output.weight`` in Q6_K or Q8_0).
   ``--option rounding=gptq|rtn`` (q4_0, q4_k_m) then overwrites the Q4_0 / Q4_K decoder and expert tensors
   with deploykit's rounding of the same weights in llama.cpp's block layout; ``rounding=imatrix`` runs
   llama.cpp's quantizer with an importance matrix from the calibration set (``rounding``).
3. Proofs beyond deploykit's parity check (which deploykit runs on the runner :meth:`GgufBackend.load`
   returns): llama.cpp's tokenization of :data:`TOKENIZER_PROOF_TEXTS` must equal deploykit's, token
   for token (else ParityError, exit 3, naming the first text that differs); KL divergence, top-1
   agreement and Δ perplexity against the fp32 torch model on :data:`HELDOUT_TEXT`; realised bits per
   weight; for MoE models the share of (token, layer) pairs where llama.cpp picks the same top-k
   expert set as the fp32 router, read from llama.cpp's ``ffn_moe_topk-N`` graph tensors through its
   eval callback (``llama_context_params.cb_eval``). All of it lands in the manifest's ``backend_info``.

Architectures. Dense and MoE models are llama.cpp's ``llama``: its rotary embedding rotates adjacent
channel pairs while deploykit (like Hugging Face Llama) rotates the two halves of each head, so the Q
and K rows are permuted per head on the way in (:func:`to_interleaved`) and back on import; experts
are llama.cpp's stacked ``ffn_{gate,up,down}_exps`` (deploykit's own layout), with Mixtral's softmax
over all experts, top-k, renormalised, which is what llama.cpp computes for ``llama`` experts. The
legacy variant is ``gpt2`` (fused qkv, learned positions, LayerNorm with biases). One difference
remains and is stated, not hidden: llama.cpp's ``gpt2`` graph computes GELU with its tanh
approximation read from an fp16 table (``ggml_gelu``), deploykit's legacy MLP the exact erf GELU; the
measured cost is in the table above the schemes and in each legacy artifact's ``parity_note``.

The runner (:class:`GgufRunner`) is ``llama_cpp.Llama`` with ``logits_all=True``: ``forward`` returns
logits for every position, a session keeps llama.cpp's KV cache. The parity proof runs with an F32 KV
cache (llama.cpp's default F16 cache alone moves logits by ~4e-3); served runners use
``--option kv_cache=`` (default f16, llama.cpp's default).

``deploykit import-gguf FILE --out CKPT`` (:class:`ImportGguf`, contributed through the
``deploykit_cli_commands`` hook) reads a llama/gpt2 GGUF back into a Hugging Face checkpoint folder.

Layout: this module is the backend (schemes, tolerances, convert, load, hooks); ``gguf_file`` the
GGUF file both ways (tensor names, keys, tokenizer, write, read); ``proofs`` the tokenizer, quality
and expert proofs; ``runtime`` the runner.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.deploy.backend import Backend, ConvertContext, Runner, Scheme, Tolerance, installed_versions
from deploykit.deploy.hookspecs import hookimpl
from deploykit.deploy.options import SchemeOptions, option
from deploykit.errors import BackendError, BackendUnavailable, ConfigError, ParityError

from .gguf_file import import_gguf, write_gguf
from .proofs import measure_quality, parity_note, prove_tokenizer
from .rounding import DEPLOYKIT_ROUNDINGS, GRIDS, ROUNDINGS, importance, write_rounded
from .runtime import KV_TYPES, GgufRunner, _quiet_llama_logs

if TYPE_CHECKING:
    from deploykit.model.config import ModelConfig
    from deploykit.model.graph import CausalLM

MODEL_FILE = "model.gguf"
INSTALL_HINT = "pip install 'deploykit[gguf]' (llama-cpp-python compiles llama.cpp: see README, Installing)"
_REQUIREMENTS = {"gguf": "gguf", "llama_cpp": "llama-cpp-python"}


# -- schemes ---------------------------------------------------------------------------------------
# Measured through deploykit's parity probes (max |Δlogit| over all positions, mean KL, top-1, greedy
# match per step) and on HELDOUT_TEXT (Δ perplexity vs fp32 torch): llama-cpp-python 0.3.36, portable
# build (GGML_NATIVE=OFF), 1 thread, AMD EPYC (AVX-512); 87 conversions. Models, in this order: the
# test models of tests/test_gguf_backend.py (conftest's nano, nano-moe, nano-legacy, 60 AdamW steps,
# d_model 128, so no K-quants; d_model-256 k-dense, k-moe, k-legacy, 40 steps), then micro (val ppl
# 3.44), micro-moe (4.12) and micro-legacy (22.5, 60 s of training), the models the issue names.
#
#   scheme  max |Δlogit| per model (order above)                  KL max   top-1 min  greedy min  Δppl %         bpw nano/k/micro
#   f32       5e-6   6e-6 0.0054   3e-5   2e-5 0.0023   1e-4   2e-4 0.0024  4.2e-08  1.000      1.000       -0.00..+0.00   32.5/32.3/32.1
#   f16     0.0032 0.0031 0.0061 0.0079  0.009 0.0031  0.016  0.009 0.0031  3.1e-07  0.997      1.000       -0.00..+0.00   16.5/16.3/16.1
#   bf16     0.023   0.14  0.033  0.072  0.045  0.046   0.11   0.88  0.027  5.8e-04  0.995      0.990       -0.02..+0.01   16.5/16.3/16.1
#   q8_0     0.079   0.14   0.12  0.075   0.17  0.058   0.59    1.1  0.076  1.4e-03  0.986      0.979       -0.10..+0.06   9.0/8.8/8.6
#   q6_k         -      -      -   0.81   0.66   0.21   0.77      -   0.24  1.2e-03  0.977      0.958       -0.23..+0.13   -/6.9/6.6
#   q5_0      0.13    1.8   0.42   0.33   0.69   0.21    2.8    3.2   0.24  1.9e-02  0.956      0.958       -0.14..+0.29   6.7/6.1/5.6
#   q5_1      0.15   0.14   0.28    0.7   0.77   0.28    1.4    3.1   0.26  2.5e-02  0.941      0.969       -0.29..+0.20   7.1/6.5/6.1
#   q5_k_m       -      -      -   0.78    1.6   0.19    1.8      -   0.24  3.8e-03  0.976      0.969       -0.26..+0.41   -/6.2/5.8
#   q4_0      0.27    1.8    1.1   0.46   0.61   0.49    5.4    4.4   0.39  2.8e-02  0.916      0.958       -0.25..+0.87   6.0/5.4/4.7
#   q4_1      0.29   0.26   0.52   0.62    1.6   0.43    4.1    3.0   0.46  2.3e-02  0.930      0.958       -0.31..+0.93   6.4/5.8/5.2
#   q4_k_m       -      -      -    1.3   0.73   0.29    2.6      -   0.23  1.4e-02  0.938      0.958       -0.28..+0.26   -/5.6/5.0
#
# F32: legacy differs by llama.cpp's tanh-approximated GELU (see the module doc), not by rounding;
# dense and MoE stay at 1e-4 and 2e-4 on micro's logits (the tests hold nano to 1e-4). MoE maxima
# from bf16 on (0.88, 1.1, 3.2...) are expert choices flipped by rounding near a router tie: llama.cpp
# picked the fp32 router's experts for 96.0-99.96 % of (token, layer) pairs (micro-moe q4_0 lowest).
# Every scheme passes its bounds below on every model but micro-moe's K-quants, which are refused
# (its experts' rows are 384 values). Bounds: 2-3x the worst max |Δlogit|, 3-8x the KL, the Δppl
# bound 3x the measured range. A missing Q/K permutation, in F32, gives held-out max |Δlogit| 4.2,
# top-1 0.85, Δppl +3.6 % on nano and 14.8, 0.53, +359 % on micro: past the bounds of every scheme
# but Q4's max |Δlogit| and top-1 (tests/test_gguf_backend.py checks that nano's F32 fails).
F32_TOL = Tolerance(max_abs_logit=2e-2, min_top1=0.995, max_kl=1e-6, min_greedy_match=0.98)
F16_TOL = Tolerance(max_abs_logit=0.05, min_top1=0.99, max_kl=1e-5, min_greedy_match=0.95, router_tie=0.02)
BF16_TOL = Tolerance(max_abs_logit=2.0, min_top1=0.98, max_kl=2e-3, min_greedy_match=0.9, router_tie=0.05)
Q8_TOL = Tolerance(max_abs_logit=3.0, min_top1=0.95, max_kl=0.01, min_greedy_match=0.9, router_tie=0.05)
Q5_TOL = Tolerance(max_abs_logit=8.0, min_top1=0.88, max_kl=0.08, min_greedy_match=0.85, router_tie=0.1)
Q4_TOL = Tolerance(max_abs_logit=12.0, min_top1=0.85, max_kl=0.1, min_greedy_match=0.8, router_tie=0.1)


@dataclass(frozen=True)
class GgufOptions(SchemeOptions):
    """How served runners run the file; the parity proof always uses an F32 KV cache."""

    kv_cache: str = option("f16", "KV cache type of served runners: f16 (llama.cpp's default), f32 or q8_0")
    flash_attn: bool = option(False, "llama.cpp's flash attention for served runners (q8_0 KV cache turns it on)")
    rounding: str = option("llama", "llama (llama.cpp's quantizer); q4_0 / q4_k_m: gptq (deploykit's GPTQ from the "
                                    "calibration set, MoE experts each from its routed tokens), gptq-imatrix (GPTQ on "
                                    "llama.cpp's importance-weighted grid) or rtn (deploykit's round to nearest), "
                                    "written as Q4_0 / Q4_K blocks; any quantized scheme: imatrix "
                                    "(llama.cpp's quantizer with an importance matrix from the calibration set)")

    def check(self) -> list[str]:
        out = [] if self.kv_cache in KV_TYPES else [f"kv_cache={self.kv_cache!r} must be one of {', '.join(KV_TYPES)}"]
        return out + ([] if self.rounding in ROUNDINGS else
                      [f"rounding={self.rounding!r} must be one of {', '.join(ROUNDINGS)}"])


@dataclass(frozen=True)
class GgufScheme:
    """What a scheme is to llama.cpp: its file type, and the row length its blocks need."""

    name: str
    ftype: str  # llama_cpp.LLAMA_FTYPE_* name
    block: int  # values per quantization block: every quantized row must be a multiple of it
    description: str
    tolerance: Tolerance
    max_delta_ppl_pct: float  # |Δ perplexity| on HELDOUT_TEXT vs fp32 torch, checked in convert (table above)


GGUF_SCHEMES = (
    GgufScheme("f16", "LLAMA_FTYPE_MOSTLY_F16", 1, "F16 weights (llama.cpp's usual base file)", F16_TOL, 0.1),
    GgufScheme("f32", "LLAMA_FTYPE_ALL_F32", 1, "F32 weights, as written by gguf.GGUFWriter", F32_TOL, 0.05),
    GgufScheme("bf16", "LLAMA_FTYPE_MOSTLY_BF16", 1, "BF16 weights", BF16_TOL, 0.25),
    GgufScheme("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", 32, "8-bit blocks of 32 with one scale", Q8_TOL, 0.5),
    GgufScheme("q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0", 32, "5-bit blocks of 32, symmetric", Q5_TOL, 1.5),
    GgufScheme("q5_1", "LLAMA_FTYPE_MOSTLY_Q5_1", 32, "5-bit blocks of 32 with a minimum", Q5_TOL, 1.5),
    GgufScheme("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", 32, "4-bit blocks of 32, symmetric", Q4_TOL, 3.0),
    GgufScheme("q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1", 32, "4-bit blocks of 32 with a minimum", Q4_TOL, 3.0),
    GgufScheme("q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K", 256, "6-bit K-quant (super-blocks of 256)", Q5_TOL, 1.5),
    GgufScheme("q5_k_m", "LLAMA_FTYPE_MOSTLY_Q5_K_M", 256, "5-bit K-quant mix, llama.cpp's Q5_K_M", Q5_TOL, 1.5),
    GgufScheme("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 256, "4-bit K-quant mix, llama.cpp's Q4_K_M", Q4_TOL, 3.0),
)
_BY_NAME = {s.name: s for s in GGUF_SCHEMES}


class GgufBackend(Backend):
    name = "gguf"
    description = "GGUF file run by llama.cpp (llama-cpp-python), quantized by llama.cpp's own quantizer"
    schemes = tuple(Scheme(s.name, s.description, s.tolerance, GgufOptions) for s in GGUF_SCHEMES)
    artifact_files = (MODEL_FILE,)
    platforms = "CPU"

    def missing_requirements(self) -> list[str]:
        return [f"{pkg} is not installed: {INSTALL_HINT}" for mod, pkg in _REQUIREMENTS.items()
                if importlib.util.find_spec(mod) is None]

    def versions(self) -> dict[str, str]:
        return installed_versions(_REQUIREMENTS.values())

    def unsupported(self, scheme: Scheme, config: ModelConfig) -> str | None:
        block = _BY_NAME[scheme.name].block
        rows = quantized_row_lengths(config)
        bad = sorted({f"{what}={n}" for what, n in rows.items() if n % block})
        if bad:
            kind = "K-quant super-blocks" if block == 256 else "quantization blocks"
            return (f"{scheme.name} needs every weight row to be a multiple of {block} values (llama.cpp's {kind}); "
                    f"this model has rows of {', '.join(bad)}, which llama.cpp would silently store in another type")
        return None

    def convert(self, model: CausalLM, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        if ctx.tokenizer is None:
            raise ConfigError("the gguf backend needs the model's tokenizer: a GGUF file carries its vocabulary",
                              hint="convert a checkpoint folder that holds tokenizer.json, or pass tokenizer=")
        spec, out = _BY_NAME[scheme.name], Path(out)
        rounding = ctx.options.rounding
        if rounding in DEPLOYKIT_ROUNDINGS and spec.name not in GRIDS:
            raise ConfigError(f"gguf/{spec.name}: rounding={rounding} writes Q4_0 and Q4_K blocks only",
                              hint=f"use --quant {' or '.join(GRIDS)} with rounding={'|'.join(DEPLOYKIT_ROUNDINGS)}, "
                                   "or rounding=llama|imatrix")
        if rounding == "imatrix" and spec.block == 1:
            raise ConfigError(f"gguf/{spec.name}: rounding=imatrix needs a quantized scheme, {spec.name} is float",
                              hint="use rounding=imatrix with q8_0, q5_*, q4_* or the K-quants")
        work = out / ".f32"  # the F32 file every quantized scheme starts from; removed below
        facts: dict[str, Any] = {"file": MODEL_FILE, "scheme": spec.name}
        try:
            ctx.progress("writing the F32 GGUF (gguf.GGUFWriter)")
            t0 = time.perf_counter()
            src = out / MODEL_FILE if spec.name == "f32" else work / MODEL_FILE
            facts |= write_gguf(model, ctx.tokenizer, src, source=ctx.source)
            facts["write_seconds"] = round(time.perf_counter() - t0, 2)
            if spec.name != "f32":
                imatrix = None
                if rounding == "imatrix":
                    ctx.progress("collecting the importance matrix on the calibration set")
                    imatrix = importance(model, ctx.calibration)
                    facts |= {"rounding": "imatrix", "imatrix_tensors": len(imatrix),
                              "calibration_tokens": sum(len(s) for s in ctx.calibration)}
                ctx.progress(f"quantizing to {spec.name} (llama_model_quantize{', imatrix' if imatrix else ''})")
                t0 = time.perf_counter()
                quantize(src, out / MODEL_FILE, spec, threads=ctx.threads, imatrix=imatrix)
                facts["quantize_seconds"] = round(time.perf_counter() - t0, 2)
            if rounding in DEPLOYKIT_ROUNDINGS:
                ctx.progress(f"rewriting the {GRIDS[spec.name]} decoder weights with deploykit's {rounding} rounding")
                t0 = time.perf_counter()
                facts |= write_rounded(out / MODEL_FILE, model, rounding, spec.name, ctx.calibration)
                facts["rounding_seconds"] = round(time.perf_counter() - t0, 2)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        path = out / MODEL_FILE
        facts |= file_facts(path, model.config)
        ctx.progress("proving llama.cpp's tokenizer against deploykit's")
        facts["tokenizer_proof"] = prove_tokenizer(path, ctx.tokenizer)
        ctx.progress("measuring KL, top-1 and Δ perplexity against fp32 torch")
        facts["quality"] = q = measure_quality(model, path, ctx.tokenizer, ctx.options, threads=ctx.threads)
        if not abs(q["delta_ppl_pct"]) <= spec.max_delta_ppl_pct:
            raise ParityError(f"gguf/{spec.name}: perplexity on held-out text moved {q['delta_ppl_pct']:+.2f} % "
                              f"({q['ppl_fp32']:.4g} -> {q['ppl']:.4g}), more than the scheme's "
                              f"{spec.max_delta_ppl_pct:g} %", hint="nothing was written; try a scheme with more bits")
        facts["parity_note"] = parity_note(model.config, facts)
        return facts

    def load(self, artifact: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        options = manifest.get("options") or {}
        # deploykit's convert loads the artifact for its parity proof before it seals the manifest
        # ("files" is added after the proof): the proof gets the exact F32 KV cache, serving the option's.
        proving = "files" not in manifest
        kv = "f32" if proving else str(options.get("kv_cache", "f16"))
        return GgufRunner(Path(artifact) / MODEL_FILE, quant=str(manifest.get("quant", "?")), threads=threads,
                          kv_cache=kv, flash_attn=False if proving else bool(options.get("flash_attn", False)))


@hookimpl
def deploykit_backends() -> list[Backend]:
    return [GgufBackend()]


@hookimpl
def deploykit_cli_commands() -> list[Any]:
    return [ImportGguf()]


def quantized_row_lengths(cfg: ModelConfig) -> dict[str, int]:
    """Row lengths (ggml's ne0: the input dimension) of the matrices llama.cpp quantizes: q/k/v, gate/up,
    experts, embeddings and output read d_model values a row, attn_output n_heads*head_dim, down ffn_dim."""
    return {"d_model": cfg.d_model, "n_heads*head_dim": cfg.n_heads * cfg.head_dim, "ffn_dim": cfg.ffn_dim}


def quantize(src: Path, dst: Path, spec: GgufScheme, *, threads: int | None = None,
             imatrix: dict[str, Any] | None = None) -> None:
    """llama.cpp's quantizer: ``src`` (F32 GGUF) -> ``dst`` in ``spec``'s file type; with ``imatrix`` (gguf tensor
    name -> float32 importance per input column, experts concatenated) its importance-weighted quantizers."""
    import ctypes

    import llama_cpp
    import numpy as np

    _quiet_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, spec.ftype)
    params.nthread = threads or 0  # 0: llama.cpp's default (hardware threads)
    keep: list[Any] = []  # the arrays and names the C array points into, alive until the call returns
    if imatrix:
        if not hasattr(llama_cpp, "llama_model_imatrix_data"):  # older llama.cpp: a C++ map pointer, not C
            raise BackendUnavailable(
                f"llama-cpp-python {llama_cpp.__version__} takes the importance matrix as a C++ std::unordered_map "
                "pointer, which Python cannot build", hint="pip install -U llama-cpp-python (0.3.36 or later), or rounding=gptq")
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # NULL-name terminated
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep += [arr, name.encode()]
            entries[i].name, entries[i].size = keep[-1], arr.size
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0 or not dst.is_file():
        raise BackendError(f"llama_model_quantize to {spec.name} failed (returned {code}) for {src}",
                           hint="rerun with DEPLOYKIT_GGUF_VERBOSE=1 to see llama.cpp's log")


def file_facts(path: Path, cfg: ModelConfig) -> dict[str, Any]:
    """Realised size: file bytes x 8 / parameters, and how many tensors llama.cpp stored in each type."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    tensor_bytes = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        tensor_bytes += int(t.n_bytes)
    size = path.stat().st_size
    params = cfg.num_params()
    return {"file_bytes": size, "bits_per_weight": round(size * 8 / params, 3),
            "tensor_bits_per_weight": round(tensor_bytes * 8 / params, 3), "tensor_types": dict(sorted(types.items()))}


# -- deploykit import-gguf ---------------------------------------------------------------------------
IMPORT_EXAMPLES = """\
examples:
  deploykit import-gguf my-model.Q8_0.gguf --out runs/my-model
  deploykit import-gguf artifacts/micro-gguf/model.gguf --out runs/micro-again --force --json
  deploykit bench runs/my-model --backends torch,onnx,gguf

Reads the llama (dense, MoE) and gpt2 architectures with F32, F16, BF16 or Q8_0 tensors (dequantized to
fp32) and a byte-level BPE vocabulary; anything else is refused with the reason and nothing is written.

exit codes: 0 ok, 2 bad input (not a GGUF, truncated, an architecture or tensor type deploykit cannot
            represent, --out exists)"""


@dataclass(frozen=True)
class ImportGguf:
    """``deploykit import-gguf FILE --out CKPT``, contributed through the ``deploykit_cli_commands`` hook."""

    name: str = "import-gguf"
    help: str = "read a llama/gpt2 GGUF file into a Hugging Face checkpoint folder"

    def register(self, sub: Any) -> Any:
        import argparse

        p = sub.add_parser(self.name, help=self.help, epilog=IMPORT_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Read FILE (a GGUF that deploykit can represent) and write its weights, "
                           "config and tokenizer as a checkpoint folder that every deploykit command reads.")
        p.add_argument("file", type=Path, help="the .gguf file")
        p.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
        p.add_argument("--force", action="store_true", help="replace --out if it exists")
        p.add_argument("--json", action="store_true", help="print what was imported as JSON")
        return p

    def run(self, args: Any) -> int:
        facts = import_gguf(args.file, args.out, force=args.force)
        if args.json:
            print(json.dumps(facts, indent=2))
        else:
            print(f"imported {facts['source']} ({facts['architecture']} -> {facts['variant']}, "
                  f"{facts['parameters'] / 1e6:.2f}M parameters, {'/'.join(facts['tensor_types'])} -> fp32; "
                  f"tokenizer: {facts['tokenizer']}) into {facts['out']}")
        return 0
