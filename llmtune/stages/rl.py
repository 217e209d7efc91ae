"""stages rl and ppo — online RL: PPO, GRPO, RLOO and REINFORCE++ as one loop (TRL 1.x ships no PPO,
and no online RL for encoder-decoders). Stage ppo is stage rl with algorithm ppo, its settings under
`ppo:`; stage rl reads `rl:` (`rl.algorithm`).

One step:
  1. rollout   `rollout_batch_size` prompts, `num_generations` responses each, sampled in batched
               generate calls (a prompt's group in the same call; `generation`)
  2. score     the reward source (and `eval_reward`, for monitoring) score every response, with the
               prompts' dataset columns (a gold `answer`); missing-EOS penalty, normalise, clip
  3. evaluate  no gradient: log-probs (values for ppo) of the sampled tokens under the policy, and
               under the frozen reference; log-probs at the sampling temperature, LM head on the
               response positions only. Skipped when not needed: the old log-probs when the batch gets
               one on-policy update (the update's own, detached, are the same), the reference when
               kl_coef is 0
  4. advantage ppo: KL-penalised token rewards + GAE (+ whitening); grpo: group baseline (/ std);
               rloo: leave-one-out baseline; reinforce_pp: returns standardized over the batch
  5. optimise  `ppo_epochs` passes of shuffled minibatches of `mini_batch_size` rollouts, each split
               into `training.gradient_accumulation_steps` micro-batches: clipped surrogate (clip-
               higher), KL in the loss when `kl_in: loss`, clipped value loss (ppo), the ratio guard,
               gradient clipping, one optimizer + LR-scheduler step per minibatch
  6. log       metrics.jsonl and `training.report_to`, samples.jsonl every `sample_every`, held-out
               reward before training, every `training.eval_steps` and at the end (data.eval_split or
               eval_fraction), checkpoints every `save_steps` (accelerate's save_state)

With LoRA the reference is the policy with its adapters disabled (one copy of the weights); with
full fine-tuning it is a frozen copy. Everything runs under `accelerate` (one process or many).
"""

from __future__ import annotations

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

import torch
from torch import nn

from llmtune.config.schema import Recipe
from llmtune.data.templates import ChatTemplate
from llmtune.errors import ConfigError, LLMTuneError
from llmtune.modeling.generate import sample
from llmtune.modeling.load import load_for_training, save_model
from llmtune.modeling.precision import accelerate_name, on_this_machine
from llmtune.modeling.reference import disable_dropout, frozen_copy
from llmtune.rewards.base import RunningStats
from llmtune.rl import core
from llmtune.rl.heldout import heldout_scores, row_columns
from llmtune.rl.rollout import Scorer, Trajectory, keeps_logits
from llmtune.rl.value import ActorCritic, load_value_model
from llmtune.runs.rundir import follow_umask
from llmtune.stages.common import Context, data_rows
from llmtune.stages.tracking import Trackers

log = logging.getLogger("llmtune.rl")

SHAPE = "prompt"
SAMPLES_FILE = "samples.jsonl"
CURVE_FILE = "reward_curve.png"
SAMPLES_PER_WRITE = 8


def run(recipe: Recipe, ctx: Context) -> dict[str, Any]:
    return RLTrainer(recipe, ctx).train()


def load_reward(section: Any) -> Any:
    """A reward section's source, an object with score(prompts, responses, **columns) -> list[float]."""
    from llmtune.rewards import build_reward

    return build_reward(section)


