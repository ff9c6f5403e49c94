"""Model configuration: one frozen dataclass, validated on construction, and named presets.

Three variants share one graph (``deploykit.model.graph``):

- ``dense``  — Llama family: pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU.
- ``moe``    — Mixtral family: the dense block with its MLP replaced by top-k routed SwiGLU experts.
- ``legacy`` — GPT-2 family: LayerNorm, learned positions, GELU MLP, biases, full multi-head attention.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError
from .schema import JsonObject, coerce, describe, field_kinds, matches

Variant = Literal["dense", "moe", "legacy"]
VARIANTS: tuple[str, ...] = ("dense", "moe", "legacy")


@dataclass(frozen=True)
class ModelConfig:
    variant: Variant = "dense"
    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads (Mistral/Qwen may differ)
    ffn_dim: int = 384  # SwiGLU hidden size; per expert for MoE; GELU MLP hidden size for legacy
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_bias: bool = False  # bias on q/k/v projections (Qwen2); legacy always has biases
    n_experts: int = 0
    top_k: int = 2
    router_aux_coef: float = 0.01  # weight of the load-balancing loss in the training loss
    init_std: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        # Types first (a string or a bool where a size belongs fails here, not as a TypeError below);
        # ints given for float fields become floats, so equal configs compare and serialise equal.
        for name, kind in field_kinds(ModelConfig).items():
            value = getattr(self, name)
            if not matches(value, kind):
                _fail(name, value, f"must be {describe(kind)}")
            object.__setattr__(self, name, coerce(value, kind))
        # Fill derived fields first so every rule below sees concrete numbers.
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "must be a positive integer")
        if self.variant not in VARIANTS:
            _fail("variant", self.variant, f"must be one of {', '.join(VARIANTS)}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                _fail("n_heads", self.n_heads, f"must divide d_model={self.d_model} (or set head_dim explicitly)")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        elif self.head_dim < 1:
            _fail("head_dim", self.head_dim, "must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads} (grouped-query attention)")
        if self.variant != "legacy" and self.head_dim % 2:
            _fail("head_dim", self.head_dim, "must be even: rotary embeddings rotate pairs of channels")
        if self.variant == "legacy":
            if self.n_kv_heads != self.n_heads:
                _fail("n_kv_heads", self.n_kv_heads, "must equal n_heads for the legacy (GPT-2) variant")
            if self.head_dim * self.n_heads != self.d_model:
                _fail("head_dim", self.head_dim, "must be d_model // n_heads for the legacy (GPT-2) variant")
        if self.n_experts < 0 or self.top_k < 0:
            _fail("n_experts" if self.n_experts < 0 else "top_k", min(self.n_experts, self.top_k), "must be >= 0")
        if self.variant == "moe":
            if self.n_experts < 2:
                _fail("n_experts", self.n_experts, "must be >= 2 for the moe variant")
            if not 1 <= self.top_k <= self.n_experts:
                _fail("top_k", self.top_k, f"must satisfy 1 <= top_k <= n_experts={self.n_experts}")
        elif self.n_experts != 0:
            _fail("n_experts", self.n_experts, f"must be 0 for the {self.variant} variant (use variant='moe')")
        if not self.rope_theta > 0:
            _fail("rope_theta", self.rope_theta, "must be > 0")
        if not self.norm_eps > 0:
            _fail("norm_eps", self.norm_eps, "must be > 0")
        if self.router_aux_coef < 0:
            _fail("router_aux_coef", self.router_aux_coef, "must be >= 0")
        if self.init_std < 0:
            _fail("init_std", self.init_std, "must be >= 0")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                _fail(name, value, f"must be a token id in [0, vocab_size={self.vocab_size})")

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.variant == "moe"

    def num_params(self) -> int:
        """Parameter count of the model this config builds (embeddings included, tied counted once)."""
        D, H, KV, hd, F, V, L = (self.d_model, self.n_heads, self.n_kv_heads, self.head_dim,
                                 self.ffn_dim, self.vocab_size, self.n_layers)
        attn = D * H * hd + 2 * D * KV * hd + H * hd * D
        if self.variant == "legacy":
            attn += 3 * H * hd + D  # biases
            mlp = 2 * D * F + F + D
            norms = 4 * D
        else:
            attn += 2 * KV * hd + H * hd if self.attn_bias else 0
            mlp = 3 * D * F * max(self.n_experts, 1) + (D * self.n_experts if self.is_moe else 0)
            norms = 2 * D
        total = L * (attn + mlp + norms) + V * D + (0 if self.tie_embeddings else V * D)
        total += 2 * D if self.variant == "legacy" else D  # final norm
        if self.variant == "legacy":
            total += self.max_seq_len * D
        return total

    def active_params_per_token(self) -> int:
        """Parameters touched per token (MoE: only top_k experts); used for FLOPs estimates."""
        if not self.is_moe:
            return self.num_params()
        inactive = self.n_layers * 3 * self.d_model * self.ffn_dim * (self.n_experts - self.top_k)
        return self.num_params() - inactive

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """The config of ``to_dict``'s output. Given a :class:`~deploykit.model.schema.JsonObject`
        (read from a file), every error names that file and the key."""
        if isinstance(data, JsonObject):
            return data.build(cls)
        if not isinstance(data, dict):
            raise ConfigError(f"ModelConfig.from_dict: expected a dict of fields, got {type(data).__name__}")
        doc = JsonObject(data, source="ModelConfig", error=ConfigError, hint="see ModelConfig's fields")
        return cls(**doc.dataclass_fields(cls))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _fail(field: str, value: Any, rule: str) -> None:
    raise ConfigError(f"ModelConfig.{field}={value!r} {rule}")


# Presets: sizes chosen so `nano` trains in seconds (tests), `micro` learns the embedded corpus in
# about two minutes on 2 cores (the demo), and `small` is a realistic CPU deployment target.
_BASE: dict[str, dict[str, Any]] = {
    "nano": dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                 max_seq_len=256, tie_embeddings=True),
    "micro": dict(vocab_size=8192, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=768,
                  max_seq_len=512, tie_embeddings=False),
    "small": dict(vocab_size=8192, d_model=512, n_layers=14, n_heads=8, n_kv_heads=4, ffn_dim=1408,
                  max_seq_len=1024, tie_embeddings=False),
}
# MoE forms keep the attention and give each of 4/8 experts a narrower SwiGLU.
_MOE: dict[str, dict[str, Any]] = {
    "nano": dict(n_experts=4, top_k=2, ffn_dim=256),
    "micro": dict(n_experts=8, top_k=2, ffn_dim=384),
    "small": dict(n_experts=8, top_k=2, ffn_dim=704),
}

PRESETS: dict[str, ModelConfig] = {}
for _name, _kw in _BASE.items():
    PRESETS[_name] = ModelConfig(variant="dense", **_kw)
    PRESETS[f"{_name}-moe"] = ModelConfig(variant="moe", **{**_kw, **_MOE[_name]})
    PRESETS[f"{_name}-legacy"] = ModelConfig(
        variant="legacy", **{**_kw, "n_kv_heads": _kw["n_heads"], "ffn_dim": 4 * _kw["d_model"], "tie_embeddings": True}
    )


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset config by name, optionally with fields overridden (e.g. ``vocab_size``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}", hint=f"choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
