"""stage: rs — rejection sampling (best-of-n fine-tuning), as in Llama 2's RLHF.

Each round: sample `rs.num_samples` responses per prompt from the current policy, score them with
the reward source, keep the best response per prompt — optionally only when it reaches
`rs.threshold` and/or the `rs.percentile` of the round's best scores (raised by
`rs.percentile_step` each round: a "rising percentile") — then fine-tune the policy on the kept
(prompt, best response) pairs with the SFT machinery. The next round samples from the result.
The `training` section applies to every round's fine-tuning (epochs/max_steps per round).

Loss is on the kept response only (`encode_prompt_response`), not on earlier assistant turns of
the prompt: those were written by someone else and are not what the round selected.

Run directory, per round K:
    rs/round-K/samples.jsonl   {"index", "prompt", "responses", "scores"}, appended per batch
    rs/round-K/kept.jsonl      {"index", "prompt", "response", "score"}
    rs/round-K/checkpoints/    the round's trainer checkpoints (deleted when the round is done)
    rs/round-K/model/          the policy after round K (LoRA: every round; full: the latest)
    rs/round-K/done.json       the round's summary; it exists only once the round is finished
Resume: finished rounds are not redone (the policy is restored from the latest round's model/);
an unfinished round continues sampling after its last written batch and training from its last
checkpoint. Ctrl-C stops between generation batches or at the next optimizer step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np
import torch

from llmtune.config.schema import Recipe, RsSection
from llmtune.data.templates import ChatTemplate, encode_prompt_response
from llmtune.errors import ConfigError, DataError, LLMTuneError
from llmtune.modeling.generate import generate
from llmtune.modeling.load import device, load_for_training, save_model
from llmtune.rewards import RewardSource, build_reward, reward_stats
from llmtune.rl.heldout import row_columns
from llmtune.runs.rundir import RunDir
from llmtune.stages.common import Context, data_rows, run_trainer, to_dataset
from llmtune.stages.sft import sft_trainer
from llmtune.stages.tracking import Trackers

log = logging.getLogger("llmtune.rs")

SHAPE = "prompt"


def run(recipe: Recipe, ctx: Context) -> dict[str, Any]:
    rs = recipe.rs
    root = ctx.run.path / "rs"
    if not ctx.resume and root.exists() and any(root.iterdir()):
        raise ConfigError(f"output_dir: {ctx.run.path} already holds rejection-sampling rounds; pass --resume "
                          "to continue them or choose another --output-dir")
    train_rows, _ = data_rows(recipe, SHAPE)
    if not train_rows:
        raise DataError("data: no prompts to sample from")
    assert recipe.reward is not None  # the schema requires a reward source for stage rs
    reward = build_reward(recipe.reward)  # before the policy: a reward that cannot load fails fast
    model, tok, spec = load_for_training(recipe)
    template = ChatTemplate.get(spec.template)

    rounds = [Round(root, k) for k in range(1, rs.iterations + 1)]
    finished = [r for r in rounds if r.done]
    if finished:  # resume: skip finished rounds, continue from the latest round's policy
        if not finished[-1].model_dir.is_dir():
            raise ConfigError(f"rs.iterations: cannot continue after round {finished[-1].k}: its policy "
                              f"{finished[-1].model_dir} is gone (full weights are kept for the latest round only)")
        restore(model, finished[-1].model_dir)
        log.info("resuming after round %d of %d", finished[-1].k, rs.iterations)
    summary: dict[str, Any] = {"prompts": len(train_rows), "rounds": [r.info() for r in finished]}
    steps = finished[-1].info()["global_step"] if finished else 0  # optimizer steps over all rounds
    if not getattr(model.config, "quantization_config", None):
        model.to(device())
    trackers = Trackers(recipe, ctx.run)
    try:
        return _rounds(rounds[len(finished):], model, tok, spec, template, train_rows, reward, recipe, ctx, trackers,
                       summary, steps)
    finally:
        trackers.close()


def _rounds(todo: list[Round], model: Any, tok: Any, spec: Any, template: ChatTemplate, rows: list[dict[str, Any]],
            reward: RewardSource, recipe: Recipe, ctx: Context, trackers: Trackers, summary: dict[str, Any],
            steps: int) -> dict[str, Any]:
    """The rounds still to do; every metrics row also goes to the recipe's trackers."""
    rs, kind = recipe.rs, spec.kind
    for rd in todo:
        rd.path.mkdir(parents=True, exist_ok=True)
        samples = sample(model, tok, template, kind, rows, reward, recipe, ctx, rd)
        if ctx.stop:
            return summary
        kept, bar, pct = select(samples, rs, rd.k)
        stats = {**score_stats(samples), "kept": len(kept), "threshold_used": bar}
        if pct is not None:
            stats["percentile_used"] = pct
        if stats["nonfinite_scores"]:
            log.warning("round %d: %d of %d scores were NaN or infinite and were dropped", rd.k,
                        stats["nonfinite_scores"], len(samples) * rs.num_samples)
        if not rd.kept_file.exists():  # fresh selection (on resume it was logged already)
            ctx.run.append_jsonl(rd.rel("kept.jsonl"), kept)
            row = {"round": rd.k, **stats, **reward_stats(reward)}
            ctx.run.log_metrics(steps, row)
            trackers.log(row, steps)
        log.info("round %d/%d: reward mean %.4g, best-of-%d mean %.4g, kept %d/%d (score >= %.4g)", rd.k,
                 rs.iterations, stats["reward_mean"], rs.num_samples, stats["reward_best_mean"], len(kept),
                 len(samples), bar)

        train: dict[str, Any] = {"global_step": 0, "train_loss": None}
        if kept:
            # Round dirs only exist in resumed runs (see the guard above): a checkpoint here is ours.
            resume = (rd.path / "checkpoints").is_dir()
            round_ctx = Context(run=RoundRun(ctx.run, rd, steps, trackers), resume=resume, stop=ctx.stop)
            train = fine_tune(model, tok, template, kind, kept, recipe, round_ctx)
            if ctx.stop:
                return summary
        else:
            log.warning("round %d kept no samples (threshold %.4g): the policy is unchanged", rd.k, bar)
        steps += train["global_step"]
        save_model(model, tok, rd.model_dir, spec, recipe, kind)
        info = {"round": rd.k, **stats, "global_step": steps, "train_loss": train["train_loss"]}
        ctx.run.write_json(rd.rel("done.json"), info)
        shutil.rmtree(rd.path / "checkpoints", ignore_errors=True)
        if recipe.model.finetuning == "full" and rd.k > 1:  # full weights are big: keep the latest only
            shutil.rmtree(Round(rd.path.parent, rd.k - 1).model_dir, ignore_errors=True)
        summary["rounds"].append(info)

    save_model(model, tok, ctx.run.model_dir, spec, recipe, kind)
    last = summary["rounds"][-1]
    summary.update(global_step=steps, reward_best_mean=last["reward_best_mean"], kept=last["kept"])
    return summary


