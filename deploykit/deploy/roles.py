"""One vocabulary for the weights of a deploykit model: which module plays which role.

Backends decide what to quantize, prune or fuse by role, read off the graph's structure (which
block holds which module), never by matching name strings, so every backend makes the same choice
for the same model and a new module in the graph is one entry here, not an edit in every backend.

    roles = linear_roles(model)                  # {"model.layers.0.self_attn.q_proj": Role.ATTN_Q, ...}
    targets = select(model, QUANTIZED | {Role.LM_HEAD})
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

    from ..model.graph import CausalLM


class Role(enum.Enum):
    """What a weight-holding module computes in the decoder."""

    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    MLP_GATE = "mlp_gate"  # SwiGLU gate (silu branch)
    MLP_UP = "mlp_up"  # SwiGLU up, or the legacy GELU MLP's first linear
    MLP_DOWN = "mlp_down"
    EXPERT_GATE = "expert_gate"  # one expert's w1, once experts are one Linear per weight (ExpertList)
    EXPERT_UP = "expert_up"  # w3
    EXPERT_DOWN = "expert_down"  # w2
    EXPERTS = "experts"  # all experts of a layer, stacked (model.graph.Experts: w1, w3 (E, F, D), w2 (E, D, F))
    ROUTER = "router"
    EMBEDDING = "embedding"
    POSITION_EMBEDDING = "position_embedding"  # legacy (GPT-2) variant
    LM_HEAD = "lm_head"


ATTENTION = frozenset({Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O})
MLP = frozenset({Role.MLP_GATE, Role.MLP_UP, Role.MLP_DOWN})
EXPERT = frozenset({Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN})
# What int8 schemes quantize: the projections that hold nearly all the FLOPs. Embeddings and norms are
# a small share; a quantized router can flip expert choices, which costs far more than it saves; the
# lm_head is a per-scheme choice (add Role.LM_HEAD).
QUANTIZED = ATTENTION | MLP | EXPERT

_ATTN = {"q_proj": Role.ATTN_Q, "k_proj": Role.ATTN_K, "v_proj": Role.ATTN_V, "o_proj": Role.ATTN_O}
_MLP = {"gate_proj": Role.MLP_GATE, "up_proj": Role.MLP_UP, "down_proj": Role.MLP_DOWN}
_EXPERT = {"w1": Role.EXPERT_GATE, "w3": Role.EXPERT_UP, "w2": Role.EXPERT_DOWN}


def linear_roles(model: CausalLM) -> dict[str, Role]:
    """Every weight-holding module of a deploykit CausalLM by its ``named_modules`` name, in graph order.

    Read from the graph's structure: a block's ``self_attn`` projections, its ``mlp`` (SwiGLU or the
    legacy GELU MLP) or its ``block_sparse_moe`` router and experts (stacked, or one Linear per expert
    weight after ``torchgraph.unstack_experts``), the embeddings and the lm_head. A projection that a
    backend swapped for its own module keeps its role; a whole MLP or expert set fused into one module
    no longer shows its parts.
    """
    import torch  # the caller holds a torch model: free here, and roles stays importable without torch

    out: dict[str, Role] = {"model.embed_tokens": Role.EMBEDDING}
    if hasattr(model.model, "embed_positions"):
        out["model.embed_positions"] = Role.POSITION_EMBEDDING
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        out.update({f"{p}.self_attn.{n}": r for n, r in _ATTN.items()})
        if hasattr(block, "block_sparse_moe"):
            experts = getattr(block.block_sparse_moe, "experts", None)  # None: a backend fused them away
            out[f"{p}.block_sparse_moe.gate"] = Role.ROUTER
            if isinstance(experts, torch.nn.ModuleList):  # one module per expert, each with w1/w3/w2
                for e in range(len(experts)):
                    out.update({f"{p}.block_sparse_moe.experts.{e}.{n}": r for n, r in _EXPERT.items()})
            elif experts is not None:
                out[f"{p}.block_sparse_moe.experts"] = Role.EXPERTS
        else:
            out.update({f"{p}.mlp.{n}": r for n, r in _MLP.items() if hasattr(block.mlp, n)})
    out["lm_head"] = Role.LM_HEAD
    return out


def select(model: CausalLM, roles: frozenset[Role] | set[Role]) -> dict[str, nn.Module]:
    """The modules whose role is in ``roles``, by name, in graph order."""
    return {name: model.get_submodule(name) for name, role in linear_roles(model).items() if role in roles}


def by_parent(roles: dict[str, Role]) -> dict[str, dict[Role, str]]:
    """Group role names by the module that holds them: {"model.layers.0.mlp": {Role.MLP_DOWN: "...down_proj"}}."""
    out: dict[str, dict[Role, str]] = {}
    for name, role in roles.items():
        out.setdefault(name.rpartition(".")[0], {})[role] = name
    return out
