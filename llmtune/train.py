"""`train(recipe, run_dir)`: the one path every run takes (CLI, web UI subprocess, pipelines).

recipe (validated) → run directory, locked and checked (recipe.yaml, run.json) → stages.<stage>.run → model/.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmtune.config.load import dump
from llmtune.config.schema import Recipe
from llmtune.errors import ConfigError, LLMTuneError
from llmtune.runs.lock import LOCK_FILE, RunLock, parent_holds
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


def run_dir_for(recipe: Recipe, output_dir: str | None) -> Path:
    """Where the run goes: --output-dir, else the recipe's output_dir, else a new timestamped directory."""
    return Path(output_dir or recipe.output_dir or default_run_dir(recipe))


def _not_a_run(path: Path) -> ConfigError | None:
    """The refusal for a directory that holds files but no run.json (our lock file aside), if it does."""
    try:
        found = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []
    except OSError as exc:
        return ConfigError(f"output_dir: cannot read {path}: {exc.strerror or exc}")
    if not found:
        return None
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return ConfigError(f"output_dir: {path} is not empty and is not an llmtune run (it holds {shown}); choose a "
                       "new or empty directory, or pass --force to write into it anyway")


def _refuse_foreign(path: Path, force: bool) -> None:
    """Refusals that must leave the directory untouched, so they come before the lock file is created.
    (A directory with a lock file may be a run being created right now: the lock decides.)"""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: {path} exists and is not a directory")
    if force or (path / LOCK_FILE).exists() or (path / "run.json").exists():
        return
    error = _not_a_run(path)
    if error:
        raise error


def check_output_dir(path: Path, recipe_yaml: str, resume: bool, force: bool) -> dict[str, Any] | None:
    """What may happen in PATH, decided under its lock. Returns the run.json of a completed run that
    --resume with the same recipe would not change (there is nothing to do); raises ConfigError when
    the run must not start; None to go ahead."""
    run = RunDir(path)
    info = run.info()
    if not info:
        if resume:
            raise ConfigError(f"--resume: {path} holds no run to resume (no run.json)")
        error = None if force else _not_a_run(path)
        if error:
            raise error
        return None
    status = info.get("status")
    if resume:
        recorded = path / "recipe.yaml"
        same = recorded.is_file() and recorded.read_text() == recipe_yaml
        # A changed recipe (more steps, rounds or epochs) continues a completed run; the same recipe has
        # nothing left to do, and a second pass would only rewrite the run's record.
        return info if status == STATUS_DONE and same else None
    # A run that failed before saving anything (bad data, OOM at load) may simply be started again.
    if status == STATUS_FAILED and run.last_checkpoint() is None:
        return None
    raise ConfigError(f"output_dir: {path} already holds a run (status: {status}); "
                      "pass --resume to continue it or choose another --output-dir")


@contextmanager
def claimed(path: Path, recipe_yaml: str, resume: bool, force: bool = False,
            owner: bool = True) -> Iterator[dict[str, Any] | None]:
    """Hold PATH's run lock (runs/lock.py) while the block writes the run; yields check_output_dir's answer.

    Only the process that owns the run locks and checks: not the workers of a multi-process run (rank
    0's launching parent holds the lock for them), not ranks other than 0, not `owner=False` (the
    launcher of a node other than the first)."""
    if not owner or not is_main_process() or parent_holds(path):
        yield None
        return
    try:
        _refuse_foreign(path, force)
    except OSError as exc:  # e.g. a parent directory we may not enter
        raise ConfigError(f"output_dir: cannot use {path}: {exc.strerror or exc}") from None
    with RunLock(path):
        yield check_output_dir(path, recipe_yaml, resume, force)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_console() -> None:
    """Keep a run's console to llmtune's own lines.

    Off a terminal (a log file, `| tee`, the web UI's console.log) the libraries' tqdm bars (dataset
    passes, "Loading weights", "Writing model shards" at every checkpoint) only clutter the log; the
    run prints one line per logging step instead. And peft 0.21 reads transformers 5's deprecated
    `is_gradient_checkpointing` in every get_peft_model: a FutureWarning about library internals that
    no user can act on."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if sys.stderr.isatty():
        return
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


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


def train(recipe: Recipe, run_dir: str | Path, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run one stage of a recipe into run_dir. Returns the run summary (also in run.json).

    The directory must be new, empty, a failed run that saved nothing, or (with resume) a run;
    `force` accepts a directory holding anything else. A completed run resumed with the same recipe is
    left untouched: the summary comes back with `already_completed`."""
    path = Path(run_dir)
    recipe_yaml = dump(recipe)
    with claimed(path, recipe_yaml, resume, force) as done:
        if done is not None:
            return {"status": STATUS_DONE, "run_dir": str(path), "already_completed": True,
                    **(done.get("summary") or {})}
        return _run(recipe, RunDir(path), recipe_yaml, resume)


def local_data(recipe: Recipe) -> list[Path]:
    """The local files and directories the recipe's datasets read (recorded in run.json)."""
    from llmtune.config.schema import DATASET_FIELDS
    from llmtune.data.load import local_sources

    d = recipe.data
    return local_sources([{k: getattr(s, k) for k in DATASET_FIELDS} for s in d.datasets or [d]], d.registry)


def _run(recipe: Recipe, run: RunDir, recipe_yaml: str, resume: bool) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llmtune import stages
    from llmtune.stages.common import Context

    module = stages.get(recipe.stage)
    run.start(recipe_yaml, recipe.training.seed, recipe.stage, resume, data=local_data(recipe))
    with stop_on_signals() as stop:  # from here on, run.json always ends with how the run ended
        try:
            setup_logging(run)
            quiet_console()
            log.info("run directory: %s (stage %s, model %s)", run.path, recipe.stage, recipe.model.name)
            if recipe.training.threads:
                from llmtune.launch.threads import apply

                apply(recipe.training.threads)
                log.info("CPU threads: %d (training.threads)", recipe.training.threads)
            seed_everything(recipe.training.seed)
            summary = module.run(recipe, Context(run=run, resume=resume, stop=stop))
        except KeyboardInterrupt:
            run.finish(STATUS_INTERRUPTED, error="aborted", signal=stop.signal)
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
    run.finish(status, summary=summary, signal=stop.signal)
    if stop:
        log.info("interrupted by %s: checkpoint saved in %s; continue with --resume", stop.signal, run.checkpoints)
        return {"status": status, "run_dir": str(run.path), "signal": stop.signal, **summary}
    log.info("done: model saved in %s", run.model_dir)
    return {"status": status, "run_dir": str(run.path), **summary}