class Round:
    """Paths and state of one round's directory."""

    def __init__(self, root: Path, k: int):
        self.k = k
        self.path = root / f"round-{k}"
        self.samples_file = self.path / "samples.jsonl"
        self.kept_file = self.path / "kept.jsonl"
        self.model_dir = self.path / "model"

    def rel(self, name: str) -> str:
        """Path relative to the run directory, for RunDir's (rank-0-only) writers."""
        return f"rs/round-{self.k}/{name}"

    @property
    def done(self) -> bool:
        return (self.path / "done.json").exists()

    def info(self) -> dict[str, Any]:
        return json.loads((self.path / "done.json").read_text())

    def read_samples(self) -> list[dict[str, Any]]:
        """Rows written so far; a line cut by a crash is dropped (and the file rewritten without it)."""
        if not self.samples_file.exists():
            return []
        text = self.samples_file.read_text()
        rows, bad = [], bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad = True
        if bad:  # rewrite, so the next append starts on a fresh line
            self.samples_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows


class RoundRun(RunDir):
    """The run directory as one round's trainer sees it: checkpoints under the round, and steps
    shifted so metrics.jsonl (and the trackers) count optimizer steps across all rounds (and resume
    truncates right)."""

    def __init__(self, run: RunDir, rd: Round, step_offset: int, trackers: Trackers):
        super().__init__(run.path)
        self.round = rd
        self.offset = step_offset
        self.trackers = trackers

    @property
    def checkpoints(self) -> Path:
        return self.round.path / "checkpoints"

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"round": self.round.k, **metrics}
        super().log_metrics(self.offset + step, row)
        self.trackers.log(row, self.offset + step)

    def truncate_metrics(self, after_step: int) -> None:
        super().truncate_metrics(self.offset + after_step)

    def restart_metrics(self) -> None:
        """The round trains again from its step 0: drop its rows, keep the earlier rounds' curve."""
        self.truncate_metrics(0)


