"""`training.precision` resolved to what runs: the one mapping the trainers, the PPO accelerator,
the launcher and `plan` share. Importing this module does not import torch."""

from __future__ import annotations

from typing import Literal

Precision = Literal["fp32", "bf16", "fp16"]


def resolve(precision: str, cuda: bool, bf16_supported: bool = True) -> Precision:
    """fp32 on CPU; on a GPU the recipe's choice, auto meaning bf16 where the GPU supports it."""
    if not cuda:
        return "fp32"
    if precision == "auto":
        return "bf16" if bf16_supported else "fp32"
    assert precision in ("fp32", "bf16", "fp16"), precision
    return precision  # type: ignore[return-value]


def on_this_machine(precision: str) -> Precision:
    """`resolve` for the GPU (or CPU) this process runs on."""
    import torch

    cuda = torch.cuda.is_available()
    return resolve(precision, cuda, cuda and torch.cuda.is_bf16_supported())


def accelerate_name(precision: Precision) -> str:
    """accelerate's name for a resolved precision (its `mixed_precision`)."""
    return "no" if precision == "fp32" else precision
