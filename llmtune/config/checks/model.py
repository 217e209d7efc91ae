"""`model`: the model resolves (registry name, run or model directory, hub id), its template exists,
and the fine-tuning method fits this machine and the stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmtune.config.checks.device import cuda_present, missing_package
from llmtune.errors import ConfigError, hint
from llmtune.registry.models import ModelSpec, resolve_model, templates

if TYPE_CHECKING:
    from llmtune.config.schema import Recipe


def resolve(name: str, where: str, errors: list[str], pending: frozenset[str],
            template: str | None = None, gguf_file: str | None = None) -> ModelSpec | None:
    """The spec of a model reference, or None with the reason appended to `errors` (also None for
    a run directory an earlier pipeline stage will create: nothing to look at yet)."""
    if name in pending:
        return None
    try:
        return resolve_model(name, template=template, gguf_file=gguf_file)
    except ConfigError as exc:
        errors.append(f"{where}: {exc}")
        return None


def check_model(recipe: Recipe, errors: list[str], device_checks: bool, pending: frozenset[str]) -> ModelSpec | None:
    """Checks `model.*`; returns the model's spec for the stage checks (None when unknown)."""
    m = recipe.model
    template = m.template
    if template is not None and template not in templates():
        errors.append(f"model.template: unknown chat template '{template}'" + hint(template, templates()))
        template = None
    if m.gguf_file and Path(m.gguf_file).name != m.gguf_file:
        errors.append(f"model.gguf_file: '{m.gguf_file}' must be a file name inside the directory model.name, "
                      "not a path")
        spec = None
    elif m.gguf_file and not Path(m.name).expanduser().is_dir():
        errors.append(f"model.gguf_file: names a file inside the directory model.name, but '{m.name}' is not a "
                      "local directory (give the .gguf path as model.name instead)")
        spec = None
    else:
        spec = resolve(m.name, "model.name", errors, pending, template, m.gguf_file)
    if m.finetuning == "qlora" and device_checks:
        if not cuda_present():
            errors.append("model.finetuning: qlora needs a CUDA GPU (bitsandbytes 4-bit); none is visible here. "
                          "Use lora or full on this machine")
        elif missing := missing_package("bitsandbytes"):
            errors.append(f"model.finetuning: qlora needs bitsandbytes; {missing}")
    if spec is not None and spec.kind == "encoder" and recipe.stage != "rm":
        errors.append(f"model.name: '{m.name}' is an encoder-only model; it can only be trained with stage: rm")
    return spec
