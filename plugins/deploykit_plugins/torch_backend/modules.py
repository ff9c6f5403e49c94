"""The torch backend's torch side: its int8 modules, calibration, the artifact's tensors both ways, and
the conversions (``Conversions``, one method per scheme). The package's ``TorchBackend`` imports it
when it converts or loads, so that registering the backend imports no torch.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploykit.deploy.backend import ConvertContext, Scheme
from deploykit.deploy.calibrate import resolve_keep_fp32, smooth_quant
from deploykit.deploy.roles import EXPERT, MLP, QUANTIZED, Role, by_parent, linear_roles, select
from deploykit.deploy.torchgraph import (check_module_names, load_tensors, plain_state, quantize_int8, read_layout,
                                         rebuild, restack_experts, save_artifact, set_module, unstack_experts)
from deploykit.errors import ArtifactError, ConfigError
from deploykit.model.config import ModelConfig
from deploykit.model.graph import CausalLM, Experts
from deploykit.model.schema import ListOf, one_of, positive

from . import LAYOUT_FILE, LAYOUT_FORMAT, WEIGHTS


# ---------------------------------------------------------------------------------------------
# int8 building blocks
# ---------------------------------------------------------------------------------------------
def dynamic_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """fbgemm/x86 dynamic int8 Linear with exactly these int8 weights and per-channel scales."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    out_f, in_f = q.shape
    mod = DynamicLinear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
    qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(out_f, dtype=torch.int64), 0)
    mod.set_weight_bias(qweight, None if bias is None else bias.detach().float())
    return mod


