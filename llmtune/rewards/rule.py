"""`type: rule` — a plain Python function as the reward, named by dotted path.

    reward: {type: rule, function: "llmtune.rewards.rules:target_length", kwargs: {target: 40}}

Calling convention, decided by the function's first parameter name:
  - `prompts` → batch: `fn(prompts, responses, **kwargs) -> list[float]` (one call per batch);
  - anything else → per sample: `fn(prompt, response, **kwargs) -> float`.
`prompt`/`prompts` are canonical message lists, responses plain strings. Dataset columns travel
along as TRL's reward functions receive them: a parameter named like a column of the prompt rows
(`answer` in `numeric_answer(prompt, response, answer)`) gets the row's value (batch form: the list
of values), unless `reward.kwargs` sets it; a function with `**kwargs` gets every column. The module
must be importable (installed, or on PYTHONPATH / the working directory). Under the web UI's
confinement only allow-listed modules are imported (`llmtune webui --rule-module`).
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
        params = inspect.signature(self.fn).parameters
        names = list(params)
        self.batched = bool(names) and names[0] == "prompts"
        self.every_column = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.named = {n for n, p in list(params.items())[2:]
                      if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        # Parameters without a default that the recipe does not set can only come from the data.
        self.required = {n for n in self.named - self.kwargs.keys() if params[n].default is inspect.Parameter.empty}

    def columns_for(self, columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """The columns this function receives, each a list aligned with the responses."""
        missing = self.required - columns.keys()
        if missing:
            raise RewardError(f"reward function {self.name} needs the dataset column(s) {', '.join(sorted(missing))}, "
                              f"which the prompt rows do not have (their columns: {', '.join(sorted(columns)) or 'none'})")
        return {k: v for k, v in columns.items()
                if k not in self.kwargs and (self.every_column or k in self.named)}

    def score(self, prompts: list[list[Message]], responses: list[str], **columns: list[Any]) -> list[float]:
        check_pairs(prompts, responses)
        given = self.columns_for(columns)
        try:
            if self.batched:
                out = list(self.fn(prompts, responses, **given, **self.kwargs))
            else:
                out = [self.fn(p, r, **{k: v[i] for k, v in given.items()}, **self.kwargs)
                       for i, (p, r) in enumerate(zip(prompts, responses))]
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
