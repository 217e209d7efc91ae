"""Shared test setup: offline hubs, an isolated LLMTUNE_HOME for tiny models, helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests run a client and a server (or two trainers) at once on 2 cores: one thread each avoids
# oversubscription that makes small CPU models tens of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LLMTUNE_HOME", str(ROOT / ".pytest_cache" / "llmtune-home"))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None,
            check: bool = False, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m llmtune.cli ARGS` as a real subprocess (stdin: `input`, else nothing)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "llmtune.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"llmtune {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
