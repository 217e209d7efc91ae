"""DeepSpeed ZeRO configs generated from the recipe, and the consolidated final save of ZeRO runs.

The generated JSON states every value the recipe decides (micro batch, accumulation, clipping,
precision, ZeRO stage and offload) explicitly, so the file in the run directory documents what ran.
transformers checks these against its TrainingArguments and refuses a mismatch, which is why they
are derived from the same recipe keys that `stages.common.training_args` uses. Values only known
once the model is built (bucket sizes from the hidden size) stay "auto" for transformers to fill.

Generating a config needs no CUDA and no torch; only running one does (checked by `config/checks/distributed.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from llmtune.config.checks.distributed import read_deepspeed_config
from llmtune.config.schema import Recipe
from llmtune.runs.rundir import RunDir

CONFIG_FILE = "deepspeed.json"




def _precision_sections(precision: str) -> dict[str, Any]:
    """bf16/fp16 blocks mirroring training.precision; "auto" lets transformers fill them from the
    bf16/fp16 flags it resolves on the actual GPU (so the two can never disagree)."""
    if precision == "auto":
        return {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    fp16: dict[str, Any] = {"enabled": precision == "fp16"}
    if precision == "fp16":
        # Dynamic loss scaling: fp16 gradients underflow without it.
        fp16.update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1)
    return {"bf16": {"enabled": precision == "bf16"}, "fp16": fp16}


def _zero_section(recipe: Recipe) -> dict[str, Any]:
    d = recipe.distributed
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=2e8, reduce_scatter=True)
    else:
        if d.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
            sub_group_size=1e9,
            # The final save gathers the shards into one ordinary 16-bit HF checkpoint.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return zero


def build_config(recipe: Recipe, num_processes: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for this recipe. `num_processes` (the world size) defaults to the
    recipe's; pass 0 to leave train_batch_size "auto" when the launcher decides the world size."""
    t = recipe.training
    world = recipe.distributed.world_size if num_processes is None else num_processes
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * world if world else "auto",
        "gradient_clipping": t.max_grad_norm,
        **_precision_sections(t.precision),
        "zero_optimization": _zero_section(recipe),
        "steps_per_print": 10**9,  # llmtune logs metrics itself; keep DeepSpeed's console quiet
        "wall_clock_breakdown": False,
    }
    if recipe.distributed.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the CPU, which needs DeepSpeed's own CPU Adam (a torch
        # optimizer from the Trainer is refused); transformers fills the hyper-parameters.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return config


def deepspeed_config_for(recipe: Recipe, run: RunDir) -> str:
    """Write the run's DeepSpeed config (generated, or a copy of the user's) and return its path.

    Rank 0 writes `<run>/deepspeed.json`, where it stays as the record of what ran. Other ranks
    never write into the run directory (which may not even exist on another node); they get the
    same content in a temp file named after its hash (so repeated runs reuse it, nothing piles up).
    """
    d = recipe.distributed
    config = read_deepspeed_config(d.deepspeed_config) if d.deepspeed_config else build_config(recipe)
    text = json.dumps(config, indent=2) + "\n"
    if run.main:
        run.path.mkdir(parents=True, exist_ok=True)
        return _write_atomic(run.path / CONFIG_FILE, text)
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    return _write_atomic(Path(tempfile.gettempdir()) / f"llmtune-deepspeed-{digest}.json", text)


def _write_atomic(target: Path, text: str) -> str:
    """Readers (other ranks, the launcher) never see a half-written file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    return str(target)


def zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage a Trainer runs with, or None when DeepSpeed is off."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return int(trainer.accelerator.deepspeed_config["zero_optimization"]["stage"])


def consolidated_state_dict(trainer: Any, scratch: Path) -> dict[str, Any] | None:
    """Full weights of a ZeRO-3 model as one ordinary state dict, for the final HF save.

    Collective: every rank must call it; rank 0 gets the state dict, the others None. With
    stage3_gather_16bit_weights_on_model_save (what llmtune generates) the shards are gathered layer
    by layer in 16 bit. A user config without it gets the slower exact route: a ZeRO checkpoint in
    `scratch`, merged to fp32 by DeepSpeed's zero_to_fp32 on rank 0.
    """
    engine = trainer.model_wrapped
    if engine.zero_gather_16bit_weights_on_model_save():
        state = trainer.accelerator.get_state_dict(engine)
        return state if trainer.is_world_process_zero() else None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine.save_checkpoint(str(scratch), tag="final")
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    return get_fp32_state_dict_from_zero_checkpoint(str(scratch), tag="final")
