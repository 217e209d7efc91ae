"""Labels → rows of the canonical preference dataset: votes and rankings on side-by-side answers,
answers the user wrote, and pairs picked from a run's rollouts (webui/rollouts.py).

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


def preference_row(prompt: list[Message], chosen: str, rejected: str, models: tuple[str, str], tie: bool = False,
                   source: str = "webui", **extra: Any) -> dict[str, Any]:
    """One row of the feedback dataset (the canonical preference shape plus who answered, when and how
    the label was given); `extra` adds provenance such as the rollout sample ids."""
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "models": {"chosen": models[0], "rejected": models[1]}, "tie": tie,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source, **extra}


def vote_rows(models: list[str], histories: list[list[Message]], ranking: list[list[int]]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(preference rows, tie rows) for the last turn of a side-by-side chat.

    Each model has its own history; the prompt of a row is the conversation of the better answer's
    model up to the last user message (the first model of the pair for ties): that is the context
    the voter saw the winning answer in. All answers reply to the same last user message."""
    def row(first: int, second: int, tie: bool) -> dict[str, Any]:
        return preference_row(histories[first][:-1], histories[first][-1]["content"],
                              histories[second][-1]["content"], (models[first], models[second]), tie)

    prefs = [row(w, lose, False) for i, better in enumerate(ranking) for worse in ranking[i + 1:]
             for w in better for lose in worse]
    ties = [row(a, b, True) for group in ranking for a, b in itertools.combinations(sorted(group), 2)]
    return prefs, ties


def written_rows(models: list[str], histories: list[list[Message]], text: str) -> list[dict[str, Any]]:
    """"Write the better answer": the user's own answer to the last turn, preferred to every model's."""
    text = (text or "").strip()
    if not text:
        raise ConfigError("better answer: write the answer first")
    return [preference_row(h[:-1], text, h[-1]["content"], ("human", m), source="webui:written")
            for m, h in zip(models, histories)]


def retrain_recipe(snapshot: dict[str, Any], stage: str, model: str) -> str:
    """"Train on this feedback": an rm or dpo recipe starting from MODEL (the model that was compared
    or labelled) on the feedback snapshot, as YAML text for the Recipes tab, ready to launch."""
    if stage not in ("dpo", "rm"):
        raise ConfigError(f"train on feedback: stage must be dpo or rm, got {stage!r}")
    if not model:
        raise ConfigError("train on feedback: choose the model to start from")
    what = "DPO of" if stage == "dpo" else "A reward model from"
    return f"""# {what} {model} on the feedback snapshot {snapshot['name']}:
#   {snapshot['count']} preference pairs, sha256 {snapshot['sha256'][:16]}..., taken {snapshot['created']}.
# The run records the snapshot's hash in its run.json. Launch it in the Runs tab; when it finishes,
# "Compare with its parent" puts it side by side with {model}.
description: {what} {model} on feedback snapshot {snapshot['name']}
stage: {stage}
model:
  name: {model}
  finetuning: lora          # {"the reference is the start model with the adapter switched off" if stage == "dpo" else "a score head and adapters on the start model"}
data:
  path: {snapshot['file']}
  format: canonical
  max_length: 128
training:
  epochs: 3
  learning_rate: 1.0e-3
  batch_size: 4
  logging_steps: 1
  save_steps: 50
"""
