"""`train(recipe, run_dir)`: the one path every run takes (CLI, web UI subprocess, pipelines).

recipe (validated) → run directory (recipe.yaml, run.json) → stages.<stage>.run → model/.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from llmtune.config.load import dump
from llmtune.config.schema import Recipe
from llmtune.errors import ConfigError, LLMTuneError
from llmtune.runs.rundir import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    RunDir,
    is_main_process,
    stop_on_signals,
)

log = logging.getLogger("llmtune")


def default_run_dir(recipe: Recipe) -> Path:
    model = Path(recipe.model.name).name if "/" in recipe.model.name else recipe.model.name
    return Path("runs") / f"{recipe.stage}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run_dir(recipe: Recipe, output_dir: str | None, resume: bool) -> Path:
    """Where the run goes; refuses to overwrite a finished run unless resuming it."""
    path = Path(output_dir or recipe.output_dir or default_run_dir(recipe))
    run = RunDir(path)
    info = run.info()
    # A run that failed before saving anything (bad data, OOM at load) may simply be started again.
    fresh_failure = info.get("status") == STATUS_FAILED and run.last_checkpoint() is None
    if info and not resume and not fresh_failure and is_main_process():
        raise ConfigError(f"output_dir: {path} already holds a run (status: {info.get('status')}); "
                          "pass --resume to continue it or choose another --output-dir")
    if resume and not info:
        raise ConfigError(f"--resume: {path} holds no run to resume (no run.json)")
    return path


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(run: RunDir) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger("llmtune")
    root.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        console.setLevel(logging.INFO if run.main else logging.WARNING)  # one voice in multi-process runs
        root.addHandler(console)
    if run.main:
        fh = logging.FileHandler(run.path / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("transformers", "datasets", "accelerate", "trl", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train(recipe: Recipe, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run one stage of a recipe into run_dir. Returns the run summary (also in run.json)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llmtune import stages
    from llmtune.stages.common import Context

    module = stages.get(recipe.stage)
    run = RunDir(run_dir)
    run.start(dump(recipe), recipe.training.seed, recipe.stage, resume)
    setup_logging(run)
    log.info("run directory: %s (stage %s, model %s)", run.path, recipe.stage, recipe.model.name)
    seed_everything(recipe.training.seed)
    with stop_on_signals() as stop:
        try:
            summary = module.run(recipe, Context(run=run, resume=resume, stop=stop))
        except KeyboardInterrupt:
            run.finish(STATUS_INTERRUPTED, error="aborted")
            raise
        except LLMTuneError as exc:
            run.finish(STATUS_FAILED, error=str(exc))
            raise
        except Exception as exc:
            run.finish(STATUS_FAILED, error=f"{type(exc).__name__}: {exc}")
            if run.main:
                (run.path / "error.txt").write_text(traceback.format_exc())
            raise
    status = STATUS_INTERRUPTED if stop else STATUS_DONE
    run.finish(status, summary=summary)
    if stop:
        log.info("interrupted by %s: checkpoint saved in %s; continue with --resume", stop.signal, run.checkpoints)
    else:
        log.info("done: model saved in %s", run.model_dir)
    return {"status": status, "run_dir": str(run.path), **summary}
