"""`type: mix` — a weighted sum of reward sources, e.g. a reward model plus a length penalty.

    reward:
      type: mix
      components:
        - {type: classifier, model: ..., weight: 1.0, normalize: true}
        - {type: rule, function: "llmtune.rewards.rules:length_penalty", weight: 0.5}

Components with `normalize: true` are standardized with running statistics first (see
`base.Normalized`), so sources on different scales can be weighted meaningfully.
"""

from __future__ import annotations

from typing import Any

from llmtune.rewards.base import Message, RewardSource, check_pairs, reward_stats


class MixReward:
    """sum_i weight_i * score_i over the components, given as (weight, type, source) built by
    `build_reward`."""

    def __init__(self, parts: list[tuple[float, str, RewardSource]]):
        self.parts = parts

    def score(self, prompts: list[list[Message]], responses: list[str], **columns: list[Any]) -> list[float]:
        check_pairs(prompts, responses)
        total = [0.0] * len(responses)
        for weight, _, source in self.parts:
            for i, s in enumerate(source.score(prompts, responses, **columns)):
                total[i] += weight * s
        return total

    def stats(self) -> dict[str, float]:
        """Component counters, prefixed `<index>_<type>/` so two judges do not collide."""
        return {f"{i}_{kind}/{k}": v for i, (_, kind, source) in enumerate(self.parts)
                for k, v in reward_stats(source).items()}
