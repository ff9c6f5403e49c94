"""The ``native`` backend: deploykit's own graph with its linears run by the fused int8 C++ kernels.

The core graph stays torch (embeddings, norms, RoPE, attention, the KV cache, the decode loop); the
backend walks a deploykit ``CausalLM`` and swaps modules for ``deploykit.native`` ones:

- ``int8`` (dense and legacy models): every attention projection, every MLP linear and, by default,
  the lm_head become ``Int8Linear`` (int8 per-output-channel weights prepacked for the kernel,
  activations quantised per row on every call, bias fused into the epilogue). A SwiGLU MLP becomes
  one ``Int8SwiGLU``: gate and up share one kernel call whose epilogue computes ``silu(g) * u``.
- ``int8-moe`` (MoE models): attention as above; each MoE layer keeps its fp32 router (an int8
  router could flip expert choices, which costs far more than it saves) and runs top-k routing,
  grouping and the int8 SwiGLU experts in one native ``moe_ffn`` call.

Artifact (pickle-free): ``config.json`` (the model config, transformers style), ``native.safetensors``
(the prepacked int8 panels, scales and column sums via ``PackedInt8Weight.to_tensors`` /
``PackedMoEExperts.to_tensors``, plus the fp32 tensors that stay fp32) and ``native_layout.json``
(which module is packed as what). Loading rebuilds the module tree from the packed tensors; nothing
is re-quantised or re-packed. The packed layout is the same for every ISA variant, so an artifact
converted on an AVX-512 machine runs on an AVX2 or scalar one.

The kernels follow ``torch.get_num_threads()`` (``threads=`` when loading sets it), and
``DEPLOYKIT_NATIVE_ISA=scalar|avx2|avx512vnni`` forces a variant for the whole process.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deploykit.deploy.backend import INT8, Backend, ConvertContext, Runner, Scheme
from deploykit.deploy.hookspecs import hookimpl
from deploykit.errors import ArtifactError, BackendError, ConfigError

WEIGHTS = "native.safetensors"
LAYOUT_FILE = "native_layout.json"
LAYOUT_FORMAT = 1
BUILD_HINT = ("build the extension: `pip install --no-build-isolation -e .` (or `make setup`) in the deploykit "
              "checkout, with a C++17 compiler and CMake >= 3.18 installed")

# INT8 is the declared tier for both schemes. Measured on the trained nano / nano-moe fixtures
# (tests/test_native_backend.py prints them) the artifacts sit far inside it: max |Δlogit| ~0.1,
# top-1 >= 0.98, KL ~1e-4; a doubled weight scale (the classic packing bug) lands outside it.
SCHEMES = (
    Scheme("int8", "dense/legacy models: fused int8 linears (per-token activations, SwiGLU epilogue), "
           "C++ kernels with run-time ISA dispatch", INT8),
    Scheme("int8-moe", "MoE models: int8 attention + native top-k routing and int8 experts (moe_ffn)", INT8),
)
_KINDS = {"int8": ("dense", "legacy"), "int8-moe": ("moe",)}
# Options: name -> (default, rule). lm_head is quantised by default: on trained nano it moves
# max |Δlogit| from ~0.05 to ~0.1 and keeps top-1 >= 0.98 (measured), for a large decode win on
# models whose vocab is the biggest matrix.
_OPTIONS = {"quantize_lm_head": (True, "true/false")}


def _options(scheme: str, given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(_OPTIONS))
    if unknown:
        valid = ", ".join(f"{k} ({rule}, default {d})" for k, (d, rule) in _OPTIONS.items())
        raise ConfigError(f"native/{scheme}: unknown option(s) {', '.join(unknown)}", hint=f"valid options: {valid}")
    out = {}
    for key, (default, rule) in _OPTIONS.items():
        value = given.get(key, default)
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"native/{scheme}: option {key}={value!r} must be {rule}")
            value = value.lower() in ("true", "1", "yes")
        out[key] = bool(value)
    return out


# ---------------------------------------------------------------------------------------------
# runtime modules
# ---------------------------------------------------------------------------------------------
class NativeMoE(nn.Module):
    """Stand-in for ``deploykit.model.graph.MoE``: fp32 router, then routing + int8 experts in one native call.

    Routing follows ``route_top_k`` (Mixtral): top-k of the router logits, softmax over the chosen k.
    ``last_experts`` / ``last_counts`` (read by the bench harness) are derived lazily from the last
    router logits, so decoding pays nothing for them; like MoE's, they are last-writer-wins.
    """

    def __init__(self, gate: nn.Linear, experts: Any, top_k: int) -> None:
        super().__init__()
        self.gate = gate
        self.n_experts, self.top_k = gate.out_features, int(top_k)
        self.d_model, self.d_ff = experts.d_model, experts.d_ff
        for n in ("w13", "s13", "c13", "w2", "s2", "c2"):
            self.register_buffer(n, getattr(experts, n))
        self.last_aux_loss = None  # inference only: no load-balancing loss
        self._last_logits: torch.Tensor | None = None

    @property
    def experts_packed(self) -> Any:
        from deploykit.native import PackedMoEExperts

        return PackedMoEExperts(self.w13, self.s13, self.c13, self.w2, self.s2, self.c2, self.d_model, self.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deploykit.native import moe_ffn

        logits = self.gate(x)  # (B, T, E) fp32 router
        if not torch.compiler.is_compiling():
            self._last_logits = logits.detach()
        return moe_ffn(x, logits, self.experts_packed, self.top_k)  # (B, T, D)

    @property
    def last_experts(self) -> torch.Tensor | None:
        lg = self._last_logits
        return None if lg is None else torch.topk(lg.reshape(-1, self.n_experts), self.top_k, dim=-1).indices

    @property
    def last_counts(self) -> torch.Tensor | None:
        ex = self.last_experts
        return None if ex is None else torch.bincount(ex.reshape(-1), minlength=self.n_experts)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}, d_model={self.d_model}, d_ff={self.d_ff}, int8"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def plan(model: nn.Module, *, lm_head: bool) -> dict[str, str]:
    """Which module becomes what: name -> "linear" | "swiglu" | "moe" (deploykit module names)."""
    cfg = model.config
    out: dict[str, str] = {}
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{proj}"] = "linear"
        if cfg.variant == "moe":
            out[f"{p}.block_sparse_moe"] = "moe"
        elif cfg.variant == "legacy":  # GELU MLP: two biased linears, GELU stays torch
            out[f"{p}.mlp.up_proj"] = out[f"{p}.mlp.down_proj"] = "linear"
        else:
            out[f"{p}.mlp"] = "swiglu"
    if lm_head:
        out["lm_head"] = "linear"
    return out


def _packed_prefix(name: str, kind: str) -> str:
    """State-dict prefix a packed entry replaces (an MoE layer keeps its fp32 router)."""
    return f"{name}.experts" if kind == "moe" else name


def pack_tensors(model: nn.Module, layout: dict[str, str]) -> dict[str, torch.Tensor]:
    """Quantise and prepack every planned module: the safetensors entries of the packed weights."""
    from deploykit import native

    out: dict[str, torch.Tensor] = {}
    for name, kind in layout.items():
        mod = model.get_submodule(name)
        if kind == "linear":
            out.update(native.pack_int8_weight(mod.weight).to_tensors(name))
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.detach().float()
        elif kind == "swiglu":
            for lin_name in ("gate_proj", "up_proj", "down_proj"):
                if getattr(mod, lin_name).bias is not None:
                    raise BackendError(f"native: {name}.{lin_name} has a bias; the fused SwiGLU kernel packs "
                                       "bias-free gate/up/down projections", hint="this model is not a deploykit SwiGLU MLP")
            out.update(native.pack_int8_swiglu(mod.gate_proj.weight, mod.up_proj.weight).to_tensors(f"{name}.gate_up"))
            out.update(native.pack_int8_weight(mod.down_proj.weight).to_tensors(f"{name}.down"))
        else:  # moe: stacked w1, w3 (E, F, D), w2 (E, D, F)
            ex = mod.experts
            out.update(native.pack_moe_experts(ex.w1.detach(), ex.w3.detach(), ex.w2.detach()).to_tensors(f"{name}.experts"))
    return out


def install(model: nn.Module, layout: dict[str, str], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Swap the planned modules of ``model`` for native ones built from packed ``tensors`` (no re-packing)."""
    from deploykit import native

    for name, kind in layout.items():
        if kind == "linear":
            mod: nn.Module = native.Int8Linear(native.PackedInt8Weight.from_tensors(tensors, name), tensors.get(f"{name}.bias"))
        elif kind == "swiglu":
            mod = native.Int8SwiGLU(native.PackedInt8Weight.from_tensors(tensors, f"{name}.gate_up"),
                                    native.PackedInt8Weight.from_tensors(tensors, f"{name}.down"))
        elif kind == "moe":
            old = model.get_submodule(name)
            mod = NativeMoE(old.gate, native.PackedMoEExperts.from_tensors(tensors, f"{name}.experts"), old.top_k)
        else:
            raise ArtifactError(f"{LAYOUT_FILE}: module {name!r} has kind {kind!r}, unknown to this deploykit",
                                hint="convert again with this version of deploykit")
        _set_module(model, name, mod)
    # Every linear that should run int8 does: a module the plan missed (a model change) fails loudly
    # here instead of silently running fp32 and flattering the benchmark.
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and not n.endswith("block_sparse_moe.gate") and n != "lm_head"]
    if left:
        raise BackendError(f"native: fp32 Linear modules left after the swap: {', '.join(left[:4])}",
                           hint="the native backend does not know this module layout; report it")
    return model


