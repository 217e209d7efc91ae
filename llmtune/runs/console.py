"""A training process's console must never kill the run.

`llmtune train ... 2>&1 | tee log` is how people watch a run on a remote box; Ctrl-C kills `tee` too,
and from then on every write to stdout/stderr fails with EPIPE (an SSH session that went away gives
EIO). Unguarded, the next progress line, log record or tqdm bar raises in the middle of saving the
interrupt checkpoint. `survive_closed_console()` wraps sys.stdout and sys.stderr so that the first
such failure points the file descriptor at /dev/null and the run carries on silently (its record is
run.json, metrics.jsonl and train.log, which stay complete).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, TextIO

DEAD_CONSOLE = (errno.EPIPE, errno.EIO)


class SurvivingStream:
    """A text stream proxy that swallows writes to a reader that is gone."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._silence(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._silence(exc)

    def _silence(self, exc: OSError) -> None:
        if exc.errno not in DEAD_CONSOLE:
            raise exc
        # Everything still buffered, and every later write (ours, C libraries', child processes'),
        # now goes to /dev/null and succeeds, including the flush at interpreter exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def survive_closed_console() -> None:
    """Wrap sys.stdout and sys.stderr (once) for a long-running command."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SurvivingStream):
            setattr(sys, name, SurvivingStream(stream))


def say(text: str) -> None:
    """Write to stderr from a signal handler: unbuffered (no re-entrant call into a buffered stream
    the main thread may be in the middle of) and never raising."""
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass
