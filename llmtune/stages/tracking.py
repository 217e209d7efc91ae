"""`training.report_to` for the loops that are not a `transformers.Trainer` (online RL, the rounds of
rejection sampling): accelerate's trackers (tensorboard, wandb, mlflow, ...) get exactly the rows
metrics.jsonl gets, at the same steps. Local trackers write under RUN/logs/ (TensorBoard:
RUN/logs/<stage>/events.out.tfevents.*)."""

from __future__ import annotations

from typing import Any

from llmtune.config.schema import Recipe
from llmtune.runs.rundir import RunDir

LOG_DIR = "logs"


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as scalar key paths (what trackers show as hyperparameters), without the online-RL
    section the stage does not read (stage ppo reads `ppo`, stage rl reads `rl`)."""
    unused = {"ppo": "rl", "rl": "ppo"}.get(recipe.stage)
    out: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if not (path == "" and key == unused):
                    walk(inner, f"{path}.{key}" if path else key)
        elif isinstance(value, (bool, int, float, str)):
            out[path] = value
        elif isinstance(value, list):
            out[path] = str(value)

    walk(recipe.to_dict(), "")
    return out


class Trackers:
    """The recipe's trackers for one run, on the main process only (nothing when report_to is empty)."""

    def __init__(self, recipe: Recipe, run: RunDir):
        self.trackers: list[Any] = []
        if not recipe.training.report_to or not run.main:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, filter_trackers

        logging_dir = run.path / LOG_DIR
        for kind in filter_trackers(recipe.training.report_to, logging_dir):  # validation checked they exist
            cls = LOGGER_TYPE_TO_CLASS[str(kind)]
            tracker = cls(recipe.stage, logging_dir) if cls.requires_logging_directory else cls(recipe.stage)
            tracker.start()  # what Accelerator.init_trackers does
            tracker.store_init_configuration(_flat_config(recipe))
            self.trackers.append(tracker)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
