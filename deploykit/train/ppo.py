"""The pieces of PPO for RLHF, as plain tensor functions; ``deploykit.train.rlhf`` runs the loop.

Every tensor is per response token, (B, T), with ``mask`` 1 on response tokens and 0 on padding;
the sequence-level reward-model score arrives on the last response token, and the KL penalty
against the frozen reference is paid on every token, so the advantage of an early token sees both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sft import IGNORE


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of each target token, (B, T); 0 where the target is IGNORE.

    ``logits`` (B, T, V) at position t score ``targets[:, t]``, the token that follows input t:
    the alignment that the seed's sketch gets wrong by slicing sequence means.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return tok * (targets != IGNORE)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distribution over the masked positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    ent = -(logp.exp() * logp).sum(-1)  # (B, T)
    return (ent * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class AdaptiveKL:
    """Ziegler et al. (2019)'s controller: nudge the KL coefficient so that the mean per-sequence KL
    tracks ``target``; proportional error clipped to ±20 %, scaled by ``n_steps / horizon``.
    ``target=None`` keeps the coefficient fixed."""

    coef: float
    target: float | None = None
    horizon: int = 10_000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef


def kl_penalized_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, score: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * (logp - ref_logp)`` plus ``score`` (B,) on the last response token.

    Returns ``(rewards, kl)``, each (B, T). ``logp - ref_logp`` of the sampled token is the usual
    single-sample estimate of KL(policy || reference): positive on average when the policy has
    moved towards tokens the reference finds less likely.
    """
    kl = (logp - ref_logp) * mask  # (B, T)
    rewards = -kl_coef * kl
    last = (mask.long().cumsum(-1)).argmax(-1)  # (B,) last response position
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response, right to left; ``(advantages, returns)``, (B, T).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with V past the last response token taken as 0 (the
    episode ends there), ``A_t = delta_t + gamma * lam * A_{t+1}``, returns ``A_t + V_t``.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype)
    next_value = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        adv[:, t] = running
        next_value = values[:, t] * m  # a padded position ends the episode: the next value is 0
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the response tokens only."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                        clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's ``-min(ratio * A, clip(ratio, 1 ± clip) * A)`` averaged over response tokens; ``(loss, clip_fraction)``."""
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip, 1 + clip) * adv
    n = mask.sum()
    loss = -(torch.minimum(unclipped, clipped) * mask).sum() / n
    clip_frac = (((ratio - 1).abs() > clip).float() * mask).sum() / n
    return loss, clip_frac


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> torch.Tensor:
    """``0.5 * max((V - R)^2, (clip(V, V_old ± clip) - R)^2)`` over response tokens."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum()
