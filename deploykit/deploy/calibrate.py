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
from .options import _AUTO, SmoothQuantOptions, kept_fp32  # noqa: F401  (re-exported: defined beside Int8Options)

# Candidates for α. The simulated KL on the calibration set preferred 0.75 on the demo micro, but
# 0.75 made the proof's KL 3-4x worse (onnx int8-dynamic 1.2e-3 -> 3.4e-3, torch int8-static
# 2.0e-3 -> 6.9e-3) while 0.5 improved torch int8-static (KL 2.0e-3 -> 1.2e-3, Δppl +0.80 % ->
# -0.32 %): the simulation overfits the few calibration rows it is measured on. So the search stops
# at SmoothQuant's usual 0.5 and only decides whether smoothing helps at all.
ALPHAS = (0.0, 0.5)
ACTIVATIONS = ("per-tensor", "per-token", "static")


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
            if args[0].numel() == 0:  # an expert the router sent no token to in this call
                return
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
def _flat_copy(model: CausalLM) -> CausalLM:
    """A copy with every MoE layer's experts as one Linear per weight (a backend may have unstacked
    them already: its copy stays as it is)."""
    from .torchgraph import unstack_experts

    work = copy.deepcopy(model)
    if any(isinstance(moe.experts, Experts) for moe in work.moe_layers()):
        unstack_experts(work)
    return work


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


