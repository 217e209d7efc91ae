"""PPO maths against values computed by hand (llmtune.rl.core, and the running reward statistics)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmtune.rewards.base import RunningStats
from llmtune.rl import core


def test_masked_mean_and_whiten_ignore_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert core.masked_mean(x, mask).item() == pytest.approx(2.5)
    assert core.masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 3.5])
    # Unbiased variance of 1,2,3,4 is 5/3.
    assert core.masked_var(x, mask).item() == pytest.approx(5 / 3)
    w = core.whiten(x, mask)
    expected = [(v - 2.5) / math.sqrt(5 / 3) for v in (1.0, 2.0, 3.0, 4.0)]
    assert [w[0, 0].item(), w[0, 1].item(), w[1, 0].item(), w[1, 1].item()] == pytest.approx(expected, abs=1e-5)
    assert w[0, 2].item() == 0 and w[1, 2].item() == 0


def test_kl_penalty_puts_score_on_last_real_token() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = core.kl_estimate(logp, ref, "k1") * mask
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    rewards = core.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    # -0.1 * kl everywhere, plus the score at the last unmasked position; padding is 0.
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]]))


def test_gae_matches_hand_computation() -> None:
    values = torch.tensor([[0.5, 1.0, 2.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    adv, ret = core.gae(values, rewards, mask, gamma, lam)
    d2 = 1.0 + 0.0 - 2.0                     # last token: no next value
    d1 = 0.0 + gamma * 2.0 - 1.0
    d0 = 0.0 + gamma * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 2.0])


def test_gae_stops_at_the_end_of_a_short_response() -> None:
    values = torch.tensor([[1.0, 3.0, 7.0]])          # the padded value must not leak back
    rewards = torch.tensor([[0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = core.gae(values, rewards, mask, gamma=1.0, lam=1.0)
    # t=1: 2 - 3 = -1; t=0: 0 + 3 - 1 + (-1) = 1
    assert adv.tolist()[0] == pytest.approx([1.0, -1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([2.0, 2.0, 0.0])


def test_policy_loss_clips_per_token() -> None:
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))   # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    per_token, ratio, clipped = core.policy_loss_per_token(new, old, adv, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped);
    # token 2: max(-2.2, -2.2) = -2.2 (inside the range).
    assert per_token.tolist()[0] == pytest.approx([-1.2, 0.8, -2.2])
    assert core.masked_mean(per_token, mask).item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert clipped.tolist() == [[True, True, False]]
    assert ratio.tolist()[0] == pytest.approx([1.5, 0.5, 1.1])


def test_value_loss_takes_the_pessimistic_clipped_term() -> None:
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[0.0, 1.0]])
    per_token, clipped = core.value_loss_per_token(new, old, returns, cliprange_value=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped (0.2-0)^2 = 0.04 -> 1;
    # token 1: unclipped (0.1-1)^2 = 0.81, clipped (0.1-1)^2 = 0.81 -> 0.81.
    assert per_token.tolist()[0] == pytest.approx([0.5, 0.405])
    assert not clipped.any()
    per_token, clipped = core.value_loss_per_token(torch.tensor([[0.5]]), old[:, :1], torch.tensor([[1.0]]), 0.2)
    # unclipped 0.25, clipped (0.2-1)^2 = 0.64 -> 0.64, counted as clipped
    assert per_token.item() == pytest.approx(0.32)
    assert clipped.item()


def test_logprobs_and_entropy() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert core.token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))
    logp, entropy = core.logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert logp.item() == pytest.approx(math.log(0.25))
    assert entropy.item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    # At temperature 2 the distribution is softmax(logits / 2): p ~ sqrt(p), renormalised.
    hot = torch.tensor([0.5, 0.25, 0.25]).sqrt()
    assert core.token_logprobs(logits, torch.tensor([[0]]), temperature=2.0).item() == pytest.approx(
        math.log(hot[0] / hot.sum()))


def test_kl_controllers() -> None:
    fixed = core.FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(9.0, 100)                     # error = 9/6 - 1 = 0.5, clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ctl.update(5.4, 100)                     # error = -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    restored = core.AdaptiveKLController(1.0, 6.0, 1000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_running_stats_match_the_whole_sample_and_resume() -> None:
    """The statistics behind ppo.reward_normalize (and reward.normalize) are batch-size independent
    and survive a checkpoint."""
    data = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, -2.0, 0.5])
    m = RunningStats()
    m.update(data[:3].tolist())
    restored = RunningStats()
    restored.load_state_dict(json.loads(json.dumps(m.state_dict())))
    restored.update(data[3:].tolist())
    assert restored.mean == pytest.approx(data.mean().item())
    assert restored.std == pytest.approx(data.std().item(), rel=1e-6)
    constant = RunningStats()
    constant.update([3.0, 3.0])
    assert constant.std == 1.0  # nothing to scale by
