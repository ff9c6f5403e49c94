"""Outlier-aware calibration shared by every int8 backend: SmoothQuant and per-layer sensitivity.

Trained LLMs have a few activation channels that are 10-100x larger than the rest; one int8 scale per
tensor (or per token) must cover them, so every other channel loses resolution. SmoothQuant (Xiao et
al., 2022) moves that range into the weights, which are quantized per output channel and take it
easily: for a linear y = x W^T fed by a norm, with per-input-channel scales s,

    y = (x / s) (W · s)^T,   s_j = max|x_j|^α / max|W_:,j|^(1-α)

and ``x / s`` costs nothing, because the norm's weight (and a LayerNorm's bias) is divided by s. It is
an exact rewrite in fp32 (the tests check the logits within float rounding), done on deploykit's
``CausalLM`` before any backend exports it, so torch, onnx, native (and any later int8 backend) get
the same smoothed weights:

- ``input_layernorm`` → q/k/v projections;
- ``post_attention_layernorm`` → the MLP's gate/up (dense, legacy) or the router and every expert's
  w1/w3 (MoE: the router reads the same normed input, so its columns are scaled too and its logits
  do not move);
- SwiGLU's up projection → down projection: down's input is silu(gate) · up, linear in up's rows;
- the final norm → lm_head, when the lm_head is not tied to the embedding.

α is chosen on the calibration sequences: for each candidate the smoothed model is run with int8
weights (per output channel) and int8 activations simulated the way the backend quantizes them, and
the α with the lowest mean KL to the fp32 logits wins (α = 0 is the unsmoothed model, so smoothing
is kept only where it helps).

A native backend adopts it with one call before it packs weights: ``smooth_quant(model,
ctx.calibration, activations="per-token")``.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..model.graph import CausalLM, Experts
from .options import Int8Options, option

# Candidates for α. The simulated KL on the calibration set preferred 0.75 on the demo micro, but
# 0.75 made the proof's KL 3-4x worse (onnx int8-dynamic 1.2e-3 -> 3.4e-3, torch int8-static
# 2.0e-3 -> 6.9e-3) while 0.5 improved torch int8-static (KL 2.0e-3 -> 1.2e-3, Δppl +0.80 % ->
# -0.32 %): the simulation overfits the few calibration rows it is measured on. So the search stops
# at SmoothQuant's usual 0.5 and only decides whether smoothing helps at all.
ALPHAS = (0.0, 0.5)
ACTIVATIONS = ("per-tensor", "per-token", "static")


@dataclass(frozen=True)
class SmoothQuantOptions(Int8Options):
    """Int8 options of a backend that runs :func:`smooth_quant` before quantizing."""

    # Off by default: every int8 scheme already passes its proof on the trained models without it, it
    # costs a calibration search at convert time, and its gain is mixed (see ALPHAS above and
    # benchmarks/results/quantization_accuracy.md).
    smoothquant: bool = option(False, "SmoothQuant: move activation outliers into the weights before int8")
    smoothquant_alpha: float = option(-1.0, "migration strength in [0, 1]; -1: chosen on the calibration set")
    keep_fp32: str = option("", "comma list of module names or prefixes kept fp32 (model.layers.0, lm_head, "
                                "model.layers.3.mlp.down_proj); a role name (attn_o, mlp_down...) keeps every such layer")

    def check(self) -> list[str]:
        a, out = self.smoothquant_alpha, []
        if not (a == -1.0 or 0.0 <= a <= 1.0):
            out.append(f"smoothquant_alpha={a} must be in [0, 1] or -1 (auto)")
        for item in self.keep_list():
            if not item.replace(".", "").replace("_", "").isalnum():
                out.append(f"keep_fp32: {item!r} is not a module name, prefix or role")
        return out

    def keep_list(self) -> list[str]:
        return [x.strip() for x in self.keep_fp32.split(",") if x.strip()]


def kept_fp32(names: Sequence[str], roles: dict[str, Any], keep: Sequence[str], *, where: str) -> set[str]:
    """The names among ``names`` that ``keep`` (module names, prefixes or Role values) keeps fp32.

    An entry that matches no quantizable module is refused, naming the valid ones: a typo must not
    silently quantize the layer the user meant to keep."""
    out: set[str] = set()
    bad = []
    for item in keep:
        hit = {n for n in names if n == item or n.startswith(item + ".") or getattr(roles.get(n), "value", None) == item}
        if not hit:
            bad.append(item)
        out |= hit
    if bad:
        blocks = sorted({n.split(".self_attn")[0].split(".mlp")[0].split(".block_sparse_moe")[0] for n in names})
        raise ConfigError(f"{where}: keep_fp32 {', '.join(map(repr, bad))} names no quantized module",
                          hint=f"use module names or prefixes ({', '.join(blocks[:3])}, ..., lm_head) or roles "
                               f"({', '.join(sorted({r.value for r in roles.values() if r is not None}))})")
    return out


# ---------------------------------------------------------------------------------------------
# where the scales go: (the norm or linear that divides, the linears that multiply, the input hook)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Site:
    name: str  # the module whose input statistics are read (a linear reading x / s)
    divide: nn.Module  # RMSNorm/LayerNorm (weight, bias) or a Linear (rows): absorbs 1 / s
    multiply: list[Any]  # Linear modules or (Experts, "w1") pairs: columns scaled by s


def _sites(model: CausalLM) -> list[_Site]:
    sites = []
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        a = block.self_attn
        sites.append(_Site(f"{p}.self_attn.q_proj", block.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]))
        if hasattr(block, "block_sparse_moe"):
            moe = block.block_sparse_moe
            if not isinstance(moe.experts, Experts):
                raise ConfigError("smooth_quant runs on stacked experts (before torchgraph.unstack_experts)",
                                  hint="call smooth_quant first, then unstack")
            sites.append(_Site(f"{p}.block_sparse_moe.gate", block.post_attention_layernorm,
                               [moe.gate, (moe.experts, "w1"), (moe.experts, "w3")]))
        else:
            mlp = block.mlp
            first = [mlp.gate_proj, mlp.up_proj] if hasattr(mlp, "gate_proj") else [mlp.up_proj]
            sites.append(_Site(f"{p}.mlp.up_proj", block.post_attention_layernorm, first))
            if hasattr(mlp, "gate_proj"):  # SwiGLU: down reads silu(gate) * up, linear in up's rows
                sites.append(_Site(f"{p}.mlp.down_proj", mlp.up_proj, [mlp.down_proj]))
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        sites.append(_Site("lm_head", model.model.norm, [model.lm_head]))
    return sites


def _weight_absmax(targets: list[Any]) -> torch.Tensor:
    """max |W_:,j| over every row of every target, per input channel j (D,)."""
    cols = []
    for t in targets:
        w = getattr(*t) if isinstance(t, tuple) else t.weight  # (out, D) or (E, F, D)
        cols.append(w.detach().abs().reshape(-1, w.shape[-1]).amax(0))
    return torch.stack(cols).amax(0)


@torch.no_grad()
def input_absmax(model: CausalLM, names: Sequence[str], calibration: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel of each named module, over the calibration sequences."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)  # (D,)
            stats[name] = torch.maximum(stats[name], x) if name in stats else x
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for seq in calibration:
            model(torch.tensor([list(seq)], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def apply_smoothing(model: CausalLM, act_max: dict[str, torch.Tensor], alpha: float) -> int:
    """Fold s = act_max^α / w_max^(1-α) into each site (exact in fp32); returns the sites smoothed."""
    if alpha == 0:
        return 0
    done = 0
    for site in _sites(model):
        if site.name not in act_max:
            continue
        s = (act_max[site.name].clamp(min=1e-5) ** alpha / _weight_absmax(site.multiply).clamp(min=1e-5) ** (1 - alpha))
        s = s.clamp(min=1e-5)  # (D,)
        div = site.divide
        if isinstance(div, nn.Linear):  # rows of up_proj: its outputs (down's inputs after the product) / s
            div.weight.div_(s[:, None])
            if div.bias is not None:
                div.bias.div_(s)
        else:
            div.weight.div_(s)
            if getattr(div, "bias", None) is not None:
                div.bias.div_(s)
        for t in site.multiply:
            w = getattr(*t) if isinstance(t, tuple) else t.weight
            w.mul_(s)  # broadcast over the last (input) dim
        done += 1
    return done


# ---------------------------------------------------------------------------------------------
# choosing α: simulated int8 on the calibration set
# ---------------------------------------------------------------------------------------------
def _fake_int8_weight(w: torch.Tensor) -> torch.Tensor:
    scale = (w.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-12)  # per output channel
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def _fake_int8_act(x: torch.Tensor, activations: str, static: torch.Tensor | None) -> torch.Tensor:
    if activations == "per-token":
        s = x.abs().amax(-1, keepdim=True) / 127.0
    elif activations == "static" and static is not None:
        s = static
    else:
        s = x.abs().amax() / 127.0
    s = s.clamp(min=1e-12)
    return torch.clamp(torch.round(x / s), -127, 127) * s


@torch.no_grad()
def simulated_kl(model: CausalLM, reference: torch.Tensor, batch: torch.Tensor, *, activations: str,
                 keep_fp32: Sequence[str] = (), quantize_lm_head: bool = True) -> float:
    """Mean KL(p_ref ‖ p_int8) on ``batch`` (B, T) of ``model`` with int8-simulated linears."""
    from .roles import QUANTIZED, Role, select
    from .torchgraph import unstack_experts

    work = copy.deepcopy(model).eval()
    unstack_experts(work)
    roles = QUANTIZED | ({Role.LM_HEAD} if quantize_lm_head else set())
    linears = {n: m for n, m in select(work, roles).items() if n not in keep_fp32}
    static: dict[str, torch.Tensor] = {}
    if activations == "static":
        static = {n: v.max() / 127.0 for n, v in input_absmax(work, list(linears), batch.tolist()).items()}
    handles = []
    for name, lin in linears.items():
        lin.weight.copy_(_fake_int8_weight(lin.weight))
        handles.append(lin.register_forward_pre_hook(
            lambda mod, args, n=name: (_fake_int8_act(args[0], activations, static.get(n)),)))
    try:
        logits = work(batch).float()
    finally:
        for h in handles:
            h.remove()
    lp, lq = F.log_softmax(reference, -1), F.log_softmax(logits, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _batch(calibration: Sequence[Sequence[int]], rows: int = 4) -> torch.Tensor:
    rows_ = [list(s) for s in calibration[:rows] if len(s) >= 2]
    if not rows_:
        raise ConfigError("SmoothQuant needs calibration token sequences (ctx.calibration), got none of length >= 2",
                          hint="deploykit convert draws them from the calibration text; pass calibration=[[ids...]]")
    n = min(len(s) for s in rows_)
    return torch.tensor([s[:n] for s in rows_], dtype=torch.long)  # (B, T)


@torch.no_grad()
def smooth_quant(model: CausalLM, calibration: Sequence[Sequence[int]], *, alpha: float = -1.0,
                 activations: str = "per-tensor", quantize_lm_head: bool = True,
                 alphas: Sequence[float] = ALPHAS) -> dict[str, Any]:
    """Smooth ``model`` in place (exact in fp32) for int8 with ``activations`` quantized per tensor,
    per token or with static scales; α chosen on ``calibration`` when ``alpha`` is -1. Returns facts
    for the manifest: the α, the sites smoothed and the simulated KL per candidate α."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"smooth_quant: activations={activations!r} must be one of {', '.join(ACTIVATIONS)}")
    model.eval()
    batch = _batch(calibration)
    act_max = input_absmax(model, [s.name for s in _sites(model)], calibration)
    reference = model(batch).float()
    tried: dict[str, float] = {}
    if alpha == -1.0:
        for a in alphas:
            trial = copy.deepcopy(model)
            apply_smoothing(trial, act_max, a)
            tried[f"{a:g}"] = simulated_kl(trial, reference, batch, activations=activations,
                                           quantize_lm_head=quantize_lm_head)
        alpha = float(min(tried, key=tried.__getitem__))
    sites = apply_smoothing(model, act_max, alpha)
    return {"alpha": alpha, "sites": sites, "activations": activations, "simulated_kl": tried}


