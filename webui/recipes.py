"""The Recipes tab's two helpers: the form ↔ YAML bridge and the recipe list's size hints.

Form edits change the user's own text, never a re-dump of it: the YAML is edited with ruamel.yaml's
round-trip mode, so comments, key order, quoting and the way every untouched number is written
(`4`, `3.0e-3`) stay exactly as typed, and only the keys the form moved are written. A cleared form
field removes its key, so the recipe falls back to the schema's default (or its `base:`) and the form
shows that value: form and YAML never disagree.

The hints come from `llmtune plan` (`make_plan`): model size and the memory a run needs, so a user can
tell a CPU quickstart from a GPU recipe before launching. plan builds the model on the meta device
(imports torch, seconds per recipe), so hints are computed on demand and cached per file and mtime.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.util import load_yaml_guess_indent

from llmtune.config.schema import DataSection, ModelSection, TrainingSection
from llmtune.errors import ConfigError, LLMTuneError

FORM_KEYS = ("stage", "model.name", "data.name", "model.finetuning", "training.learning_rate", "training.epochs",
             "training.max_steps", "training.batch_size", "data.max_length", "model.lora.r",
             "distributed.strategy")
INT_KEYS = ("training.max_steps", "training.batch_size", "data.max_length", "model.lora.r")
FLOAT_KEYS = ("training.learning_rate", "training.epochs")
CPU_PARAMS = 200_000_000  # up to ~SmolLM2-135M: trains on a laptop CPU in minutes


def lookup(data: Any, dotted: str, default: Any = None) -> Any:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def form_defaults() -> dict[str, Any]:
    """What each form key means when a recipe leaves it out: the schema's defaults."""
    t, m, d = TrainingSection(), ModelSection(name=""), DataSection()
    return {"stage": "sft", "model.name": None, "data.name": None, "model.finetuning": m.finetuning,
            "training.learning_rate": t.learning_rate, "training.epochs": t.epochs,
            "training.max_steps": t.max_steps, "training.batch_size": t.batch_size,
            "data.max_length": d.max_length, "model.lora.r": m.lora.r, "distributed.strategy": "none"}


def form_values(merged: dict[str, Any]) -> list[Any]:
    """The form fields' values for a merged recipe dict; missing keys show the schema's defaults."""
    defaults = form_defaults()
    values = [lookup(merged, key, defaults[key]) for key in FORM_KEYS]
    values[-1] = values[-1] == "deepspeed"
    return values


def _yaml() -> YAML:
    y = YAML()  # round-trip
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap a long line the user wrote
    return y


def _load(text: str) -> tuple[Any, YAML]:
    y = _yaml()
    try:
        data, indent, block_seq_indent = load_yaml_guess_indent(text) if text.strip() else ({}, 2, None)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"recipe: not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("recipe: a recipe must be a mapping of sections")
    offset = block_seq_indent or 0
    y.indent(mapping=indent or 2, sequence=(indent or 2) + offset, offset=offset)
    return data, y


def _normal(key: str, value: Any) -> Any:
    if key in INT_KEYS:
        return int(value)
    if key in FLOAT_KEYS:  # `4` stays `4` (YAML and the schema read it as 4.0 anyway)
        return int(value) if float(value).is_integer() else float(value)
    return value


def _same(key: str, a: Any, b: Any) -> bool:
    if key in INT_KEYS + FLOAT_KEYS:
        try:
            return a is not None and b is not None and float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def edit_text(text: str, merged: dict[str, Any], values: list[Any]) -> str:
    """TEXT with the form's VALUES written in (see the module doc). MERGED is the recipe as it
    resolves (bases merged), which is what the form showed."""
    data, y = _load(text)
    defaults = form_defaults()
    changed = False
    for key, value in zip(FORM_KEYS, values):
        if key == "distributed.strategy":
            current = lookup(merged, key, "none")
            value = "deepspeed" if value else ("none" if current == "deepspeed" else current)
        if value is None or value == "":
            changed |= _delete(data, key)
            continue
        value = _normal(key, value)
        if _same(key, value, lookup(merged, key, defaults[key])):
            continue
        if key == "data.name" and isinstance(data.get("data"), dict):
            for stale in ("path", "datasets", "format"):  # they described the previous dataset
                data["data"].pop(stale, None)
        _put(data, key, value)
        changed = True
    if not changed:
        return text
    out = io.StringIO()
    y.dump(data, out)
    return out.getvalue()


def _put(data: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def _delete(data: Any, dotted: str) -> bool:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    return False


class RecipeHints:
    """`plan`'s verdict per recipe file: model size, memory, CPU or GPU; cached per (file, mtime)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, float], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def hint(self, path: Path) -> dict[str, Any]:
        """{"where": "CPU"|"GPU"|"command line", "text": one line for the list, ...}."""
        key = (str(path), path.stat().st_mtime)
        with self._lock:  # one plan at a time: they are CPU-bound, and transformers' lazy imports race
            if key not in self._cache:
                self._cache[key] = plan_hint(path)
            return self._cache[key]


def plan_hint(path: Path) -> dict[str, Any]:
    """One recipe's hint, from `llmtune plan`'s estimate (on this machine, and for a GPU)."""
    from llmtune.config.confine import active
    from llmtune.config.load import load_dict
    from llmtune.config.pipeline import is_pipeline
    from llmtune.config.schema import check, parse

    source = path.name
    try:
        if is_pipeline(path):
            return {"where": "command line", "text": "pipeline (several stages): run it with `llmtune train` "
                    "from a shell; the web UI launches single-stage recipes"}
        recipe = parse(load_dict(path), source)
        if (policy := active()) is not None:  # what the UI would refuse to launch
            policy.resolve_refs(recipe, source)
        recipe = check(recipe, source, device_checks=False)  # a GPU recipe is still sized on a laptop
        from llmtune.launch.plan import make_plan

        plan = make_plan(recipe, gpus=[])  # fp32 on this CPU
        if plan["model"]["params"] > CPU_PARAMS:
            plan = make_plan(recipe, gpu_memory_gb=80.0, gpus=[])  # the precision a GPU would use
    except LLMTuneError as exc:
        return {"where": "not runnable here", "text": f"not runnable from the web UI: {str(exc).splitlines()[0]}"}
    params = plan["model"]["params"]
    gib = plan["memory"]["per_device_total_gib"]
    size = f"{plan['model']['name']}, {_count(params)} params"
    if params <= CPU_PARAMS:
        return {"where": "CPU", "text": f"{size}, ~{gib:.1f} GiB: CPU quickstart", "params": params, "gib": gib}
    return {"where": "GPU", "text": f"{size}, ~{gib:.1f} GiB per GPU ({plan['memory']['precision']}): needs a GPU",
            "params": params, "gib": gib}


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)
