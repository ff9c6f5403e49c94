"""PPO pieces against hand-computed cases: GAE, the KL penalty's sign and scale, clipping."""
from __future__ import annotations

import pytest
import torch

from deploykit.train.ppo import clipped_policy_loss, clipped_value_loss, gae, kl_penalized_rewards, whiten


def test_gae_matches_a_hand_computed_case():
    # one response of 3 tokens then a pad; gamma 0.9, lambda 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0.0 - 0.3  # 0.7 (the episode ends: no value after it)
    d1 = 0.0 + 0.9 * 0.3 - 0.4  # -0.13
    d0 = 0.0 + 0.9 * 0.4 - 0.5  # -0.14
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]))


def test_kl_penalty_sign_and_scale():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -1.0]])  # the policy likes tokens 0 and 2 more than the reference
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(logp, ref, torch.tensor([2.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 2.0, 0.0]]))  # score on the last response token


def test_policy_clipping():
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5]]))  # ratios 1.5 (clipped to 1.2), 1.1, 0.5 (clipped to 0.8)
    loss, frac = clipped_policy_loss(logp, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 1.1 - 0.8) / 3)
    assert frac.item() == pytest.approx(2 / 3)


def test_value_clipping_and_whitening():
    mask = torch.ones(1, 2)
    loss = clipped_value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
                              mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.8 ** 2 + 0.0) / 2)  # the clipped value is further: it counts
    w = whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