@torch.no_grad()
def layer_sensitivity(model: CausalLM, calibration: Sequence[Sequence[int]], *, activations: str = "per-tensor",
                      quantize_lm_head: bool = True) -> dict[str, float]:
    """Simulated int8 KL to fp32 with one layer group at a time kept fp32 (lower: that group costs more).

    Groups: ``lm_head`` and each block (``model.layers.N``). Returns {"none": KL all int8, group: KL}.
    """
    from .roles import QUANTIZED, Role, select

    batch = _batch(calibration)
    reference = model.eval()(batch).float()
    names = list(select(model, QUANTIZED | {Role.LM_HEAD}))
    out = {"none": simulated_kl(model, reference, batch, activations=activations, quantize_lm_head=quantize_lm_head)}
    groups = [f"model.layers.{i}" for i in range(len(model.model.layers))] + (["lm_head"] if quantize_lm_head else [])
    for g in groups:
        keep = [n for n in names if n == g or n.startswith(g + ".")]
        # stacked experts are unstacked inside simulated_kl: keep their per-expert names too
        keep += [f"{g}.block_sparse_moe.experts.{e}.{w}" for e in range(model.config.n_experts or 0)
                 for w in ("w1", "w2", "w3")]
        out[g] = simulated_kl(model, reference, batch, activations=activations, keep_fp32=keep,
                              quantize_lm_head=quantize_lm_head)
    return out
