"""Pairwise accuracy of a reward model on preference data: how often it scores the chosen response
above the rejected one, with the mean margin and a split by `source` when rows carry one.

Scoring goes through `RewardModelScorer`, i.e. the same input encoding the rm stage trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtune.config.schema import RewardSection
from llmtune.data.load import load_mixture, load_rows
from llmtune.data.registry import FORMATS, list_entries

# Asking for "no limit" lets the scorer apply the reward model's own training length.
UNCAPPED = 1 << 30


def default_split(data: str | None, path: str | None, registries: list[str] | None = None) -> str:
    """Held-out data where there is some: the test split of a registry dataset or a directory,
    else train (a single local file is one split)."""
    if path:
        return "train" if Path(path).expanduser().is_file() else "test"
    entries = list_entries(registries)
    return "test" if data in entries and "test" in entries[data].splits else "train"


def preference_rows(data: str | None, path: str | None, split: str = "train", n: int | None = None,
                    subset: str | None = None, registries: list[str] | None = None,
                    eval_fraction: float = 0.0, seed: int = 42) -> list[dict[str, Any]]:
    """Canonical preference rows from a registry dataset or a local file (`data` may name a raw
    format such as canonical or hh when `path` is given).

    eval_fraction > 0 keeps only the pairs a recipe with the same data, eval_fraction and
    training.seed holds out for evaluation, so a run can be re-scored on exactly its eval set.
    """
    name, fmt = data, None
    if data and path and data in FORMATS and data not in list_entries(registries):
        name, fmt = None, data
    spec = {"name": name, "path": path, "split": split, "format": fmt, "subset": subset}
    if eval_fraction:
        rows = load_mixture([spec], shape="preference", eval_fraction=eval_fraction, seed=seed,
                            extra_registries=registries)[1]
    else:
        rows = load_rows(**spec, shape="preference", extra_registries=registries).rows
    return rows[:n] if n else rows


def reward_accuracy(model: str, rows: list[dict[str, Any]], batch_size: int = 16,
                    max_length: int | None = None) -> dict[str, Any]:
    """{"accuracy", "mean_margin", "n", "max_length"[, "by_source"]} of `model` on preference rows."""
    from llmtune.rewards.reward_model import RewardModelScorer, pairwise_stats, split_pair

    scorer = RewardModelScorer(RewardSection(type="reward_model", model=model, batch_size=batch_size,
                                             max_length=max_length or UNCAPPED))
    pairs = [split_pair(r) for r in rows]
    prompts = [p for p, _, _ in pairs]
    scores = scorer.score(prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs])
    stats = pairwise_stats(scores[: len(pairs)], scores[len(pairs):], [r.get("source") for r in rows])
    return {**stats, "max_length": scorer.max_length}
