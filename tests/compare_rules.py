"""A rule judge for the compare tests (referenced as `rule:compare_rules:letters`)."""

from __future__ import annotations


def letters(prompts: list[list[dict[str, str]]], responses: list[str]) -> list[float]:
    """Count of alphabetic characters: deterministic, and different for different answers."""
    return [float(sum(ch.isalpha() for ch in r)) for r in responses]
