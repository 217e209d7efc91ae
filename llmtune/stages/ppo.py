"""stage: ppo — RLHF / RLAIF with our own PPO (TRL 1.x ships none, and none for encoder-decoders).

One PPO step:
  1. rollout   sample `ppo.rollout_batch_size` prompts, generate a response each (ppo.generation)
  2. score     reward source → one score per response (+ missing-EOS penalty, normalise, clip)
  3. evaluate  log-probs and values under the policy, log-probs under the frozen reference
  4. advantage per-token KL penalty (kl_coef from the fixed/adaptive controller), score at the last
               token, GAE, whitening
  5. optimise  `ppo.ppo_epochs` passes over shuffled minibatches of `ppo.mini_batch_size`, each
               split into `training.gradient_accumulation_steps` micro-batches, clipped losses,
               gradient clipping, one optimizer + LR-scheduler step per minibatch
  6. log       metrics.jsonl, samples.jsonl every ppo.sample_every, checkpoints every save_steps

With LoRA the reference is the policy with its adapters disabled (one copy of the weights); with
full fine-tuning it is a frozen copy. Everything runs under `accelerate` (one process or many).
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmtune.config.schema import Recipe
from llmtune.data.templates import ChatTemplate, Message
from llmtune.errors import ConfigError
from llmtune.modeling.batch import pad_ids
from llmtune.modeling.load import load_for_training, save_model
from llmtune.modeling.precision import accelerate_name, on_this_machine
from llmtune.modeling.reference import disable_dropout, frozen_copy
from llmtune.ppo import core
from llmtune.ppo.rollout import Rollout, evaluate, reference_logprobs, sample
from llmtune.ppo.value import ActorCritic, load_value_model
from llmtune.rewards.base import RunningStats
from llmtune.runs.rundir import follow_umask
from llmtune.stages.common import Context, data_rows

log = logging.getLogger("llmtune.ppo")

SHAPE = "prompt"
SAMPLES_FILE = "samples.jsonl"
CURVE_FILE = "reward_curve.png"
SAMPLES_PER_WRITE = 8


def run(recipe: Recipe, ctx: Context) -> dict[str, Any]:
    return PPOTrainer(recipe, ctx).train()


def load_reward(recipe: Recipe) -> Any:
    """The recipe's reward source, an object with score(prompts, responses) -> list[float]."""
    from llmtune.rewards import build_reward

    assert recipe.reward is not None  # check() guarantees a reward section for stage ppo
    return build_reward(recipe.reward)