def _plain_state(model: nn.Module, layout: dict[str, str]) -> dict[str, torch.Tensor]:
    """fp32 tensors not covered by a pack (embeddings, norms, routers, an unquantised lm_head)."""
    prefixes = [_packed_prefix(n, k) for n, k in layout.items()]
    out = {}
    for key, value in model.state_dict().items():
        if any(key.startswith(p + ".") for p in prefixes):
            continue
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue  # tied: the embedding is stored once, re-tied on load
        out[key] = value.detach().float().contiguous()
    return out


def load_native_model(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the native CausalLM of an artifact folder from its packed tensors."""
    from safetensors.torch import load_file

    from deploykit.model.checkpoint import load_config
    from deploykit.model.graph import CausalLM

    try:
        layout = json.loads((folder / LAYOUT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{folder}: unreadable {LAYOUT_FILE} ({e})", hint="convert again") from e
    if layout.get("format") != LAYOUT_FORMAT:
        raise ArtifactError(f"{folder / LAYOUT_FILE}: format {layout.get('format')!r}, this deploykit reads "
                            f"{LAYOUT_FORMAT}", hint="convert again with this version of deploykit")
    cfg = load_config(folder)
    tensors = load_file(str(folder / WEIGHTS))
    modules: dict[str, str] = layout["modules"]
    with torch.device("meta"):
        model = CausalLM(cfg)
    prefixes = [_packed_prefix(n, k) for n, k in modules.items()]
    plain = {k: v for k, v in tensors.items() if not any(k.startswith(p + ".") for p in prefixes)}
    missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)
               and not any(k.startswith(p + ".") for p in prefixes)]
    if missing or unexpected:
        raise ArtifactError(f"{folder}: {WEIGHTS} does not match {LAYOUT_FILE}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}", hint="convert again")
    model.finish_meta_load()  # tied head and rotary buffer; a packed lm_head replaces the tied one below
    try:
        install(model, modules, tensors)
    except KeyError as e:
        raise ArtifactError(f"{folder}: {WEIGHTS} lacks {e.args[0]}", hint="convert again") from e
    except ValueError as e:  # from_tensors: sizes or layout version do not match
        raise ArtifactError(f"{folder}: {WEIGHTS}: {e}", hint="convert again with this version of deploykit") from e
    return model.eval(), layout


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
class NativeBackend(Backend):
    name = "native"
    description = "deploykit's graph on its own fused int8 C++ kernels (AVX-512 VNNI/AVX2/scalar) and MoE routing"
    schemes = SCHEMES
    artifact_files = ("config.json", WEIGHTS, LAYOUT_FILE)
    platforms = "CPU (x86-64; portable scalar fallback)"

    def unsupported(self, scheme: Scheme, config: Any) -> str | None:
        if config.variant in _KINDS[scheme.name]:
            return None
        return f"native/{scheme.name} runs {' and '.join(_KINDS[scheme.name])} models; this model is {config.variant!r}"

    def missing_requirements(self) -> list[str]:
        from deploykit import native

        if native.available():
            return []
        return [f"the native kernels are not built ({native.unavailable_reason()}): {BUILD_HINT}"]

    def versions(self) -> dict[str, str]:
        from deploykit import native

        if not native.available():
            return {"torch": torch.__version__, "native": "unavailable"}
        s = native.cpu_summary()
        return {"torch": torch.__version__, "native_isa": s["isa"], "native_supported_isas": ",".join(s["supported_isas"]),
                "cpu": s["cpu"], "cpu_flags": s["cpu_flags"]}

    def convert(self, model: Any, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        from safetensors.torch import save_file

        from deploykit import native
        from deploykit.model.checkpoint import to_hf_config
        from deploykit.model.graph import CausalLM

        if not isinstance(model, CausalLM):
            raise BackendError(f"native convert expects a deploykit CausalLM, got {type(model).__name__}",
                               hint="pass a checkpoint folder or a deploykit CausalLM to deploykit.convert")
        cfg = model.config
        reason = self.unsupported(scheme, cfg)
        if reason:
            right = next(s for s, kinds in _KINDS.items() if cfg.variant in kinds)
            raise BackendError(reason, hint=f"use --quant {right} for {cfg.variant} models")
        opts = _options(scheme.name, ctx.options)
        model = model.float().eval()
        if ctx.threads:
            torch.set_num_threads(ctx.threads)
        ctx.progress("quantising and prepacking int8 weights")
        modules = plan(model, lm_head=opts["quantize_lm_head"])
        with torch.no_grad():
            tensors = {**_plain_state(model, modules), **pack_tensors(model, modules)}
        hf = to_hf_config(cfg)
        hf["dtype"] = "int8"
        (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
        layout = {"format": LAYOUT_FORMAT, "scheme": scheme.name, "quantize_lm_head": opts["quantize_lm_head"],
                  "modules": modules}
        (out / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n")
        counts = {k: sum(1 for v in modules.values() if v == k) for k in ("linear", "swiglu", "moe")}
        kept = "embeddings, norms" + (", MoE routers" if cfg.is_moe else "") + ("" if opts["quantize_lm_head"] else ", lm_head")
        return {"runs": "deploykit graph (torch attention/norms/KV cache) with deploykit.native._native fused int8 kernels"
                + (" and native MoE routing" if cfg.is_moe else ""),
                "packed_modules": counts, "quantize_lm_head": opts["quantize_lm_head"], "fp32_kept": kept,
                "isa_at_convert": native.cpu_summary()["isa"]}

    def load(self, artifact: Path, manifest: dict[str, Any], **options: Any) -> Runner:
        from deploykit import native
        from deploykit.deploy.runtime import ModelRunner, load_tokenizer, set_threads

        if not native.available():
            from deploykit.errors import BackendUnavailable

            raise BackendUnavailable(f"{artifact}: native artifacts need the compiled kernels "
                                     f"({native.unavailable_reason()})", hint=BUILD_HINT)
        threads = options.pop("threads", None)
        if options:
            raise ConfigError(f"native runner: unknown option(s) {', '.join(sorted(options))}", hint="valid: threads")
        set_threads(threads)
        artifact = Path(artifact)
        model, layout = load_native_model(artifact)
        files = {p.name: p.stat().st_size for p in artifact.iterdir() if p.is_file()}
        s = native.cpu_summary()
        # ModelRunner: thread-safe (weights only read, each session owns its KV cache; the kernels'
        # thread pool serialises concurrent jobs) and decodes with deploykit's KV cache.
        return ModelRunner(model, tokenizer=load_tokenizer(artifact), info={
            "backend": "native", "quant": manifest.get("quant", layout.get("scheme")), "isa": s["isa"],
            "threads": torch.get_num_threads(), "quantize_lm_head": layout.get("quantize_lm_head"),
            "files": files, "bytes": files.get(WEIGHTS, 0), "parameters": model.config.num_params()})


@hookimpl
def deploykit_backends() -> list[Backend]:
    return [NativeBackend()]
