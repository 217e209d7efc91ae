"""`data`: every dataset entry resolves (registry name or local path), its format, options, subset and
splits exist, and it can give the rows the stage trains on. As far as can be known offline: a hub
dataset's splits and subsets are the registry's, a local directory's are its file names."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.config.checks import given
from llmtune.data.converters import CONVERTERS, DERIVABLE, column_shape, natural_shape
from llmtune.data.raw import data_files
from llmtune.data.registry import DatasetEntry, entry_format, entry_split, list_entries, resolve_path
from llmtune.errors import ConfigError, DataError, hint

if TYPE_CHECKING:
    from llmtune.config.schema import DatasetSection, Recipe

# The canonical shape each stage trains on.
STAGE_SHAPE = {"sft": "sft", "rm": "preference", "dpo": "preference", "rs": "prompt", "ppo": "prompt", "rl": "prompt"}


def check_data(recipe: Recipe, errors: list[str]) -> None:
    data = recipe.data
    try:
        registry = list_entries(data.registry)
    except ConfigError as exc:
        errors.append(f"data.registry: {exc}")
        registry = {}
    entries: list[tuple[str, DatasetSection]] = []
    if data.datasets:
        if data.name or data.path:
            errors.append("data: give either name/path or a datasets list, not both")
        for key in _set_beside_list(data):
            errors.append(f"data.{key}: set it on each entry of data.datasets; beside a datasets list a top-level "
                          "value would not be used")
        entries = [(f"data.datasets[{i}]", d) for i, d in enumerate(data.datasets)]
    elif data.name or data.path:
        entries = [("data", data)]
    else:
        errors.append("data: give a dataset `name` (see `llmtune datasets`), a local `path`, or a `datasets` list")
    for where, ds in entries:
        check_dataset(ds, where, registry, recipe.stage, errors)


def _set_beside_list(data: Any) -> list[str]:
    """Per-dataset keys given at the top of `data` next to a `datasets` list (name/path are reported
    on their own)."""
    return [f.name for f in dataclasses.fields(data.datasets[0])
            if f.name not in ("name", "path") and given(data, f.name)]


def check_dataset(ds: DatasetSection, where: str, registry: dict[str, DatasetEntry], stage: str,
                  errors: list[str]) -> None:
    """One dataset entry (`data` itself or `data.datasets[i]`)."""
    if not (ds.name or ds.path):
        errors.append(f"{where}: give a dataset `name` (see `llmtune datasets`) or a local `path`")
        return
    entry = None
    if ds.name:
        entry = registry.get(ds.name)
        if entry is None:
            if registry:
                errors.append(f"{where}.name: unknown dataset '{ds.name}'" + hint(ds.name, registry))
            return
    local = None
    if ds.path:
        local = resolve_path(ds.path)
        if not local.exists():
            errors.append(f"{where}.path: no such file or directory: {ds.path}")
            local = None
    if ds.format and ds.format not in CONVERTERS:
        errors.append(f"{where}.format: unknown format '{ds.format}'" + hint(ds.format, CONVERTERS))
        return
    fmt = entry_format(entry, ds.format, ds.columns)
    options = _check_options(ds, where, entry, fmt, errors)
    if ds.subset and entry is not None and entry.subsets and ds.subset not in entry.subsets:
        errors.append(f"{where}.subset: unknown subset '{ds.subset}' of dataset '{ds.name}'"
                      + hint(ds.subset, entry.subsets))
    for key in ("split", "eval_split"):
        split = getattr(ds, key)
        if split is not None:
            _check_split(split, f"{where}.{key}", entry, local, bool(ds.path), errors)
    if ds.eval_split and ds.eval_fraction:
        errors.append(f"{where}.eval_fraction: give eval_split or eval_fraction, not both")
    if options is not None:
        _check_shape(STAGE_SHAPE[stage], stage, ds, where, entry, fmt, options, errors)


def _check_options(ds: DatasetSection, where: str, entry: DatasetEntry | None, fmt: str,
                   errors: list[str]) -> dict[str, Any] | None:
    """The converter options the dataset will be read with (None when they are unusable): each
    declared by the format's converter (data/converters.py), with a value of the declared type."""
    declared = CONVERTERS[fmt].options
    options = {**(entry.options if entry else {}), **ds.options}
    if ds.columns:
        if fmt != "columns":
            errors.append(f"{where}.columns: a column mapping is only used with format 'columns' (format is '{fmt}')")
            return None
        options["columns"] = ds.columns
    ok = True
    for key, value in options.items():
        path = f"{where}.options.{key}" if key in ds.options else f"{where}.name"
        if key not in declared:
            errors.append(f"{path}: unknown option '{key}' for format '{fmt}'" + hint(key, declared or ["(none)"]))
            ok = False
        elif value is not None and (not isinstance(value, declared[key].types) or isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in declared[key].types)
            errors.append(f"{path}: option '{key}' expects {names}, got {value!r}")
            ok = False
    if fmt == "columns":
        try:
            column_shape(options.get("columns"))
        except ConfigError as exc:
            errors.append(f"{where}.columns: {exc}")
            ok = False
    return options if ok else None


def _check_split(split: str, where: str, entry: DatasetEntry | None, local: Path | None, has_path: bool,
                 errors: list[str]) -> None:
    """A split of a registry entry is one it lists; of local files, one their names give."""
    try:
        if has_path:
            if local is not None:
                data_files(local, split)
        elif entry is not None:
            source_split = entry_split(entry, split)
            if entry.path:
                data_files(resolve_path(entry.path), source_split)
    except (ConfigError, DataError) as exc:
        errors.append(f"{where}: {exc}")


def _check_shape(shape: str, stage: str, ds: DatasetSection, where: str, entry: DatasetEntry | None, fmt: str,
                 options: dict[str, Any], errors: list[str]) -> None:
    """The dataset can give the rows the stage trains on."""
    if entry is not None and fmt == entry.format:
        if shape not in entry.shapes:
            errors.append(f"{where}.name: dataset '{ds.name}' cannot give {shape} rows (stage {stage} trains on "
                          f"them); it gives: {', '.join(entry.shapes)}")
        return
    native = natural_shape(fmt, options)
    if native is not None and shape not in DERIVABLE[native]:
        errors.append(f"{where}.format: format '{fmt}' gives {native} rows, which cannot become {shape} rows "
                      f"(stage {stage} trains on them)")
