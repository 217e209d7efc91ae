"""Read raw rows from local files or the hub without interpreting them; each row keeps its
file and line so a bad row can be reported precisely instead of crashing the load."""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a row that could not be parsed, so converters count it as a row error."""

    reason: str


Row = dict[str, Any] | Unreadable
Record = tuple[str, int, Row]
"""(source, line, row): source is a file path or `hub:ID[split]`; line is 1-based in files
(the item number for JSON arrays and parquet) and the 0-based row index on the hub."""


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def data_files(path: Path, split: str | None) -> list[Path]:
    """A file as is; a directory's supported files (recursive, sorted), narrowed to those named
    after `split` (e.g. `train.jsonl.gz`, `test-0000.parquet`) when any are. Only `train` may fall
    back to all the data, so an eval split can never silently be the training data."""
    if path.is_file():
        if split and split != "train":
            raise DataError(
                f"{path} is a single file, so it has no '{split}' split; use a directory with "
                f"files named {split}.* or hold out eval rows with eval_fraction"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
    if split:
        named = [p for p in files if p.name.lower().startswith((f"{split}.", f"{split}-", f"{split}_"))]
        if not named and split != "train" and files:
            raise DataError(f"no files named {split}.* (or {split}-*) under {path} for split '{split}'")
        files = named or files
    if not files:
        raise DataError(f"no data files ({', '.join(SUFFIXES)}) under {path}")
    return files


def _jsonl(path: Path, opener: Any) -> Iterator[Record]:
    with opener(path, "rt", encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield str(path), n, Unreadable(f"invalid JSON ({e.msg})")
                continue
            yield str(path), n, row if isinstance(row, dict) else Unreadable("not a JSON object")


def _json(path: Path) -> Iterator[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of rows or {{"data": [...]}}')
    for n, row in enumerate(data, 1):
        yield str(path), n, row if isinstance(row, dict) else Unreadable("not a JSON object")


def _csv(path: Path) -> Iterator[Record]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row or None in row.values():
                yield str(path), reader.line_num, Unreadable("wrong number of CSV fields")
            else:
                yield str(path), reader.line_num, dict(row)


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pyarrow.ArrowException as e:
        raise DataError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
    for n, row in enumerate(table.to_pylist(), 1):
        yield str(path), n, row


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _file_records(file: Path) -> Iterator[Record]:
    kind = _suffix(file)
    if kind is None:
        raise DataError(f"unsupported data file {file}; supported: {', '.join(SUFFIXES)}")
    if kind == ".jsonl":
        yield from _jsonl(file, open)
    elif kind == ".jsonl.gz":
        yield from _jsonl(file, gzip.open)
    elif kind == ".json":
        yield from _json(file)
    elif kind == ".csv":
        yield from _csv(file)
    else:
        yield from _parquet(file)


def _guarded(file: Path, records: Iterator[Record]) -> Iterator[Record]:
    """A file that cannot be read at all (binary, corrupt, unreadable) is one DataError naming it and
    the last row read, not a traceback from deep inside a decoder."""
    line = 0
    try:
        for record in records:
            line = record[1]
            yield record
    except UnicodeDecodeError:
        where = f" after line {line}" if line else ""
        raise DataError(f"{file}: not UTF-8 text{where} (a binary file?)") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        where = f" after line {line}" if line else ""
        raise DataError(f"{file}: not a valid gzip file{where} ({_first_line(e)})") from None
    except csv.Error as e:
        raise DataError(f"{file}: unreadable CSV after line {line} ({_first_line(e)})") from None
    except OSError as e:
        raise DataError(f"{file}: cannot read: {e.strerror or _first_line(e)}") from None


def read_records(path: str | Path, split: str | None = None) -> Iterator[Record]:
    """Yield every raw row under `path` (a file or a directory) in a stable order."""
    path = Path(path).expanduser()
    try:
        if not path.exists():
            raise DataError(f"data path not found: {path}")
        files = data_files(path, split)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or _first_line(e)}") from None
    for file in files:
        yield from _guarded(file, _file_records(file))


def hub_records(hub_id: str, split: str, subset: str | None = None) -> Iterator[Record]:
    """Stream rows of a hub dataset (downloaded and cached by `datasets`)."""
    import datasets
    import httpx
    from datasets.exceptions import DatasetsError

    try:
        ds = datasets.load_dataset(hub_id, data_dir=subset, split=split)
    except (OSError, ValueError, DatasetsError, httpx.HTTPError) as e:  # offline, missing, gated: one fix
        raise DataError(
            f"cannot load '{hub_id}' (split '{split}'{f', data_dir {subset}' if subset else ''}) "
            f"from the hub: {type(e).__name__}: {e}. If you are offline, download it elsewhere and set "
            "`path:` to the local copy (a file or directory of .jsonl/.jsonl.gz/.json/.csv/.parquet)."
        ) from None
    source = f"hub:{hub_id}[{split}]"
    for n, row in enumerate(ds):
        yield source, n, dict(row)
