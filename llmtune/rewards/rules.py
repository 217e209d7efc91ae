"""Rule rewards to use as `reward.function: llmtune.rewards.rules:<name>`, or to copy.

Per-sample functions take `(prompt, response, **kwargs)`; `distinct_ngrams` shows the batch form
(first parameter `prompts`). A parameter named like a dataset column (`answer`) receives that row's
value (see `llmtune.rewards.rule`). `numeric_answer` is a verifiable reward: it checks the final
number against the row's gold answer (the `arithmetic` data set, GSM8K-style tasks).
`target_length`, `keyword_density` and `char_fraction` give a dense signal that even a random-init
tiny model can climb in a few minutes; the others are the shaping terms people usually mix in
(length limits, formats, repetition).

No llmtune imports at run time: benchmarks/ppo_trl011_baseline.py loads this file by path in a
virtualenv without llmtune, so both PPO implementations are scored by the very same function.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmtune.rewards.base import Message

_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _length(text: str, unit: str) -> int:
    if unit == "chars":
        return len(text)
    if unit == "words":
        return len(_words(text))
    raise ValueError(f"unit must be 'chars' or 'words', got {unit!r}")


def target_length(prompt: list[Message], response: str, target: int = 40, unit: str = "chars") -> float:
    """1 at exactly `target` chars/words, falling linearly to 0 at 0 or 2x target, floored at -1."""
    return max(-1.0, 1.0 - abs(_length(response, unit) - target) / max(target, 1))


def length_penalty(prompt: list[Message], response: str, max_words: int = 100, penalty: float = 0.01) -> float:
    """0 up to `max_words`, then `-penalty` per extra word: discourages rambling when mixed in."""
    return -penalty * max(0, len(_words(response)) - max_words)


def keyword_density(prompt: list[Message], response: str, keywords: list[str] | None = None,
                    case_sensitive: bool = False) -> float:
    """Fraction of the response's words that are one of `keywords` (0..1); dense, so easy to learn."""
    words = _words(response)
    if not words:
        return 0.0
    wanted = set(keywords or ["the"])
    if not case_sensitive:
        wanted = {k.lower() for k in wanted}
        words = [w.lower() for w in words]
    return sum(w in wanted for w in words) / len(words)


def contains_keyword(prompt: list[Message], response: str, keywords: list[str] | None = None,
                     reward: float = 1.0, penalty: float = 0.0, case_sensitive: bool = False) -> float:
    """`reward` when any keyword occurs as a word in the response, else `penalty`."""
    return reward if keyword_density(prompt, response, keywords, case_sensitive) > 0 else penalty


def regex_match(prompt: list[Message], response: str, pattern: str = r"^[A-Z].*[.!?]$",
                reward: float = 1.0, penalty: float = 0.0) -> float:
    """A format reward: `reward` when the stripped response matches `pattern` (default: a sentence)."""
    return reward if re.search(pattern, response.strip(), flags=re.DOTALL) else penalty


def distinct_ngrams(prompts: list[list[Message]], responses: list[str], n: int = 2) -> list[float]:
    """Share of distinct word n-grams in each response (1 = no repetition); batch convention."""
    out = []
    for response in responses:
        words = _words(response.lower())
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        out.append(len(set(grams)) / len(grams) if grams else 0.0)
    return out


def final_number(text: str) -> float | None:
    """The last number in a text ("1,200" reads 1200), or None; how GSM8K-style answers are read."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_answer(prompt: list[Message], response: str, answer: float | int | str, reward: float = 1.0,
                   penalty: float = 0.0) -> float:
    """`reward` when the response's final number equals the row's gold `answer` (a dataset column),
    else `penalty`: the checker of the `arithmetic` data set."""
    got = final_number(response)
    return reward if got is not None and abs(got - float(answer)) < 1e-6 else penalty


def char_fraction(prompt: list[Message], response: str, chars: str = "0123456789") -> float:
    """Fraction of a response's non-space characters that are in `chars` (0 when empty): a dense signal
    a random-init model climbs by itself in a few dozen steps, for smoke tests."""
    visible = [c for c in response if not c.isspace()]
    return sum(c in chars for c in visible) / len(visible) if visible else 0.0
