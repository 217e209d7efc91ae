"""One writer per run directory: an exclusive `flock` on `<run>/.llmtune.lock`.

Every process that writes a run takes it first: `llmtune train` (each pipeline stage), `--resume`, and
the web UI's launches (which start `llmtune train`). In a multi-process run the process that owns the
run takes it (the launching parent, which tells its workers through LLMTUNE_LOCKED_RUN, or rank 0
when started by an outside launcher); the workers never do, so they cannot deadlock on it.

The kernel drops the lock when its holder exits, however it dies (SIGKILL, OOM, a crashed node on
NFSv4, whose lease expires), so a lock file left behind is stale by construction and simply reused:
there is no pid guessing. The file records the holder's pid, host and start time, only to name it in
the refusal. Filesystems without working `flock` (some FUSE mounts) cannot exclude concurrent
writers; there llmtune warns and carries on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from llmtune.errors import ConfigError

LOCK_FILE = ".llmtune.lock"
PARENT_HOLDS = "LLMTUNE_LOCKED_RUN"
"""Environment variable a launching parent sets to the run directory whose lock it holds for its workers."""

ATTEMPTS, PAUSE_S = 5, 0.1  # a holder releasing at this very moment (or a web UI probe) is waited out

log = logging.getLogger("llmtune")


class RunLocked(ConfigError):
    """Another live process writes this run directory."""


def describe(holder: dict[str, Any]) -> str:
    """'pid 123 on host h since 2024-...' (whatever the lock file tells)."""
    if not holder:
        return "another process"
    where = holder.get("host")
    if where and where != socket.gethostname():
        where = f"{where} (another machine)"
    parts = [f"pid {holder.get('pid', '?')}", f"on {where}" if where else "",
             f"since {holder['started']}" if holder.get("started") else ""]
    return " ".join(p for p in parts if p)


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """Exclusive lock on one run directory, created if absent; `with RunLock(path):`."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise RunLocked naming the holder; OSError (read-only, not a directory,
        no permission) becomes a ConfigError naming the directory."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(ATTEMPTS):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read(fd)
                    os.close(fd)
                    if attempt == ATTEMPTS - 1:
                        raise RunLocked(
                            f"output_dir: {self.path.parent} is in use by another llmtune run ({describe(holder)}); "
                            "wait for it to finish or stop it, or choose another --output-dir") from None
                    time.sleep(PAUSE_S)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        os.close(fd)
                        raise
                    log.warning("%s: this filesystem cannot lock files; another llmtune process writing the same "
                                "run directory would not be noticed", self.path.parent)
                if self._still_linked(fd):
                    self.fd = fd
                    break
                os.close(fd)  # the previous holder removed the file between our open and lock: retry
            else:
                raise RunLocked(f"output_dir: {self.path.parent}: the run lock keeps changing hands; try again")
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)
        except RunLocked:
            raise
        except OSError as exc:
            raise ConfigError(f"output_dir: cannot write to {self.path.parent}: {exc.strerror or exc}") from None

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the file, then unlock (in this order, see _still_linked): a finished run leaves no lock file."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a directory turned read-only under us: the kernel still drops the lock below
        os.close(self.fd)
        self.fd = None


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds the lock of RUN_DIR right now (pid, host, started), or None when nobody does.

    A probe takes a shared lock for an instant; a writer starting at that very moment waits it out
    (see ATTEMPTS)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # closing also drops a shared lock we got
    return None


def parent_holds(run_dir: Path) -> bool:
    """True in a worker whose launching parent holds RUN_DIR's lock (and did the output-dir checks)."""
    return os.environ.get(PARENT_HOLDS) == str(run_dir.resolve())
