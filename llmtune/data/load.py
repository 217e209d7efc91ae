"""Load a dataset (by registry name and/or local path) into canonical rows with a report of what
was dropped and why, and mix several datasets by weight into train and eval rows."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.data.converters import CONVERTERS, RowError, natural_shape
from llmtune.data.raw import Record, hub_records, read_records
from llmtune.data.registry import (
    FORMATS,
    DatasetEntry,
    entry_format,
    entry_split,
    get_entry,
    list_entries,
    resolve_path,
)
from llmtune.errors import ConfigError, DataError

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
    """Resolve entry, format, options and the record source of a dataset the recipe schema accepted
    (`llmtune/config/checks/data.py`). Lookups still fail clearly for commands that name a dataset
    without a recipe (preview, eval, compare): unknown names and splits."""
    entry = get_entry(name, extra_registries) if name else None
    fmt = entry_format(entry, format, columns)
    opts = {**(entry.options if entry else {}), **(options or {})}
    if columns:
        opts["columns"] = columns
    subset = subset or (entry.subset if entry else None)
    if path:
        local = str(resolve_path(path))
        return entry, fmt, opts, read_records(local, split), f"{name or fmt}[{split}] ({local})"
    assert entry is not None, "a dataset needs a registry name or a path"
    source_split = entry_split(entry, split)
    if entry.path:
        local = str(resolve_path(entry.path))
        return entry, fmt, opts, read_records(local, source_split), f"{name}[{split}] ({local})"
    hub_id = entry.hub_id or ""
    records = hub_records(hub_id, source_split, subset)
    return entry, fmt, opts, records, f"{name}[{split}] (hub {hub_id}{'/' + subset if subset else ''})"


def local_sources(specs: list[dict[str, Any]], extra_registries: list[str] | None = None) -> list[Path]:
    """The local files or directories the dataset specs read (a `path`, or a registry entry's path),
    for the run's provenance record; hub datasets have none."""
    out = []
    for spec in specs:
        path = spec.get("path")
        if not path and spec.get("name"):
            entry = get_entry(spec["name"], extra_registries)
            path = entry.path
        if path:
            out.append(resolve_path(path))
    return out


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
    entry, fmt, opts, records, label = _plan(
        name, path, split, columns, format, subset, options, extra_registries
    )
    if shape is None:  # a format override makes the entry's shapes meaningless
        shape = entry.shapes[0] if entry is not None and fmt == entry.format else natural_shape(fmt, opts)
    report = Report(label)
    rows, errors = CONVERTERS[fmt].convert(_counted(records, report), shape, opts)
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
    """Mix datasets (the recipe's data entries, see `DATASET_FIELDS`) into (train rows, eval rows),
    deterministic for a given seed.

    Eval rows come from each spec's `eval_split` (loaded like train) or a seeded `eval_fraction`
    held out before weighting, so repeated (weight > 1) rows never leak into eval.
    """
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for i, raw in enumerate(specs):
        spec = dict(raw)
        weight = spec.pop("weight", 1.0)
        split_eval = spec.pop("eval_split", eval_split)
        fraction = spec.pop("eval_fraction", eval_fraction)
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
                raise DataError(f"dataset {i}: eval_fraction {fraction} leaves no training rows")
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
