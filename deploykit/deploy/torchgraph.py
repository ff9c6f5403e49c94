"""Plumbing for backends whose runner is deploykit's own torch graph with some modules swapped.

The torch and native backends (and any backend that keeps the graph in torch) write the same kind of
artifact: ``config.json`` (transformers-style, plus deploykit's exact config), one safetensors file
holding the fp32 tensors that stay fp32 and the backend's packed tensors, and a small JSON layout
saying which module became what. Loading rebuilds the graph on the meta device, fills the plain
tensors and lets the backend install its modules. This module is that shared path:

- :func:`quantize_int8` — symmetric per-output-channel int8 weights;
- :func:`unstack_experts` / :func:`restack_experts` — MoE experts as one ``nn.Linear`` per weight;
- :func:`set_module`, :func:`plain_state` — swapping modules and the tensors that stay fp32;
- :func:`save_artifact`, :func:`read_layout` (from ``deploy.artifact``, which readers without torch use),
  :func:`load_tensors`, :func:`rebuild` — the artifact's files both ways.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ArtifactError
from ..model.checkpoint import CONFIG_NAME, check_config_fits, load_config, to_hf_config
from ..model.config import ModelConfig
from ..model.graph import CausalLM, Experts
from ..model.schema import JsonObject, short_repr
from .artifact import load_arrays, read_layout  # noqa: F401  (read_layout: re-exported)


# -- weights ---------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w (out, in) -> q int8 (out, in) in [-127, 127], scale fp32 (out,).

    scale = max|w_row| / 127, q = round-half-to-even(w / scale). An all-zero row gets a tiny scale
    instead of 0, so dequantising and runtimes that divide by the scale never see 0/0.
    """
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


# -- MoE experts as ordinary Linear modules ----------------------------------------------------------
class ExpertMLP(nn.Module):
    """One SwiGLU expert as three Linear modules, Mixtral's names: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, w1: nn.Module, w2: nn.Module, w3: nn.Module) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ExpertList(nn.ModuleList):
    """Stand-in for ``model.graph.Experts`` with one module per expert (``experts.{e}.w1``...).

    Quantisation, calibration hooks and pruning then treat expert weights like any other Linear.
    Implements ``expert(e, x)``, which MoE's default (sorted) dispatch calls.
    """

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self[e](x)


def unstack_experts(model: CausalLM) -> None:
    """Replace each MoE layer's stacked experts with an :class:`ExpertList`, in place (same weights)."""
    for moe in model.moe_layers():
        w = moe.experts
        E, Fd, D = w.w1.shape

        def lin(weight: torch.Tensor, out_f: int, in_f: int) -> nn.Linear:
            layer = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
            layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            return layer

        moe.experts = ExpertList(ExpertMLP(lin(w.w1[e], Fd, D), lin(w.w2[e], D, Fd), lin(w.w3[e], Fd, D))
                                 for e in range(E))


def restack_experts(model: CausalLM) -> None:
    """The inverse of :func:`unstack_experts` (experts must still be plain Linear modules)."""
    for moe in model.moe_layers():
        if isinstance(moe.experts, ExpertList):
            mods = list(moe.experts)
            Fd, D = mods[0].w1.weight.shape
            stacked = Experts(len(mods), D, Fd)
            for name in ("w1", "w2", "w3"):
                setattr(stacked, name, nn.Parameter(torch.stack([getattr(m, name).weight.detach() for m in mods])))
            moe.experts = stacked


# -- swapping modules --------------------------------------------------------------------------------
def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model.get_submodule(name)`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _under(key: str, prefixes: set[str]) -> bool:
    """``key`` is one of ``prefixes`` or lies under one (a dotted-name prefix). A set lookup per dot, not a scan
    of the prefixes per key: loads filter every tensor against every replaced module (786 x 181 on a
    30-layer model)."""
    if key in prefixes:
        return True
    dot = key.find(".")
    while dot != -1:
        if key[:dot] in prefixes:
            return True
        dot = key.find(".", dot + 1)
    return False


def plain_state(model: CausalLM, replaced: Iterable[str]) -> dict[str, torch.Tensor]:
    """fp32 tensors of every module not under a ``replaced`` prefix (deploykit names).

    A tied lm_head is left out: the embedding is stored once and re-tied when the graph is rebuilt.
    """
    replaced = set(replaced)
    out = {}
    for key, value in model.state_dict().items():
        if _under(key, replaced) or (key == "lm_head.weight" and model.config.tie_embeddings):
            continue
        out[key] = value.detach().float().contiguous()
    return out


# -- the artifact's files ------------------------------------------------------------------------------
def save_artifact(out: Path, config: ModelConfig, tensors: dict[str, torch.Tensor], *, weights: str,
                  layout_file: str, layout: dict[str, Any], layout_format: int, dtype: str) -> None:
    """Write config.json (``dtype`` recorded for transformers), the safetensors file and the layout JSON."""
    from safetensors.torch import save_file

    hf = to_hf_config(config)
    hf["dtype"] = dtype
    (out / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / weights), metadata={"format": "pt"})
    (out / layout_file).write_text(json.dumps({"format": layout_format, **layout}, indent=2) + "\n")


def check_module_names(folder: Path, layout: JsonObject, key: str, names: Iterable[str], model: nn.Module) -> None:
    """Every module name a layout lists under ``key`` is a module of ``model`` (refused naming the first
    one that is not: a layout edited or written for another model)."""
    known = dict(model.named_modules())
    for name in names:
        if name not in known:
            layout.fail(key, f"names module {short_repr(name)}, which this model does not have",
                        hint="the layout does not belong to this config.json; convert again")


def load_tensors(folder: Path, weights: str) -> dict[str, torch.Tensor]:
    """Every tensor of the artifact's safetensors file (refused with a hint when it is missing)."""
    return load_arrays(folder, weights, framework="pt")


def rebuild(folder: Path, tensors: dict[str, torch.Tensor], replaced: Iterable[str], *,
            prepare: Callable[[CausalLM], None] | None = None) -> CausalLM:
    """The artifact's graph (config.json of ``folder``) with every tensor not under ``replaced`` loaded.

    The graph is built on the meta device (no memory for weights that are replaced anyway) and
    ``prepare`` may reshape it first (e.g. ``unstack_experts``). The backend then installs its own
    modules for the replaced prefixes from ``tensors``. Tensors that do not match the graph are refused.
    """
    cfg = load_config(folder)
    check_config_fits(cfg, tensors, Path(folder))
    replaced = set(replaced)
    with torch.device("meta"):
        model = CausalLM(cfg)
    if prepare is not None:
        prepare(model)
    plain = {k: v for k, v in tensors.items() if not _under(k, replaced)}
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} {v.dtype} vs {tuple(expected[k].shape)} {expected[k].dtype}"
             for k, v in plain.items() if k in expected and (v.shape != expected[k].shape or v.dtype != expected[k].dtype)]
    if wrong:
        raise ArtifactError(f"{folder}: tensors do not match config.json: {'; '.join(wrong[:3])}", hint="convert again")
    missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings) and not _under(k, replaced)]
    if missing or unexpected:
        raise ArtifactError(f"{folder}: the weights do not match the layout: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}", hint="convert again")
    return model.finish_meta_load()  # tied head and rotary buffer; a replaced lm_head is the backend's
