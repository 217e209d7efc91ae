"""stage: sft — supervised fine-tuning on conversations, loss on assistant tokens only.

Causal LMs train through TRL's SFTTrainer on rows we tokenise ourselves (so history is trimmed from
the left and the response survives). Seq2seq models (Flan-T5) train through transformers'
Seq2SeqTrainer, because TRL has no encoder-decoder support: the history goes to the encoder, the
final assistant turn is the decoder target.
"""

from __future__ import annotations

from typing import Any

from llmtune.config.schema import Recipe
from llmtune.data.templates import IGNORE, ChatTemplate, encode_sft_causal, encode_sft_seq2seq
from llmtune.modeling.load import load_for_training
from llmtune.stages.common import (
    Context,
    data_rows,
    finish,
    run_trainer,
    show_answers,
    to_dataset,
    training_args,
)

SHAPE = "sft"


def run(recipe: Recipe, ctx: Context) -> dict[str, Any]:
    train_rows, eval_rows = data_rows(recipe, SHAPE)
    model, tok, spec = load_for_training(recipe)
    template = ChatTemplate.get(spec.template)
    encode_messages = encode_sft_seq2seq if spec.kind == "seq2seq" else encode_sft_causal

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        return encode_messages(tok, template, row["messages"], recipe.data.max_length)

    train_ds = to_dataset(train_rows, encode, "tokenising train")
    eval_ds = to_dataset(eval_rows, encode, "tokenising eval") if eval_rows else None
    trainer = sft_trainer(recipe, ctx, model, tok, spec.kind, train_ds, eval_ds)
    if not ctx.resume:
        show_answers(trainer.model, tok, spec, recipe, ctx, "before")
    summary = run_trainer(trainer, ctx)
    summary.update(train_rows=len(train_rows), eval_rows=len(eval_rows))
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    if evals:
        summary["eval_loss"] = evals[-1]
    return finish(trainer, tok, spec, recipe, ctx, spec.kind, summary)


def sft_trainer(recipe: Recipe, ctx: Context, model: Any, tok: Any, kind: str, train_ds: Any,
                eval_ds: Any | None) -> Any:
    """The supervised trainer for tokenised rows (input_ids + labels), also used by each rs round:
    TRL's SFTTrainer for causal LMs, transformers' Seq2SeqTrainer for encoder-decoders."""
    if kind == "seq2seq":
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

        args = training_args(recipe, ctx, Seq2SeqTrainingArguments, eval_ds is not None)
        return Seq2SeqTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tok,
                              data_collator=DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=IGNORE))
    from trl import SFTConfig, SFTTrainer

    args = training_args(recipe, ctx, SFTConfig, eval_ds is not None, max_length=recipe.data.max_length,
                         packing=False, dataset_num_proc=None)
    return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok)
