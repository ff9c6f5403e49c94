"""The ``torch`` backend: the model run by PyTorch itself, full precision, bf16, int8 and pruned.

Artifacts are pickle-free: ``config.json`` + ``model.safetensors`` + ``torch_quant.json`` (the layout:
which modules are quantised or packed, and how). The runner rebuilds deploykit's graph from them and
swaps in the quantised modules, so every scheme decodes with the same KV cache (``TorchSession``).

What runs, per scheme (stated in the manifest too):

- ``fp32``, ``prune-structured``: a plain transformers-compatible checkpoint (``LlamaForCausalLM`` /
  ``MixtralForCausalLM`` can load the folder).
- ``bf16``: bf16 weights and activations (norms and softmax statistics in fp32, as in Llama).
- ``int8-dynamic``: int8 per-channel weights; activations quantised per call by fbgemm/x86
  (``torch.ao.nn.quantized.dynamic.Linear``) — measured faster than torchao's int8 paths on this CPU.
- ``int8-static``: int8 weights and an int8 activation scale per layer fixed from calibration text;
  ``torch._int_mm`` (int8×int8→int32 GEMM) with the result rescaled to fp32.
- ``int8-qat``: ``int8-static``'s format and kernels, after a few steps of fake-quantised fine-tuning
  that distils the fp32 model (KL to its logits) so the weights adapt to int8 rounding.
- ``prune-l1``: unstructured magnitude pruning, made permanent; pruned tensors stored as a bitmask +
  the non-zero values, so the file shrinks with sparsity. Runs dense kernels (no speed-up on CPU).

Embeddings, norms and MoE routers stay fp32 in every int8 scheme: they are a small share of the
compute, and quantising a router can flip expert choices, which costs far more than it saves.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploykit.deploy.backend import EXACT, HALF, INT8, LOSSY, Backend, ConvertContext, Runner, Scheme
from deploykit.deploy.hookspecs import hookimpl
from deploykit.errors import ArtifactError, ConfigError

LAYOUT_FILE = "torch_quant.json"
WEIGHTS = "model.safetensors"
LAYOUT_FORMAT = 1

# Tolerances are the shared tiers. Measured on trained nano / nano-moe models (tests/conftest.py), the
# int8 schemes sit well inside INT8 and pruning inside LOSSY; a broken scale or transposed weight is
# far outside (see tests/test_torch_backend.py::test_broken_quantizer_fails_parity).
SCHEMES = (
    Scheme("fp32", "full precision, the reference; a transformers-loadable checkpoint", EXACT),
    Scheme("bf16", "bfloat16 weights and activations (half the size)", HALF),
    Scheme("int8-dynamic", "int8 per-channel weights, activations quantised per call (fbgemm)", INT8),
    Scheme("int8-static", "int8 weights + static int8 activation scales from calibration (torch._int_mm)", INT8),
    Scheme("int8-qat", "int8-static after a few steps of fake-quantised distillation", INT8),
    Scheme("prune-l1", "unstructured magnitude pruning (option sparsity, default 0.3), bitmask-packed", LOSSY),
    Scheme("prune-structured", "MLP channels removed by importance (option sparsity, default 0.25): smaller matrices",
           LOSSY),
)

# Options each scheme accepts (--option key=value): name -> (type, default, rule text, check).
_OPTIONS: dict[str, dict[str, tuple[type, Any, str, Callable[[Any], bool]]]] = {
    "int8-dynamic": {"quantize_lm_head": (bool, True, "true/false", lambda v: True)},
    "int8-static": {"quantize_lm_head": (bool, True, "true/false", lambda v: True)},
    "int8-qat": {"quantize_lm_head": (bool, True, "true/false", lambda v: True),
                 "qat_steps": (int, 10, "an integer >= 0", lambda v: v >= 0),
                 "qat_lr": (float, 1e-5, "a float > 0", lambda v: v > 0)},
    "prune-l1": {"sparsity": (float, 0.3, "a fraction in [0, 1)", lambda v: 0 <= v < 1)},
    "prune-structured": {"sparsity": (float, 0.25, "a fraction in [0, 1)", lambda v: 0 <= v < 1)},
}


def _options(scheme: str, given: dict[str, Any]) -> dict[str, Any]:
    """Typed options for ``scheme``; strings from the CLI are parsed here, unknown keys rejected."""
    spec = _OPTIONS.get(scheme, {})
    unknown = sorted(set(given) - set(spec))
    if unknown:
        valid = ", ".join(f"{k} ({rule}, default {d})" for k, (_, d, rule, _c) in spec.items()) or "none"
        raise ConfigError(f"torch/{scheme}: unknown option(s) {', '.join(unknown)}", hint=f"valid options: {valid}")
    out = {}
    for key, (typ, default, rule, check) in spec.items():
        value = given.get(key, default)
        try:
            if typ is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            else:
                value = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"torch/{scheme}: option {key}={given.get(key)!r} must be {rule}") from None
        if not check(value):
            raise ConfigError(f"torch/{scheme}: option {key}={value!r} must be {rule}")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# MoE experts as ordinary Linear modules
# ---------------------------------------------------------------------------------------------
class ExpertMLP(nn.Module):
    def __init__(self, w1: nn.Module, w2: nn.Module, w3: nn.Module) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ExpertList(nn.ModuleList):
    """Stand-in for ``model.Experts`` with one Linear per expert weight (``experts.{e}.w1``, Mixtral's names).

    Quantisation, calibration hooks and pruning then treat expert weights like any other Linear.
    Implements ``expert(e, x)``, which MoE's default (sorted) dispatch calls.
    """

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self[e](x)


def unstack_experts(model: nn.Module) -> None:
    for moe in model.moe_layers():
        w = moe.experts
        E, Fd, D = w.w1.shape

        def lin(weight: torch.Tensor, out_f: int, in_f: int) -> nn.Linear:
            layer = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
            layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            return layer

        moe.experts = ExpertList(ExpertMLP(lin(w.w1[e], Fd, D), lin(w.w2[e], D, Fd), lin(w.w3[e], Fd, D))
                                 for e in range(E))


def restack_experts(model: nn.Module) -> None:
    from deploykit.model.graph import Experts

    for moe in model.moe_layers():
        if isinstance(moe.experts, ExpertList):
            mods = list(moe.experts)
            Fd, D = mods[0].w1.weight.shape
            stacked = Experts(len(mods), D, Fd)
            for name in ("w1", "w2", "w3"):
                setattr(stacked, name, nn.Parameter(torch.stack([getattr(m, name).weight.detach() for m in mods])))
            moe.experts = stacked


def target_linears(model: nn.Module, *, lm_head: bool) -> dict[str, nn.Linear]:
    """The Linear modules int8 schemes quantise: attention, MLP/expert projections (+ lm_head)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("model.layers.") and not name.endswith("block_sparse_moe.gate"):
            out[name] = mod
    if lm_head:
        out["lm_head"] = model.lm_head
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---------------------------------------------------------------------------------------------
# int8 building blocks
# ---------------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w (out, in) -> q int8 (out, in), scale fp32 (out,)."""
    scale = w.detach().abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.clamp(torch.round(w.detach() / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale.float()


def dynamic_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """fbgemm/x86 dynamic int8 Linear with exactly these int8 weights and per-channel scales."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    out_f, in_f = q.shape
    mod = DynamicLinear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
    qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(out_f, dtype=torch.int64), 0)
    mod.set_weight_bias(qweight, None if bias is None else bias.detach().float())
    return mod


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
    # An expert the calibration text never reached borrows the largest scale of its siblings' same weight.
    for name in linears:
        if name not in scales:
            suffix = name.rsplit(".", 1)[-1]
            siblings = [s for k, s in scales.items() if k.endswith("." + suffix)]
            scales[name] = max(siblings) if siblings else 1.0
    return {k: max(v, 1e-8) for k, v in scales.items()}


# ---------------------------------------------------------------------------------------------
# saving and loading
# ---------------------------------------------------------------------------------------------
def _save(out: Path, config: Any, tensors: dict[str, torch.Tensor], layout: dict[str, Any], dtype: str) -> None:
    from safetensors.torch import save_file

    from deploykit.model.checkpoint import to_hf_config

    hf = to_hf_config(config)
    hf["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / LAYOUT_FILE).write_text(json.dumps({"format": LAYOUT_FORMAT, **layout}, indent=2) + "\n")


def _plain_state(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """fp32 tensors of everything not in a quantised module (deploykit names, tied lm_head dropped)."""
    out = {}
    for k, v in model.state_dict().items():
        if any(k == s or k.startswith(s + ".") for s in skip):
            continue
        if k == "lm_head.weight" and model.config.tie_embeddings and "lm_head" not in skip:
            continue
        out[k] = v.detach().float()
    return out


def _pack_sparse(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A mostly-zero tensor as a bitmask (1 bit per element) + its non-zero values in order."""
    import numpy as np

    flat = t.detach().float().reshape(-1).numpy()
    mask = flat != 0
    return {"mask": torch.from_numpy(np.packbits(mask)), "values": torch.from_numpy(flat[mask].copy())}


def _unpack_sparse(mask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    import numpy as np

    n = int(np.prod(shape))
    bits = np.unpackbits(mask.numpy(), count=n).astype(bool)
    dense = np.zeros(n, dtype=np.float32)
    dense[bits] = values.numpy()
    return torch.from_numpy(dense).reshape(shape)


def load_artifact_model(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (quantised) CausalLM of a torch artifact folder."""
    from safetensors.torch import load_file

    from deploykit.model.checkpoint import load_config, load_model
    from deploykit.model.graph import CausalLM

    try:
        layout = json.loads((folder / LAYOUT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{folder}: unreadable {LAYOUT_FILE} ({e})", hint="convert again") from e
    kind = layout.get("kind")
    if kind in ("hf", "hf-bf16"):  # a plain checkpoint folder
        return load_model(folder, dtype=torch.bfloat16 if kind == "hf-bf16" else torch.float32), layout
    cfg = load_config(folder)
    tensors = load_file(str(folder / WEIGHTS))
    with torch.device("meta"):
        model = CausalLM(cfg)
    if cfg.is_moe and kind in ("int8-dynamic", "int8-static"):
        unstack_experts(model)  # quantised experts are one module per expert weight
    if kind == "sparse":
        for name, shape in layout["packed"].items():
            tensors[name] = _unpack_sparse(tensors.pop(f"{name}.mask"), tensors.pop(f"{name}.values"), shape)
    elif kind not in ("int8-dynamic", "int8-static"):
        raise ArtifactError(f"{folder}: {LAYOUT_FILE} kind {kind!r} is unknown to this deploykit", hint="convert again")
    quantized = layout.get("quantized", {})
    # Plain tensors first: quantised modules have their own state-dict format, so they are built
    # from their tensors afterwards rather than through load_state_dict.
    plain = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in quantized)}
    missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)
               and not any(k.startswith(n + ".") for n in quantized)]
    if missing or unexpected:
        raise ArtifactError(f"{folder}: {WEIGHTS} does not match its layout: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}", hint="convert again")
    model.finish_meta_load()  # tied head and rotary buffer; a quantised lm_head replaces the tied one below
    for name, entry in quantized.items():
        try:
            q, s = tensors[f"{name}.qweight"], tensors[f"{name}.wscale"]
        except KeyError as e:
            raise ArtifactError(f"{folder}: {WEIGHTS} lacks {e.args[0]}", hint="convert again") from e
        bias = tensors.get(f"{name}.bias")
        mod = dynamic_linear(q, s, bias) if kind == "int8-dynamic" else StaticInt8Linear(q, s, entry["act_scale"], bias)
        _set_module(model, name, mod)
    return model.eval(), layout


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch eager: fp32 reference, bf16, int8 (dynamic/static/QAT), pruning"
    schemes = SCHEMES
    artifact_files = ("config.json", WEIGHTS, LAYOUT_FILE)
    platforms = "CPU"

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine}

    def missing_requirements(self) -> list[str]:
        return []  # torch is a core dependency; int8 kernels are in every CPU wheel (fbgemm/x86)

    # -- convert -------------------------------------------------------------------------------
    def convert(self, model: Any, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        opts = _options(scheme.name, ctx.options)
        model = model.float().eval()
        if ctx.threads:
            torch.set_num_threads(ctx.threads)
        return getattr(self, "_convert_" + scheme.name.replace("-", "_"))(model, out, ctx, opts)

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
        if cfg.is_moe:
            unstack_experts(model)
        linears = target_linears(model, lm_head=opts["quantize_lm_head"])
        scales: dict[str, float] = {}
        info: dict[str, Any] = {}
        if kind == "int8-static":
            ctx.progress("calibrating activation scales")
            scales = act_scales(model, linears, ctx.calibration)
            if qat:
                info["qat"] = self._qat(model, linears, scales, ctx, opts)
        tensors = _plain_state(model, set(linears))
        layout: dict[str, Any] = {"kind": kind, "quantized": {}}
        for name, lin in linears.items():
            q, s = quantize_weight(lin.weight)
            tensors[f"{name}.qweight"], tensors[f"{name}.wscale"] = q, s
            if lin.bias is not None:
                tensors[f"{name}.bias"] = lin.bias.detach().float()
            layout["quantized"][name] = {"act_scale": scales[name]} if kind == "int8-static" else {}
        _save(out, cfg, tensors, layout, "int8")
        runs = ("fbgemm/x86 dynamic int8 Linear (torch.ao.nn.quantized.dynamic)" if kind == "int8-dynamic"
                else "int8×int8→int32 torch._int_mm with static per-layer activation scales")
        return {"runs": runs, "quantized_modules": len(linears), "fp32_kept": "embeddings, norms, MoE routers"
                + ("" if opts["quantize_lm_head"] else ", lm_head"), **info}

    def _convert_int8_dynamic(self, model, out, ctx, opts):
        return self._int8(model, out, ctx, opts, kind="int8-dynamic")

    def _convert_int8_static(self, model, out, ctx, opts):
        return self._int8(model, out, ctx, opts, kind="int8-static")

    def _convert_int8_qat(self, model, out, ctx, opts):
        return self._int8(model, out, ctx, opts, kind="int8-static", qat=True)

    def _qat(self, model, linears, scales, ctx, opts) -> dict[str, Any]:
        """Fake-quantised fine-tuning that distils the fp32 model: loss = KL(p_fp32 ‖ p_fakequant)."""
        steps = opts["qat_steps"]
        if steps == 0:
            return {"steps": 0}
        ctx.progress(f"QAT: {steps} distillation steps")
        teacher = copy.deepcopy(model).eval()
        for name, lin in linears.items():
            _set_module(model, name, FakeQuantLinear(lin, scales[name]))
        params = [lin.weight for lin in linears.values()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=opts["qat_lr"], weight_decay=0.0)
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
            losses.append(float(loss))
            if float(loss) < best[0]:  # step 0 is the PTQ starting point: QAT can only improve on it
                best = (float(loss), step, [p.detach().clone() for p in params])
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
            _set_module(model, name, lin)
        return {"steps": steps, "lr": opts["qat_lr"], "kl_fakequant_start": losses[0], "kl_fakequant_end": losses[-1],
                "kept_step": best[1], "kl_fakequant_kept": best[0]}

    def _convert_prune_l1(self, model, out, ctx, opts):
        import torch.nn.utils.prune as prune

        sparsity = opts["sparsity"]
        targets = []  # (module, parameter name, deploykit state-dict key)
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.startswith("model.layers.") and not name.endswith("block_sparse_moe.gate"):
                targets.append((mod, "weight", f"{name}.weight"))
            elif type(mod).__name__ == "Experts":
                targets += [(mod, w, f"{name}.{w}") for w in ("w1", "w2", "w3")]
        for mod, pname, _ in targets:
            prune.l1_unstructured(mod, pname, amount=sparsity)
            prune.remove(mod, pname)  # permanent: the zeros are now the weights, no mask/hook left
        tensors = _plain_state(model, set())
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
        from deploykit.model.graph import CausalLM

        cfg = model.config
        if cfg.variant == "legacy":
            raise ConfigError("torch/prune-structured supports the dense and moe variants, not legacy (GPT-2)",
                              hint="use prune-l1 for legacy models")
        keep = max(8, int(round(cfg.ffn_dim * (1 - opts["sparsity"]) / 8)) * 8)  # multiples of 8 suit GEMM tiling
        keep = min(keep, cfg.ffn_dim)
        if cfg.is_moe:
            unstack_experts(model)
        # Channel importance: mean |activation| entering down_proj/w2 on calibration text, times the
        # norm of the column that reads it (a channel that is large but never read matters little).
        downs = {n: m for n, m in model.named_modules() if n.endswith((".mlp.down_proj", ".w2"))}
        usage = calibrate(model, downs, ctx.calibration, reduce="absmean") if ctx.calibration else {}
        new_cfg = cfg.replace(ffn_dim=keep)
        for name, down in downs.items():
            parent = model.get_submodule(name.rpartition(".")[0])
            gate, up = (parent.gate_proj, parent.up_proj) if hasattr(parent, "gate_proj") else (parent.w1, parent.w3)
            score = down.weight.detach().norm(dim=0)  # (F,)
            if name in usage:
                score = score * usage[name]
            else:  # never-routed expert: fall back to a weight-only importance
                score = score * gate.weight.detach().norm(dim=1) * up.weight.detach().norm(dim=1)
            idx = torch.topk(score, keep).indices.sort().values
            for lin, dim in ((gate, 0), (up, 0), (down, 1)):
                lin.weight = nn.Parameter(lin.weight.detach().index_select(dim, idx).contiguous())
                lin.in_features, lin.out_features = lin.weight.shape[1], lin.weight.shape[0]
        if cfg.is_moe:
            restack_experts(model)
        model.config = new_cfg
        smaller = CausalLM(new_cfg)  # validates the new config and gives a clean module tree
        smaller.load_state_dict(model.state_dict(), strict=True)
        _save(out, new_cfg, to_hf_state_dict(smaller), {"kind": "hf"}, "float32")
        return {"runs": "fp32 eager PyTorch on the smaller model", "ffn_dim": [cfg.ffn_dim, keep],
                "parameters": [cfg.num_params(), new_cfg.num_params()],
                "heads_pruned": 0, "transformers_loadable": True, "model_config": new_cfg.to_dict()}

    # -- load ----------------------------------------------------------------------------------
    def load(self, artifact: Path, manifest: dict[str, Any], **options: Any) -> Runner:
        from deploykit.deploy.runtime import ModelRunner, load_tokenizer, set_threads

        threads = options.pop("threads", None)
        if options:
            raise ConfigError(f"torch runner: unknown option(s) {', '.join(sorted(options))}", hint="valid: threads")
        set_threads(threads)
        model, layout = load_artifact_model(Path(artifact))
        files = {p.name: p.stat().st_size for p in Path(artifact).iterdir() if p.is_file()}
        return ModelRunner(model, tokenizer=load_tokenizer(Path(artifact)), info={
            "backend": "torch", "quant": manifest.get("quant"), "layout": layout.get("kind"),
            "files": files, "bytes": files.get(WEIGHTS, 0), "threads": torch.get_num_threads(),
            "parameters": model.config.num_params()})


@hookimpl
def deploykit_backends() -> list[Backend]:
    return [TorchBackend()]
