"""Plumbing shared by the stages that run on a `transformers.Trainer` (sft, rm, dpo, rs):
recipe → TrainingArguments, metrics/progress/stop callbacks, resume, final save.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from llmtune.config.schema import DATASET_FIELDS, Recipe
from llmtune.modeling.precision import on_this_machine
from llmtune.registry.models import ModelSpec
from llmtune.runs.rundir import RunDir, StopFlag, follow_umask

log = logging.getLogger("llmtune")


@dataclass
class Context:
    """What a stage gets besides its recipe: where to write, whether to resume, the stop flag."""

    run: RunDir
    resume: bool
    stop: StopFlag


def precision_flags(recipe: Recipe) -> dict[str, bool]:
    """bf16/fp16 flags for TrainingArguments; CPU always trains in fp32."""
    p = on_this_machine(recipe.training.precision)
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def training_args(recipe: Recipe, ctx: Context, cls: Any, has_eval: bool, **extra: Any) -> Any:
    """Map the recipe's `training` section onto a TrainingArguments subclass (SFTConfig, ...)."""
    t = recipe.training
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if t.eval_steps else "epoch"
    kwargs: dict[str, Any] = dict(
        output_dir=str(ctx.run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.num_workers,
        # Lengths: the dataset's `length` column where a stage writes one (rm), else its input_ids.
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        report_to=t.report_to or "none",
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # The recipe decides: TRL's configs default the (deprecated) gradient_checkpointing alias to True.
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        **precision_flags(recipe),
    )
    if recipe.distributed.strategy == "deepspeed":
        from llmtune.launch.deepspeed import deepspeed_config_for

        kwargs["deepspeed"] = deepspeed_config_for(recipe, ctx.run)
    if recipe.distributed.strategy == "ddp" and not torch.cuda.is_available():
        # use_cpu makes accelerate set up MULTI_CPU (gloo) from the launcher's env; without it each
        # process would silently train alone on the whole data set.
        kwargs["ddp_backend"] = recipe.distributed.backend or "gloo"
        kwargs["use_cpu"] = True
    elif recipe.distributed.backend:
        kwargs["ddp_backend"] = recipe.distributed.backend
    kwargs.update(extra)
    return cls(**kwargs)


TOKEN_KEYS = ("num_tokens", "eval_num_tokens")
"""TRL's running count of training tokens; it restarts from 0 in every process, so a resumed run adds
the count its checkpoint reached."""


class MetricsCallback(TrainerCallback):
    """Writes every log event to metrics.jsonl and, off a terminal, one clean line per log."""

    def __init__(self, run: RunDir, line_output: bool):
        self.run = run
        self.line_output = line_output
        self.tokens_before = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # state.log_history comes from the checkpoint on resume (already counted in whole-run tokens).
        self.tokens_before = next((h["num_tokens"] for h in reversed(state.log_history) if "num_tokens" in h), 0)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not logs:
            return
        for key in TOKEN_KEYS:
            if key in logs and self.tokens_before:
                logs[key] += self.tokens_before
                if state.log_history and key in state.log_history[-1]:
                    state.log_history[-1][key] = logs[key]  # what the next checkpoint records
        if not state.is_world_process_zero:
            return
        metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["epoch"] = round(state.epoch or 0.0, 4)
        self.run.log_metrics(state.global_step, metrics)
        if self.line_output:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if k != "epoch")
            print(f"step {state.global_step}/{state.max_steps} epoch {metrics['epoch']:.2f} {shown}", flush=True)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class StopCallback(TrainerCallback):
    """Turns a SIGINT/SIGTERM into "save a checkpoint now and stop" at the next step boundary, and logs
    at every step that saves, so a checkpoint always closes a logged interval of the loss curve (the
    whole-run train_loss of a resumed run is exact, see run_loss)."""

    def __init__(self, stop: StopFlag):
        self.stop = stop

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if _any_rank(bool(self.stop), args.device):
            control.should_save = True
            control.should_training_stop = True
        if control.should_save:
            control.should_log = True
        return control


class CheckpointFiles(TrainerCallback):
    """Tidies what a checkpoint save leaves: safetensors made readable like every other file (see
    follow_umask), and no TRL draft model card (checkpoints/README.md), which describes the run as a
    fine-tune of a hub model named "None" whenever the base is a local directory."""

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return
        out = Path(args.output_dir)
        (out / "README.md").unlink(missing_ok=True)
        follow_umask(out)


