"""The native backend's torch side: the module swap a conversion makes, and the torch graph it loads back.

- ``plan`` / ``pack_tensors`` / ``round_int4``: which modules become what, and their packed safetensors
  entries (int8 via ``deploykit.native.kernels``, int4 via ``deploykit.native.int4`` after GPTQ or RTN);
- ``install`` / ``load_native_model``: a CausalLM with the native modules built from packed tensors (the
  readable reference the C++ engine is tested against: ``EngineRunner.reference()``);
- ``engine_tensors``: the engine's tensor dict from such a model (the engine's own loader,
  ``deploykit_plugins.native_backend.engine_arrays``, reads the artifact without torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deploykit.deploy.roles import ATTENTION, MLP, QUANTIZED, Role, by_parent, linear_roles
from deploykit.deploy.torchgraph import check_module_names, load_tensors, read_layout, rebuild, set_module
from deploykit.errors import ArtifactError, BackendError
from deploykit.model.graph import CausalLM, MoE, SwiGLU
from deploykit.model.schema import one_of

from . import LAYOUT_FILE, LAYOUT_FORMAT, WEIGHTS


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


def plan(model: CausalLM, *, lm_head: bool, bits: int = 8) -> dict[str, str]:
    """Which module becomes what: name -> "linear" | "swiglu" | "moe" (+ "linear4" | "swiglu4" when bits=4).

    By role: attention projections (and the lm_head) become Int8Linear; a SwiGLU MLP (gate, up and
    down) one fused Int8SwiGLU; the legacy GELU MLP's two linears Int8Linear each (GELU stays torch);
    an MoE layer's stacked experts one NativeMoE beside its fp32 router. With bits=4 every decoder linear
    is int4 (Int4Linear / Int4SwiGLU) and the lm_head, the one layer whose rows are read as logits, int8.
    """
    roles = linear_roles(model)
    suffix = "4" if bits == 4 else ""
    out: dict[str, str] = {}
    for parent, group in by_parent(roles).items():
        if set(group) == set(MLP):
            out[parent] = "swiglu" + suffix
            continue
        for role, name in group.items():
            if role is Role.LM_HEAD and lm_head:
                out[name] = "linear"
            elif role in ATTENTION or role in (Role.MLP_UP, Role.MLP_DOWN):
                out[name] = "linear" + suffix
            elif role is Role.EXPERTS:
                out[parent] = "moe"  # the block_sparse_moe module: router + experts
    return out


def _packed_prefix(name: str, kind: str) -> str:
    """State-dict prefix a packed entry replaces (an MoE layer keeps its fp32 router)."""
    return f"{name}.experts" if kind == "moe" else name


def _check_bias_free(name: str, mod: nn.Module) -> None:
    for lin_name in ("gate_proj", "up_proj", "down_proj"):
        if getattr(mod, lin_name).bias is not None:
            raise BackendError(f"native: {name}.{lin_name} has a bias; the fused SwiGLU kernel packs "
                               "bias-free gate/up/down projections", hint="this model is not a deploykit SwiGLU MLP")


def int4_linears(layout: dict[str, str]) -> list[str]:
    """The nn.Linear names an int4 layout rounds to 4 bits (a SwiGLU MLP's three projections each)."""
    out = []
    for name, kind in layout.items():
        if kind == "linear4":
            out.append(name)
        elif kind == "swiglu4":
            out += [f"{name}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return out


def round_int4(model: nn.Module, layout: dict[str, str], rounding: str, calibration: list[list[int]],
               damp: float = 0.01) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(q, scales) on the Q4_0 grid of every int4 linear: GPTQ from the calibration set, or round to nearest."""
    from deploykit.deploy import gptq

    names = int4_linears(layout)
    if rounding == "rtn":
        return {n: gptq.rtn(model.get_submodule(n).weight) for n in names}
    hessians = gptq.collect_hessians(model, names, calibration)
    return {n: gptq.gptq(model.get_submodule(n).weight, hessians[n], damp=damp) for n in names}


def _pack4(rounded: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str, mod: nn.Module,
           kind: str) -> dict[str, torch.Tensor]:
    from deploykit.native.int4 import pack_int4_weight

    if kind == "linear4":
        out = pack_int4_weight(*rounded[name]).to_tensors(name)
        if mod.bias is not None:
            out[f"{name}.bias"] = mod.bias.detach().float()
        return out
    _check_bias_free(name, mod)
    (qg, sg), (qu, su) = rounded[f"{name}.gate_proj"], rounded[f"{name}.up_proj"]
    return {**pack_int4_weight(torch.cat([qg, qu]), torch.cat([sg, su]), swiglu=True).to_tensors(f"{name}.gate_up"),
            **pack_int4_weight(*rounded[f"{name}.down_proj"]).to_tensors(f"{name}.down")}


def pack_tensors(model: nn.Module, layout: dict[str, str],
                 rounded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Quantise and prepack every planned module: the safetensors entries of the packed weights.

    ``rounded``: the (q, scales) of every int4 linear (:func:`round_int4`), needed when the layout has any."""
    from deploykit import native

    out: dict[str, torch.Tensor] = {}
    for name, kind in layout.items():
        mod = model.get_submodule(name)
        if kind in ("linear4", "swiglu4"):
            if rounded is None:
                raise BackendError("native: an int4 layout needs its rounded weights", hint="call round_int4 first")
            out.update(_pack4(rounded, name, mod, kind))
        elif kind == "linear":
            out.update(native.pack_int8_weight(mod.weight).to_tensors(name))
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.detach().float()
        elif kind == "swiglu":
            _check_bias_free(name, mod)
            out.update(native.pack_int8_swiglu(mod.gate_proj.weight, mod.up_proj.weight).to_tensors(f"{name}.gate_up"))
            out.update(native.pack_int8_weight(mod.down_proj.weight).to_tensors(f"{name}.down"))
        else:  # moe: stacked w1, w3 (E, F, D), w2 (E, D, F)
            ex = mod.experts
            out.update(native.pack_moe_experts(ex.w1.detach(), ex.w3.detach(), ex.w2.detach()).to_tensors(f"{name}.experts"))
    return out


def install(model: nn.Module, layout: dict[str, str], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Swap the planned modules of ``model`` for native ones built from packed ``tensors`` (no re-packing)."""
    from deploykit import native
    from deploykit.native import int4

    for name, kind in layout.items():
        if kind == "linear4":
            mod: nn.Module = int4.Int4Linear(int4.PackedInt4Weight.from_tensors(tensors, name), tensors.get(f"{name}.bias"))
        elif kind == "swiglu4":
            mod = int4.Int4SwiGLU(int4.PackedInt4Weight.from_tensors(tensors, f"{name}.gate_up"),
                                  int4.PackedInt4Weight.from_tensors(tensors, f"{name}.down"))
        elif kind == "linear":
            mod = native.Int8Linear(native.PackedInt8Weight.from_tensors(tensors, name), tensors.get(f"{name}.bias"))
        elif kind == "swiglu":
            mod = native.Int8SwiGLU(native.PackedInt8Weight.from_tensors(tensors, f"{name}.gate_up"),
                                    native.PackedInt8Weight.from_tensors(tensors, f"{name}.down"))
        elif kind == "moe":
            old = model.get_submodule(name)
            mod = NativeMoE(old.gate, native.PackedMoEExperts.from_tensors(tensors, f"{name}.experts"), old.top_k)
        else:
            raise ArtifactError(f"{LAYOUT_FILE}: module {name!r} has kind {kind!r}, unknown to this deploykit",
                                hint="convert again with this version of deploykit")
        set_module(model, name, mod)
    # Every projection that should run int8 does: a module the plan missed (a model change) fails loudly
    # here instead of silently running fp32 and flattering the benchmark.
    left = [n for n, r in linear_roles(model).items() if r in QUANTIZED and isinstance(model.get_submodule(n), nn.Linear)]
    if left:
        raise BackendError(f"native: fp32 Linear modules left after the swap: {', '.join(left[:4])}",
                           hint="the native backend does not know this module layout; report it")
    return model


# What each packed kind replaces in deploykit's graph (a layout naming another module is refused).
_MODULE_KINDS: dict[str, type[nn.Module]] = {"linear": nn.Linear, "swiglu": SwiGLU, "moe": MoE,
                                             "linear4": nn.Linear, "swiglu4": SwiGLU}


def load_native_model(folder: Path) -> tuple[CausalLM, dict[str, Any]]:
    """Rebuild the native CausalLM of an artifact folder from its packed tensors (nothing is re-packed)."""
    layout = read_layout(folder, LAYOUT_FILE, LAYOUT_FORMAT)
    modules: dict[str, str] = layout.mapping("modules", str, check=one_of(*_MODULE_KINDS))
    layout.field("scheme", str, default=None)
    layout.field("quantize_lm_head", bool, default=None)
    tensors = load_tensors(folder, WEIGHTS)
    model = rebuild(folder, tensors, [_packed_prefix(n, k) for n, k in modules.items()])
    check_module_names(folder, layout, "modules", modules, model)
    for name, kind in modules.items():
        if not isinstance(model.get_submodule(name), _MODULE_KINDS[kind]):
            layout.fail("modules", f"packs {name!r} as {kind!r}, but it is a {type(model.get_submodule(name)).__name__}",
                        hint="the layout does not belong to this config.json; convert again")
    try:
        install(model, modules, tensors)
    except KeyError as e:
        raise ArtifactError(f"{folder}: {WEIGHTS} lacks {e.args[0]}", hint="convert again") from e
    except ValueError as e:  # from_tensors: sizes or layout version do not match
        raise ArtifactError(f"{folder}: {WEIGHTS}: {e}", hint="convert again with this version of deploykit") from e
    return model.eval(), layout


# ---------------------------------------------------------------------------------------------
# the C++ decode engine over the installed modules' tensors
# ---------------------------------------------------------------------------------------------
def _pack(prefix: str, packed: Any, scales: Any, colsum: Any, bias: Any = None) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.packed": packed, f"{prefix}.scales": scales, f"{prefix}.colsum": colsum}
    if bias is not None:
        out[f"{prefix}.bias"] = bias
    return out


def _linear(prefix: str, mod: nn.Module) -> dict[str, torch.Tensor]:
    if not hasattr(mod, "colsum"):  # Int4Linear: nibbles and group scales
        return {f"{prefix}.packed": mod.packed, f"{prefix}.scales": mod.scales,
                **({} if mod.bias is None else {f"{prefix}.bias": mod.bias})}
    return _pack(prefix, mod.packed, mod.scales, mod.colsum, mod.bias)


def engine_tensors(model: CausalLM) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) for ``deploykit.native.engine.Engine`` from a model with native modules installed.

    The tensors are the modules' own (the artifact's packed buffers as loaded): the engine and the torch
    path share one copy of the weights, and the torch modules stay the reference the engine is tested against.
    """
    from deploykit import native
    from deploykit.native.int4 import Int4Linear

    cfg = model.config
    legacy = cfg.variant == "legacy"
    lm_int8 = isinstance(model.lm_head, native.Int8Linear)
    bits = 4 if isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear) else 8
    config = {"variant": cfg.variant, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
              "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "ffn_dim": cfg.ffn_dim,
              "max_seq_len": cfg.max_seq_len, "norm_eps": cfg.norm_eps, "n_experts": cfg.n_experts,
              "top_k": cfg.top_k, "lm_head_int8": lm_int8, "weight_bits": bits}
    dec = model.model
    t: dict[str, torch.Tensor] = {"embed": dec.embed_tokens.weight, "norm.w": dec.norm.weight}
    if legacy:
        t["pos_embed"], t["norm.b"] = dec.embed_positions.weight, dec.norm.bias
    else:
        t["rope.inv_freq"] = model.inv_freq
    t.update(_linear("lm_head", model.lm_head) if lm_int8 else {"lm_head.w": model.lm_head.weight})
    for i, blk in enumerate(dec.layers):
        p = f"layers.{i}."
        t[p + "ln1.w"], t[p + "ln2.w"] = blk.input_layernorm.weight, blk.post_attention_layernorm.weight
        if legacy:
            t[p + "ln1.b"], t[p + "ln2.b"] = blk.input_layernorm.bias, blk.post_attention_layernorm.bias
        at = blk.self_attn
        for short, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            t.update(_linear(p + short, getattr(at, name)))
        if cfg.variant == "dense":
            m = blk.mlp
            if bits == 4:
                t.update({p + "gate_up.packed": m.gate_up_packed, p + "gate_up.scales": m.gate_up_scales,
                          p + "down.packed": m.down_packed, p + "down.scales": m.down_scales})
            else:
                t.update(_pack(p + "gate_up", m.gate_up_packed, m.gate_up_scales, m.gate_up_colsum))
                t.update(_pack(p + "down", m.down_packed, m.down_scales, m.down_colsum))
        elif legacy:
            t.update(_linear(p + "up", blk.mlp.up_proj))
            t.update(_linear(p + "down", blk.mlp.down_proj))
        else:
            moe = blk.block_sparse_moe
            t[p + "router.w"] = moe.gate.weight
            for n, buf in (("w13", "w13"), ("s13", "s13"), ("c13", "c13"), ("w2", "w2"), ("s2", "s2"), ("c2", "c2")):
                t[f"{p}experts.{n}"] = getattr(moe, buf)
    return config, {k: v.detach().contiguous() for k, v in t.items()}
