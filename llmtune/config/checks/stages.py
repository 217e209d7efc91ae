"""The stage's own section and the keys whose meaning depends on the stage (`training.*` batch
keys, reward, data lengths): one function per stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llmtune.config.checks import given
from llmtune.config.checks.model import resolve
from llmtune.registry.models import ModelSpec

if TYPE_CHECKING:
    from llmtune.config.schema import Recipe

PPO_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


def check_stage(recipe: Recipe, spec: ModelSpec | None, errors: list[str], pending: frozenset[str]) -> None:
    if recipe.training.group_by_length and recipe.stage not in ("sft", "rm"):
        errors.append(f"training.group_by_length: supported by stages sft and rm, not '{recipe.stage}'")
    if recipe.stage in ("rs", "ppo") and recipe.reward is None:
        errors.append(f"reward: stage '{recipe.stage}' needs a reward source (type: reward_model, classifier, "
                      "judge, rule or mix)")
    if recipe.answers.prompts:
        if recipe.stage not in ("sft", "dpo"):
            errors.append(f"answers.prompts: shown by stages sft and dpo, not '{recipe.stage}'")
        if recipe.distributed.strategy == "deepspeed" and recipe.distributed.zero_stage == 3:
            errors.append("answers.prompts: not with ZeRO-3 (rank 0 alone cannot generate from sharded weights)")
    check = STAGE_CHECKS.get(recipe.stage)
    if check is not None:
        check(recipe, spec, errors, pending)


def check_rm(recipe: Recipe, spec: ModelSpec | None, errors: list[str], pending: frozenset[str]) -> None:
    if recipe.rm.pooling == "mean" and spec is not None and spec.kind not in (None, "encoder"):
        errors.append(f"rm.pooling: mean pooling is for encoder models; '{recipe.model.name}' is {spec.kind} "
                      "(use pooling: architecture)")


def check_dpo(recipe: Recipe, spec: ModelSpec | None, errors: list[str], pending: frozenset[str]) -> None:
    d, data = recipe.dpo, recipe.data
    if d.label_smoothing and d.loss_type != "sigmoid":
        errors.append(f"dpo.label_smoothing: only loss_type sigmoid uses it (loss_type is '{d.loss_type}'); set it to 0")
    if data.max_prompt_length is not None and data.max_prompt_length >= data.max_length:
        errors.append(f"data.max_prompt_length: {data.max_prompt_length} leaves no room for the responses; "
                      f"it must be smaller than data.max_length ({data.max_length})")


def check_rs(recipe: Recipe, spec: ModelSpec | None, errors: list[str], pending: frozenset[str]) -> None:
    if recipe.distributed.strategy != "none":
        errors.append("distributed.strategy: stage rs samples and fine-tunes in one process; use strategy: none")
    if given(recipe.training, "eval_batch_size"):
        errors.append("training.eval_batch_size: stage rs evaluates nothing; prompts per generation batch are "
                      "rs.generation_batch_size")


def check_ppo(recipe: Recipe, spec: ModelSpec | None, errors: list[str], pending: frozenset[str]) -> None:
    p, t = recipe.ppo, recipe.training
    if recipe.distributed.strategy == "deepspeed":
        # Our accelerate loop saves full parameters and does not gather ZeRO-partitioned ones (ZeRO-3
        # would save empty weights).
        errors.append("distributed.strategy: stage ppo does not support deepspeed (its checkpoints and final model "
                      "would not gather ZeRO-partitioned weights); use strategy: ddp, with finetuning: lora or qlora "
                      "to fit large models")
    if p.rollout_batch_size % p.mini_batch_size:
        errors.append(f"ppo.mini_batch_size: {p.mini_batch_size} must divide ppo.rollout_batch_size "
                      f"({p.rollout_batch_size})")
    if p.mini_batch_size % t.gradient_accumulation_steps:
        errors.append(f"training.gradient_accumulation_steps: {t.gradient_accumulation_steps} must divide "
                      f"ppo.mini_batch_size ({p.mini_batch_size})")
    if t.optimizer not in PPO_OPTIMIZERS:
        errors.append(f"training.optimizer: the PPO stage uses AdamW (adamw_torch or adamw_torch_fused), "
                      f"got '{t.optimizer}'")
    for key in ("batch_size", "eval_batch_size"):
        if given(t, key):
            errors.append(f"training.{key}: stage ppo trains on minibatches of ppo.mini_batch_size rollouts (each "
                          "split into training.gradient_accumulation_steps micro-batches); prompts per generation "
                          "batch are ppo.generation_batch_size")
    if p.value_model == "shared":
        if p.value_model_path:
            errors.append("ppo.value_model_path: only used with ppo.value_model: separate")
        return
    if spec is not None and spec.kind == "seq2seq":
        errors.append("ppo.value_model: a separate value model is supported for causal policies; use "
                      "ppo.value_model: shared for seq2seq models")
    where, ref = ("ppo.value_model_path", p.value_model_path) if p.value_model_path else \
        ("reward.model", recipe.reward.model if recipe.reward else None)
    if not ref:
        errors.append("ppo.value_model_path: required for ppo.value_model: separate when the reward source has no "
                      "model to initialize the value model from")
        return
    # A bad reward.model is already reported by the reward checks.
    value = resolve(ref, where, errors if p.value_model_path else [], pending)
    if value is not None and value.kind not in (None, "causal"):
        errors.append(f"{where}: the separate value model '{ref}' is a {value.kind} model; it must be a decoder "
                      "(causal) model sharing the policy's tokenizer, or use ppo.value_model: shared")


STAGE_CHECKS: dict[str, Callable[[Recipe, ModelSpec | None, list[str], frozenset[str]], None]] = {
    "rm": check_rm, "dpo": check_dpo, "rs": check_rs, "ppo": check_ppo,
}
