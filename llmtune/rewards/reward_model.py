"""Reward models trained by `stage: rm`: the one input encoding, batching, and the scorer.

`encode_reward_input` is the only way a (prompt, response) pair becomes reward-model input: the rm
stage trains on it, `RewardModelScorer` (rs, ppo) and `llmtune eval reward-accuracy` score with it,
so a reward means at scoring time exactly what it meant in training. Long pairs lose the start of
their shared history, never the responses (they are what differs between chosen and rejected).

How the pair is presented depends on the architecture:
- causal LMs: the chat-template transcript ending in EOS; the score head reads the last token.
- encoders (BERT, MiniLM, DeBERTa): the tokenizer's own text-pair format,
  `[CLS] conversation [SEP] response [SEP]` with segment ids, the way these models were
  pre-trained to compare two texts; the conversation is trimmed from the left.
- T5: one sequence (conversation + response) with exactly one EOS, where
  `T5ForSequenceClassification` reads the decoder state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from llmtune.config.schema import RewardSection
from llmtune.data.templates import ChatTemplate, Message, encode_prompt_response, fit, token_ids
from llmtune.errors import ConfigError, DataError
from llmtune.modeling.batch import pad_batch, pad_ids
from llmtune.registry.models import META_FILE, ModelSpec
from llmtune.rewards.base import check_pairs


def _encode_text_pair(tok: Any, first: str, second: str, max_length: int) -> dict[str, list[int]]:
    """[CLS] first [SEP] second [SEP] via the tokenizer's own post-processor; `first` trimmed left."""
    if not hasattr(tok, "backend_tokenizer"):
        raise ConfigError(f"model.name: the encoder tokenizer {type(tok).__name__} has no fast (Rust) backend; "
                          "reward models on encoders need one to build text pairs")
    a = tok(first, add_special_tokens=False, verbose=False).encodings[0]  # trimmed below
    b = tok(second, add_special_tokens=False, verbose=False).encodings[0]
    budget = max_length - tok.num_special_tokens_to_add(pair=True)
    keep_a, keep_b = fit(a.ids, b.ids, budget)
    if len(keep_a) < len(a.ids):
        a.truncate(len(keep_a), direction="left")
    if len(keep_b) < len(b.ids):
        b.truncate(len(keep_b), direction="right")
    pair = tok.backend_tokenizer.post_process(a, b, add_special_tokens=True)
    return {"input_ids": list(pair.ids), "token_type_ids": list(pair.type_ids)}


def encode_reward_input(tok: Any, template: ChatTemplate, kind: str, prompt: list[Message], response: str,
                        max_length: int) -> dict[str, list[int]]:
    """The reward-model input for one (prompt messages, response text) pair, at most max_length tokens.

    Returns input_ids (and token_type_ids for encoders). Used by training, scoring and eval alike.
    """
    if kind == "encoder":
        return _encode_text_pair(tok, template.render_prompt(prompt), response, max_length)
    if kind == "seq2seq":
        eos = tok.eos_token_id
        if eos is None:
            raise ConfigError("model.name: a T5-style reward model needs a tokenizer with an EOS token")
        # T5ForSequenceClassification reads the state at the EOS: exactly one, at the end.
        prompt_ids = [i for i in token_ids(tok, template.render_prompt(prompt)) if i != eos]
        text = template.assistant.format(content=response, bos="", eos="") + template.assistant_suffix.format(
            bos="", eos="")
        resp_ids = [i for i in token_ids(tok, text) if i != eos]
        p, r = fit(prompt_ids, resp_ids, max_length - 1)
        return {"input_ids": p + r + [eos]}
    return {"input_ids": encode_prompt_response(tok, template, prompt, response, max_length, "causal")["input_ids"]}


def split_pair(row: dict[str, Any]) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen text, rejected text) of a canonical preference row."""
    try:
        return row["prompt"], row["chosen"][-1]["content"], row["rejected"][-1]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise DataError(f"preference row without prompt/chosen/rejected messages ({exc!r}): {str(row)[:200]}") \
            from None


def collate(encoded: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded inputs into a batch (the score head reads the last non-pad token)."""
    batch = pad_batch([e["input_ids"] for e in encoded], pad_token_id)
    if "token_type_ids" in encoded[0]:
        batch["token_type_ids"] = pad_ids([e["token_type_ids"] for e in encoded], 0)
    return batch


def pairwise_stats(chosen: Sequence[float], rejected: Sequence[float],
                   sources: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Pairwise accuracy (chosen strictly above rejected), mean margin, and accuracy per source."""
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    n = len(wins)
    stats: dict[str, Any] = {
        "accuracy": sum(wins) / n if n else math.nan,
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n if n else math.nan,
        "n": n,
    }
    if sources is not None and any(s for s in sources):
        groups: dict[str, list[bool]] = {}
        for win, source in zip(wins, sources, strict=True):
            groups.setdefault(source or "(none)", []).append(win)
        stats["by_source"] = {s: {"accuracy": sum(w) / len(w), "n": len(w)} for s, w in sorted(groups.items())}
    return stats


def trained_max_length(spec: ModelSpec) -> int | None:
    """The data.max_length an rm run trained with (recorded in llmtune.json), if known."""
    value = spec.extra.get("max_length")
    return int(value) if value else None


def record_max_length(model_dir: Any, max_length: int) -> None:
    """Note the training length next to the saved reward model, so scorers never exceed it."""
    meta_file = model_dir / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    meta["max_length"] = max_length
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")


class RewardModelScorer:
    """Scores (prompt, response) pairs with a reward model trained by `stage: rm` (or any one-logit
    sequence-classification model directory), encoding them exactly as training did.

    The length used is reward.max_length, capped at the rm run's own data.max_length: the model
    never saw longer inputs, so longer ones would be scored out of distribution.
    """

    def __init__(self, section: RewardSection):
        from llmtune.config.checks.reward import not_a_reward_model
        from llmtune.modeling.load import load_for_inference
        from llmtune.registry.models import resolve_model

        assert section.model is not None
        if problem := not_a_reward_model(resolve_model(section.model), section.model):
            raise ConfigError(f"reward model: {problem}")
        self.model, self.tok, self.spec = load_for_inference(section.model, head="classifier")
        self.template = ChatTemplate.get(self.spec.template)
        self.kind = self.spec.kind
        limits = [section.max_length, trained_max_length(self.spec), self.spec.context_length]
        self.max_length = min(v for v in limits if v)
        self.batch_size = section.batch_size
        self.device = next(self.model.parameters()).device

    def encode(self, prompt: list[Message], response: str) -> dict[str, list[int]]:
        return encode_reward_input(self.tok, self.template, self.kind, prompt, response, self.max_length)

    @torch.no_grad()
    def score(self, prompts: list[list[Message]], responses: list[str], **columns: list[Any]) -> list[float]:
        """One scalar reward per (prompt, response); batches are formed by length to pad little."""
        check_pairs(prompts, responses)
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]), reverse=True)
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = collate([encoded[i] for i in chunk], self.tok.pad_token_id)
            logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            for i, value in zip(chunk, logits[:, 0].float().tolist(), strict=True):
                scores[i] = value
        return scores
