"""stage: dpo — Direct Preference Optimization on (prompt, chosen, rejected) pairs.

Causal LMs train through TRL's DPOTrainer. TRL 1.16 tokenises preference data itself and accepts no
pre-tokenised columns, so we hand it text already rendered with OUR chat template and already
truncated by us (prompt trimmed from the left, keeping BOS, so the responses survive); TRL's own
`max_length` cut is then a no-op. Seq2seq models (Flan-T5) use our own trainer in `seq2seq_dpo`,
since TRL has no encoder-decoder DPO.

The reference policy is the model as it is when DPO starts. With LoRA it is the same weights with
the adapter disabled (no second copy; after an SFT LoRA run that is the SFT model, merged in memory
by `load_for_training`). Full fine-tuning needs a frozen second copy, since every weight moves.
"""

from __future__ import annotations

from typing import Any

from llmtune.config.schema import Recipe
from llmtune.data.templates import ChatTemplate, fit_pair, reply_text, token_ids
from llmtune.modeling.load import load_for_training
from llmtune.modeling.reference import frozen_copy
from llmtune.stages.common import Context, data_rows, finish, run_trainer, show_answers, training_args
from llmtune.stages.seq2seq_dpo import build_seq2seq_trainer

SHAPE = "preference"
# The metrics DPO reports (TRL's names; the seq2seq trainer uses the same ones).
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected")


def adds_bos(tok: Any) -> bool:
    """Whether the tokenizer itself prepends BOS (Llama-2's does): TRL tokenises with special tokens
    on, so a BOS our template renders must then be left out of the text or it would appear twice."""
    if tok.bos_token_id is None:
        return False
    return tok("a")["input_ids"][:1] == [tok.bos_token_id] != tok("a", add_special_tokens=False)["input_ids"][:1]


def render_causal_pair(tok: Any, template: ChatTemplate, row: dict[str, Any], max_length: int,
                       max_prompt_length: int, strip_bos: bool) -> dict[str, str]:
    """A canonical preference row as TRL's text columns, rendered with our template and truncated
    by token count (kept text is decoded back only when something was cut)."""
    bos, eos = tok.bos_token or "", tok.eos_token or ""
    texts = [template.render_prompt(row["prompt"], bos, eos)]
    texts += [reply_text(template, row[key], bos, eos) for key in ("chosen", "rejected")]
    ids = [token_ids(tok, t) for t in texts]
    prompt, responses = fit_pair(ids[0], ids[1:], max_length, max_prompt_length, tok.bos_token_id)
    kept = [prompt, *responses]
    out = [t if len(k) == len(i) else tok.decode(k, skip_special_tokens=False, clean_up_tokenization_spaces=False)
           for t, i, k in zip(texts, ids, kept)]
    if strip_bos and bos and out[0].startswith(bos):
        out[0] = out[0][len(bos):]
    return {"prompt": out[0], "chosen": out[1], "rejected": out[2]}


def trl_loss_type(recipe: Recipe) -> str:
    """TRL's name for our loss: the label-smoothed sigmoid loss is TRL's `robust` (rDPO)."""
    d = recipe.dpo
    return "robust" if d.loss_type == "sigmoid" and d.label_smoothing > 0 else d.loss_type


def build_causal_trainer(recipe: Recipe, ctx: Context, model: Any, tok: Any, template: ChatTemplate,
                         train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> Any:
    """TRL DPOTrainer on our rendered pairs; LoRA goes through TRL's `peft_config` path so the
    reference is the base with adapters disabled (given a ready PeftModel, TRL 1.16 would add a
    second "ref" adapter instead)."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    max_length, max_prompt_length = recipe.data.max_length, recipe.data.prompt_length
    strip_bos = adds_bos(tok)

    def dataset(rows: list[dict[str, Any]]) -> Any:
        return Dataset.from_list([render_causal_pair(tok, template, r, max_length, max_prompt_length, strip_bos)
                                  for r in rows])

    train_ds = dataset(train_rows)
    eval_ds = dataset(eval_rows) if eval_rows else None
    peft_config = None
    ref_model = None
    if isinstance(model, PeftModel):
        peft_config = model.peft_config["default"]
        model = model.unload()  # TRL adds the same fresh adapter back itself
    else:
        ref_model = frozen_copy(model)
    d = recipe.dpo
    args = training_args(recipe, ctx, DPOConfig, eval_ds is not None, beta=d.beta, loss_type=[trl_loss_type(recipe)],
                         label_smoothing=d.label_smoothing, max_length=max_length, truncation_mode="keep_start",
                         dataset_num_proc=None, precompute_ref_log_probs=False, disable_dropout=True)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tok, peft_config=peft_config)


def build_trainer(recipe: Recipe, ctx: Context) -> tuple[Any, Any, Any, dict[str, int]]:
    """(trainer, tokenizer, spec, row counts) for a DPO run, causal or seq2seq."""
    train_rows, eval_rows = data_rows(recipe, SHAPE)
    model, tok, spec = load_for_training(recipe)
    template = ChatTemplate.get(spec.template)
    if spec.kind == "seq2seq":
        trainer = build_seq2seq_trainer(recipe, ctx, model, tok, template, train_rows, eval_rows)
    else:
        trainer = build_causal_trainer(recipe, ctx, model, tok, template, train_rows, eval_rows)
    return trainer, tok, spec, {"train_rows": len(train_rows), "eval_rows": len(eval_rows)}


def last_logged(history: list[dict[str, Any]], keys: tuple[str, ...] | list[str]) -> dict[str, float]:
    """The latest logged value of each key (for the run summary)."""
    out: dict[str, float] = {}
    for entry in history:
        out.update({k: round(float(entry[k]), 6) for k in keys if k in entry})
    return out


def run(recipe: Recipe, ctx: Context) -> dict[str, Any]:
    trainer, tok, spec, counts = build_trainer(recipe, ctx)
    if not ctx.resume:
        show_answers(trainer.model, tok, spec, recipe, ctx, "before")
    summary = run_trainer(trainer, ctx)
    summary.update(counts)
    keys = [*REWARD_METRICS, "eval_loss", *(f"eval_{k}" for k in REWARD_METRICS)]
    summary.update(last_logged(trainer.state.log_history, keys))
    return finish(trainer, tok, spec, recipe, ctx, spec.kind, summary)
