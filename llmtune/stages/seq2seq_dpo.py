"""DPO for encoder-decoder models (Flan-T5), which TRL does not support.

A thin `transformers.Trainer` subclass: the prompt goes to the encoder, the chosen and rejected
responses are the decoder labels, and a response's log-probability is the sum of its token
log-probabilities. The reference log-probabilities come from the same model with its LoRA adapter
disabled, or, for full fine-tuning, from a frozen copy (every weight moves, so there is nothing to
switch off: full fine-tuning genuinely holds the model twice). The losses and metrics match TRL's
DPOTrainer, so causal and seq2seq runs read the same in metrics.jsonl.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from llmtune.config.schema import Recipe
from llmtune.data.templates import IGNORE, ChatTemplate, encoder_ids, fit_pair, reply_text, token_ids
from llmtune.modeling.batch import pad_batch, pad_ids
from llmtune.modeling.reference import disable_dropout, frozen_copy
from llmtune.stages.common import Context, to_dataset, training_args


def encode_seq2seq_pair(tok: Any, template: ChatTemplate, row: dict[str, Any], max_length: int,
                        max_prompt_length: int) -> dict[str, list[int]]:
    """Encoder input_ids (the rendered prompt) and the two decoder label sequences (response + EOS),
    the way seq2seq SFT encodes them, trimmed by `fit_pair`."""
    bos, eos = tok.bos_token or "", tok.eos_token or ""

    def target(reply: list[dict[str, str]]) -> list[int]:
        text = reply[0]["content"] if len(reply) == 1 else reply_text(template, reply, "", "").strip()
        return token_ids(tok, text) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])

    prompt, (chosen, rejected) = fit_pair(encoder_ids(tok, template.render_prompt(row["prompt"], bos, eos)),
                                          [target(row["chosen"]), target(row["rejected"])],
                                          max_length, max_prompt_length, None)
    return {"input_ids": prompt, "chosen_labels": chosen, "rejected_labels": rejected}


@dataclass
class Seq2SeqPairCollator:
    """Pads a batch of encoded pairs: encoder inputs with pad, both label sets to one width with -100
    (so chosen and rejected run as one stacked decoder batch)."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = pad_ids([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows], IGNORE)
        chosen, rejected = labels.chunk(2)
        return {**pad_batch([r["input_ids"] for r in rows], self.pad_token_id),
                "chosen_labels": chosen, "rejected_labels": rejected}


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each response, its token count), chosen rows first then rejected.
    The encoder input is repeated so both responses go through the decoder in one forward."""
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    out = model(input_ids=batch["input_ids"].repeat(2, 1), attention_mask=batch["attention_mask"].repeat(2, 1),
                labels=labels, use_cache=False)
    mask = labels != IGNORE
    token_logps = out.logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, chosen_len: torch.Tensor, rejected_len: torch.Tensor, beta: float,
             loss_type: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO losses, with the same formulas as TRL 1.16's DPOTrainer.

    delta = (chosen log-ratio) - (rejected log-ratio), each log-ratio = policy - reference logp.
      sigmoid: -log σ(β·delta) (DPO). With label smoothing ε, the chance a label is flipped, it is
               robust DPO: [-(1-ε)·log σ(β·delta) + ε·log σ(-β·delta)] / (1-2ε) (TRL's `robust`).
      ipo:     (d - 1/(2β))², d = the log-ratios averaged per response token (as TRL does).
      hinge:   max(0, 1 - β·delta) (SLiC).
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "ipo":
        d = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        return (d - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}")


class Seq2SeqDPOTrainer(Trainer):
    """DPO on encoder-decoder log-probabilities. `ref_model=None` means the model is a PeftModel
    and the reference is the same model with its adapters disabled."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(self, *args: Any, ref_model: Any = None, beta: float, loss_type: str,
                 label_smoothing: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if ref_model is None and not hasattr(self.model, "disable_adapter"):
            raise ValueError("a reference model is required unless the model has a LoRA adapter to disable")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.stats: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if ref_model is not None:
            if self.is_deepspeed_enabled:
                from trl.models import prepare_deepspeed

                ref_model = prepare_deepspeed(ref_model, self.accelerator)
            else:
                ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.ref_model = ref_model

    def reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return sequence_logps(self.ref_model, batch)[0]
            unwrapped = self.accelerator.unwrap_model(model)
            with unwrapped.disable_adapter():
                return sequence_logps(unwrapped, batch)[0]

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        logps, lens = sequence_logps(model, inputs)
        ref_logps = self.reference_logps(model, inputs)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        chosen_len, rejected_len = lens.chunk(2)
        losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, self.beta,
                          self.loss_type, self.label_smoothing)
        self.record(chosen.detach(), rejected.detach(), ref_chosen, ref_rejected)
        loss = losses.mean()
        return (loss, {"logps": logps.detach()}) if return_outputs else loss

    def record(self, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor) -> None:
        """Batch statistics under TRL's metric names, averaged over the steps of each log."""
        gather = self.accelerator.gather_for_metrics
        chosen_rewards = self.beta * (chosen - ref_chosen)
        rejected_rewards = self.beta * (rejected - ref_rejected)
        values = {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen, "logps/rejected": rejected,
        }
        stats = self.stats["train" if self.model.training else "eval"]
        for key, value in values.items():
            stats[key].append(gather(value).mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self.stats[mode].items() if v})
        self.stats[mode].clear()
        super().log(logs, start_time)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """Evaluation is the DPO loss (and its metrics); there are no logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def build_seq2seq_trainer(recipe: Recipe, ctx: Context, model: Any, tok: Any, template: ChatTemplate,
                          train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> Seq2SeqDPOTrainer:
    """The seq2seq DPO trainer for a recipe: LoRA → adapters disabled as reference; full → a copy."""
    from peft import PeftModel

    max_length, max_prompt_length = recipe.data.max_length, recipe.data.prompt_length

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        return encode_seq2seq_pair(tok, template, row, max_length, max_prompt_length)

    train_ds = to_dataset(train_rows, encode, "tokenising train")
    eval_ds = to_dataset(eval_rows, encode, "tokenising eval") if eval_rows else None
    disable_dropout(model)
    ref_model = None if isinstance(model, PeftModel) else frozen_copy(model)
    args = training_args(recipe, ctx, TrainingArguments, eval_ds is not None)
    d = recipe.dpo
    return Seq2SeqDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tok,
                             data_collator=Seq2SeqPairCollator(tok.pad_token_id), beta=d.beta, loss_type=d.loss_type,
                             label_smoothing=d.label_smoothing)
