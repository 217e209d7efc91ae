"""One module per stage, each with `run(recipe, ctx) -> summary dict`. This table is the registry."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from llmtune.errors import ConfigError

MODULES = {"sft": "llmtune.stages.sft", "rm": "llmtune.stages.rm", "dpo": "llmtune.stages.dpo",
           "rs": "llmtune.stages.rs", "ppo": "llmtune.stages.ppo"}


def implemented(stage: str) -> bool:
    return importlib.util.find_spec(MODULES[stage]) is not None


def get(stage: str) -> ModuleType:
    """The stage module; a clear error (not a traceback) for stages not implemented yet."""
    if not implemented(stage):
        raise ConfigError(f"stage: '{stage}' is not implemented yet in this version of llmtune "
                          f"(available: {', '.join(s for s in MODULES if implemented(s))})")
    return importlib.import_module(MODULES[stage])