class Progress:
    """The loop's own position, checkpointed with accelerate's state (register_for_checkpointing)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


class RLTrainer:
    """Holds the policy (with a critic for ppo), the frozen reference when one is needed, optimizer and
    loop state; `train()` runs the loop. Built eagerly so tests can inspect what is allocated."""

    def __init__(self, recipe: Recipe, ctx: Context):
        self.recipe, self.ctx, self.p, self.t = recipe, ctx, recipe.online, recipe.training
        self._setup_accelerator()
        self._setup_data()
        self._setup_models()
        self.reward = load_reward(recipe.reward)
        self.eval_reward = load_reward(recipe.eval_reward) if recipe.eval_reward is not None else None
        self._setup_optimizer()
        self._setup_checkpointing()

    # -- setup --------------------------------------------------------------------------------------
    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        precision = accelerate_name(on_this_machine(self.t.precision))
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())

    def _setup_data(self) -> None:
        self.rows, self.eval_rows = data_rows(self.recipe, SHAPE)
        if not self.rows:
            raise ConfigError("data: no prompts to train on")
        self.max_prompt_length = self.recipe.data.prompt_length

    def _setup_models(self) -> None:
        recipe, p = self.recipe, self.p
        policy, self.tok, self.spec = load_for_training(recipe)
        self.kind = self.spec.kind
        self.template = ChatTemplate.get(self.spec.template)
        self.critic = p.algorithm == "ppo"
        self.use_reference = p.kl_coef > 0 or p.adaptive_kl
        # Full fine-tuning needs a frozen copy for the KL term; LoRA switches its adapters off instead.
        self.reference: nn.Module | None = None
        if self.use_reference and recipe.model.finetuning not in ("lora", "qlora"):
            self.reference = frozen_copy(policy).to(self.accelerator.device)
        module: nn.Module = policy
        if self.critic:
            value_model, score_head = None, None
            if p.value_model == "separate":  # the schema checked there is a causal model to start from
                ref = p.value_model_path or (recipe.reward.model if recipe.reward else None)
                value_model, score_head = load_value_model(ref, recipe, policy.get_input_embeddings().weight.shape[0])
            module = ActorCritic(policy, self.kind, value_model, score_head)
        disable_dropout(module)
        self._module = module
        temperature = p.generation.temperature if p.generation.do_sample else 1.0
        self.scorer = Scorer(self.kind, getattr(policy.config, "decoder_start_token_id", None), temperature,
                             keeps_logits(policy))

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        p, t = self.p, self.t
        self.num_steps = self._num_steps()
        self.updates_per_batch = p.ppo_epochs * (p.rollouts // p.mini_batch_size)
        self.total_updates = self.num_steps * self.updates_per_batch
        params = [q for q in self._module.parameters() if q.requires_grad]
        fused = t.optimizer == "adamw_torch_fused"
        # foreach: one kernel per group of tensors instead of a Python loop over them (torch only picks it
        # by itself on CUDA); LoRA has many small tensors.
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=fused,
                                      foreach=not fused)
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * self.total_updates)
        self.scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_updates)
        self.module, self.optimizer = self.accelerator.prepare(self._module, optimizer)
        self.kl_ctl = (core.AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon)
                       if p.adaptive_kl else core.FixedKLController(p.kl_coef))
        self.reward_stats = RunningStats()
        self.progress = Progress()

    def _setup_checkpointing(self) -> None:
        """accelerate's save_state/load_state keep the optimizer, RNG states and the registered objects;
        the hooks keep the weights to the trainable ones (adapters, value head: the frozen base stays
        where it was loaded from)."""
        acc = self.accelerator
        for obj in (self.scheduler, self.kl_ctl, self.reward_stats, self.progress):
            acc.register_for_checkpointing(obj)
        trainable = {k for k, v in self.module.named_parameters() if v.requires_grad}

        def keep_trainable(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
            for i, state in enumerate(weights):
                weights[i] = {k: v for k, v in state.items() if k in trainable}

        def check_match(models: list[Any], input_dir: str) -> None:
            from safetensors import safe_open

            with safe_open(str(Path(input_dir) / "model.safetensors"), "pt") as f:
                saved = set(f.keys())
            if saved != trainable:
                odd = sorted(saved ^ trainable)[:3]
                raise ConfigError(f"--resume: {input_dir} does not match this recipe's model (weights that differ: "
                                  f"{odd})")

        acc.register_save_state_pre_hook(keep_trainable)
        acc.register_load_state_pre_hook(check_match)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _num_steps(self) -> int:
        if self.t.max_steps > 0:
            return self.t.max_steps
        per_step = self.p.rollout_batch_size * self.accelerator.num_processes
        return max(1, math.ceil(self.t.epochs * len(self.rows) / per_step))

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def unwrapped(self) -> nn.Module:
        """The policy, or the ActorCritic (ppo), without accelerate's wrappers."""
        return self.accelerator.unwrap_model(self.module)

    @property
    def policy(self) -> nn.Module:
        model = self.unwrapped
        return model.policy if isinstance(model, ActorCritic) else model

    def held_parameters(self) -> int:
        """Distinct parameter elements held by the trainer (shared storage counted once)."""
        seen: dict[int, int] = {}
        for module in (self.unwrapped, self.reference):
            if module is None:
                continue
            for q in module.parameters():
                seen[q.data_ptr()] = q.numel()
        return sum(seen.values())

    def step_rows(self, step: int) -> list[dict[str, Any]]:
        """This process's prompt rows for a (1-based) step: a deterministic walk over per-epoch shuffles of
        the rows, so a resumed run sees exactly the prompts the uninterrupted one would."""
        n, size = len(self.rows), self.p.rollout_batch_size
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
            out.append(self.rows[perms[epoch][i % n]])
        return out

    # -- 1-3: rollout, score, evaluate ------------------------------------------------------------
    def rollout(self, rows: list[dict[str, Any]]) -> Trajectory:
        """Sample every prompt's group, in generation_batch_size prompts per generate call."""
        policy = self.policy
        # Eval mode for sampling: with gradient checkpointing on, train mode would make generate() drop its
        # KV cache. Dropout is off either way (disable_dropout).
        policy.eval()
        bs, n = self.p.generation_batch_size, self.p.num_generations or 1
        parts = []
        for i in range(0, len(rows), bs):
            chunk = rows[i:i + bs]
            s = sample(policy, self.tok, self.template, self.kind, [r["prompt"] for r in chunk], self.p.generation,
                       self.max_prompt_length, n=n)
            parts.append(Trajectory.from_samples(s, [r["prompt"] for r in chunk], row_columns(chunk)))
        return Trajectory.cat(parts, self.tok.pad_token_id, left_pad_queries=self.kind != "seq2seq")

    def score(self, t: Trajectory) -> Trajectory:
        """The reward (and eval_reward) of every response; non-finite scores are counted and left out of
        the update (see advantages)."""
        device = t.response_ids.device
        raw = torch.tensor([float(x) for x in self.reward.score(t.prompts, t.texts, **t.columns)],
                           dtype=torch.float32, device=device)
        judged = None
        if self.eval_reward is not None:
            judged = torch.tensor([float(x) for x in self.eval_reward.score(t.prompts, t.texts, **t.columns)],
                                  dtype=torch.float32, device=device)
        t.scores, t.eval_scores = raw, judged
        return t

    def shape_scores(self, t: Trajectory) -> torch.Tensor:
        """Raw scores → training scores: missing-EOS penalty, running normalisation, clipping; a
        non-finite score becomes the batch's finite mean (its row is left out of the update)."""
        assert t.scores is not None
        finite = torch.isfinite(t.scores)
        if not finite.any():
            raise LLMTuneError(f"reward: every score of step {self.step + 1} is NaN or infinite ({len(t)} responses): "
                               "the reward source is broken")
        scores = torch.where(finite, t.scores, t.scores[finite].mean())
        if self.p.missing_eos_penalty is not None:
            scores = scores - self.p.missing_eos_penalty * (~t.ended).float()
        if self.p.reward_normalize:
            self.reward_stats.update(self.accelerator.gather(scores).tolist())
            scores = (scores - self.reward_stats.mean) / self.reward_stats.std
        if self.p.reward_clip is not None:
            scores = scores.clamp(-self.p.reward_clip, self.p.reward_clip)
        return scores

    @torch.no_grad()
    def evaluate(self, t: Trajectory) -> Trajectory:
        """Old log-probs (+ values, entropy) and reference log-probs of the sampled tokens, in chunks of
        generation_batch_size prompts. The old log-probs are only needed when the batch is updated more
        than once, by ppo (values, GAE) or for a KL penalty in the reward."""
        need_old = self.critic or self.p.kl_in == "reward" or self.updates_per_batch > 1
        if not (need_old or self.use_reference):
            return t
        self.unwrapped.eval()
        chunk = self.p.generation_batch_size * (self.p.num_generations or 1)
        logps, refs, values, ents = [], [], [], []
        for start in range(0, len(t), chunk):
            part = t.select(list(range(start, min(start + chunk, len(t)))))
            if need_old:
                lp, v, ent = self.scorer(self.unwrapped, part, entropy=True, critic=self.critic)
                logps.append(lp)
                ents.append(ent)
                if v is not None:
                    values.append(v)
            if self.use_reference:
                refs.append(self.scorer.reference(self.policy, self.reference, part))
        width = t.response_ids.shape[1]

        def cat(parts: list[torch.Tensor]) -> torch.Tensor | None:
            return torch.cat([nn.functional.pad(x, (0, width - x.shape[1])) for x in parts]) if parts else None

        t.logprobs, t.ref_logprobs, t.values, t.entropy = cat(logps), cat(refs), cat(values), cat(ents)
        return t

    # -- 4: advantages ----------------------------------------------------------------------------
    def advantages(self, t: Trajectory, scores: torch.Tensor) -> Trajectory:
        """The algorithm's advantages (and ppo's returns), the KL estimate per token, the active rows."""
        p, coef = self.p, self.kl_ctl.value
        mask = t.response_mask.float()
        group = t.group
        assert t.scores is not None
        active = torch.isfinite(t.scores)
        penalty = torch.zeros_like(mask)  # the KL term in the reward, per token
        if t.logprobs is not None and t.ref_logprobs is not None:
            t.kl = (t.logprobs - t.ref_logprobs) * mask
            if p.kl_in == "reward":
                penalty = core.kl_estimate(t.logprobs, t.ref_logprobs, p.kl_estimator or "k1") * mask
        if p.algorithm == "ppo":
            assert t.values is not None
            rewards = core.token_rewards(scores, penalty, mask, coef)
            t.advantages, t.returns = core.gae(t.values, rewards, mask, p.gamma, p.lam)
            if p.whiten_advantages:
                t.advantages = core.whiten(t.advantages, mask)
        elif p.algorithm == "reinforce_pp":
            if group > 1:  # REINFORCE++-baseline: the group mean first, then the global normalisation
                scores = scores - scores.view(-1, group).mean(1).repeat_interleave(group)
            t.advantages = core.reinforce_pp_advantages(core.token_rewards(scores, penalty, mask, coef), mask, p.gamma)
        else:
            sequence = scores - coef * penalty.sum(1)
            t.advantages = (core.group_advantages(sequence, group, p.scale_rewards) if p.algorithm == "grpo"
                            else core.leave_one_out_advantages(sequence, group))
            if p.skip_zero_variance_groups:
                active = active & ~core.zero_variance(scores, group)
        t.active = active
        return t

    # -- 5: optimise ------------------------------------------------------------------------------
    def optimise(self, t: Trajectory) -> dict[str, float]:
        """ppo_epochs passes of minibatch updates over the active rows. Statistics stay on the device as
        running sums until the end (one transfer per step, not one per micro-batch)."""
        p, acc = self.p, self.accelerator
        n, mb = len(t), p.mini_batch_size
        micro = mb // self.t.gradient_accumulation_steps
        assert t.active is not None
        active = t.active.tolist()
        parts: dict[str, list[torch.Tensor]] = {}
        self.module.train()
        gen = torch.Generator().manual_seed(self.t.seed * 100003 + self.step)
        for _ in range(p.ppo_epochs or 1):
            order = torch.randperm(n, generator=gen).tolist()
            for start in range(0, n, mb):
                idx = [i for i in order[start:start + mb] if active[i]]
                sequences, tokens = max(len(idx), 1), max(sum(t.lengths[i] for i in idx), 1)
                for m_start in range(0, mb, micro):
                    sub = idx[m_start:m_start + micro]
                    if not sub and acc.num_processes == 1:
                        continue
                    # Under DDP every rank runs every micro-batch: an empty one trains on a row with weight 0.
                    rows, weight = (sub, 1.0) if sub else (order[start:start + 1], 0.0)
                    sync = acc.no_sync(self.module) if m_start + micro < mb else nullcontext()
                    with sync:
                        loss, stats = self._loss(t.select(rows), sequences, tokens, weight)
                        acc.backward(loss)
                    for k, v in stats.items():
                        parts.setdefault(k, []).append(v)
                if idx:  # else no gradient: the optimizer skips, the scheduler steps on as planned
                    parts.setdefault("updates", []).append(torch.ones(()))
                    if self.t.max_grad_norm > 0:
                        parts.setdefault("grad_norm", []).append(
                            acc.clip_grad_norm_(self.module.parameters(), self.t.max_grad_norm).detach().float())
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return self._reduce_stats(parts)

    @staticmethod
    def _reduce_stats(parts: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Per-step statistics from the micro-batches' sums: token averages (*_tokens / tokens), sequence
        averages (*_seqs / sequences), minibatch losses (summed shares / updates), grad_norm (mean)."""
        if not parts:
            return {}
        names = list(parts)
        totals = dict(zip(names, torch.stack([torch.stack([x.float().cpu() for x in parts[k]]).sum()
                                              for k in names]).tolist()))
        counts = {k: len(v) for k, v in parts.items()}
        tokens, sequences, updates = (max(totals.pop(k, 0.0), 1.0) for k in ("tokens", "sequences", "updates"))
        out: dict[str, float] = {}
        for k, v in totals.items():
            if k.endswith("_tokens"):
                out[k[:-len("_tokens")]] = v / tokens
            elif k.endswith("_seqs"):
                out[k[:-len("_seqs")]] = v / sequences
            elif k in ("policy_loss", "value_loss"):
                out[k] = v / updates
            elif k == "grad_norm":
                out[k] = v / counts[k]
            else:
                out[k] = v
        return out

    def _loss(self, sub: Trajectory, sequences: int, tokens: int, weight: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's share of its minibatch's loss (normalised by the minibatch's SEQUENCES and
        TOKENS, so the accumulated micro-batches add up to the minibatch loss), and its statistics as sums."""
        p = self.p
        mask = sub.response_mask.float() * weight
        logprobs, values, ent = self.scorer(self.module, sub, entropy=sub.entropy is None, critic=self.critic)
        old = sub.logprobs if sub.logprobs is not None else logprobs.detach()
        per_token, ratio, clipped = core.policy_loss_per_token(logprobs, old, sub.advantages, p.cliprange,
                                                               p.cliprange_high)
        if p.kl_in == "loss" and sub.ref_logprobs is not None:
            per_token = per_token + self.kl_ctl.value * core.kl_estimate(logprobs, sub.ref_logprobs,
                                                                          p.kl_estimator or "k3")
        max_len = p.generation.max_new_tokens
        pg = core.aggregate(per_token, mask, p.loss_aggregation, sequences, tokens, max_len)
        loss = pg
        log_ratio = (logprobs.detach() - old) * mask
        stats = {"policy_loss": pg.detach(), "tokens": mask.sum(), "sequences": mask.amax(1).sum(),
                 "clipfrac_tokens": (clipped.float() * mask).sum(), "approx_kl_tokens": 0.5 * (log_ratio ** 2).sum(),
                 "ratio_tokens": (ratio.detach() * mask).sum()}
        if values is not None:
            assert sub.values is not None and sub.returns is not None
            vf_token, vclipped = core.value_loss_per_token(values, sub.values, sub.returns, p.cliprange_value)
            vf = core.aggregate(vf_token, mask, p.loss_aggregation, sequences, tokens, max_len)
            loss = loss + p.vf_coef * vf
            stats.update(value_loss=vf.detach(), vf_clipfrac_tokens=(vclipped.float() * mask).sum())
        if p.ratio_threshold is not None:
            # TRL 0.11's guard: a micro-batch whose mean ratio explodes is skipped (its loss zeroed, no sync).
            skip = core.masked_mean(ratio.detach(), mask) > p.ratio_threshold
            loss = loss * (~skip).float()
            stats["skipped_batches"] = skip.float()
        if ent is not None:
            stats["entropy_tokens"] = (ent * mask).sum()
        if sub.logprobs is None and sub.ref_logprobs is not None:  # on-policy: the KL metric comes from here
            row_kl = ((logprobs.detach() - sub.ref_logprobs) * mask).sum(1)
            stats.update(kl_seqs=row_kl.sum(), ref_kl_per_token_tokens=row_kl.sum())
        return loss, stats

    # -- one step ---------------------------------------------------------------------------------
    def rl_step(self) -> tuple[dict[str, float], Trajectory]:
        """One full iteration (rollout → score → evaluate → advantages → updates); the step's metrics."""
        started = time.perf_counter()
        t = self.score(self.rollout(self.step_rows(self.step + 1)))
        rollout_time = time.perf_counter() - started
        scores = self.shape_scores(t)
        t = self.advantages(self.evaluate(t), scores)
        kl_coef = self.kl_ctl.value
        stats = self.optimise(t)
        self.progress.step += 1
        acc = self.accelerator
        mask = t.response_mask.float()
        assert t.scores is not None and t.active is not None
        raw_all = acc.gather(t.scores)
        finite = raw_all[torch.isfinite(raw_all)]
        lengths = acc.gather(mask.sum(1))
        elapsed = time.perf_counter() - started
        metrics: dict[str, float] = {
            "reward_mean": finite.mean().item(), "reward_std": finite.std().item() if finite.numel() > 1 else 0.0,
            "score_mean": acc.reduce(scores.mean(), "mean").item(), "kl_coef": kl_coef,
        }
        if t.eval_scores is not None:
            judged = acc.gather(t.eval_scores)
            metrics.update(eval_reward_mean=judged.mean().item(),
                           eval_reward_std=judged.std().item() if judged.numel() > 1 else 0.0)
        if t.kl is not None:
            metrics["kl"] = acc.reduce(t.kl.sum(1).mean(), "mean").item()
            metrics["ref_kl_per_token"] = acc.reduce(core.masked_mean(t.kl, mask), "mean").item()
        if t.entropy is not None:
            metrics["entropy"] = acc.reduce(core.masked_mean(t.entropy, mask), "mean").item()
        if t.returns is not None:
            metrics["returns_mean"] = acc.reduce(core.masked_mean(t.returns, mask), "mean").item()
        if self.p.algorithm in ("grpo", "rloo"):
            metrics["zero_variance_groups"] = acc.reduce(
                core.zero_variance(t.scores, t.group).float().mean(), "mean").item()
        metrics.update({k: acc.reduce(torch.tensor(v, device=acc.device), "mean").item() for k, v in stats.items()})
        if "kl" in metrics:
            self.kl_ctl.update(metrics["kl"], self.p.rollouts * acc.num_processes)
        metrics.update({
            "nonfinite_scores": float(raw_all.numel() - finite.numel()),
            "response_length": lengths.float().mean().item(), "response_length_max": lengths.max().item(),
            "ended_fraction": acc.reduce(t.ended.float().mean(), "mean").item(),
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": raw_all.numel() / elapsed, "tokens_per_s": lengths.sum().item() / elapsed,
            "rollout_s": rollout_time, "step_s": elapsed, "max_rss_mb": _max_rss_mb(),
        })
        if torch.cuda.is_available():
            metrics["max_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return metrics, t

    def write_samples(self, t: Trajectory) -> None:
        """The first groups of the step's rollouts (at least SAMPLES_PER_WRITE responses) to samples.jsonl,
        with what shows reward hacking: length, KL, the eval_reward's score."""
        n = max(SAMPLES_PER_WRITE, t.group)
        assert t.scores is not None
        lists = {"reward": t.scores[:n].tolist(), "length": t.lengths[:n], "ended": t.ended[:n].tolist()}
        if t.eval_scores is not None:
            lists["eval_reward"] = t.eval_scores[:n].tolist()
        if t.kl is not None:
            lists["kl"] = t.kl[:n].sum(1).tolist()
        if t.advantages is not None:
            adv = t.advantages if t.advantages.dim() == 1 else core.masked_mean(t.advantages, t.response_mask.float(), 1)
            lists["advantage"] = adv[:n].tolist()
        rows = []
        for i in range(min(n, len(t))):
            row = {"step": self.step, "prompt": t.prompts[i], "response": t.texts[i], "group": i // t.group}
            row.update({k: v[i] for k, v in lists.items()})
            row.update({k: v[i] for k, v in t.columns.items() if k not in row})
            rows.append(row)
        self.ctx.run.append_jsonl(SAMPLES_FILE, rows)

    # -- held-out evaluation ----------------------------------------------------------------------
    def heldout(self) -> dict[str, float]:
        """Greedy answers to the eval rows, scored (main process; the others go on and wait at the next
        collective)."""
        if not self.eval_rows or not self.accelerator.is_main_process:
            return {}
        policy = self.policy
        policy.eval()
        batch = self.p.generation_batch_size * (self.p.num_generations or 1)
        result = heldout_scores(policy, self.tok, self.template, self.kind, self.eval_rows, self.reward,
                                self.p.generation, self.max_prompt_length, batch, self.eval_reward)
        out = {"heldout_reward_mean": result["reward_mean"], "heldout_n": len(self.eval_rows),
               "heldout_response_chars": result["response_chars"]}
        if "eval_reward_mean" in result:
            out["heldout_eval_reward_mean"] = result["eval_reward_mean"]
        return out

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        if self.ctx.resume:
            self.resume()
        p, stage = self.p, self.recipe.stage
        log.info("%s (%s): %d steps x %d prompts x %d samples (%s, %s), %d optimizer updates", stage, p.algorithm,
                 self.num_steps, p.rollout_batch_size, p.num_generations, self.kind, self.recipe.model.finetuning,
                 self.total_updates)
        trackers = Trackers(self.recipe, self.ctx.run)
        line_output = not sys.stderr.isatty()
        eval_every = self.t.eval_steps
        summary: dict[str, Any] = {"global_step": self.step, "prompts": len(self.rows)}
        if self.step == 0 and self.eval_rows and not self.ctx.stop:
            first = self.heldout()
            if first:
                self.ctx.run.log_metrics(0, first)
                trackers.log(first, 0)
                summary["heldout_reward_mean_start"] = first["heldout_reward_mean"]
        last: dict[str, float] = {}
        try:
            while self.step < self.num_steps and not self.ctx.stop:
                metrics, t = self.rl_step()
                last = metrics
                if self.step % p.sample_every == 0 or self.step == 1:
                    self.write_samples(t)
                if self.eval_rows and ((eval_every and self.step % eval_every == 0) or self.step == self.num_steps):
                    metrics.update(self.heldout())
                if self.step % self.t.logging_steps == 0 or self.step == self.num_steps or "heldout_reward_mean" in metrics:
                    self.ctx.run.log_metrics(self.step, metrics)
                    trackers.log(metrics, self.step)
                    if line_output and self.accelerator.is_main_process:
                        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in (
                            "reward_mean", "eval_reward_mean", "heldout_reward_mean", "kl", "kl_coef", "entropy",
                            "policy_loss", "value_loss", "response_length", "samples_per_s") if k in metrics)
                        print(f"{stage} step {self.step}/{self.num_steps} {shown}", flush=True)
                if self.step % self.t.save_steps == 0 or self.ctx.stop:
                    self.save_checkpoint()
        finally:
            trackers.close()
        summary["global_step"] = self.step
        if last:
            summary.update(reward_mean_last=last["reward_mean"], kl_last=last.get("kl"))
            if "heldout_reward_mean" in last:
                summary["heldout_reward_mean"] = last["heldout_reward_mean"]
        if self.accelerator.is_main_process:
            from llmtune.rl.plot import reward_curve

            reward_curve(self.ctx.run.metrics(), self.ctx.run.path / CURVE_FILE, f"{stage} ({p.algorithm}) reward curve")
        if not self.ctx.stop and self.accelerator.is_main_process:
            save_model(self.policy, self.tok, self.ctx.run.model_dir, self.spec, self.recipe, self.kind)
        self.accelerator.wait_for_everyone()
        return summary

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """accelerate's save_state: trainable weights, optimizer, RNG states, and the registered scheduler,
        KL controller, reward statistics and step; enough to continue exactly."""
        acc = self.accelerator
        path = self.ctx.run.checkpoints / f"checkpoint-{self.step}"
        acc.wait_for_everyone()
        acc.save_state(str(path))
        if acc.is_main_process:
            follow_umask(path)
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
        self.accelerator.load_state(str(last), strict=False)
        self.ctx.run.truncate_metrics(self.step)
        log.info("resuming from %s (step %d)", last, self.step)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
