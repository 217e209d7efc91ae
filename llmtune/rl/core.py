"""The maths of online RL as small pure tensor functions, so each piece can be read and unit-tested alone.

Shapes: per-token tensors are (batch, response_length); `mask` is 1 on response tokens (up to and
including EOS) and 0 on padding; per-response tensors are (batch,), rows prompt-major in groups of
`group` samples of the same prompt (row i * group + j is sample j of prompt i).

Advantage estimators (`rl.algorithm`):
  ppo           GAE over per-token rewards (KL penalty per token, score at the last token), value head
                (Ziegler et al. 2019 / Stiennon et al. 2020, the TRL classic PPOTrainer);
  grpo          (score - group mean) / group std, one value per response (Shao et al. 2024; Dr. GRPO:
                without the std);
  rloo          score minus the mean of the group's other scores (Ahmadian et al. 2024);
  reinforce_pp  discounted returns of the per-token rewards, standardized over the whole batch
                (Hu 2025, REINFORCE++; with groups the group mean is subtracted first).
The update is the same clipped surrogate for all of them.
"""

from __future__ import annotations

from typing import Any

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the masked entries (all of them, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (Bessel-corrected, like TRL's whitening)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standardize over the masked entries (zero mean, unit variance)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(label) per position under softmax(logits / temperature): TRL's `selective_log_softmax`, which
    gathers the chosen logit and subtracts a row-wise logsumexp instead of materialising a
    full-vocabulary log-softmax."""
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits, labels, temperature=temperature)


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen-token log-probs and the entropy of each position's sampling distribution (a collapse
    detector, without gradient), from one pass over the logits."""
    from trl.trainer.utils import selective_log_softmax_and_entropy

    return selective_log_softmax_and_entropy(logits, labels, entropy_requires_grad=False, temperature=temperature)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy, with
    r = log p - log p_ref (Schulman, "Approximating KL divergence"): k1 = r (unbiased, can be negative),
    k2 = r^2 / 2, k3 = exp(-r) - 1 + r (unbiased, never negative, low variance)."""
    r = logprobs - ref_logprobs
    if estimator == "k1":
        return r
    if estimator == "k2":
        return 0.5 * r ** 2
    if estimator == "k3":
        return torch.exp(-r) - 1 + r
    raise ValueError(f"unknown KL estimator {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards of ppo and reinforce_pp: -kl_coef * the per-token KL estimate everywhere, plus
    the response's score at its last token; 0 on padding."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over the response (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}; the value after the
    last real token is 0 (the episode ends there). Returns (advantages, returns = A + V)."""
    values = values * mask
    length = rewards.shape[1]
    last_adv = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else torch.zeros_like(last_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_adv = (delta + gamma * lam * last_adv) * mask[:, t]
        advantages[:, t] = last_adv
    return advantages, (advantages + values) * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} within each response (REINFORCE's return to go)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def _groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    if scores.numel() % group:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group}")
    return scores.view(-1, group)


def group_advantages(scores: torch.Tensor, group: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (score - mean of its group) / (std of its group + eps), the std unbiased as TRL's GRPOTrainer
    computes it; `scale=False` keeps only the mean (Dr. GRPO). A group of one has no baseline to compare
    with: its advantage is 0, not NaN."""
    if group == 1:
        return torch.zeros_like(scores)
    grouped = _groups(scores, group)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO: score minus the mean of the other scores of its group; a group of one has none (0)."""
    if group == 1:
        return torch.zeros_like(scores)
    grouped = _groups(scores, group)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group - 1)
    return (grouped - baseline).reshape(-1)


def zero_variance(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Per response: whether every score of its group is the same (its group advantage is 0)."""
    grouped = _groups(scores, group)
    same = (grouped == grouped[:, :1]).all(1, keepdim=True)
    return same.expand_as(grouped).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++: the discounted returns of the per-token rewards (KL penalty per token, score at the
    end), standardized over every token of the batch (a global baseline instead of a critic)."""
    return whiten(discounted_returns(rewards, mask, gamma), mask)


def policy_loss_per_token(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                          cliprange: float, cliprange_high: float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip per token: max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) with r = p / p_old.

    `advantages` is (batch, length) or one value per response, (batch,). Returns (per-token loss,
    ratio, whether the clipped term was taken), unmasked."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    high = cliprange if cliprange_high is None else cliprange_high
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    return torch.max(loss1, loss2), ratio, loss2 > loss1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, sequences: int, tokens: torch.Tensor | float,
              max_length: int) -> torch.Tensor:
    """A minibatch's loss from the per-token losses of one of its micro-batches (summing the micro-batches'
    results gives the minibatch's loss). `sequences` and `tokens` count the whole minibatch.

    token_mean:      sum / tokens                      (DAPO; TRL GRPO loss_type "dapo"/"bnpo")
    sequence_mean:   sum of per-response means / sequences (GRPO paper; TRL "grpo")
    token_sum_norm:  sum / (sequences * max_length)    (Dr. GRPO; TRL "dr_grpo")"""
    masked = per_token * mask
    if mode == "token_mean":
        return masked.sum() / tokens
    if mode == "sequence_mean":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / sequences
    if mode == "token_sum_norm":
        return masked.sum() / (sequences * max_length)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def value_loss_per_token(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                         cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token: 0.5 * max((V - R)^2, (clip(V, V_old +- e) - R)^2); and whether the
    clipped term was the larger one."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    return 0.5 * torch.max(loss1, loss2), loss2 > loss1


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: move kl_coef so the observed KL tracks `target`.

    error = clip(KL / target - 1, -0.2, 0.2);  kl_coef *= 1 + error * n_steps / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
