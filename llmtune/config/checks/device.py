"""What this machine offers, found without importing torch (`llmtune validate` must start fast)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Optional dependencies and the extra that installs them (setup.cfg).
EXTRAS = {"bitsandbytes": "gpu", "deepspeed": "gpu", "gradio": "webui", "ruamel.yaml": "webui"}


def cuda_present() -> bool:
    """Whether an NVIDIA GPU is visible."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def visible_gpus() -> int | None:
    """How many NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES, else /dev/nvidiaN); None
    when unknown."""
    if not cuda_present():
        return 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip()])
    return len(list(Path("/dev").glob("nvidia[0-9]*"))) or None


def missing_package(module: str) -> str | None:
    """None when `module` is importable, else how to install it (`pip install 'llmtune[gpu]'`)."""
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{module} is not installed: pip install 'llmtune[{EXTRAS[module]}]'"
