"""The compute planner behind ``deploykit plan``: what a training run of a config costs, term by term.

Every number says what it counts:

- **parameters**, exact, from the config (``ModelConfig.num_params``); MoE models also give the
  parameters active per token (top_k of n_experts);
- **training FLOPs** = matmul term + attention term, with training = 3 × forward (the backward pass
  costs two forwards: gradients for activations and for weights):
    - matmul: ``6 · N_matmul · D``, N_matmul the weights of every matrix product a token goes
      through (attention and MLP projections of the active experts, the router, the LM head; not
      the embedding lookup, norms or biases);
    - attention: per token and layer, QKᵀ and AV cost ``2 · 2 · c · H · hd`` forward at context c,
      causal so c averages ``(T + 1) / 2`` over a T-token sequence: ``6 · L · (T + 1) · H · hd · D``.
  The seed's estimator adds "2N forward + 4N backward" on top of the 6N it already counted; here
  6N is the whole of it.
- **Chinchilla-optimal tokens** ≈ 20 × parameters (Hoffmann et al. 2022);
- **memory**: fp32 weights, gradients and AdamW's two moments (16 bytes/parameter), plus
  activations kept for the backward, per layer ``T · b · d · (34 + 5 · H · T / d)`` bytes at 2 bytes
  per value (Korthikanti et al. 2022, no recomputation), doubled for fp32; with gradient
  checkpointing only each block's input is kept (``T · b · d · 4`` bytes per layer) plus one block's
  activations during its recomputation;
- **time** = FLOPs / (peak × MFU): this machine's peak is a measured fp32 GEMM (the same
  ``measure_peak_flops`` the trainer reports MFU against) and the MFU is the last run's if one is
  given, else a stated assumption; accelerators use their datasheet dense bf16 peaks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..model.config import ModelConfig

# Datasheet dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
ACCELERATORS: dict[str, float] = {
    "NVIDIA H100 SXM / H200 (bf16)": 989e12,
    "NVIDIA A100 SXM (bf16)": 312e12,
    "NVIDIA L4 (bf16)": 121e12,
    "NVIDIA RTX 4090 (bf16, fp32 accumulate)": 165e12,
}
CHINCHILLA_TOKENS_PER_PARAM = 20
DEFAULT_MFU = 0.4  # assumed when no run is given; the demo's micro measured 0.49 of the fp32 GEMM peak


@dataclass(frozen=True)
class PlanRequest:
    """A config to plan for, or only a parameter count (``--params``: 6ND and 16 bytes/parameter,
    no attention or activation terms, which need the shape)."""

    config: ModelConfig | None = None
    params: int | None = None
    tokens: float | None = None  # None: Chinchilla-optimal
    seq_len: int | None = None  # None: the config's max_seq_len
    batch_size: int = 16  # sequences per optimizer step (activation memory)
    gradient_checkpointing: bool = False
    mfu: float = DEFAULT_MFU
    mfu_source: str = "assumed"
    peak_flops: float | None = None  # this machine; None: not measured

    def __post_init__(self) -> None:
        if (self.config is None) == (self.params is None):
            raise ConfigError("plan needs exactly one of a config and a parameter count",
                              hint="pass --preset NAME, a checkpoint folder, or --params N")
        if self.params is not None and not (isinstance(self.params, int) and self.params >= 1):
            raise ConfigError(f"params={self.params!r} must be a positive integer", hint="e.g. --params 1.2e8")
        if self.tokens is not None and not (self.tokens > 0 and math.isfinite(self.tokens)):
            raise ConfigError(f"tokens={self.tokens!r} must be a finite number > 0", hint="e.g. --tokens 1e9")
        if self.seq_len is not None and self.config is not None and not 1 <= self.seq_len <= self.config.max_seq_len:
            raise ConfigError(f"seq_len={self.seq_len} must be in [1, {self.config.max_seq_len}] (the config's "
                              "max_seq_len)", hint="lower --seq-len")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} must be an integer >= 1")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"mfu={self.mfu!r} must be in (0, 1]", hint="e.g. --mfu 0.4")


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights of every matrix product one token goes through (active experts only)."""
    D, H, KV, hd, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    attn = D * H * hd + 2 * D * KV * hd + H * hd * D  # q, k, v, o
    if cfg.variant == "legacy":
        mlp = 2 * D * F
    elif cfg.is_moe:
        mlp = 3 * D * F * cfg.top_k + D * cfg.n_experts  # active experts + router
    else:
        mlp = 3 * D * F
    return cfg.n_layers * (attn + mlp) + V * D  # + LM head