class PerTokenInt8Linear(nn.Module):
    """y = (round(x / s_t) ⊗ q_w) · s_t · s_w + b with one activation scale per token, s_t = max|x_t| / 127.

    The scheme of LLM.int8()/SmoothQuant's "per-token" activations: a token's outlier channel costs
    only that token's resolution. The GEMM is ``torch._int_mm`` (oneDNN int8 on CPU).
    """

    def __init__(self, q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("qweight_t", q.t().contiguous())  # (in, out): _int_mm wants (K, N)
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (M, K)
        s = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)  # (M, 1)
        xq = torch.round(x2 / s).to(torch.int8)  # |x / s| <= 127 by construction
        y = torch._int_mm(xq, self.qweight_t).float() * (s * self.w_scale)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class StaticInt8Linear(nn.Module):
    """y = (round(x / s_x) ⊗ q_w) · s_x · s_w + b, with an int8×int8→int32 GEMM (``torch._int_mm``).

    s_x is one activation scale fixed at calibration; values beyond ±127·s_x are clamped.
    """

    def __init__(self, q: torch.Tensor, w_scale: torch.Tensor, act_scale: float, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("qweight_t", q.t().contiguous())  # (in, out): _int_mm wants (K, N)
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("act_scale", torch.tensor(float(act_scale)))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (M, K)
        xq = torch.clamp(torch.round(x2 / self.act_scale), -127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.qweight_t).float() * (self.act_scale * self.w_scale)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class FakeQuantLinear(nn.Module):
    """QAT stand-in: the forward sees int8-rounded weights and activations, gradients pass straight
    through (torch's fake_quantize ops implement the straight-through estimator)."""

    def __init__(self, linear: nn.Linear, act_scale: float) -> None:
        super().__init__()
        self.linear, self.act_scale = linear, float(act_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        scale = (w.detach().abs().amax(dim=1).clamp(min=1e-8) / 127.0).float()
        zeros = torch.zeros(w.shape[0], dtype=torch.int32)
        wq = torch.fake_quantize_per_channel_affine(w, scale, zeros, 0, -127, 127)
        xq = torch.fake_quantize_per_tensor_affine(x, self.act_scale, 0, -127, 127)
        return F.linear(xq, wq, self.linear.bias)


@torch.no_grad()
def calibrate(model: nn.Module, linears: dict[str, nn.Module], calibration: list[list[int]],
              reduce: str = "absmax") -> dict[str, torch.Tensor]:
    """Run calibration text through ``model``; per module, the input statistic per channel (in,).

    ``absmax``: max |x| (activation scales). ``absmean``: mean |x| (channel importance for pruning).
    Modules that saw no tokens (an expert the router never picked) are absent from the result.
    """
    stats: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs()  # (N, in)
            if x.shape[0] == 0:
                return
            if reduce == "absmax":
                v = x.amax(dim=0)
                stats[name] = torch.maximum(stats[name], v) if name in stats else v
            else:
                stats[name] = stats.get(name, 0) + x.sum(dim=0)
                counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in linears.items()]
    try:
        for seq in calibration:
            model(torch.tensor([seq], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    if reduce == "absmean":
        return {k: v / counts[k] for k, v in stats.items()}
    return stats


def act_scales(model: nn.Module, linears: dict[str, nn.Module], calibration: list[list[int]]) -> dict[str, float]:
    if not calibration:
        raise ConfigError("int8-static/int8-qat need calibration sequences", hint="pass calibration=[[ids...], ...]")
    stats = calibrate(model, linears, calibration)
    scales = {k: float(v.max()) / 127.0 for k, v in stats.items()}
    # An expert the calibration text never reached borrows the largest scale of the weights in its role.
    roles = linear_roles(model)
    for name in linears:
        if name not in scales:
            siblings = [s for k, s in scales.items() if roles[k] == roles[name]]
            scales[name] = max(siblings) if siblings else 1.0
    return {k: max(v, 1e-8) for k, v in scales.items()}


# ---------------------------------------------------------------------------------------------
# saving and loading
# ---------------------------------------------------------------------------------------------
def _pack_sparse(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A mostly-zero tensor as a bitmask (1 bit per element) + its non-zero values in order."""
    import numpy as np

    flat = t.detach().float().reshape(-1).numpy()
    mask = flat != 0
    return {"mask": torch.from_numpy(np.packbits(mask)), "values": torch.from_numpy(flat[mask].copy())}


def _unpack_sparse(mask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    import numpy as np

    n = math.prod(shape)
    bits = np.unpackbits(mask.numpy(), count=n).astype(bool)
    dense = np.zeros(n, dtype=np.float32)
    dense[bits] = values.numpy()
    return torch.from_numpy(dense).reshape(shape)


def _save(out: Path, config: ModelConfig, tensors: dict[str, torch.Tensor], layout: dict[str, Any], dtype: str) -> None:
    save_artifact(out, config, tensors, weights=WEIGHTS, layout_file=LAYOUT_FILE, layout=layout,
                  layout_format=LAYOUT_FORMAT, dtype=dtype)


_KINDS = ("hf", "hf-bf16", "sparse", "int8-dynamic", "int8-static")


def load_artifact_model(folder: Path) -> tuple[CausalLM, dict[str, Any]]:
    """Rebuild the (quantised) CausalLM of a torch artifact folder."""
    from deploykit.model.checkpoint import load_model

    layout = read_layout(folder, LAYOUT_FILE, LAYOUT_FORMAT)
    kind = layout.field("kind", str, check=one_of(*_KINDS))
    if kind in ("hf", "hf-bf16"):  # a plain checkpoint folder
        return load_model(folder, dtype=torch.bfloat16 if kind == "hf-bf16" else torch.float32).eval(), layout
    tensors = load_tensors(folder, WEIGHTS)
    if kind == "sparse":
        for name, shape in layout.mapping("packed", ListOf(int), check=_shape).items():
            tensors[name] = _sparse_tensor(folder, tensors, name, shape)
    quantized = layout.object("quantized", default=None) or {}
    per_token = layout.field("activations", str, default="per-tensor", check=one_of("per-tensor", "per-token")) == "per-token"
    act_scales: dict[str, float | None] = {}  # int8-static: each module's calibrated activation scale
    for name in quantized:
        entry = quantized.object(name)
        act_scales[name] = entry.field("act_scale", float, check=positive) if kind == "int8-static" else None
    # int8 experts are one module per expert weight, as convert made them (a no-op for dense models)
    model = rebuild(folder, tensors, quantized, prepare=unstack_experts if kind != "sparse" else None)
    check_module_names(folder, layout, "quantized", quantized, model)
    for name, scale in act_scales.items():
        try:
            q, s = tensors[f"{name}.qweight"], tensors[f"{name}.wscale"]
        except KeyError as e:
            raise ArtifactError(f"{folder}: {WEIGHTS} lacks {e.args[0]}", hint="convert again") from e
        bias = tensors.get(f"{name}.bias")
        if scale is not None:
            mod = StaticInt8Linear(q, s, scale, bias)
        elif per_token:
            mod = PerTokenInt8Linear(q, s, bias)
        else:  # artifacts written before issue 12: fbgemm's per-tensor dynamic activations
            mod = dynamic_linear(q, s, bias)
        set_module(model, name, mod)
    return model.eval(), layout


def _shape(shape: list[int]) -> str | None:
    return None if all(d >= 0 for d in shape) else "must be a tensor shape (sizes >= 0)"


def _sparse_tensor(folder: Path, tensors: dict[str, torch.Tensor], name: str, shape: list[int]) -> torch.Tensor:
    """The dense tensor of a pruned weight from its bitmask and values, refused when they do not fit
    ``shape`` (the bitmask bounds the size, so an edited shape cannot ask for unbounded memory)."""
    mask, values = tensors.pop(f"{name}.mask", None), tensors.pop(f"{name}.values", None)
    if mask is None or values is None:
        raise ArtifactError(f"{folder}: {WEIGHTS} lacks {name}.mask or {name}.values", hint="convert again")
    n = math.prod(shape)
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != (n + 7) // 8 or values.dtype != torch.float32:
        raise ArtifactError(f"{folder}: {LAYOUT_FILE}: packed {name} of shape {shape} does not match its "
                            f"{WEIGHTS} tensors", hint="convert again")
    try:
        return _unpack_sparse(mask, values.reshape(-1), shape)
    except ValueError as e:  # more or fewer values than set bits
        raise ArtifactError(f"{folder}: {WEIGHTS}: {name}.values do not fit its bitmask ({e})",
                            hint="convert again") from e


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
class Conversions:
    """TorchBackend.convert's work, one ``_convert_<scheme>`` per scheme."""

    def convert(self, model: CausalLM, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        return getattr(self, "_convert_" + scheme.name.replace("-", "_"))(model.float().eval(), out, ctx, ctx.options)

    def _convert_fp32(self, model, out, ctx, opts):
        from deploykit.model.checkpoint import to_hf_state_dict

        _save(out, model.config, to_hf_state_dict(model), {"kind": "hf"}, "float32")
        return {"runs": "fp32 eager PyTorch", "transformers_loadable": True}

    def _convert_bf16(self, model, out, ctx, opts):
        from deploykit.model.checkpoint import to_hf_state_dict

        model = model.to(torch.bfloat16)
        _save(out, model.config, to_hf_state_dict(model), {"kind": "hf-bf16"}, "bfloat16")
        return {"runs": "bf16 eager PyTorch (norm statistics in fp32)", "transformers_loadable": True}

    def _int8(self, model, out, ctx, opts, *, kind: str, qat: bool = False):
        cfg = model.config
        info: dict[str, Any] = {}
        if opts.smoothquant and ctx.calibration:
            ctx.progress("SmoothQuant: choosing α on the calibration set")
            info["smoothquant"] = smooth_quant(model, ctx.calibration, alpha=opts.smoothquant_alpha,
                                               activations="per-token" if kind == "int8-dynamic" else "static",
                                               quantize_lm_head=opts.quantize_lm_head)
        elif opts.smoothquant:
            info["smoothquant"] = "skipped: no calibration sequences"
        unstack_experts(model)  # MoE experts become Linear modules like the rest (no-op for dense models)
        linears = select(model, QUANTIZED | ({Role.LM_HEAD} if opts.quantize_lm_head else set()))
        if opts.auto_groups():
            ctx.progress("measuring each layer group's int8 cost on the calibration set (keep_fp32=auto)")
        keep, auto = resolve_keep_fp32(model, list(linears), linear_roles(model), opts, ctx.calibration,
                                       activations="per-token" if kind == "int8-dynamic" else "static",
                                       where=f"torch/{kind}")
        linears = {n: m for n, m in linears.items() if n not in keep}
        if keep:
            info["kept_fp32"] = sorted(keep)
        if auto:
            info["keep_fp32_auto"] = auto
        scales: dict[str, float] = {}
        if kind == "int8-static":
            ctx.progress("calibrating activation scales")
            scales = act_scales(model, linears, ctx.calibration)
            if qat:
                info["qat"] = self._qat(model, linears, scales, ctx, opts)
        tensors = plain_state(model, linears)
        layout: dict[str, Any] = {"kind": kind, "quantized": {}}
        if kind == "int8-dynamic":
            layout["activations"] = "per-token"
        for name, lin in linears.items():
            q, s = quantize_int8(lin.weight)
            tensors[f"{name}.qweight"], tensors[f"{name}.wscale"] = q, s
            if lin.bias is not None:
                tensors[f"{name}.bias"] = lin.bias.detach().float()
            layout["quantized"][name] = {"act_scale": scales[name]} if kind == "int8-static" else {}
        _save(out, cfg, tensors, layout, "int8")
        runs = ("int8×int8→int32 torch._int_mm with per-token dynamic activation scales" if kind == "int8-dynamic"
                else "int8×int8→int32 torch._int_mm with static per-layer activation scales")
        return {"runs": runs, "quantized_modules": len(linears), "fp32_kept": "embeddings, norms, MoE routers"
                + ("" if opts.quantize_lm_head else ", lm_head"), **info}

    def _convert_int8_dynamic(self, model, out, ctx, opts):
        return self._int8(model, out, ctx, opts, kind="int8-dynamic")

    def _convert_int8_static(self, model, out, ctx, opts):
        return self._int8(model, out, ctx, opts, kind="int8-static")

    def _convert_int8_qat(self, model, out, ctx, opts):
        return self._int8(model, out, ctx, opts, kind="int8-static", qat=True)

    def _qat(self, model, linears, scales, ctx, opts) -> dict[str, Any]:
        """Fake-quantised fine-tuning that distils the fp32 model: loss = KL(p_fp32 ‖ p_fakequant)."""
        steps = opts.qat_steps
        if steps == 0:
            return {"steps": 0}
        ctx.progress(f"QAT: {steps} distillation steps")
        teacher = copy.deepcopy(model).eval()
        for name, lin in linears.items():
            set_module(model, name, FakeQuantLinear(lin, scales[name]))
        params = [lin.weight for lin in linears.values()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=opts.qat_lr, weight_decay=0.0)
        # One fixed batch (all calibration rows, cut to a common length) and the teacher's log-probs
        # computed once: the distillation target never changes, so every step sees the same problem.
        # 8 rows of at most 32 tokens: QAT is the slowest scheme, and the keep-best rule below means a
        # small batch can only cost improvement, never parity.
        rows = ctx.calibration[:8]
        length = min(32, *(len(s) for s in rows))
        ids = torch.tensor([s[:length] for s in rows], dtype=torch.long)  # (B, T)
        with torch.no_grad():
            target = F.log_softmax(teacher(ids).float(), dim=-1)  # (B, T, V)
        del teacher
        model.train()
        best = (math.inf, -1, [p.detach().clone() for p in params])
        losses = []
        for step in range(steps + 1):
            logp = F.log_softmax(model(ids).float(), dim=-1)
            loss = F.kl_div(logp, target, log_target=True, reduction="sum") / (ids.shape[0] * ids.shape[1])
            losses.append(float(loss.detach()))
            if losses[-1] < best[0]:  # step 0 is the PTQ starting point: QAT can only improve on it
                best = (losses[-1], step, [p.detach().clone() for p in params])
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            for p, kept in zip(params, best[2]):
                p.copy_(kept)
        model.eval()
        for name, lin in linears.items():
            lin.weight.requires_grad_(False)
            set_module(model, name, lin)
        return {"steps": steps, "lr": opts.qat_lr, "kl_fakequant_start": losses[0], "kl_fakequant_end": losses[-1],
                "kept_step": best[1], "kl_fakequant_kept": best[0]}

    def _convert_prune_l1(self, model, out, ctx, opts):
        import torch.nn.utils.prune as prune

        sparsity = opts.sparsity
        targets = []  # (module, parameter name, deploykit state-dict key): every projection int8 would quantize
        for name, mod in select(model, QUANTIZED | {Role.EXPERTS}).items():
            weights = ("w1", "w2", "w3") if isinstance(mod, Experts) else ("weight",)
            targets += [(mod, w, f"{name}.{w}") for w in weights]
        for mod, pname, _ in targets:
            prune.l1_unstructured(mod, pname, amount=sparsity)
            prune.remove(mod, pname)  # permanent: the zeros are now the weights, no mask/hook left
        tensors = plain_state(model, ())
        packed: dict[str, list[int]] = {}
        for _, _, key in targets:
            t = tensors[key]
            if sparsity > 1 / 32:  # a bitmask costs 1/32 of fp32; below that dense is smaller
                p = _pack_sparse(tensors.pop(key))
                tensors[f"{key}.mask"], tensors[f"{key}.values"] = p["mask"], p["values"]
                packed[key] = list(t.shape)
        total = sum(model.state_dict()[k].numel() for _, _, k in targets)
        zeros = sum(int((model.state_dict()[k] == 0).sum()) for _, _, k in targets)
        _save(out, model.config, tensors, {"kind": "sparse", "packed": packed}, "float32")
        return {"runs": "dense fp32 kernels over zeroed weights (unstructured sparsity gives no CPU speed-up)",
                "sparsity": sparsity, "pruned_fraction": zeros / max(total, 1), "pruned_tensors": len(targets),
                "storage": "bitmask + non-zero values" if packed else "dense"}

    def _convert_prune_structured(self, model, out, ctx, opts):
        from deploykit.model.checkpoint import to_hf_state_dict

        cfg = model.config
        if cfg.variant == "legacy":
            raise ConfigError("torch/prune-structured supports the dense and moe variants, not legacy (GPT-2)",
                              hint="use prune-l1 for legacy models")
        keep = max(8, int(round(cfg.ffn_dim * (1 - opts.sparsity) / 8)) * 8)  # multiples of 8 suit GEMM tiling
        keep = min(keep, cfg.ffn_dim)
        unstack_experts(model)
        # Channel importance: mean |activation| entering each down projection on calibration text, times
        # the norm of the column that reads it (a channel that is large but never read matters little).
        mlps = [group for group in by_parent(linear_roles(model)).values() if set(group) & (MLP | EXPERT)]
        downs = {g.get(Role.MLP_DOWN) or g[Role.EXPERT_DOWN]: g for g in mlps}  # down name -> its MLP's roles
        usage = calibrate(model, {n: model.get_submodule(n) for n in downs}, ctx.calibration, reduce="absmean") \
            if ctx.calibration else {}
        new_cfg = cfg.replace(ffn_dim=keep)
        for name, group in downs.items():
            down = model.get_submodule(name)
            gate = model.get_submodule(group.get(Role.MLP_GATE) or group[Role.EXPERT_GATE])
            up = model.get_submodule(group.get(Role.MLP_UP) or group[Role.EXPERT_UP])
            score = down.weight.detach().norm(dim=0)  # (F,)
            if name in usage:
                score = score * usage[name]
            else:  # never-routed expert: fall back to a weight-only importance
                score = score * gate.weight.detach().norm(dim=1) * up.weight.detach().norm(dim=1)
            idx = torch.topk(score, keep).indices.sort().values
            for lin, dim in ((gate, 0), (up, 0), (down, 1)):
                lin.weight = nn.Parameter(lin.weight.detach().index_select(dim, idx).contiguous())
                lin.in_features, lin.out_features = lin.weight.shape[1], lin.weight.shape[0]
        restack_experts(model)
        model.config = new_cfg
        smaller = CausalLM(new_cfg)  # validates the new config and gives a clean module tree
        smaller.load_state_dict(model.state_dict(), strict=True)
        _save(out, new_cfg, to_hf_state_dict(smaller), {"kind": "hf"}, "float32")
        return {"runs": "fp32 eager PyTorch on the smaller model", "ffn_dim": [cfg.ffn_dim, keep],
                "parameters": [cfg.num_params(), new_cfg.num_params()],
                "heads_pruned": 0, "transformers_loadable": True, "model_config": new_cfg.to_dict()}
