"""Rollouts: sample responses from the policy, then score every response token with the policy
(log-probs, values) and the frozen reference (log-probs), for causal and seq2seq models alike.

Causal:  [left-padded prompt | right-padded response] is one sequence; the logits at position
         prompt_width - 1 + t predict response token t (explicit position ids, so left padding does
         not shift positions).
Seq2seq: the prompt goes to the encoder; the response tokens are the decoder's actions, the
         decoder input is the response shifted right behind the decoder start token.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from llmtune.config.schema import GenerationSection
from llmtune.data.templates import ChatTemplate, Message
from llmtune.modeling.generate import sample as generate_samples
from llmtune.ppo.core import entropy_from_logits, logprobs_from_logits


@dataclass
class Rollout:
    """One batch of sampled episodes; per-token tensors are (batch, response_width)."""

    prompts: list[list[Message]]
    query_ids: torch.Tensor         # causal: left-padded; seq2seq: right-padded encoder input
    query_mask: torch.Tensor
    response_ids: torch.Tensor      # pad after the end of each response
    response_mask: torch.Tensor     # 1 on response tokens, EOS included
    texts: list[str]                # decoded responses (special tokens removed, cut before a stop string)
    ended: torch.Tensor             # bool: the response ended by itself with EOS

    def select(self, idx: list[int]) -> Rollout:
        """A sub-batch (prompt lists and tensors indexed alike)."""
        t = torch.tensor(idx, device=self.query_ids.device)
        return Rollout([self.prompts[i] for i in idx], self.query_ids[t], self.query_mask[t],
                       self.response_ids[t], self.response_mask[t], [self.texts[i] for i in idx], self.ended[t])


def sample(policy: Any, tok: Any, template: ChatTemplate, kind: str, prompts: list[list[Message]],
           gen: GenerationSection, max_prompt_length: int) -> Rollout:
    """One response per prompt with the recipe's sampling settings (see `modeling.generate.sample`:
    generation stops at stop strings and the tokens and mask end there; only EOS counts as ending, so a
    response cut at a stop string is not waived `missing_eos_penalty`)."""
    s = generate_samples(policy, tok, template, kind, prompts, gen, max_prompt_length)
    return Rollout(prompts, s.query_ids, s.query_mask, s.response_ids, s.response_mask, s.texts, s.ended)


def model_inputs(r: Rollout, kind: str, decoder_start_id: int | None) -> dict[str, torch.Tensor]:
    """Forward-pass inputs that make the logits line up with the response tokens (see module doc)."""
    if kind == "seq2seq":
        start = torch.full_like(r.response_ids[:, :1], decoder_start_id if decoder_start_id is not None else 0)
        decoder_ids = torch.cat([start, r.response_ids[:, :-1]], 1)
        decoder_mask = torch.cat([torch.ones_like(start), r.response_mask[:, :-1]], 1)
        return {"input_ids": r.query_ids, "attention_mask": r.query_mask, "decoder_input_ids": decoder_ids,
                "decoder_attention_mask": decoder_mask}
    input_ids = torch.cat([r.query_ids, r.response_ids], 1)
    mask = torch.cat([r.query_mask, r.response_mask], 1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


def response_logits(logits: torch.Tensor, r: Rollout, kind: str) -> torch.Tensor:
    """The slice of the output logits (or per-position values) that scores each response token."""
    if kind == "seq2seq":
        return logits
    width = r.query_ids.shape[1]
    return logits[:, width - 1: width - 1 + r.response_ids.shape[1]]


def evaluate(actor_critic: Any, r: Rollout, kind: str, decoder_start_id: int | None,
             with_entropy: bool = False) -> dict[str, torch.Tensor]:
    """Log-probs of the taken tokens and values (and entropy) under the current actor-critic.

    Gradients flow when called outside `torch.no_grad()` (the PPO update); rollouts call it inside."""
    logits, values = actor_critic(model_inputs(r, kind, decoder_start_id))
    logits = response_logits(logits, r, kind)
    out = {"logprobs": logprobs_from_logits(logits, r.response_ids),
           "values": response_logits(values, r, kind).float()}
    if with_entropy:
        out["entropy"] = entropy_from_logits(logits.detach())
    return out


@torch.no_grad()
def token_logprobs(model: Any, r: Rollout, kind: str, decoder_start_id: int | None) -> torch.Tensor:
    """log p(response token t) under MODEL for the rollout's own sampled tokens, (batch, width)."""
    logits = model(**model_inputs(r, kind, decoder_start_id), use_cache=False).logits
    return logprobs_from_logits(response_logits(logits, r, kind), r.response_ids)


@torch.no_grad()
def reference_logprobs(policy: Any, reference: Any | None, r: Rollout, kind: str,
                       decoder_start_id: int | None) -> torch.Tensor:
    """Log-probs under the frozen reference: a separate frozen model for full fine-tuning, or —
    with LoRA — the very same policy with its adapters switched off (no second copy)."""
    model = reference if reference is not None else policy
    switch: AbstractContextManager[Any] = policy.disable_adapter() if reference is None else nullcontext()
    with switch:
        return token_logprobs(model, r, kind, decoder_start_id)


def sequence_logprobs(model: Any, tok: Any, template: ChatTemplate, kind: str, prompts: list[list[Message]],
                      responses: list[str], max_length: int) -> list[float]:
    """sum_t log p(response token t | prompt, earlier tokens) per (prompt, response) text pair,
    tokenised the way training sees it; used to measure the KL between two policies."""
    from llmtune.data.templates import encode_prompt_response

    device = next(model.parameters()).device
    out: list[float] = []
    for prompt, response in zip(prompts, responses):
        enc = encode_prompt_response(tok, template, prompt, response, max_length, kind)
        if kind == "seq2seq":
            src = torch.tensor([enc["input_ids"]], device=device)
            labels = torch.tensor([enc["labels"]], device=device)
            with torch.no_grad():
                logits = model(input_ids=src, attention_mask=torch.ones_like(src), labels=labels).logits
            out.append(logprobs_from_logits(logits, labels).sum().item())
            continue
        ids = torch.tensor([enc["input_ids"]], device=device)
        start = enc["prompt_length"]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        targets = ids[:, start:]
        out.append(logprobs_from_logits(logits[:, start - 1:-1], targets).sum().item() if targets.numel() else 0.0)
    return out
