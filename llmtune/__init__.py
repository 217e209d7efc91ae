"""llmtune: one YAML recipe in, a trained, evaluated model you can chat with out."""

import os as _os

__version__ = "0.1.0"

# DeepSpeed (imported by peft/accelerate when installed) prints an accelerator-detection warning on
# stdout on CPU-only machines, which would corrupt the JSON our commands print there.
if "DS_ACCELERATOR" not in _os.environ and not _os.path.exists("/proc/driver/nvidia/version"):
    _os.environ["DS_ACCELERATOR"] = "cpu"
