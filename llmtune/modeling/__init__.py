"""Model loading (base, LoRA, QLoRA, full) and heads used by the stages and the server.

Every path that loads or trains a model imports this package first. accelerate imports DeepSpeed
there whenever it is installed (to unwrap models), and DeepSpeed's accelerator probe then prints a
warning on stdout on a machine without a GPU, which would corrupt the JSON our commands print: on
such a machine it is told up front that the accelerator is the CPU."""

import os as _os

if "DS_ACCELERATOR" not in _os.environ and not _os.path.exists("/proc/driver/nvidia/version"):
    _os.environ["DS_ACCELERATOR"] = "cpu"
