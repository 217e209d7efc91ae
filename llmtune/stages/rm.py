"""stage: rm — a reward model from preference pairs (Bradley–Terry: -log σ(r_chosen - r_rejected)).

Every architecture becomes a one-logit sequence classifier (`load_for_training(head="classifier")`:
LlamaForSequenceClassification, BertForSequenceClassification, T5ForSequenceClassification, ...) and
trains through TRL's RewardTrainer, which only needs `model(**batch).logits`. We tokenise the pairs
ourselves with `encode_reward_input` (the encoding the scorer and eval use too), so nothing is
dropped for length: TRL would filter out long pairs, we trim their shared history instead.

Evaluation reports exact pairwise accuracy, mean margin and loss over the whole eval set, plus
accuracy per `source` when rows carry one (eval_accuracy_<source>).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import logsigmoid
from trl import RewardConfig, RewardTrainer

from llmtune.config.schema import Recipe
from llmtune.data.templates import ChatTemplate
from llmtune.modeling.load import load_for_training
from llmtune.rewards.reward_model import (
    collate,
    encode_reward_input,
    pairwise_stats,
    record_max_length,
    split_pair,
)
from llmtune.stages.common import Context, data_rows, finish, run_trainer, to_dataset, training_args

SHAPE = "preference"
# Encoded input key -> dataset column suffix (RewardTrainer recognises chosen_ids/rejected_ids as
# pre-tokenised pairs and leaves them alone).
COLUMNS = {"input_ids": "ids", "token_type_ids": "token_type_ids"}


@dataclass
class RewardPairCollator:
    """Chosen inputs then rejected inputs in one right-padded batch (RewardTrainer splits it in two)."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def side(name: str) -> list[dict[str, list[int]]]:
            return [{key: r[f"{name}_{col}"] for key, col in COLUMNS.items() if f"{name}_{col}" in r} for r in rows]

        return collate(side("chosen") + side("rejected"), self.pad_token_id)


class PairwiseRewardTrainer(RewardTrainer):
    """RewardTrainer whose evaluation returns (chosen, rejected) rewards per pair, so accuracy and
    margin are exact over the eval set and can be split by source (TRL averages per batch)."""

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            rewards = model(**inputs).logits.squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        # The same objective as RewardTrainer.compute_loss, without its per-batch metric records.
        loss = -logsigmoid(chosen - rejected).mean()
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        return loss.detach(), torch.stack([chosen, rejected], dim=1), torch.ones_like(chosen)


def run(recipe: Recipe, ctx: Context) -> dict[str, Any]:
    train_rows, eval_rows = data_rows(recipe, SHAPE)
    model, tok, spec = load_for_training(recipe, head="classifier")
    template = ChatTemplate.get(spec.template)
    kind = spec.kind
    max_len = recipe.data.max_length

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        prompt, chosen, rejected = split_pair(row)
        out: dict[str, Any] = {}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            for key, ids in encode_reward_input(tok, template, kind, prompt, text, max_len).items():
                out[f"{side}_{COLUMNS[key]}"] = ids
        # A batch pads both sides to its longest input: what training.group_by_length sorts on.
        out["length"] = max(len(out["chosen_ids"]), len(out["rejected_ids"]))
        return out

    train_ds = to_dataset(train_rows, encode, "tokenising train")
    eval_ds = to_dataset(eval_rows, encode, "tokenising eval") if eval_rows else None
    sources = [r.get("source") for r in eval_rows]

    def compute_metrics(pred: Any) -> dict[str, float]:
        scores = pred.predictions
        stats = pairwise_stats(scores[:, 0].tolist(), scores[:, 1].tolist(),
                               sources if len(sources) == len(scores) else None)
        metrics = {"accuracy": stats["accuracy"], "margin": stats["mean_margin"]}
        for source, s in stats.get("by_source", {}).items():
            metrics[f"accuracy_{source}"] = s["accuracy"]
        return metrics

    args = training_args(recipe, ctx, RewardConfig, eval_ds is not None, max_length=None,
                         center_rewards_coefficient=recipe.rm.center_rewards, dataset_num_proc=None)
    trainer = PairwiseRewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                    processing_class=tok, data_collator=RewardPairCollator(tok.pad_token_id),
                                    compute_metrics=compute_metrics if eval_ds is not None else None)
    summary = run_trainer(trainer, ctx)
    summary.update(train_rows=len(train_rows), eval_rows=len(eval_rows))
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    if evals:
        summary.update({k: evals[-1][k] for k in ("eval_accuracy", "eval_margin", "eval_loss") if k in evals[-1]})
    summary = finish(trainer, tok, spec, recipe, ctx, "classifier", summary)
    if not ctx.stop and ctx.run.main:
        record_max_length(ctx.run.model_dir, max_len)
    return summary
