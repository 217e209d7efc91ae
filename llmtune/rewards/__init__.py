"""Reward sources for rejection sampling and PPO: one interface, five kinds.

    build_reward(recipe.reward).score(prompts, responses) -> list[float]

Kinds (the `reward.type` key): reward_model (an llmtune rm run), classifier (any
sequence-classification model scoring the response), judge (an LLM asked for a rating, local or
over an OpenAI-compatible endpoint), rule (a Python function by dotted path), mix (a weighted sum
of the others). The dispatch table below is the registry; each builder imports its module lazily
so importing `llmtune.rewards` never pulls in torch.
"""

from __future__ import annotations

from collections.abc import Callable

from llmtune.config.schema import RewardSection
from llmtune.rewards.base import Normalized, RewardError, RewardSource, reward_stats

__all__ = ["BUILDERS", "RewardError", "RewardSource", "build_reward", "reward_stats"]


def _reward_model(section: RewardSection, where: str) -> RewardSource:
    from llmtune.rewards.reward_model import RewardModelScorer

    return RewardModelScorer(section)


def _classifier(section: RewardSection, where: str) -> RewardSource:
    from llmtune.rewards.classifier import ClassifierReward

    return ClassifierReward(section, where)


def _judge(section: RewardSection, where: str) -> RewardSource:
    from llmtune.rewards.judge import JudgeReward

    return JudgeReward(section, where)


def _rule(section: RewardSection, where: str) -> RewardSource:
    from llmtune.rewards.rule import RuleReward

    return RuleReward(section, where)


def _mix(section: RewardSection, where: str) -> RewardSource:
    from llmtune.rewards.mix import MixReward

    return MixReward([(c.weight, c.type, build_reward(c, f"{where}.components[{i}]"))
                      for i, c in enumerate(section.components or [])])


BUILDERS: dict[str, Callable[[RewardSection, str], RewardSource]] = {
    "reward_model": _reward_model,
    "classifier": _classifier,
    "judge": _judge,
    "rule": _rule,
    "mix": _mix,
}


def build_reward(section: RewardSection, where: str = "reward") -> RewardSource:
    """The reward source a validated `reward` section describes (`where`: its key path, for the
    errors only loading can reveal). The recipe schema (`config/checks/reward.py`) has checked it.

    `normalize: true` wraps the source in running mean/std standardization, at any level."""
    source = BUILDERS[section.type](section, where)
    return Normalized(source) if section.normalize else source
