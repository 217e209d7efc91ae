"""`distributed`: a strategy this machine can run, consistent process counts and ZeRO options, and
the files it names (your DeepSpeed JSON, accelerate config, hostfile) present and readable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.config.checks.device import cuda_present, missing_package, visible_gpus
from llmtune.errors import ConfigError

if TYPE_CHECKING:
    from llmtune.config.schema import Recipe


def read_deepspeed_config(path: str) -> dict[str, Any]:
    """The user's DeepSpeed JSON (`distributed.deepspeed_config`) as a dict, or a ConfigError."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except OSError as exc:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"distributed.deepspeed_config: {path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"distributed.deepspeed_config: {path} must hold a JSON object")
    return data


def check_distributed(recipe: Recipe, errors: list[str], device_checks: bool) -> None:
    """device_checks=False skips what depends on this machine (GPUs, installed launchers)."""
    dist = recipe.distributed
    if device_checks and dist.strategy == "deepspeed":
        if not cuda_present():
            errors.append("distributed.strategy: deepspeed needs CUDA GPUs; use ddp (gloo) on CPU")
        elif missing := missing_package("deepspeed"):
            errors.append(f"distributed.strategy: {missing}")
    gpus = visible_gpus() if device_checks else None
    if gpus and dist.strategy != "none" and dist.num_processes > gpus:
        errors.append(f"distributed.num_processes: {dist.num_processes} processes but {gpus} GPU(s) visible on "
                      "this machine (one process per GPU)")
    if (dist.offload_optimizer or dist.offload_params) and dist.strategy != "deepspeed":
        errors.append("distributed.offload_optimizer/offload_params: CPU offload needs strategy: deepspeed")
    if dist.deepspeed_config and dist.strategy != "deepspeed":
        errors.append("distributed.deepspeed_config: only used with strategy: deepspeed")
    if dist.hostfile and (dist.strategy != "deepspeed" or dist.num_nodes < 2):
        errors.append("distributed.hostfile: only used by multi-node DeepSpeed runs (strategy: deepspeed, "
                      "num_nodes > 1)")
    elif dist.hostfile and device_checks and shutil.which("pdsh") is None:
        errors.append("distributed.hostfile: multi-node DeepSpeed with a hostfile needs `pdsh` on this machine; "
                      "install it, or drop hostfile and run the command on every node")
    if dist.machine_rank >= dist.num_nodes:
        errors.append(f"distributed.machine_rank: {dist.machine_rank} must be < num_nodes ({dist.num_nodes})")
    if dist.strategy == "deepspeed" and dist.zero_stage == 3 and recipe.model.finetuning == "qlora":
        errors.append("distributed.zero_stage: QLoRA's 4-bit weights cannot be sharded by ZeRO-3; use zero_stage: 2")
    if dist.offload_params and dist.zero_stage != 3:
        errors.append("distributed.offload_params: parameter offload needs zero_stage: 3")
    if dist.strategy == "none" and (dist.num_processes > 1 or dist.num_nodes > 1):
        errors.append("distributed.strategy: more than one process needs strategy ddp or deepspeed")
    for key in ("deepspeed_config", "accelerate_config", "hostfile"):
        value = getattr(dist, key)
        if value and not Path(value).expanduser().exists():
            errors.append(f"distributed.{key}: no such file: {value}")
        elif value and key == "deepspeed_config":
            try:
                read_deepspeed_config(value)
            except ConfigError as exc:
                errors.append(str(exc))
    if dist.num_nodes > 1 and not dist.main_process_ip:
        errors.append("distributed.main_process_ip: required when num_nodes > 1")