class PPOTrainer:
    """Holds the actor-critic, the (optional) frozen reference, optimizer and PPO state; `train()`
    runs the loop. Built eagerly so tests can inspect what is allocated before training."""

    def __init__(self, recipe: Recipe, ctx: Context, reward: Any | None = None):
        from accelerate import Accelerator
        from transformers import get_scheduler

        self.recipe, self.ctx, self.p, self.t = recipe, ctx, recipe.ppo, recipe.training
        precision = accelerate_name(on_this_machine(recipe.training.precision))
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        rows, _ = data_rows(recipe, SHAPE)
        self.prompts: list[list[Message]] = [r["prompt"] for r in rows]
        if not self.prompts:
            raise ConfigError("data: no prompts to train on")
        policy, self.tok, self.spec = load_for_training(recipe)
        self.kind = self.spec.kind
        self.template = ChatTemplate.get(self.spec.template)
        self.lora = recipe.model.finetuning in ("lora", "qlora")
        value_model, score_head = None, None
        if self.p.value_model == "separate":  # the schema checked there is a causal model to start from
            ref = self.p.value_model_path or (recipe.reward.model if recipe.reward else None)
            value_model, score_head = load_value_model(ref, recipe, policy.get_input_embeddings().weight.shape[0])
        # Full fine-tuning needs a frozen copy for the KL term; LoRA switches its adapters off instead.
        self.reference: nn.Module | None = None
        if not self.lora:
            self.reference = frozen_copy(policy)
            self.reference.to(self.accelerator.device)
        self.decoder_start = getattr(policy.config, "decoder_start_token_id", None)
        ac = ActorCritic(policy, self.kind, value_model, score_head)
        disable_dropout(ac)
        self.reward = reward if reward is not None else load_reward(recipe)

        self.num_steps = self._num_steps()
        minibatches = self.p.rollout_batch_size // self.p.mini_batch_size
        self.total_updates = self.num_steps * self.p.ppo_epochs * minibatches
        params = [q for q in ac.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.t.learning_rate, weight_decay=self.t.weight_decay,
                                      fused=self.t.optimizer == "adamw_torch_fused")
        warmup = self.t.warmup_steps or math.ceil(self.t.warmup_ratio * self.total_updates)
        self.scheduler = get_scheduler(self.t.lr_scheduler, optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_updates)
        self.ac, self.optimizer = self.accelerator.prepare(ac, optimizer)
        self.kl_ctl = (core.AdaptiveKLController(self.p.kl_coef, self.p.target_kl, self.p.kl_horizon)
                       if self.p.adaptive_kl else core.FixedKLController(self.p.kl_coef))
        self.reward_stats = RunningStats()
        self.step = 0
        self.max_prompt_length = recipe.data.prompt_length

    # -- bookkeeping ------------------------------------------------------------------------------
    def _num_steps(self) -> int:
        if self.t.max_steps > 0:
            return self.t.max_steps
        per_step = self.p.rollout_batch_size * self.accelerator.num_processes
        return max(1, math.ceil(self.t.epochs * len(self.prompts) / per_step))

    @property
    def unwrapped(self) -> ActorCritic:
        return self.accelerator.unwrap_model(self.ac)

    def held_parameters(self) -> int:
        """Distinct parameter elements held by the trainer (shared storage counted once)."""
        seen: dict[int, int] = {}
        for module in (self.unwrapped, self.reference):
            if module is None:
                continue
            for q in module.parameters():
                seen[q.data_ptr()] = q.numel()
        return sum(seen.values())

    def step_prompts(self, step: int) -> list[list[Message]]:
        """This process's prompts for a (1-based) step: a deterministic walk over per-epoch shuffles of
        the prompt set, so a resumed run sees exactly the prompts the uninterrupted one would."""
        n, size = len(self.prompts), self.p.rollout_batch_size
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        start = ((step - 1) * world + rank) * size
        out = []
        perms: dict[int, list[int]] = {}
        for i in range(start, start + size):
            epoch = i // n
            if epoch not in perms:
                order = list(range(n))
                random.Random(self.t.seed + epoch).shuffle(order)
                perms[epoch] = order
            out.append(self.prompts[perms[epoch][i % n]])
        return out

    # -- one PPO step -----------------------------------------------------------------------------
    def rollout(self, prompts: list[list[Message]]) -> tuple[Rollout, dict[str, torch.Tensor], list[float]]:
        """Sample, score and evaluate one batch; returns (rollout, per-token tensors, raw scores)."""
        model = self.unwrapped
        # Eval mode for sampling and scoring: with gradient checkpointing on, train mode would make
        # generate() drop its KV cache. Dropout is off either way (disable_dropout).
        model.eval()
        bs = self.p.generation_batch_size
        chunks: list[Rollout] = []
        for i in range(0, len(prompts), bs):
            chunks.append(sample(model.policy, self.tok, self.template, self.kind, prompts[i:i + bs],
                                 self.p.generation, self.max_prompt_length))
        raw = [float(s) for c in chunks for s in self.reward.score(c.prompts, c.texts)]
        parts: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for c in chunks:
                out = evaluate(model, c, self.kind, self.decoder_start)
                out["ref_logprobs"] = reference_logprobs(model.policy, self.reference, c, self.kind,
                                                         self.decoder_start)
                parts.append(out)
        r = _concat_rollouts(chunks, self.tok.pad_token_id, left=self.kind != "seq2seq")
        tensors = {k: pad_ids([row for p in parts for row in p[k]], 0.0) for k in parts[0]}
        return r, tensors, raw

    def shape_scores(self, raw: list[float], r: Rollout) -> torch.Tensor:
        """Raw scores → training scores: missing-EOS penalty, running normalisation, clipping."""
        scores = torch.tensor(raw, dtype=torch.float32, device=r.response_ids.device)
        if self.p.missing_eos_penalty is not None:
            scores = scores - self.p.missing_eos_penalty * (~r.ended).float()
        if self.p.reward_normalize:
            self.reward_stats.update(self.accelerator.gather(scores).tolist())
            scores = (scores - self.reward_stats.mean) / self.reward_stats.std
        if self.p.reward_clip is not None:
            scores = scores.clamp(-self.p.reward_clip, self.p.reward_clip)
        return scores

    def optimise(self, r: Rollout, old: dict[str, torch.Tensor], advantages: torch.Tensor,
                 returns: torch.Tensor) -> dict[str, float]:
        """ppo_epochs passes of minibatch updates; returns the mean of each loss statistic."""
        n, mb = len(r.prompts), self.p.mini_batch_size
        micro = mb // self.t.gradient_accumulation_steps
        stats: dict[str, list[float]] = {}
        self.ac.train()
        gen = torch.Generator().manual_seed(self.t.seed * 100003 + self.step)
        for _ in range(self.p.ppo_epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for start in range(0, n, mb):
                idx = order[start:start + mb]
                for m_start in range(0, len(idx), micro):
                    sub = idx[m_start:m_start + micro]
                    last = m_start + micro >= len(idx)
                    sync = self.accelerator.no_sync(self.ac) if not last else nullcontext()
                    with sync:
                        loss, s = self._loss(r.select(sub), {k: v[sub] for k, v in old.items()},
                                             advantages[sub], returns[sub])
                        self.accelerator.backward(loss / self.t.gradient_accumulation_steps)
                    for k, v in s.items():
                        stats.setdefault(k, []).append(v)
                if self.t.max_grad_norm > 0:
                    norm = self.accelerator.clip_grad_norm_(self.ac.parameters(), self.t.max_grad_norm)
                    stats.setdefault("grad_norm", []).append(float(norm))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def _loss(self, r: Rollout, old: dict[str, torch.Tensor], advantages: torch.Tensor,
              returns: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mask = r.response_mask.float()
        # Trim to the longest response in this micro-batch: padding columns cost compute only.
        width = int(mask.sum(1).max().item())
        r = Rollout(r.prompts, r.query_ids, r.query_mask, r.response_ids[:, :width], r.response_mask[:, :width],
                    r.texts, r.ended)
        mask, advantages, returns = mask[:, :width], advantages[:, :width], returns[:, :width]
        new = evaluate(self.ac, r, self.kind, self.decoder_start, with_entropy=True)
        pg_loss, pg_stats = core.policy_loss(new["logprobs"], old["logprobs"][:, :width], advantages, mask,
                                             self.p.cliprange)
        vf_loss, vf_clip = core.value_loss(new["values"], old["values"][:, :width], returns, mask,
                                           self.p.cliprange_value)
        loss = pg_loss + self.p.vf_coef * vf_loss
        return loss, {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
                      "clipfrac": pg_stats["clipfrac"].item(), "approx_kl": pg_stats["approx_kl"].item(),
                      "vf_clipfrac": vf_clip.item(), "entropy": core.masked_mean(new["entropy"], mask).item()}

    def ppo_step(self) -> dict[str, float]:
        """One full PPO iteration (rollout → advantages → updates); returns the step's metrics."""
        started = time.perf_counter()
        prompts = self.step_prompts(self.step + 1)
        r, t, raw = self.rollout(prompts)
        rollout_time = time.perf_counter() - started
        mask = r.response_mask.float()
        scores = self.shape_scores(raw, r)
        rewards, kl = core.kl_penalised_rewards(scores, t["logprobs"], t["ref_logprobs"], mask, self.kl_ctl.value)
        advantages, returns = core.gae(t["values"], rewards, mask, self.p.gamma, self.p.lam)
        if self.p.whiten_advantages:
            advantages = core.whiten(advantages, mask)
        kl_coef = self.kl_ctl.value
        stats = self.optimise(r, t, advantages, returns)
        self.step += 1

        acc = self.accelerator
        seq_kl = kl.sum(1)
        mean_kl = acc.reduce(seq_kl.mean(), "mean").item()
        self.kl_ctl.update(mean_kl, self.p.rollout_batch_size * acc.num_processes)
        raw_all = acc.gather(torch.tensor(raw, device=acc.device))
        lengths = acc.gather(mask.sum(1))
        elapsed = time.perf_counter() - started
        metrics = {
            "reward_mean": raw_all.mean().item(), "reward_std": raw_all.std().item() if raw_all.numel() > 1 else 0.0,
            "score_mean": acc.reduce(scores.mean(), "mean").item(), "kl": mean_kl, "kl_coef": kl_coef,
            "ref_kl_per_token": acc.reduce(core.masked_mean(kl, mask), "mean").item(),
            "response_length": lengths.float().mean().item(),
            "ended_fraction": acc.reduce(r.ended.float().mean(), "mean").item(),
            "returns_mean": acc.reduce(core.masked_mean(returns, mask), "mean").item(),
            **{k: acc.reduce(torch.tensor(v, device=acc.device), "mean").item() for k, v in stats.items()},
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": raw_all.numel() / elapsed, "tokens_per_s": lengths.sum().item() / elapsed,
            "rollout_s": rollout_time, "step_s": elapsed, "max_rss_mb": _max_rss_mb(),
        }
        if torch.cuda.is_available():
            metrics["max_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        if self.step % self.p.sample_every == 0 or self.step == 1:
            self.ctx.run.append_jsonl(SAMPLES_FILE, [
                {"step": self.step, "prompt": p, "response": text, "reward": score, "ended": bool(e)}
                for p, text, score, e in list(zip(r.prompts, r.texts, raw, r.ended.tolist()))[:SAMPLES_PER_WRITE]])
        return metrics

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        if self.ctx.resume:
            self.resume()
        log.info("ppo: %d steps x %d prompts (%s, %s), %d optimizer updates", self.num_steps,
                 self.p.rollout_batch_size, self.kind, self.recipe.model.finetuning, self.total_updates)
        line_output = not sys.stderr.isatty()
        history: list[dict[str, float]] = []
        while self.step < self.num_steps and not self.ctx.stop:
            metrics = self.ppo_step()
            history.append(metrics)
            if self.step % self.t.logging_steps == 0 or self.step == self.num_steps:
                self.ctx.run.log_metrics(self.step, metrics)
                if line_output and self.accelerator.is_main_process:
                    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in ("reward_mean", "kl", "kl_coef", "entropy",
                                                                      "policy_loss", "value_loss", "samples_per_s"))
                    print(f"ppo step {self.step}/{self.num_steps} {shown}", flush=True)
            if self.step % self.t.save_steps == 0 or self.ctx.stop:
                self.save_checkpoint()
        summary: dict[str, Any] = {"global_step": self.step, "prompts": len(self.prompts)}
        if history:
            summary.update(reward_mean_last=history[-1]["reward_mean"], kl_last=history[-1]["kl"])
        if self.accelerator.is_main_process:
            from llmtune.ppo.plot import reward_curve

            reward_curve(self.ctx.run.metrics(), self.ctx.run.path / CURVE_FILE)
        if not self.ctx.stop and self.accelerator.is_main_process:
            save_model(self.unwrapped.policy, self.tok, self.ctx.run.model_dir, self.spec, self.recipe, self.kind)
        self.accelerator.wait_for_everyone()
        return summary

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Everything needed to continue bit-for-bit: trainable weights (adapters or all, value head),
        optimizer, scheduler, KL controller, reward statistics, RNG states, step."""
        acc = self.accelerator
        path = self.ctx.run.checkpoints / f"checkpoint-{self.step}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            model = self.unwrapped
            trainable = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
            torch.save(trainable, path / "trainable.pt")
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), path / "scheduler.pt")
            model.policy.save_pretrained(path / "policy", safe_serialization=True)
            follow_umask(path)
            state = {"step": self.step, "kl_controller": self.kl_ctl.state_dict(),
                     "reward_stats": self.reward_stats.state_dict()}
            (path / "ppo_state.json").write_text(json.dumps(state, indent=2) + "\n")
        acc.wait_for_everyone()
        torch.save(_rng_state(), path / f"rng_state_{acc.process_index}.pt")
        if acc.is_main_process:
            self._rotate_checkpoints()
        log.info("checkpoint saved: %s", path)
        return path

    def _rotate_checkpoints(self) -> None:
        limit = self.t.save_total_limit
        if not limit:
            return
        done = sorted((p for p in self.ctx.run.checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                      key=lambda p: int(p.name.split("-")[-1]))
        for old in done[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> None:
        last = self.ctx.run.last_checkpoint()
        if last is None:
            log.warning("--resume: no checkpoint in %s; starting again from step 0", self.ctx.run.checkpoints)
            self.ctx.run.restart_metrics()
            return
        state = json.loads((last / "ppo_state.json").read_text())
        trainable = torch.load(last / "trainable.pt", map_location=self.accelerator.device)
        missing = self.unwrapped.load_state_dict(trainable, strict=False)
        if missing.unexpected_keys:
            raise ConfigError(f"--resume: {last} does not match this recipe's model (unexpected weights: "
                              f"{missing.unexpected_keys[:3]})")
        self.optimizer.load_state_dict(torch.load(last / "optimizer.pt", map_location=self.accelerator.device))
        self.scheduler.load_state_dict(torch.load(last / "scheduler.pt"))
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_stats.load_state_dict(state["reward_stats"])
        self.step = int(state["step"])
        rng = last / f"rng_state_{self.accelerator.process_index}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        self.ctx.run.truncate_metrics(self.step)
        log.info("resuming from %s (step %d)", last, self.step)


def _concat_rollouts(chunks: list[Rollout], pad_id: int, left: bool) -> Rollout:
    """One Rollout from generation chunks of different widths (causal queries re-padded on the left)."""
    if len(chunks) == 1:
        return chunks[0]

    def rows(name: str) -> list[torch.Tensor]:
        return [row for c in chunks for row in getattr(c, name)]

    side = "left" if left else "right"
    return Rollout(
        [p for c in chunks for p in c.prompts],
        pad_ids(rows("query_ids"), pad_id, side),
        pad_ids(rows("query_mask"), 0, side),
        pad_ids(rows("response_ids"), pad_id).long(),
        pad_ids(rows("response_mask"), 0).long(),
        [t for c in chunks for t in c.texts],
        torch.cat([c.ended for c in chunks]),
    )


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
