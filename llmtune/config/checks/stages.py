"""The stage's own section and the keys whose meaning depends on the stage (`training.*` batch
keys, reward, data lengths): one function per stage."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmtune.config.checks import given
from llmtune.config.checks.model import resolve
from llmtune.errors import hint
from llmtune.registry.models import ModelSpec

if TYPE_CHECKING:
    from llmtune.config.schema import Recipe

PPO_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
GROUPED = ("grpo", "rloo")  # online-RL algorithms that sample a group of responses per prompt
CRITIC = ("lam", "cliprange_value", "vf_coef", "value_model", "value_model_path", "whiten_advantages")


# accelerate's trackers (the loops of stages ppo, rl and rs log through them) and the modules they need.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",),
            "swanlab": ("swanlab",), "trackio": ("trackio",)}


def check_stage(recipe: Recipe, spec: ModelSpec | None, errors: list[str], pending: frozenset[str]) -> None:
    if recipe.stage in ("ppo", "rl", "rs"):
        check_trackers(recipe, errors)
    if recipe.training.group_by_length and recipe.stage not in ("sft", "rm"):
        errors.append(f"training.group_by_length: supported by stages sft and rm, not '{recipe.stage}'")
    if recipe.eval_reward is not None and recipe.stage not in ("ppo", "rl"):
        errors.append(f"eval_reward: scored beside the reward by stages ppo and rl, not '{recipe.stage}'")
    if recipe.stage in ("rs", "ppo", "rl") and recipe.reward is None:
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


def check_trackers(recipe: Recipe, errors: list[str]) -> None:
    """`training.report_to` of the stages whose own loops log through accelerate's trackers."""
    for name in recipe.training.report_to:
        if name not in TRACKERS:
            errors.append(f"training.report_to: '{name}' is not a tracker stage {recipe.stage} can log to "
                          f"({', '.join(TRACKERS)})" + hint(name, TRACKERS))
        elif not any(importlib.util.find_spec(m) for m in TRACKERS[name]):
            errors.append(f"training.report_to: {name} is not installed (pip install {TRACKERS[name][0]})")


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


def check_online(recipe: Recipe, spec: ModelSpec | None, errors: list[str], pending: frozenset[str]) -> None:
    """Stages ppo and rl: one loop, its section named after the stage (`ppo` or `rl`)."""
    s, p, t = recipe.stage, recipe.online, recipe.training
    if recipe.distributed.strategy == "deepspeed":
        # Our accelerate loop saves full parameters and does not gather ZeRO-partitioned ones (ZeRO-3
        # would save empty weights).
        errors.append(f"distributed.strategy: stage {s} does not support deepspeed (its checkpoints and final model "
                      "would not gather ZeRO-partitioned weights); use strategy: ddp, with finetuning: lora or qlora "
                      "to fit large models")
    if s == "ppo" and p.algorithm != "ppo":
        errors.append(f"ppo.algorithm: stage ppo is algorithm ppo; for {p.algorithm} use stage: rl with "
                      f"rl.algorithm: {p.algorithm}")
    other = "ppo" if s == "rl" else "rl"
    if getattr(recipe, other) != type(p)():
        errors.append(f"{other}: stage {s} reads its settings from the `{s}` section; move these keys there")
    if p.rollouts % p.mini_batch_size:
        per_step = (f"{s}.rollout_batch_size ({p.rollout_batch_size})" if p.num_generations == 1 else
                    f"the rollouts per step, {s}.rollout_batch_size x {s}.num_generations ({p.rollouts})")
        errors.append(f"{s}.mini_batch_size: {p.mini_batch_size} must divide {per_step}")
    if p.mini_batch_size % t.gradient_accumulation_steps:
        errors.append(f"training.gradient_accumulation_steps: {t.gradient_accumulation_steps} must divide "
                      f"{s}.mini_batch_size ({p.mini_batch_size})")
    if t.optimizer not in PPO_OPTIMIZERS:
        errors.append(f"training.optimizer: the {s.upper()} stage uses AdamW (adamw_torch or adamw_torch_fused), "
                      f"got '{t.optimizer}'")
    for key in ("batch_size", "eval_batch_size"):
        if given(t, key):
            errors.append(f"training.{key}: stage {s} trains on minibatches of {s}.mini_batch_size rollouts (each "
                          "split into training.gradient_accumulation_steps micro-batches); prompts per generation "
                          f"batch are {s}.generation_batch_size")
    if p.algorithm in GROUPED:
        if p.num_generations == 1:
            errors.append(f"{s}.num_generations: {p.algorithm} compares the responses of each prompt with each other; "
                          "sample 2 or more (e.g. 8)")
        if not p.generation.do_sample:
            errors.append(f"{s}.generation.do_sample: {p.algorithm} needs several different responses per prompt; "
                          "greedy decoding makes them all the same")
    else:
        for key in ("skip_zero_variance_groups",):
            if given(p, key):
                errors.append(f"{s}.{key}: only grpo and rloo sample groups to compare")
    if p.algorithm != "grpo" and given(p, "scale_rewards"):
        errors.append(f"{s}.scale_rewards: only grpo divides by the group's std (algorithm is {p.algorithm})")
    if p.algorithm in GROUPED and given(p, "gamma"):
        errors.append(f"{s}.gamma: {p.algorithm} gives one advantage to a whole response; only ppo and reinforce_pp "
                      "discount")
    if p.algorithm != "ppo":
        for key in CRITIC:
            if given(p, key):
                errors.append(f"{s}.{key}: only algorithm ppo has a critic (value head); {p.algorithm} has none")
        return
    _check_value_model(recipe, spec, errors, pending)


def _check_value_model(recipe: Recipe, spec: ModelSpec | None, errors: list[str], pending: frozenset[str]) -> None:
    s, p = recipe.stage, recipe.online
    if p.value_model == "shared":
        if p.value_model_path:
            errors.append(f"{s}.value_model_path: only used with {s}.value_model: separate")
        return
    if spec is not None and spec.kind == "seq2seq":
        errors.append(f"{s}.value_model: a separate value model is supported for causal policies; use "
                      f"{s}.value_model: shared for seq2seq models")
    where, ref = (f"{s}.value_model_path", p.value_model_path) if p.value_model_path else \
        ("reward.model", recipe.reward.model if recipe.reward else None)
    if not ref:
        errors.append(f"{s}.value_model_path: required for {s}.value_model: separate when the reward source has no "
                      "model to initialize the value model from")
        return
    # A bad reward.model is already reported by the reward checks.
    value = resolve(ref, where, errors if p.value_model_path else [], pending)
    if value is not None and value.kind not in (None, "causal"):
        errors.append(f"{where}: the separate value model '{ref}' is a {value.kind} model; it must be a decoder "
                      f"(causal) model sharing the policy's tokenizer, or use {s}.value_model: shared")


STAGE_CHECKS: dict[str, Callable[[Recipe, ModelSpec | None, list[str], frozenset[str]], None]] = {
    "rm": check_rm, "dpo": check_dpo, "rs": check_rs, "ppo": check_online, "rl": check_online,
}