def sample(model: Any, tok: Any, template: ChatTemplate, kind: str, prompt_rows: list[dict[str, Any]],
           reward: RewardSource, recipe: Recipe, ctx: Context, rd: Round) -> list[dict[str, Any]]:
    """num_samples responses per prompt, scored (with the rows' dataset columns), appended to
    samples.jsonl batch by batch."""
    n = recipe.rs.num_samples
    batch = recipe.rs.generation_batch_size
    max_prompt = recipe.data.prompt_length
    rows = rd.read_samples()[: len(prompt_rows)]
    for start in range(len(rows), len(prompt_rows), batch):
        if ctx.stop:
            break
        chunk = [r["prompt"] for r in prompt_rows[start:start + batch]]
        columns = {k: [v for v in values for _ in range(n)]
                   for k, values in row_columns(prompt_rows[start:start + batch]).items()}
        responses = generate(model, tok, template, kind, chunk, recipe.rs.generation, max_prompt_length=max_prompt,
                             num_return_sequences=n, batch_size=batch)
        scores = reward.score([p for p in chunk for _ in range(n)], [r for group in responses for r in group],
                              **columns)
        new = [{"index": start + i, "prompt": p, "responses": group, "scores": scores[i * n:(i + 1) * n]}
               for i, (p, group) in enumerate(zip(chunk, responses))]
        ctx.run.append_jsonl(rd.rel("samples.jsonl"), new)
        rows += new
    return rows


def select(samples: list[dict[str, Any]], rs: RsSection, k: int) -> tuple[list[dict[str, Any]], float, float | None]:
    """(kept rows, score bar used, percentile used): the best response per prompt, if it clears the bar.

    The bar is the highest of `threshold` and the round's percentile of best-per-prompt scores
    (so percentile 30 drops the 30% weakest prompts); without either, the lowest best score.
    Non-finite scores (a reward source's NaN or inf) are never picked nor counted in the bar; a
    prompt with no finite score keeps nothing. Every score non-finite is an error, not an empty round."""
    best: list[tuple[dict[str, Any], int, float]] = []
    for s in samples:
        finite = [(i, x) for i, x in enumerate(s["scores"]) if math.isfinite(x)]
        if finite:
            best.append((s, *max(finite, key=lambda t: t[1])))
    if samples and not best:
        raise LLMTuneError(f"reward: every score of round {k} is NaN or infinite ({sum(len(s['scores']) for s in samples)} "
                           "responses): the reward source is broken")
    best_scores = [score for _, _, score in best]
    bars = [rs.threshold] if rs.threshold is not None else []
    pct = None
    if rs.percentile is not None:
        pct = min(100.0, rs.percentile + (k - 1) * rs.percentile_step)
        bars.append(float(np.percentile(best_scores, pct)))
    bar = max(bars) if bars else min(best_scores)
    kept = [{"index": s["index"], "prompt": s["prompt"], "response": s["responses"][i], "score": score}
            for s, i, score in best if score >= bar]
    return kept, bar, pct


def score_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A round's reward mean and best-of-n mean over finite scores, and how many were not finite."""
    scores = [x for s in samples for x in s["scores"]]
    finite = [x for x in scores if math.isfinite(x)]
    best = [max(f) for s in samples if (f := [x for x in s["scores"] if math.isfinite(x)])]
    return {"reward_mean": fmean(finite), "reward_best_mean": fmean(best), "nonfinite_scores": len(scores) - len(finite)}


def fine_tune(model: Any, tok: Any, template: ChatTemplate, kind: str, kept: list[dict[str, Any]],
              recipe: Recipe, ctx: Context) -> dict[str, Any]:
    """One round of supervised fine-tuning on (prompt, best response), as stage sft trains."""
    max_len = recipe.data.max_length

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        enc = encode_prompt_response(tok, template, row["prompt"], row["response"], max_len, kind)
        return {"input_ids": enc["input_ids"], "labels": enc["labels"]}

    dataset = to_dataset(kept, encode, "tokenising kept samples")
    # The round's metrics reach the trackers through RoundRun (step-shifted); the round's own Trainer would
    # log into its checkpoint directory, which is deleted once the round is done.
    quiet = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, report_to=[]))
    trainer = sft_trainer(quiet, ctx, model, tok, kind, dataset, None)
    result = run_trainer(trainer, ctx)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def restore(model: Any, path: Path) -> None:
    """Load a finished round's weights (adapter or full) into the freshly loaded policy."""
    from peft import PeftModel, load_peft_weights, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_peft_weights(str(path)))
        return
    from safetensors.torch import load_file

    for shard in sorted(path.glob("*.safetensors")):
        unexpected = model.load_state_dict(load_file(str(shard)), strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{shard}: weights do not fit the policy ({unexpected[:3]}...)")
