"""One module per stage, each with `run(recipe, ctx) -> summary dict`. This table is the registry."""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = {"sft": "llmtune.stages.sft", "rm": "llmtune.stages.rm", "dpo": "llmtune.stages.dpo",
           "rs": "llmtune.stages.rs", "ppo": "llmtune.stages.rl", "rl": "llmtune.stages.rl"}


def get(stage: str) -> ModuleType:
    """The stage module (the schema only accepts stages listed here)."""
    return importlib.import_module(MODULES[stage])
