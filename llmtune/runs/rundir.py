"""The run directory: the one place a run's outputs go, and what the web UI and `eval` read.

    <run>/recipe.yaml      resolved recipe (what actually ran)
    <run>/run.json         status (running|completed|interrupted|failed), signal, times, seed, pid, host,
                           provenance: recipe_sha256, versions (python, libraries, llmtune + git commit),
                           data (file, sha256, bytes, rows, modified of each local data file)
    <run>/metrics.jsonl    one JSON object per logging step: {"step": N, "loss": ..., ...}
    <run>/metrics.<time>.jsonl  the curve of an attempt that restarted from step 0 (kept, never mixed in)
    <run>/checkpoints/     checkpoint-N/ (resumable)
    <run>/model/           final model or adapter + tokenizer + llmtune.json
    <run>/train.log        the log lines
    <run>/.llmtune.lock    present while a process writes the run (runs/lock.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmtune.runs.console import say

STATUS_RUNNING, STATUS_DONE, STATUS_INTERRUPTED, STATUS_FAILED = "running", "completed", "interrupted", "failed"
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
"""Exit status of a run stopped by a signal: 128 + the signal number, as a shell reports it."""


def exit_code(status: str, signal_name: str | None = None) -> int:
    """0 for a completed run; 130 / 143 for one interrupted by SIGINT / SIGTERM; 1 otherwise."""
    if status == STATUS_DONE:
        return 0
    if status == STATUS_INTERRUPTED:
        return EXIT_CODES.get(signal_name or "SIGINT", 130)
    return 1


def is_main_process() -> bool:
    """Only rank 0 writes logs, metrics and models in multi-process runs."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("llmtune", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    commit = _git_commit()
    if commit:
        out["llmtune_git"] = commit
    return out


def _git_commit() -> str | None:
    """The commit of the llmtune checkout this runs from (with "-dirty" for local changes), or None
    for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def data_record(path: Path) -> dict[str, Any]:
    """Provenance of one local data source: what a model learned from, pinned down by content.

    A file gets its sha256, size, modification time and (JSON lines) row count; a directory one
    sha256 over its files' relative paths and contents. A labelled-feedback snapshot (the web UI's
    `feedback/snapshots/NAME.jsonl`) is thereby recorded by name, count, hash and time."""
    digest, size, rows = hashlib.sha256(), 0, 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                rows += chunk.count(b"\n") if file.name.endswith(".jsonl") else 0
    record: dict[str, Any] = {"file": str(path), "sha256": digest.hexdigest(), "bytes": size,
                              "modified": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(path.stat().st_mtime))}
    if rows:
        record["rows"] = rows
    return record


def follow_umask(root: Path) -> None:
    """Give the *.safetensors files under ROOT the mode any new file gets (0666 & ~umask, 0644 typically).

    safetensors 0.8 writes through a temporary file that is always created 0600 and renamed into
    place (safetensors#782), so a model saved into a shared team directory would be unreadable to
    the team while its config.json next to it is readable."""
    mask = os.umask(0o022)  # reading the umask means setting it; restored on the next line
    os.umask(mask)
    for path in root.rglob("*.safetensors"):
        os.chmod(path, 0o666 & ~mask)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    """Reads and writes one run directory. Writes are no-ops on non-zero ranks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.main = is_main_process()

    # paths
    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    # run.json
    def info(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def update(self, **fields: Any) -> None:
        if not self.main:
            return
        info = self.info()
        info.update(fields)
        _atomic_write(self.path / "run.json", json.dumps(info, indent=2, default=str) + "\n")

    def start(self, recipe_yaml: str, seed: int, stage: str, resume: bool, data: Sequence[Path] = ()) -> None:
        """Record a (re)start. The run.json written here is what makes the directory an llmtune run;
        it also pins down what ran: the recipe's hash, every library version and the local data files
        (`data_record`)."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:  # a restarted failed run must not inherit the old curve
            self.restart_metrics()
        _atomic_write(self.path / "recipe.yaml", recipe_yaml)
        info = self.info() if resume else {}
        self.update(
            status=STATUS_RUNNING, stage=stage, seed=seed, pid=os.getpid(), host=socket.gethostname(),
            started=info.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"), ended=None,
            resumed=info.get("resumed", 0) + (1 if resume else 0), error=None, signal=None,
            recipe_sha256=hashlib.sha256(recipe_yaml.encode()).hexdigest(), versions=_versions(),
            data=[data_record(p) for p in data if p.exists()],
        )

    def finish(self, status: str, error: str | None = None, **extra: Any) -> None:
        self.update(status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), error=error, pid=None, **extra)

    # metrics
    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.main:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        with self.metrics_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
        return rows

    def restart_metrics(self) -> None:
        """Training starts again from step 0: move the old curve aside (metrics.<time>.jsonl) so the
        new one is a single increasing sequence and nothing recorded is lost."""
        if not self.main or not self.metrics_file.exists():
            return
        if not self.metrics_file.stat().st_size:
            self.metrics_file.unlink()
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.metrics_file.stat().st_mtime))
        target, n = self.path / f"metrics.{stamp}.jsonl", 1
        while target.exists():
            n += 1
            target = self.path / f"metrics.{stamp}-{n}.jsonl"
        os.replace(self.metrics_file, target)

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop rows logged after the checkpoint we continue from (they will be redone)."""
        if not self.main or not self.metrics_file.exists():
            return
        keep = [r for r in self.metrics() if r.get("step", 0) <= after_step]
        _atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in keep))

    def last_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        done = [p for p in self.checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)

    def write_json(self, name: str, obj: Any) -> None:
        if self.main:
            _atomic_write(self.path / name, json.dumps(obj, indent=2, default=str) + "\n")

    def append_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not self.main:
            return
        with (self.path / name).open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=str) + "\n")


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 8)
    return v


class StopFlag:
    """Set by SIGINT/SIGTERM; training loops poll it, save a checkpoint and stop cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.requested


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """First Ctrl-C/SIGTERM asks for a graceful stop (checkpoint, status=interrupted);
    a second one aborts at once."""
    flag = StopFlag()
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        flag.signal = signal.Signals(signum).name
        # Only a flag and a best-effort note here: the checkpoint is written at the next step
        # boundary, and nothing said on a console (maybe a dead `| tee`) can get in its way.
        say(f"\n[llmtune] {flag.signal} received: saving a checkpoint and stopping "
            "(send again to abort without saving)\n")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
