"""Named datasets: the packaged registry plus user registry files, so recipes say `dataset: hh`
instead of repeating hub ids, raw formats and split names."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.data.converters import CONVERTERS
from llmtune.errors import ConfigError, hint

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PACKAGE_PREFIX = "package:"
ENV_VAR = "LLMTUNE_DATA_REGISTRY"

FORMATS = frozenset(CONVERTERS)
SHAPES = ("sft", "preference", "prompt")

_KEYS = (
    "hub_id",
    "path",
    "format",
    "description",
    "shapes",
    "splits",
    "subset",
    "subsets",
    "options",
    "license",
)


@dataclass(frozen=True)
class DatasetEntry:
    """One registry entry: where the data lives and how to turn its raw rows into our shapes."""

    name: str
    format: str
    hub_id: str | None = None
    path: str | None = None
    description: str = ""
    shapes: tuple[str, ...] = SHAPES
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train"})
    subset: str | None = None
    subsets: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    license: str = "unknown"


def registry_file() -> Path:
    """The top-level file in a repo checkout (so edits show up at once), else the packaged copy."""
    top = PACKAGE_DIR.parent / "data_registry.json"
    return top if top.is_file() else PACKAGE_DIR / "data" / "data_registry.json"


def resolve_path(path: str, base: Path | None = None) -> Path:
    """Expand `package:` (relative to the installed llmtune package) and paths relative to `base`."""
    if path.startswith(PACKAGE_PREFIX):
        return PACKAGE_DIR / path[len(PACKAGE_PREFIX) :]
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def _entry(name: str, raw: Any, file: Path, is_user: bool) -> DatasetEntry:
    """Validate one JSON entry; user files may use paths relative to themselves."""
    where = f"{file}: entry '{name}'"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    unknown = [k for k in raw if k not in _KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'" + hint(unknown[0], _KEYS))
    fmt = raw.get("format")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: unknown format '{fmt}'" + hint(str(fmt), FORMATS))
    if not raw.get("hub_id") and not raw.get("path"):
        raise ConfigError(f"{where} needs 'hub_id' or 'path'")
    shapes = tuple(raw.get("shapes") or SHAPES)
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise ConfigError(f"{where}: unknown shape '{bad[0]}'" + hint(bad[0], SHAPES))
    path = raw.get("path")
    if path and is_user and not path.startswith(PACKAGE_PREFIX):
        path = str(resolve_path(path, file.parent))
    for key, typ in (("splits", dict), ("options", dict), ("subsets", list)):
        if key in raw and raw[key] is not None and not isinstance(raw[key], typ):
            raise ConfigError(f"{where}: '{key}' must be a {'object' if typ is dict else 'list'}")
    return DatasetEntry(
        name=name,
        format=fmt,
        hub_id=raw.get("hub_id"),
        path=path,
        description=raw.get("description", ""),
        shapes=shapes,
        splits=dict(raw.get("splits") or {"train": "train"}),
        subset=raw.get("subset"),
        subsets=tuple(raw.get("subsets") or ()),
        options=dict(raw.get("options") or {}),
        license=raw.get("license", "unknown"),
    )


def _read(file: Path, is_user: bool) -> dict[str, DatasetEntry]:
    """Parse one registry file; any problem names the file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"data registry file not found: {file}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read data registry {file}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"data registry {file} must be a JSON object of name -> entry")
    return {name: _entry(name, raw, file, is_user) for name, raw in data.items()}


def read_registry(file: Path) -> dict[str, DatasetEntry]:
    """The entries of one user registry file (paths resolved relative to it)."""
    return _read(file, is_user=True)


def user_files(extra_files: list[str] | None = None) -> list[Path]:
    """User registries: `$LLMTUNE_DATA_REGISTRY` (os.pathsep-separated) first, then `extra_files`."""
    env = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    return [Path(p).expanduser() for p in [*env, *(extra_files or [])]]


def list_entries(extra_files: list[str] | None = None) -> dict[str, DatasetEntry]:
    """All known datasets; later user files add entries or override earlier ones by name."""
    entries = _read(registry_file(), is_user=False)
    for file in user_files(extra_files):
        entries.update(_read(file, is_user=True))
    return entries


def entry_format(entry: DatasetEntry | None, format: str | None, columns: dict[str, str] | None) -> str:
    """The raw format a dataset is read in: the one asked for, `columns` when a column mapping is
    given, else the registry entry's, else canonical rows."""
    return format or ("columns" if columns else entry.format if entry else "canonical")


def entry_split(entry: DatasetEntry, split: str) -> str:
    """The registry entry's name for a split on its source (e.g. `test` -> `test_prefs`)."""
    if split not in entry.splits:
        raise ConfigError(f"dataset '{entry.name}' has no split '{split}'" + hint(split, entry.splits))
    return entry.splits[split]


def get_entry(name: str, extra_files: list[str] | None = None) -> DatasetEntry:
    """Look a dataset up by name, with a did-you-mean hint for typos."""
    entries = list_entries(extra_files)
    if name not in entries:
        raise ConfigError(f"unknown dataset '{name}'" + hint(name, entries))
    return entries[name]
