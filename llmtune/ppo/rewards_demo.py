"""A rule reward simple enough that the built-in tiny models learn it in a couple of minutes on a
laptop CPU, so the PPO quickstart shows a rising reward curve without any reward model.

Used by `recipes/ppo-quickstart.yaml` as `reward.function: llmtune.ppo.rewards_demo:char_fraction`.
"""

from __future__ import annotations

# No llmtune imports: benchmarks/ppo_trl011_baseline.py loads this file by path in a virtualenv
# without llmtune, so both PPO implementations are scored by the very same function.


def char_fraction(prompts: list[list[dict[str, str]]], responses: list[str], chars: str = "0123456789") -> list[float]:
    """Fraction of a response's non-space characters that are in `chars` (0 for an empty response).

    A random-init model emits digits ~1% of the time; PPO has to push the whole output
    distribution towards them, which it can do by itself in a few dozen steps."""
    allowed = set(chars)
    out = []
    for text in responses:
        visible = [c for c in text if not c.isspace()]
        out.append(sum(c in allowed for c in visible) / len(visible) if visible else 0.0)
    return out
