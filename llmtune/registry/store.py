"""The local model store, `$LLMTUNE_HOME/models` (default `~/.cache/llmtune/models`).

Models llmtune makes itself live here as ordinary `save_pretrained` directories: the built-in tiny
models and the safetensors conversions of GGUF files (a registry entry's offline source included).
Each is built once into a temporary directory and moved in with `os.replace`, a marker file written
last, so a crash never leaves half a model behind and two racing processes end with one complete copy.
No torch import here: listings ask `is_complete` without loading anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What llmtune records next to a model's config.json (kind, template, base, pooling, ...).
META_FILE = "llmtune.json"


def llmtune_home() -> Path:
    """`$LLMTUNE_HOME`, else `~/.cache/llmtune`."""
    home = os.environ.get("LLMTUNE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "llmtune"


def models_root() -> Path:
    return llmtune_home() / "models"


def is_complete(path: Path, marker_file: str, expected: dict[str, Any]) -> bool:
    """A build is complete iff its marker (written last) holds every expected key and value."""
    try:
        marker = json.loads((path / marker_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in expected.items())


def install(dest: Path, marker_file: str, marker: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling of `dest` with `build(tmp)`, write the marker, move it in.

    A stale or partial `dest` is moved aside first (os.replace cannot overwrite a non-empty dir)."""
    if is_complete(dest, marker_file, marker):
        return dest
    root = dest.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared between users
        build(tmp)
        (tmp / marker_file).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if dest.exists() and not is_complete(dest, marker_file, marker):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=root))
            try:
                os.replace(dest, old / dest.name)
            except FileNotFoundError:
                pass  # another process moved it already
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            # Lost a race: another process installed its (identical) build first.
            if not is_complete(dest, marker_file, marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
