"""Load a dataset (by registry name and/or local path) into canonical rows with a report of what
was dropped and why, and mix several datasets by weight into train and eval rows."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmtune.data.converters import CONVERTERS, FORMAT_OPTIONS, RowError, column_shape
from llmtune.data.raw import Record, hub_records, read_records
from llmtune.data.registry import FORMATS, SHAPES, DatasetEntry, get_entry, list_entries, resolve_path
from llmtune.errors import ConfigError, DataError, hint

log = logging.getLogger("llmtune.data")

MAX_FAILED_FRACTION = 0.5
SHOWN_ERRORS = 5


@dataclass
class Report:
    """What happened to the raw rows of one load, for the user and for run logs."""

    label: str
    read: int = 0
    converted: int = 0
    kept: int = 0
    filtered: int = 0
    failed: int = 0
    errors: list[RowError] = field(default_factory=list)

    def summary(self) -> str:
        """One line of counts, then the first few errors as file:line: reason."""
        head = (
            f"{self.label}: read {self.read}, converted {self.converted} (kept {self.kept}), "
            f"filtered {self.filtered}, failed {self.failed}"
        )
        shown = [f"  {e}" for e in self.errors[:SHOWN_ERRORS]]
        more = (
            [f"  ... and {len(self.errors) - SHOWN_ERRORS} more"] if len(self.errors) > SHOWN_ERRORS else []
        )
        return "\n".join([head, *shown, *more])


@dataclass
class LoadResult:
    rows: list[dict[str, Any]]
    report: Report


def _counted(records: Iterable[Record], report: Report) -> Iterator[Record]:
    """Count raw rows as the converter pulls them (some converters need every row first)."""
    for record in records:
        report.read += 1
        yield record


def _natural_shape(fmt: str, entry: DatasetEntry | None, options: dict[str, Any]) -> str | None:
    """The shape a format gives without derivation; None for canonical (each row keeps its own)."""
    if entry is not None:
        return entry.shapes[0]
    if fmt == "columns":
        return column_shape(options.get("columns"))
    return {"hh": "preference", "shp": "preference", "dolly": "sft", "oasst": "sft"}.get(fmt)


def _plan(
    name: str | None,
    path: str | None,
    split: str,
    columns: dict[str, str] | None,
    format: str | None,
    subset: str | None,
    options: dict[str, Any] | None,
    extra_registries: list[str] | None,
) -> tuple[DatasetEntry | None, str, dict[str, Any], Iterator[Record], str]:
    """Resolve entry, format, options and the record source; raise ConfigError on bad recipes."""
    if not name and not path:
        raise ConfigError("a dataset needs a registry name or a 'path'")
    entry = get_entry(name, extra_registries) if name else None
    fmt = format or ("columns" if columns else entry.format if entry else "canonical")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format '{fmt}'" + hint(fmt, FORMATS))
    opts = {**(entry.options if entry else {}), **(options or {})}
    if columns:
        opts["columns"] = columns
    for key in opts:
        if key not in FORMAT_OPTIONS[fmt]:
            raise ConfigError(
                f"unknown option '{key}' for format '{fmt}'" + hint(key, FORMAT_OPTIONS[fmt] or ["(none)"])
            )
    subset = subset or (entry.subset if entry else None)
    if entry and subset and entry.subsets and subset not in entry.subsets:
        raise ConfigError(f"unknown subset '{subset}' of dataset '{name}'" + hint(subset, entry.subsets))
    if path:
        local = str(resolve_path(path))
        return entry, fmt, opts, read_records(local, split), f"{name or fmt}[{split}] ({local})"
    assert entry is not None  # checked above: no path means a name was given
    if split not in entry.splits:
        raise ConfigError(f"dataset '{name}' has no split '{split}'" + hint(split, entry.splits))
    if entry.path:
        local = str(resolve_path(entry.path))
        return entry, fmt, opts, read_records(local, entry.splits[split]), f"{name}[{split}] ({local})"
    hub_id = entry.hub_id or ""
    records = hub_records(hub_id, entry.splits[split], subset)
    return entry, fmt, opts, records, f"{name}[{split}] (hub {hub_id}{'/' + subset if subset else ''})"


def load_rows(
    name: str | None,
    path: str | None,
    *,
    split: str = "train",
    shape: str | None,
    num_samples: int | None = None,
    columns: dict[str, str] | None = None,
    format: str | None = None,
    subset: str | None = None,
    options: dict[str, Any] | None = None,
    extra_registries: list[str] | None = None,
    seed: int = 0,
) -> LoadResult:
    """Load one dataset in `shape` (None: the format's natural shape).

    `path` (a local file or directory) overrides the registry's hub copy. `num_samples` keeps the
    first N converted rows in file order: deterministic and independent of `seed`, which is
    accepted so a spec dict can be passed through unchanged. Raises DataError when nothing
    converts or more than half of the rows fail.
    """
    if shape is not None and shape not in SHAPES:
        raise ConfigError(f"unknown data shape '{shape}'" + hint(shape, SHAPES))
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
    entry, fmt, opts, records, label = _plan(
        name, path, split, columns, format, subset, options, extra_registries
    )
    if entry is not None and fmt != entry.format:
        entry = None  # a format override makes the entry's shapes meaningless
    if shape is None:
        shape = _natural_shape(fmt, entry, opts)
    elif entry is not None and shape not in entry.shapes:
        raise DataError(f"dataset '{name}' cannot give {shape} rows; it gives: {', '.join(entry.shapes)}")
    report = Report(label)
    rows, errors = CONVERTERS[fmt](_counted(records, report), shape, opts)
    if subset:
        for row in rows:
            row.setdefault("source", subset)
    report.converted = len(rows)
    rows = rows[:num_samples] if num_samples else rows
    report.kept = len(rows)
    report.errors = [e for e in errors if not e.filtered]
    report.failed = len(report.errors)
    report.filtered = len(errors) - report.failed
    if not rows or (report.read and report.failed > MAX_FAILED_FRACTION * report.read):
        why = "no rows converted" if not rows else "more than half of the rows failed"
        raise DataError(f"dataset not usable: {why}\n{report.summary()}")
    log.log(logging.WARNING if report.failed else logging.INFO, "%s", report.summary())
    return LoadResult(rows, report)


_SPEC_KEYS = ("name", "path", "split", "num_samples", "columns", "format", "subset", "options")


def _weighted(rows: list[dict[str, Any]], weight: float, rng: random.Random) -> list[dict[str, Any]]:
    """round(weight * len) rows: whole copies for weight >= 1, plus a seeded sample of the rest."""
    n = round(weight * len(rows))
    copies, rest = divmod(n, len(rows))
    return rows * copies + rng.sample(rows, rest)


def load_mixture(
    specs: list[dict[str, Any]],
    *,
    shape: str | None,
    eval_split: str | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    extra_registries: list[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Mix datasets into (train rows, eval rows), deterministic for a given seed.

    Eval rows come from each spec's `eval_split` (loaded like train) or a seeded `eval_fraction`
    held out before weighting, so repeated (weight > 1) rows never leak into eval.
    """
    if not specs:
        raise ConfigError("the data mixture is empty")
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for i, raw in enumerate(specs):
        spec = dict(raw)
        weight = spec.pop("weight", 1.0)
        split_eval = spec.pop("eval_split", eval_split)
        fraction = spec.pop("eval_fraction", eval_fraction)
        for key in spec:
            if key not in _SPEC_KEYS:
                raise ConfigError(
                    f"dataset {i}: unknown key '{key}'"
                    + hint(key, [*_SPEC_KEYS, "weight", "eval_split", "eval_fraction"])
                )
        if not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"dataset {i}: weight must be a number >= 0, got {weight!r}")
        if not isinstance(fraction, int | float) or not 0 <= fraction < 1:
            raise ConfigError(f"dataset {i}: eval_fraction must be in [0, 1), got {fraction!r}")
        rng = random.Random(f"{seed}:{i}")
        rows = load_rows(
            **{"name": None, "path": None, **spec}, shape=shape, extra_registries=extra_registries
        ).rows
        if split_eval:
            spec["split"] = split_eval
            spec.pop("num_samples", None)
            evals += load_rows(
                **{"name": None, "path": None, **spec}, shape=shape, extra_registries=extra_registries
            ).rows
        elif fraction:
            held = set(rng.sample(range(len(rows)), max(1, round(fraction * len(rows)))))
            evals += [r for j, r in enumerate(rows) if j in held]
            rows = [r for j, r in enumerate(rows) if j not in held]
            if not rows:
                raise ConfigError(f"dataset {i}: eval_fraction {fraction} leaves no training rows")
        train += _weighted(rows, float(weight), rng)
    random.Random(seed).shuffle(train)
    return train, evals


def preview(
    name: str | None,
    path: str | None,
    n: int = 3,
    shape: str | None = None,
    split: str = "train",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """First `n` converted rows (all when n <= 0), for `llmtune data preview`; shape defaults to the
    natural one."""
    return load_rows(name, path, split=split, shape=shape, num_samples=n if n > 0 else None, **kwargs).rows


def load_prompts(data: str, path: str | None, split: str = "train", n: int | None = None,
                 extra_registries: list[str] | None = None) -> list[list[dict[str, str]]]:
    """Prompts (canonical message lists) for generation commands (compare, eval policy, web UI).

    `data` is a registry name, or a raw format (canonical, hh, ...) whose rows come from `path`."""
    name, fmt = data, None
    if data in FORMATS and data not in list_entries(extra_registries):
        if not path:
            raise ConfigError(f"--prompts {data}: a data format needs --path")
        name, fmt = None, data
    rows = load_rows(name, path, split=split, shape="prompt", num_samples=n, format=fmt,
                     extra_registries=extra_registries).rows
    return [r["prompt"] for r in rows]
