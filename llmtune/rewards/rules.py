"""Example rule rewards to use as `reward.function: llmtune.rewards.rules:<name>`, or to copy.

Per-sample functions take `(prompt, response, **kwargs)`; `distinct_ngrams` shows the batch form
(first parameter `prompts`). `target_length` and `keyword_density` give a dense signal that even a
random-init tiny model can climb in a few minutes (the rs/ppo quickstarts use them); the others are
the shaping terms people usually mix in (length limits, formats, repetition).
"""

from __future__ import annotations

import re

from llmtune.rewards.base import Message

_WORD = re.compile(r"\w+")


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