def training_flops(cfg: ModelConfig, tokens: float, seq_len: int) -> dict[str, float]:
    matmul = 6.0 * matmul_params_per_token(cfg) * tokens
    attention = 6.0 * cfg.n_layers * (seq_len + 1) * cfg.n_heads * cfg.head_dim * tokens
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def memory_bytes(cfg: ModelConfig, seq_len: int, batch_size: int, checkpointing: bool) -> dict[str, float]:
    n = cfg.num_params()
    T, b, d, H, L = seq_len, batch_size, cfg.d_model, cfg.n_heads, cfg.n_layers
    per_layer_fp32 = 2 * T * b * d * (34 + 5 * H * T / d)  # Korthikanti et al.'s 2-byte count, doubled
    if checkpointing:
        activations = L * T * b * d * 4 + per_layer_fp32  # block inputs + one block recomputed
    else:
        activations = L * per_layer_fp32
    logits = T * b * cfg.vocab_size * 4 * 2  # fp32 logits and their gradient
    out = {"weights": 4.0 * n, "gradients": 4.0 * n, "optimizer": 8.0 * n, "activations": activations + logits}
    out["total"] = sum(out.values())
    return out


def plan(req: PlanRequest) -> dict[str, Any]:
    cfg = req.config
    n = cfg.num_params() if cfg is not None else req.params
    assert n is not None
    optimal = CHINCHILLA_TOKENS_PER_PARAM * n
    tokens = req.tokens if req.tokens is not None else float(optimal)
    out: dict[str, Any] = {"params": n, "tokens": tokens, "chinchilla_tokens": optimal, "tokens_per_param": tokens / n,
                           "batch_size": req.batch_size, "gradient_checkpointing": req.gradient_checkpointing,
                           "mfu_source": req.mfu_source}
    if cfg is not None:
        seq_len = req.seq_len or cfg.max_seq_len
        active = cfg.active_params_per_token()
        flops = training_flops(cfg, tokens, seq_len)
        mem = memory_bytes(cfg, seq_len, req.batch_size, req.gradient_checkpointing)
        out.update(active_params=active, matmul_params_per_token=matmul_params_per_token(cfg), seq_len=seq_len)
    else:  # only N: the 6ND rule and the 16 bytes/parameter of fp32 AdamW training
        active = n
        flops = {"matmul": 6.0 * n * tokens, "attention": float("nan"), "total": 6.0 * n * tokens}
        mem = {"weights": 4.0 * n, "gradients": 4.0 * n, "optimizer": 8.0 * n, "activations": float("nan")}
        mem["total"] = 16.0 * n
    times = {}
    if req.peak_flops:
        times["this machine (measured fp32 GEMM)"] = req.peak_flops
    times.update(ACCELERATORS)
    out.update(flops=flops, flops_6nd=6.0 * active * tokens, memory_bytes=mem,
               memory_vs_weights=mem["total"] / mem["weights"],
               time={name: {"peak_flops": peak, "mfu": req.mfu, "seconds": flops["total"] / (peak * req.mfu)}
                     for name, peak in times.items()})
    return out


def run_mfu(folder: Any) -> tuple[float, float | None]:
    """Median MFU of a training run's logged steps, and the peak it was measured against."""
    import json
    import statistics
    from pathlib import Path

    from ..errors import DataError
    from ..model.checkpoint import LOG_NAME, STATE_JSON

    log = Path(folder) / LOG_NAME
    if not log.is_file():
        raise DataError(f"{folder}: no {LOG_NAME}, so no measured MFU", hint="pass a `deploykit train` run folder")
    mfus = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "train" and isinstance(rec.get("mfu"), (int, float)):
            mfus.append(float(rec["mfu"]))
    if not mfus or not 0 < statistics.median(mfus) <= 1:
        raise DataError(f"{log}: no usable MFU records", hint="pass a run folder written by `deploykit train`")
    peak = None
    state = Path(folder) / STATE_JSON
    if state.is_file():
        try:
            value = json.loads(state.read_text()).get("peak_flops")
            peak = float(value) if isinstance(value, (int, float)) and value > 0 else None
        except ValueError:
            peak = None
    return statistics.median(mfus), peak


def human_seconds(s: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"
