"""`type: rule` — a plain Python function as the reward, named by dotted path.

    reward: {type: rule, function: "llmtune.rewards.rules:target_length", kwargs: {target: 40}}

Calling convention, decided by the function's first parameter name:
  - `prompts` → batch: `fn(prompts, responses, **kwargs) -> list[float]` (one call per batch);
  - anything else → per sample: `fn(prompt, response, **kwargs) -> float`.
`prompt`/`prompts` are canonical message lists, responses plain strings. The module must be
importable (installed, or on PYTHONPATH / the working directory). Under the web UI's confinement
only allow-listed modules are imported (`llmtune webui --rule-module`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from llmtune.config.checks.reward import import_function
from llmtune.config.schema import RewardSection
from llmtune.rewards.base import Message, RewardError, check_pairs


class RuleReward:
    """A user function as a reward source; see the module doc for the calling convention."""

    def __init__(self, section: RewardSection, where: str = "reward"):
        self.name = section.function or ""
        self.fn = import_function(self.name, f"{where}.function")
        self.kwargs = dict(section.kwargs)
        params = list(inspect.signature(self.fn).parameters)
        self.batched = bool(params) and params[0] == "prompts"

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float]:
        check_pairs(prompts, responses)
        try:
            if self.batched:
                out = list(self.fn(prompts, responses, **self.kwargs))
            else:
                out = [self.fn(p, r, **self.kwargs) for p, r in zip(prompts, responses)]
        except Exception as exc:  # the user's function: say which one failed and how, not a bare traceback
            raise RewardError(f"reward function {self.name} failed: {type(exc).__name__}: {exc}") from exc
        if len(out) != len(responses):
            raise RewardError(f"reward function {self.name} returned {len(out)} scores for "
                              f"{len(responses)} responses")
        return [self._number(v) for v in out]

    def _number(self, value: Any) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise RewardError(f"reward function {self.name} returned {value!r}, not a number") from None
        if not math.isfinite(x):
            raise RewardError(f"reward function {self.name} returned {x}")
        return x