def _any_rank(flag: bool, device: Any) -> bool:
    """True when any process has the flag set. Ranks must stop at the same step: one rank leaving the
    loop while the others wait in the next gradient all-reduce would hang the run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def run_trainer(trainer: Any, ctx: Context) -> dict[str, Any]:
    """Train with our callbacks, resuming from the last checkpoint when asked. The summary covers the
    whole run, across resumes: train_loss over every step, num_tokens counted from step 1."""
    from transformers.trainer_callback import PrinterCallback

    line_output = not sys.stderr.isatty()
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(MetricsCallback(ctx.run, line_output))
    trainer.add_callback(StopCallback(ctx.stop))
    trainer.add_callback(CheckpointFiles())
    checkpoint = None
    if ctx.resume:
        last = ctx.run.last_checkpoint()
        if last is not None:
            checkpoint = str(last)
            step = int(last.name.split("-")[-1])
            ctx.run.truncate_metrics(step)
            log.info("resuming from %s (step %d)", last, step)
        else:
            log.warning("--resume: no checkpoint in %s; starting again from step 0", ctx.run.checkpoints)
            ctx.run.restart_metrics()
    trainer.train(resume_from_checkpoint=checkpoint)
    history = trainer.state.log_history
    summary = {"global_step": trainer.state.global_step, "train_loss": _finite(run_loss(history))}
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    if tokens:
        summary["num_tokens"] = tokens[-1]
    return summary


def run_loss(history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over every step of the run, from the trainer's log history (restored from the
    checkpoint on resume, so it spans all the processes that trained this run). Each logged `loss` is
    the mean since the previous log; weighting it by its number of steps gives the exact mean, because
    every checkpoint and the last step are logged (StopCallback)."""
    total, last = 0.0, 0
    for entry in history:
        if "loss" in entry and entry.get("step", 0) > last:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else None


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def show_answers(model: Any, tok: Any, spec: ModelSpec, recipe: Recipe, ctx: Context, when: str) -> None:
    """The model's greedy answers to `answers.prompts`, printed and appended to answers.jsonl (rank 0),
    so a run shows what tuning changed."""
    if not recipe.answers.prompts or not ctx.run.main:
        return
    from llmtune.config.schema import GenerationSection
    from llmtune.data.templates import ChatTemplate
    from llmtune.modeling.generate import generate

    prompts = [[{"role": "user", "content": p}] for p in recipe.answers.prompts]
    gen = GenerationSection(max_new_tokens=recipe.answers.max_new_tokens, do_sample=False)
    answers = generate(model, tok, ChatTemplate.get(spec.template), spec.kind or "causal", prompts, gen,
                       max_prompt_length=recipe.data.max_length)
    rows = [{"when": when, "prompt": p, "answer": a[0]} for p, a in zip(recipe.answers.prompts, answers)]
    ctx.run.append_jsonl("answers.jsonl", rows)
    lines = [f"answers {when} training ({spec.name}):"]
    for row in rows:
        lines += [f"  Q: {row['prompt']}", "  A: " + row["answer"].replace("\n", "\n     ")]
    print("\n".join(lines), flush=True)


def finish(trainer: Any, tok: Any, spec: ModelSpec, recipe: Recipe, ctx: Context, head: str,
           summary: dict[str, Any]) -> dict[str, Any]:
    """Save the final model (not on interrupt: the checkpoint is the resumable state), then show its
    answers (`answers.prompts`)."""
    if ctx.stop:
        saved = ctx.run.checkpoints / f"checkpoint-{trainer.state.global_step}"
        trainer.save_model(str(saved))
        if trainer.is_world_process_zero():
            follow_umask(saved)
        return summary
    from llmtune.launch.deepspeed import consolidated_state_dict, zero_stage

    # ZeRO-3 shards every weight across ranks: gather them (all ranks take part) into one normal model.
    state = consolidated_state_dict(trainer, ctx.run.checkpoints / "zero3-final") if zero_stage(trainer) == 3 else None
    if trainer.is_world_process_zero():
        from llmtune.modeling.load import save_model

        model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
        save_model(model, tok, ctx.run.model_dir, spec, recipe, head, state_dict=state)
        if head != "classifier":
            show_answers(model, tok, spec, recipe, ctx, "after")
    return summary


def to_dataset(rows: list[dict[str, Any]], encode: Any, desc: str) -> Any:
    """Tokenise canonical rows once into a datasets.Dataset (what the Trainers take)."""
    from datasets import Dataset

    encoded = [encode(r) for r in _progress(rows, desc)]
    return Dataset.from_list(encoded)


def _progress(rows: list[Any], desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(rows, desc=desc, disable=not sys.stderr.isatty() or len(rows) < 2000, leave=False)


def data_rows(recipe: Recipe, shape: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, eval rows) in the canonical shape the stage needs, mixed and split per recipe."""
    from llmtune.data.load import load_mixture

    d = recipe.data
    specs = [{k: getattr(s, k) for k in DATASET_FIELDS} for s in d.datasets or [d]]
    return load_mixture(specs, shape=shape, seed=recipe.training.seed, extra_registries=d.registry)
