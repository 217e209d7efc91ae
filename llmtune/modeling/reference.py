"""What preference and RL training need of a policy before comparing it with its reference: a frozen
copy (full fine-tuning only; with LoRA the reference is the base with adapters disabled) and no
dropout, so policy and reference log-probabilities of the same tokens are comparable."""

from __future__ import annotations

import copy

from torch import nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference for full fine-tuning: a second, frozen copy of the weights as they start."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def disable_dropout(model: nn.Module) -> None:
    """TRL's `disable_dropout_in_model` (every nn.Dropout), plus the float rates attention layers
    apply functionally, which it leaves on (T5's `dropout`, Llama's and GPT-J's `attention_dropout`).
    PPO's ratio must be exactly 1 before the first update, and DPO's reference forward runs while
    the model is in train mode."""
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
