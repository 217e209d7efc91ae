"""Batched generation from canonical prompts: the one place that knows left padding for causal
models, the encoder path for seq2seq models, the template's generation prompt, its stop strings and
where a response ends.

`sample()` is the core: `n` responses per prompt from one batched `generate` call, returned token by
token (`Samples`: ids, masks, texts, why each ended). Everything that generates goes through it:
online-RL rollouts (which need the tokens), rejection sampling, evaluation, compare, the judge and
the server (which need the texts, via `generate()` or the serving engine).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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


@dataclass
class Samples:
    """`n` sampled responses for each of B prompts. Rows are prompt-major (row i*n + j is sample j of
    prompt i); per-token tensors are (B*n, width)."""

    query_ids: torch.Tensor      # the prompt per row: causal left-padded, seq2seq right-padded (encoder input)
    query_mask: torch.Tensor
    response_ids: torch.Tensor   # pad after each response's end
    response_mask: torch.Tensor  # 1 on the response's tokens: EOS included, nothing from a stop string on
    texts: list[str]             # decoded responses (special tokens removed, cut before a stop string, stripped)
    ended: torch.Tensor          # bool: the response ended by itself with EOS
    stopped: list[bool]          # the response was cut at a stop string
    n: int = 1

    @property
    def finish_reasons(self) -> list[str]:
        """OpenAI's finish_reason per row: "stop" (EOS or a stop string) or "length" (max_new_tokens)."""
        return ["stop" if e or s else "length" for e, s in zip(self.ended.tolist(), self.stopped)]

    @property
    def lengths(self) -> list[int]:
        """Response tokens per row."""
        return self.response_mask.sum(1).tolist()

    def grouped(self) -> list[list[str]]:
        """texts as one list of n responses per prompt."""
        return [self.texts[i:i + self.n] for i in range(0, len(self.texts), self.n)]


def response_mask(response_ids: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first EOS, whether an EOS was produced) per response."""
    if eos_id is None:
        return torch.ones_like(response_ids), torch.zeros(len(response_ids), dtype=torch.bool,
                                                          device=response_ids.device)
    is_eos = response_ids == eos_id
    ended = is_eos.any(1)
    # Tokens strictly after the first EOS have a cumulative EOS count of 1 before them.
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()
    return (before == 0).long(), ended


def cut_tokens_at_stops(tok: Any, ids: list[int], stops: tuple[str, ...]) -> tuple[int, bool]:
    """(how many leading tokens to keep, whether a stop string was hit): the tokens before the first
    stop string of the decoded text. A token that straddles the stop's start is dropped with it, so the
    kept tokens decode to exactly the text the reward will see."""
    text = tok.decode(ids, skip_special_tokens=True)
    cut = len(cut_at_stop(text, stops))
    if cut == len(text):
        return len(ids), False
    keep = 0
    while keep < len(ids) and len(tok.decode(ids[:keep + 1], skip_special_tokens=True)) <= cut:
        keep += 1
    return keep, True


@torch.no_grad()
def sample(model: Any, tok: Any, template: ChatTemplate, kind: str, prompts: list[list[Message]],
           gen: GenerationSection, max_prompt_length: int, n: int = 1, stops: tuple[str, ...] | list[str] = (),
           **generate_kwargs: Any) -> Samples:
    """`n` responses per prompt in one batched `generate` call (KV cache, left-padded causal batch).

    Generation stops at the template's stop strings (plus `stops`), e.g. a hallucinated "\\n\\nHuman:"
    turn, and each response's tokens and mask end before the stop: whatever scores the text (a reward,
    a KL term) lands only on tokens that are in it. Only an EOS counts as ending by itself.
    `generate_kwargs` go to `model.generate` as they are (a streamer, logits processors, stopping
    criteria that cancel)."""
    device = next(model.parameters()).device
    batch = batch_prompts(tok, template, prompts, max_prompt_length, kind, device)
    stop_list = tuple(s for s in (*template.stop, *stops) if s)
    seqs = model.generate(**batch, num_return_sequences=n, **generation_kwargs(gen, tok),
                          **stop_kwargs(tok, stop_list), **generate_kwargs)
    # Keep only new tokens: drop the prompt (causal) or the decoder start token (seq2seq).
    responses = seqs[:, 1:] if kind == "seq2seq" else seqs[:, batch["input_ids"].shape[1]:]
    mask, ended = response_mask(responses, tok.eos_token_id)
    texts, stopped = [], []
    for row in range(len(responses)):
        ids = responses[row][mask[row].bool()].tolist()
        keep, hit = cut_tokens_at_stops(tok, ids, stop_list)
        texts.append(tok.decode(ids[:keep], skip_special_tokens=True).strip())
        stopped.append(hit)
        if hit:  # the padding after a stopped row may read as EOS (pad == eos): it did not end by itself
            # An answer that is nothing but a stop string keeps its first token: the action its score lands on.
            mask[row, max(keep, 1):] = 0
            ended[row] = False
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, tok.pad_token_id))
    return Samples(batch["input_ids"].repeat_interleave(n, 0), batch["attention_mask"].repeat_interleave(n, 0),
                   responses, mask, texts, ended, stopped, n)


def generate(model: Any, tok: Any, template: ChatTemplate, kind: str, prompts: list[list[Message]],
             gen: GenerationSection, max_prompt_length: int = 512, num_return_sequences: int = 1,
             batch_size: int = 8, stops: list[str] | None = None) -> list[list[str]]:
    """For each prompt, `num_return_sequences` decoded responses (special tokens and stop strings
    removed), sampled `batch_size` prompts at a time."""
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        out += sample(model, tok, template, kind, prompts[start:start + batch_size], gen, max_prompt_length,
                      n=num_return_sequences, stops=tuple(stops or ())).grouped()
    if was_training:
        model.train()
    return out
