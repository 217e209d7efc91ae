"""What every reward source is, plus the helpers they share.

A reward source turns (prompt, response) pairs into one float each. Prompts are canonical message
lists (`[{"role": "user", "content": ...}, ...]`) so a source can see the whole conversation; the
response is the generated assistant text. Nothing here imports torch: `llmtune.rewards` stays
cheap to import for validation and the CLI.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

from llmtune.errors import LLMTuneError

Message = dict[str, str]


class RewardError(LLMTuneError):
    """A reward source failed at scoring time (endpoint down after retries, rule returned garbage)."""


@runtime_checkable
class RewardSource(Protocol):
    """The one interface the rs and online-RL stages use."""

    def score(self, prompts: list[list[Message]], responses: list[str], **columns: list[Any]) -> list[float]:
        """One reward per (prompt, response) pair, in order. `columns` are the prompts' other dataset
        columns, one list each aligned with the pairs (a gold `answer`): rule functions receive the
        ones they name, as TRL's reward functions receive dataset columns; other sources ignore them."""
        ...


def reward_stats(source: Any) -> dict[str, float]:
    """Counters a source exposes through an optional `stats()` (e.g. judge fallbacks), for logging."""
    stats = getattr(source, "stats", None)
    return dict(stats()) if callable(stats) else {}


def check_pairs(prompts: list[list[Message]], responses: list[str]) -> None:
    """Sources index prompts and responses in lockstep; a length mismatch is a caller bug."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")


def prompt_text(messages: list[Message]) -> str:
    """A conversation as plain 'Role: text' lines, for scorers that read text (judges, classifiers)."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


class RunningStats:
    """Running mean/variance across calls (Welford), so standardization does not depend on batch
    size: the one implementation behind `reward.normalize` and `ppo.reward_normalize`."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0

    def update(self, values: list[float]) -> None:
        for v in values:
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self._m2 += delta * (v - self.mean)

    @property
    def std(self) -> float:
        """Sample standard deviation; 1 until there are two distinct values (nothing to scale by)."""
        std = math.sqrt(self._m2 / (self.count - 1)) if self.count > 1 else 1.0
        return std if std > 1e-8 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self._m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class Normalized:
    """`normalize: true`: standardize a source's scores with running mean/std over every call so far.

    The statistics include the current batch, so the very first batch is already centred."""

    def __init__(self, source: RewardSource):
        self.source = source
        self.running = RunningStats()

    def score(self, prompts: list[list[Message]], responses: list[str], **columns: list[Any]) -> list[float]:
        raw = self.source.score(prompts, responses, **columns)
        self.running.update(raw)
        return [(r - self.running.mean) / self.running.std for r in raw]

    def stats(self) -> dict[str, float]:
        return {**reward_stats(self.source), "running_mean": self.running.mean, "running_std": self.running.std}
