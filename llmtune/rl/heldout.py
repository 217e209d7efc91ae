"""Held-out evaluation: greedy answers to prompts the policy never trained on, scored by the reward
(and the eval_reward) with each prompt's dataset columns. For a verifiable task such as `arithmetic`
with `numeric_answer`, the mean is the held-out accuracy; online-RL runs log it as
`heldout_reward_mean` before training, every `training.eval_steps` and at the end, and
`benchmarks/alignment.py` scores every arm with it."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmtune.config.schema import GenerationSection
from llmtune.data.templates import ChatTemplate
from llmtune.modeling.generate import generate


def row_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The rows' dataset columns besides the prompt, one list each (None where a row lacks one)."""
    names = sorted({k for r in rows for k in r if k != "prompt"})
    return {k: [r.get(k) for r in rows] for k in names}


def heldout_scores(model: Any, tok: Any, template: ChatTemplate, kind: str, rows: list[dict[str, Any]],
                   reward: Any, gen: GenerationSection, max_prompt_length: int, batch_size: int,
                   eval_reward: Any | None = None) -> dict[str, Any]:
    """Greedy answers (up to gen.max_new_tokens) to every row's prompt, scored. Returns the answers, the
    scores (and eval scores) per row, and their means."""
    greedy = dataclasses.replace(gen, do_sample=False)
    prompts = [r["prompt"] for r in rows]
    answers = [a[0] for a in generate(model, tok, template, kind, prompts, greedy, max_prompt_length,
                                      batch_size=batch_size)]
    columns = row_columns(rows)
    scores = [float(x) for x in reward.score(prompts, answers, **columns)]
    out: dict[str, Any] = {"answers": answers, "scores": scores, "reward_mean": sum(scores) / len(scores),
                           "response_chars": sum(len(a) for a in answers) / len(answers)}
    if eval_reward is not None:
        judged = [float(x) for x in eval_reward.score(prompts, answers, **columns)]
        out.update(eval_scores=judged, eval_reward_mean=sum(judged) / len(judged))
    return out