class Int8Simulation:
    """A flat fp32 copy of a model in which every quantizable linear runs with int8-rounded weights (per
    output channel) and int8-simulated activations (``activations``: per tensor, per token, or static
    scales from ``batch``'s max |x|), except those named kept fp32 in each :meth:`kl` call.

    One copy and one set of rounded weights serve every call, so measuring a few dozen keep-sets costs
    a few dozen forwards (not a deep copy each). Use it as a context manager: it removes its hooks."""

    def __init__(self, model: CausalLM, batch: torch.Tensor, *, activations: str, quantize_lm_head: bool = True) -> None:
        from .roles import QUANTIZED, Role, select

        if activations not in ACTIVATIONS:
            raise ConfigError(f"int8 simulation: activations={activations!r} must be one of {', '.join(ACTIVATIONS)}")
        self.work, self.batch, self.activations = _flat_copy(model).eval(), batch, activations
        self.linears = dict(select(self.work, QUANTIZED | ({Role.LM_HEAD} if quantize_lm_head else set())))
        self.static: dict[str, torch.Tensor] = {}
        if activations == "static":  # fp32 input ranges, as a backend's calibration measures them
            self.static = {n: v.max() / 127.0 for n, v in input_absmax(self.work, list(self.linears), batch.tolist()).items()}
        self.fp32 = {n: lin.weight.detach().clone() for n, lin in self.linears.items()}
        self.int8 = {n: _fake_int8_weight(lin.weight.detach()) for n, lin in self.linears.items()}
        self.kept: frozenset[str] = frozenset()
        self.handles = [lin.register_forward_pre_hook(self._hook(n)) for n, lin in self.linears.items()]

    def _hook(self, name: str):
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor] | None:
            if name in self.kept:
                return None
            return (_fake_int8_act(args[0], self.activations, self.static.get(name)),)
        return fn

    @torch.no_grad()
    def kl(self, reference: torch.Tensor, keep_fp32: Sequence[str] = ()) -> float:
        """Mean KL(p_ref ‖ p_int8) over ``batch`` with the modules ``keep_fp32`` left fp32."""
        self.kept = frozenset(keep_fp32)
        for n, lin in self.linears.items():
            lin.weight.copy_(self.fp32[n] if n in self.kept else self.int8[n])
        logits = self.work(self.batch).float()  # (B, T, V)
        lp, lq = F.log_softmax(reference, -1), F.log_softmax(logits, -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    def __enter__(self) -> Int8Simulation:
        return self

    def __exit__(self, *_exc: object) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def simulated_kl(model: CausalLM, reference: torch.Tensor, batch: torch.Tensor, *, activations: str,
                 keep_fp32: Sequence[str] = (), quantize_lm_head: bool = True) -> float:
    """Mean KL(p_ref ‖ p_int8) on ``batch`` (B, T) of ``model`` with int8-simulated linears."""
    with Int8Simulation(model, batch, activations=activations, quantize_lm_head=quantize_lm_head) as sim:
        return sim.kl(reference, keep_fp32)


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


# ---------------------------------------------------------------------------------------------
# keep_fp32=auto: the layer groups whose int8 costs most, measured on the calibration set
# ---------------------------------------------------------------------------------------------
# A group is one block's projections of one kind, or the lm_head: fine enough to keep only what
# costs (micro-moe int8-static: block 0's expert down projections alone carry ~90 % of the proof's
# KL, the rest of block 0 almost nothing), coarse enough that the search is a few dozen simulated
# forwards (4 groups per block + 1).
def _families() -> dict[str, frozenset[Any]]:
    from .roles import Role

    return {"attn_qkv": frozenset({Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V}), "attn_o": frozenset({Role.ATTN_O}),
            "mlp_in": frozenset({Role.MLP_GATE, Role.MLP_UP, Role.EXPERT_GATE, Role.EXPERT_UP}),
            "mlp_down": frozenset({Role.MLP_DOWN, Role.EXPERT_DOWN}), "lm_head": frozenset({Role.LM_HEAD})}


def layer_group(name: str, role: Any) -> str | None:
    """The group of a quantizable module: ``model.layers.N.<attn_qkv|attn_o|mlp_in|mlp_down>`` or
    ``lm_head`` (None: not a module int8 quantizes, e.g. a router). Every backend's names map the same
    way (the onnx backend's stacked ``...experts.w2`` is its layer's mlp_down like torch's
    ``...experts.E.w2``)."""
    family = next((f for f, roles in _families().items() if role in roles), None)
    if family is None or family == "lm_head":
        return family
    parts = name.split(".")
    if len(parts) < 3 or parts[:2] != ["model", "layers"]:
        return None
    return f"model.layers.{parts[2]}.{family}"


@torch.no_grad()
def group_costs(model: CausalLM, calibration: Sequence[Sequence[int]], *, activations: str,
                quantize_lm_head: bool = True, rows: int = 8,
                float_roles: frozenset[Any] = frozenset()) -> tuple[float, dict[str, float]]:
    """Simulated int8 on the calibration set: (KL with every group int8, {group: its cost}), where a
    group's cost is how much the KL drops when that group alone stays fp32 (larger: costs more).

    ``float_roles``: roles the backend never quantizes (tflite and onnx keep MoE expert down
    projections float): fp32 in every simulation, and no group of theirs is ranked."""
    from .roles import linear_roles

    batch = _batch(calibration, rows)
    model.eval()
    reference = model(batch).float()  # (B, T, V)
    with Int8Simulation(model, batch, activations=activations, quantize_lm_head=quantize_lm_head) as sim:
        roles = linear_roles(sim.work)  # group members by the per-expert names the simulation quantizes
        fixed = {n for n in sim.linears if roles[n] in float_roles}
        members: dict[str, list[str]] = {}
        for name in sim.linears:
            if name not in fixed and (g := layer_group(name, roles[name])) is not None:
                members.setdefault(g, []).append(name)
        base = sim.kl(reference, fixed)
        return base, {g: base - sim.kl(reference, fixed | set(names)) for g, names in members.items()}


def resolve_keep_fp32(model: CausalLM, names: Sequence[str], roles: dict[str, Any], opts: SmoothQuantOptions,
                      calibration: Sequence[Sequence[int]], *, activations: str, where: str,
                      float_roles: frozenset[Any] = frozenset()) -> tuple[set[str], dict[str, Any]]:
    """The names among ``names`` (a backend's quantizable modules, ``roles`` their Role) kept fp32 by
    ``opts.keep_fp32``, and the facts for the manifest.

    Explicit entries resolve through :func:`kept_fp32`. ``auto:N`` measures every layer group's cost
    (:func:`group_costs`, simulated with the backend's ``activations``) on ``calibration`` and keeps
    the N costliest (only groups whose fp32 copy lowers the KL). Run it after any SmoothQuant rewrite,
    so the costs are those of the model actually quantized. ``float_roles``: see :func:`group_costs`."""
    keep = kept_fp32(names, roles, [x for x in opts.keep_list() if not _AUTO.fullmatch(x)], where=where)
    n = opts.auto_groups()
    if n == 0:
        return keep, {}
    if not calibration:
        raise ConfigError(f"{where}: keep_fp32=auto measures layer costs on calibration sequences, got none",
                          hint="deploykit convert draws them from the calibration text; or name the layers")
    base, costs = group_costs(model, calibration, activations=activations, quantize_lm_head=opts.quantize_lm_head,
                              float_roles=float_roles)
    ranked = sorted(costs, key=costs.__getitem__, reverse=True)
    chosen = [g for g in ranked[:n] if costs[g] > 0]
    picked = {m for m in names if layer_group(m, roles.get(m)) in chosen}
    facts = {"mode": f"auto:{n}", "activations": activations, "simulated_kl_all_int8": base,
             **({"always_float": sorted(r.value for r in float_roles)} if float_roles else {}),
             "kept_groups": {g: costs[g] for g in chosen}, "modules": sorted(picked),
             "costliest": {g: costs[g] for g in ranked[:8]}}
    return keep | picked, facts
