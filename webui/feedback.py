"""Votes on side-by-side answers → rows of the canonical preference dataset.

A vote is a ranking of the answer slots, written with letters: `A>B` (A better), `B>A`, `A=B` (tie),
and for more models `B>A>C` or `A=C>B`. The shorthands `A`, `B` and `tie` mean `A>B`, `B>A` and
`A=B`. Every pair of answers in different groups gives one preference row (better → chosen); every
pair inside a group gives one tie row. Ties go to a separate file so `rm`/`dpo` never train on them.
"""

from __future__ import annotations

import itertools
import string
import time
from typing import Any

from llmtune.errors import ConfigError

Message = dict[str, str]


def parse_ranking(text: str, n: int) -> list[list[int]]:
    """Groups of slot indices, best first. Every one of the N slots must appear exactly once."""
    letters = string.ascii_uppercase[:n]
    raw = (text or "").strip().upper().replace(" ", "")
    if n == 2:
        raw = {"A": "A>B", "B": "B>A", "TIE": "A=B"}.get(raw, raw)
    groups = [g.split("=") for g in raw.split(">")] if raw else []
    flat = [x for g in groups for x in g]
    if not flat or sorted(flat) != sorted(letters) or any(len(x) != 1 for x in flat):
        example = "A, B or tie" if n == 2 else f"{'>'.join(letters)} (use = for ties)"
        raise ConfigError(f"vote: {text!r} must rank each of the answers {', '.join(letters)} exactly once, "
                          f"e.g. {example}")
    return [[letters.index(x) for x in g] for g in groups]


def vote_rows(models: list[str], histories: list[list[Message]], ranking: list[list[int]]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(preference rows, tie rows) for the last turn of a side-by-side chat.

    Each model has its own history; the prompt of a row is the conversation of the better answer's
    model up to the last user message (the first model of the pair for ties): that is the context
    the voter saw the winning answer in. All answers reply to the same last user message."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def row(first: int, second: int, tie: bool) -> dict[str, Any]:
        return {
            "prompt": histories[first][:-1],
            "chosen": [histories[first][-1]],
            "rejected": [histories[second][-1]],
            "models": {"chosen": models[first], "rejected": models[second]},
            "tie": tie,
            "timestamp": stamp,
            "source": "webui",
        }

    prefs = [row(w, lose, False) for i, better in enumerate(ranking) for worse in ranking[i + 1:]
             for w in better for lose in worse]
    ties = [row(a, b, True) for group in ranking for a, b in itertools.combinations(sorted(group), 2)]
    return prefs, ties
