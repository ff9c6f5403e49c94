"""The deploykit decoder: one readable graph for the dense (Llama), MoE (Mixtral) and legacy (GPT-2)
variants.

Module names follow Hugging Face's Llama/Mixtral trees (``model.layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``...), so a PEFT adapter trained here loads onto transformers'
reading of the same checkpoint and vice versa. The only structural difference is that MoE experts
are stored stacked (``experts.w1`` is ``(E, F, D)``) so dispatch runs one GEMM per expert;
``deploykit.model.checkpoint`` splits them into Mixtral's per-expert tensors on save.

Reading order: norms → rotary → attention → MLPs → MoE → block → model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast, as Llama does: the mean of squares underflows.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, computed on the fly (no buffer slicing, which some
    exporters cannot trace). positions (T,) -> cos, sin (T, hd)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd): Llama's "rotate half" layout
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, h, T, hd); cos/sin (T, hd) broadcast over batch and heads.
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of past positions, one entry per layer, grown by concatenation.

    Mutable and per-sequence: create one per generation. ``length`` is the number of cached positions.
    """

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v (B, kv_heads, T_new, hd) -> all positions so far (B, kv_heads, T_past + T_new, hd)
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = cfg.attn_bias or cfg.variant == "legacy"
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.variant == "legacy")

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, kv, S, hd) with S = past + T
        if self.n_kv_heads != self.n_heads:
            # Grouped-query attention: each kv head serves n_heads / n_kv_heads query heads. An explicit
            # repeat (rather than SDPA's enable_gqa) keeps the graph exportable to ONNX and Core ML.
            groups = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(groups, dim=1)  # (B, h, S, hd)
            v = v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.up_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """The legacy (GPT-2) MLP; exact erf GELU, which GPT-2 configs call ``activation_function="gelu"``."""

    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, ffn_dim)
        self.down_proj = nn.Linear(ffn_dim, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


@dataclass(frozen=True)
class Routing:
    """A router's decision for N tokens: each token goes to k experts with these weights."""

    weights: torch.Tensor  # (N, k) softmax over the chosen k logits, sums to 1 per token
    experts: torch.Tensor  # (N, k) expert ids, int64
    probs: torch.Tensor  # (N, E) softmax over all experts (fp32), for the load-balancing loss


def route_top_k(logits: torch.Tensor, k: int) -> Routing:
    """Mixtral convention: softmax over all E in fp32, keep the top k, renormalise them.

    Renormalising the top-k probabilities equals a softmax over the k chosen logits.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
    top_p, top_i = torch.topk(probs, k, dim=-1)  # (N, k)
    weights = top_p / top_p.sum(dim=-1, keepdim=True)
    return Routing(weights=weights, experts=top_i, probs=probs)


def load_balancing_loss(routing: Routing, n_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * Σ_e f_e · P_e``.

    f_e is the fraction of the N·k assignments that went to expert e (not differentiable), P_e the
    mean router probability of e (differentiable). It is 1.0 when both are uniform and grows as the
    router concentrates tokens on few experts.
    """
    counts = torch.bincount(routing.experts.reshape(-1), minlength=n_experts)  # (E,)
    f = counts.to(routing.probs.dtype) / routing.experts.numel()
    p = routing.probs.mean(dim=0)  # (E,)
    return n_experts * torch.sum(f * p)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: expert e computes ``w2[e] (silu(w1[e] x) * w3[e] x)``."""

    def __init__(self, n_experts: int, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, ffn_dim))  # down

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        # x (n, D) -> (n, D)
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])


MoEDispatch = Literal["sorted", "dense"]


class MoE(nn.Module):
    """Top-k routed experts replacing the MLP (Mixtral's ``block_sparse_moe``).

    Two dispatch strategies compute the same function:

    - ``sorted`` (default): assignments are sorted by expert so each expert runs one GEMM over a
      contiguous slice, then a weighted ``index_add_`` scatters results back. No per-token loop.
    - ``dense``: every expert runs on every token and a (N, E) combine matrix zeroes the unchosen
      ones. E/k times the FLOPs, but free of data-dependent shapes, so exporters can trace it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.ffn_dim)
        self.dispatch: MoEDispatch = "sorted"
        # Statistics of the last forward, read by the training loop and the bench harness.
        self.last_aux_loss: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None  # (E,) tokens routed to each expert
        self.last_experts: torch.Tensor | None = None  # (N, k) chosen experts

    def __getstate__(self) -> dict:
        # Copies drop the last forward's statistics: right after a training step the aux loss is a
        # non-leaf tensor holding the autograd graph, which copy.deepcopy refuses to copy.
        state = self.__dict__.copy()
        state.update(last_aux_loss=None, last_counts=None, last_experts=None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        xf = x.reshape(B * T, D)  # (N, D)
        routing = route_top_k(self.gate(xf), self.top_k)
        weights = routing.weights.to(x.dtype)  # (N, k)
        if self.dispatch == "dense":
            out = self._dense(xf, routing.experts, weights)
        else:
            out = self._sorted(xf, routing.experts, weights)
        if not torch.compiler.is_compiling():  # export traces must stay free of side effects
            self.last_aux_loss = load_balancing_loss(routing, self.n_experts)
            self.last_counts = torch.bincount(routing.experts.reshape(-1), minlength=self.n_experts)
            self.last_experts = routing.experts
        return out.view(B, T, D)

    def _sorted(self, xf: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, D = xf.shape
        flat = experts.reshape(-1)  # (N*k,) assignment a belongs to token a // k
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        token = order // self.top_k  # (N*k,) source token of each grouped assignment
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # one host sync per layer
        xs = xf[token]  # (N*k, D) gathered inputs, contiguous per expert
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):  # a loop over experts, each one GEMM over its slice
            if n:
                ys[start:start + n] = self.experts.expert(e, xs[start:start + n])
            start += n
        ys = ys * weights.reshape(-1)[order, None]
        return torch.zeros_like(xf).index_add_(0, token, ys)  # (N, D)

    def _dense(self, xf: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        combine = torch.zeros(xf.shape[0], self.n_experts, dtype=xf.dtype, device=xf.device)
        combine = combine.scatter(1, experts, weights)  # (N, E), k non-zeros per row
        w = self.experts
        h = F.silu(torch.einsum("nd,efd->enf", xf, w.w1)) * torch.einsum("nd,efd->enf", xf, w.w3)  # (E, N, F)
        y = torch.einsum("enf,edf->end", h, w.w2)  # (E, N, D)
        return torch.einsum("ne,end->nd", combine, y)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        Norm = _norm_class(cfg)
        self.input_layernorm = Norm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = Norm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.variant == "moe":
            self.block_sparse_moe = MoE(cfg)
        elif cfg.variant == "legacy":
            self.mlp = GeluMLP(cfg.d_model, cfg.ffn_dim)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x, rotary, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)  # pre-norm residual
        h = self.post_attention_layernorm(x)
        return x + (self.block_sparse_moe(h) if hasattr(self, "block_sparse_moe") else self.mlp(h))


def _norm_class(cfg: ModelConfig):
    return nn.LayerNorm if cfg.variant == "legacy" else RMSNorm


def _embedding(n: int, d: int) -> nn.Embedding:
    """nn.Embedding, without its own N(0, 1) draw when built on the meta device (every load): there
    the draw goes through torch._refs, whose first use imports torch._dynamo (1.4 s of a fresh
    process's first load). Elsewhere it draws as before, so seeded models keep their weights."""
    weight = torch.empty(n, d)
    return nn.Embedding(n, d, _weight=weight) if weight.is_meta else nn.Embedding(n, d)


class Decoder(nn.Module):
    """Embeddings, the block stack and the final norm (Hugging Face's ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = _embedding(cfg.vocab_size, cfg.d_model)
        if cfg.variant == "legacy":
            self.embed_positions = _embedding(cfg.max_seq_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = _norm_class(cfg)(cfg.d_model, eps=cfg.norm_eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies theta^(-2i/hd), (hd/2,), as Llama computes them."""
    return 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)


class CausalLM(nn.Module):
    """Decoder-only language model. ``forward(input_ids) -> logits (B, T, V)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.variant != "legacy":
            # On the meta device finish_meta_load computes it (arange there would import torch._dynamo).
            inv_freq = torch.empty(cfg.head_dim // 2) if self.lm_head.weight.is_meta else rope_inv_freq(cfg)
            self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2,)
        self.reset_parameters()

    def finish_meta_load(self) -> "CausalLM":
        """Complete a model built on the meta device and filled by ``load_state_dict(assign=True)``.

        Neither the tied head (saved once, as the embedding) nor the rotary buffer (not persistent)
        is in a state dict, so both are restored here.
        """
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.config.variant != "legacy":
            self.inv_freq = rope_inv_freq(self.config)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2L)."""
        if self.lm_head.weight.is_meta:
            # Built on the meta device to be filled by load_state_dict(assign=True): nothing to draw,
            # and nn.init.normal_ on meta tensors goes through torch._refs, whose first use imports
            # torch._dynamo: 1.4 s of a fresh process's first load_model, for values never used.
            return
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norms' weights are 1, biases 0
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
                nn.init.normal_(p, 0.0, residual_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        past = 0 if kv_cache is None else kv_cache.length
        positions = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        rotary = None
        if self.config.variant == "legacy":
            x = x + self.model.embed_positions(positions)
        else:
            rotary = rotary_cos_sin(positions, self.inv_freq)
        # Query t (absolute position past + t) may attend to keys 0..past + t. One explicit mask for
        # prefill, decode and chunked prefill alike, with no branch on `past` (exporters trace one graph).
        keys = torch.arange(past + T, device=input_ids.device)  # (S,)
        mask = keys[None, :] <= positions[:, None]  # (T, S) bool
        for block in self.model.layers:
            x = block(x, rotary, mask, kv_cache)
        return self.lm_head(self.model.norm(x))  # (B, T, V)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)

    # -- MoE statistics of the last forward ---------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [b.block_sparse_moe for b in self.model.layers if hasattr(b, "block_sparse_moe")]

    def aux_loss(self) -> torch.Tensor | None:
        """Mean load-balancing loss over MoE layers from the last forward (None for dense models)."""
        losses = [m.last_aux_loss for m in self.moe_layers() if m.last_aux_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def expert_counts(self) -> torch.Tensor | None:
        """Tokens routed to each expert in the last forward, (L, E); None for dense models."""
        counts = [m.last_counts for m in self.moe_layers() if m.last_counts is not None]
        return torch.stack(counts) if counts else None

    def set_moe_dispatch(self, dispatch: MoEDispatch) -> None:
        for m in self.moe_layers():
            m.dispatch = dispatch

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
