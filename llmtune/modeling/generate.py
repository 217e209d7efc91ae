"""Batched generation from canonical prompts, shared by rejection sampling, evaluation, compare and
the server: one place that knows left padding for causal models, the encoder path for seq2seq
models, the template's generation prompt and its stop strings.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from llmtune.config.schema import GenerationSection
from llmtune.data.templates import ChatTemplate, Message, encode_prompt
from llmtune.modeling.batch import pad_batch


def generation_kwargs(gen: GenerationSection, tok: Any) -> dict[str, Any]:
    """transformers.generate kwargs from the recipe's generation settings."""
    g = asdict(gen)
    kwargs: dict[str, Any] = {
        "max_new_tokens": g["max_new_tokens"], "min_new_tokens": g["min_new_tokens"],
        "do_sample": g["do_sample"], "repetition_penalty": g["repetition_penalty"],
        "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
    }
    if g["do_sample"]:
        kwargs.update(temperature=g["temperature"], top_p=g["top_p"], top_k=g["top_k"] or None)
    return kwargs


def stop_kwargs(tok: Any, stops: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """generate() kwargs that end a sequence as soon as it produces one of `stops` (transformers'
    StopStringCriteria): no tokens are spent after a hallucinated next turn."""
    stops = [s for s in stops if s]
    return {"stop_strings": stops, "tokenizer": tok} if stops else {}


def batch_prompts(tok: Any, template: ChatTemplate, prompts: list[list[Message]], max_prompt_length: int,
                  kind: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenise prompts into a padded batch: left padding for causal (generation continues at the
    right edge), right padding for seq2seq encoders."""
    ids = [encode_prompt(tok, template, p, max_prompt_length, kind) for p in prompts]
    batch = pad_batch(ids, tok.pad_token_id, "right" if kind == "seq2seq" else "left")
    return {k: v.to(device) for k, v in batch.items()}


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Trim a response at the first of the template's stop strings (e.g. '\\n\\nHuman:')."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@torch.no_grad()
def generate(model: Any, tok: Any, template: ChatTemplate, kind: str, prompts: list[list[Message]],
             gen: GenerationSection, max_prompt_length: int = 512, num_return_sequences: int = 1,
             batch_size: int = 8, stops: list[str] | None = None) -> list[list[str]]:
    """For each prompt, `num_return_sequences` decoded responses (special tokens and stop strings removed)."""
    device = next(model.parameters()).device
    kwargs = generation_kwargs(gen, tok)
    stop_list = tuple(template.stop) + tuple(stops or ())
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = batch_prompts(tok, template, chunk, max_prompt_length, kind, device)
        seqs = model.generate(**batch, num_return_sequences=num_return_sequences, **kwargs,
                              **stop_kwargs(tok, stop_list))
        if kind != "seq2seq":
            seqs = seqs[:, batch["input_ids"].shape[1]:]
        texts = tok.batch_decode(seqs, skip_special_tokens=True)
        for i in range(len(chunk)):
            group = texts[i * num_return_sequences:(i + 1) * num_return_sequences]
            out.append([cut_at_stop(t, stop_list).strip() for t in group])
    if was_training:
        model.train()
    return out
