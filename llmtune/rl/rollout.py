"""The trajectory record of online RL and the forward passes that score its tokens, for causal and
seq2seq models alike.

Causal:  [left-padded prompt | right-padded response] is one sequence; the logits at position
         prompt_width - 1 + t predict response token t (explicit position ids, so left padding does
         not shift positions). Only those positions go through the LM head (`logits_to_keep`).
Seq2seq: the prompt goes to the encoder; the response tokens are the decoder's actions, the
         decoder input is the response shifted right behind the decoder start token.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from llmtune.data.templates import Message
from llmtune.modeling.batch import pad_ids
from llmtune.modeling.generate import Samples
from llmtune.rl.core import logprobs_and_entropy, token_logprobs


@dataclass
class Trajectory:
    """One batch of episodes as it travels the loop: sampled, scored, evaluated, given advantages,
    optimised on (cf. torchtune's `Trajectory`). B rows = prompts x `group`, prompt-major (row
    i * group + j is sample j of prompt i); Q is the prompt width, R the response width.

    Filled by sampling:
        prompts        B message lists (each prompt repeated `group` times)
        columns        the prompts' other dataset columns (a gold `answer`): name -> B values
        query_ids      (B, Q) long   causal: the left-padded prompt; seq2seq: the right-padded encoder input
        query_mask     (B, Q) long
        response_ids   (B, R) long   padded after each response's end
        response_mask  (B, R) long   1 on the response's tokens, EOS included, nothing from a stop string on
        lengths        B ints        response tokens per row (a host copy of response_mask.sum(1): no device sync)
        texts          B strings     what the reward reads (special tokens removed, cut before a stop string)
        ended          (B,) bool     the response ended by itself with EOS
    Filled by scoring:
        scores         (B,) float32  the reward source's scores, raw
        eval_scores    (B,) float32  the eval_reward source's scores on the same responses, or None
    Filled by the evaluation pass (no gradient):
        logprobs       (B, R) float32  log p_policy at sampling time; None when the one update per batch is
                                       on-policy (the update's own log-probs, detached, are the old ones)
        ref_logprobs   (B, R) float32  log p_reference; None when kl_coef is 0
        values         (B, R) float32  the critic's values (ppo); None for critic-free algorithms
        entropy        (B, R) float32  entropy of the sampling distribution per position, or None
    Filled by the advantage estimator:
        advantages     (B, R) or (B,) float32  per token (ppo, reinforce_pp) or per response (grpo, rloo)
        returns        (B, R) float32  the critic's targets (ppo), else None
        kl             (B, R) float32  the KL estimate per token (k1 of the policy at sampling), masked, or None
        active         (B,) bool       rows the update trains on (grpo/rloo leave zero-variance groups out)
    """

    prompts: list[list[Message]]
    columns: dict[str, list[Any]]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    lengths: list[int]
    texts: list[str]
    ended: torch.Tensor
    group: int = 1
    scores: torch.Tensor | None = None
    eval_scores: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    active: torch.Tensor | None = field(default=None)

    @classmethod
    def from_samples(cls, s: Samples, prompts: list[list[Message]], columns: dict[str, list[Any]]) -> Trajectory:
        """The record for `modeling.generate.sample`'s output: PROMPTS and COLUMNS are per prompt and
        are repeated for each of its s.n samples."""
        n = s.n
        return cls([p for p in prompts for _ in range(n)], {k: [v for v in vs for _ in range(n)] for k, vs in columns.items()},
                   s.query_ids, s.query_mask, s.response_ids, s.response_mask, s.lengths, s.texts, s.ended, n)

    @classmethod
    def cat(cls, parts: list[Trajectory], pad_id: int, left_pad_queries: bool) -> Trajectory:
        """One record from generation chunks of different widths (causal queries re-padded on the left)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]

        def rows(name: str) -> list[torch.Tensor]:
            return [row for p in parts for row in getattr(p, name)]

        side = "left" if left_pad_queries else "right"
        return cls([x for p in parts for x in p.prompts],
                   {k: [x for p in parts for x in p.columns[k]] for k in first.columns},
                   pad_ids(rows("query_ids"), pad_id, side), pad_ids(rows("query_mask"), 0, side),
                   pad_ids(rows("response_ids"), pad_id).long(), pad_ids(rows("response_mask"), 0).long(),
                   [x for p in parts for x in p.lengths], [x for p in parts for x in p.texts],
                   torch.cat([p.ended for p in parts]), first.group)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, idx: list[int]) -> Trajectory:
        """The rows IDX, with the response columns trimmed to their longest response (padding columns
        cost compute only)."""
        width = max(max(self.lengths[i] for i in idx), 1)
        t = torch.tensor(idx, device=self.query_ids.device)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[t]
                if value.dim() == 2 and f.name not in ("query_ids", "query_mask"):
                    value = value[:, :width]
            elif f.name == "columns":
                value = {k: [v[i] for i in idx] for k, v in value.items()}
            elif isinstance(value, list):
                value = [value[i] for i in idx]
            out[f.name] = value
        return Trajectory(**out)


def model_inputs(t: Any, kind: str, decoder_start_id: int | None) -> dict[str, torch.Tensor]:
    """Forward-pass inputs that make the logits line up with the response tokens (see module doc); T is
    anything with query/response ids and masks (a Trajectory, generate's Samples)."""
    if kind == "seq2seq":
        start = torch.full_like(t.response_ids[:, :1], decoder_start_id if decoder_start_id is not None else 0)
        decoder_ids = torch.cat([start, t.response_ids[:, :-1]], 1)
        decoder_mask = torch.cat([torch.ones_like(start), t.response_mask[:, :-1]], 1)
        return {"input_ids": t.query_ids, "attention_mask": t.query_mask, "decoder_input_ids": decoder_ids,
                "decoder_attention_mask": decoder_mask}
    input_ids = torch.cat([t.query_ids, t.response_ids], 1)
    mask = torch.cat([t.query_mask, t.response_mask], 1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


def keeps_logits(model: Any) -> bool:
    """Whether a causal model's forward takes `logits_to_keep` (transformers' LMs do): then the LM head
    runs on the response positions only, not on the prompt."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class Scorer:
    """Per-token log-probs (and values, entropy) of a Trajectory's responses under a model: the one
    forward pass of rollout evaluation, reference and update. The model is the policy, or an
    `ActorCritic` (then values come from the same pass)."""

    def __init__(self, kind: str, decoder_start_id: int | None, temperature: float, trim_logits: bool):
        self.kind = kind
        self.decoder_start_id = decoder_start_id
        self.temperature = temperature
        self.trim_logits = trim_logits and kind != "seq2seq"

    def __call__(self, model: Any, t: Any, entropy: bool = False, critic: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(log-probs (B, R), values (B, R) or None, entropy (B, R) or None) of T's responses (a Trajectory,
        or generate's Samples) under MODEL, an `ActorCritic` when CRITIC; gradients flow when called
        outside `torch.no_grad()`."""
        inputs: dict[str, Any] = {**model_inputs(t, self.kind, self.decoder_start_id), "use_cache": False}
        width = t.response_ids.shape[1]
        if self.trim_logits:
            inputs["logits_to_keep"] = width + 1  # the last position predicts nothing we sampled
        logits, values = model(**inputs) if critic else (model(**inputs).logits, None)
        if self.kind != "seq2seq":
            start = logits.shape[1] - width - 1
            logits = logits[:, start:start + width]
            if values is not None:
                values = values[:, t.query_ids.shape[1] - 1:t.query_ids.shape[1] - 1 + width]
        if entropy:
            logp, ent = logprobs_and_entropy(logits, t.response_ids, self.temperature)
            return logp, None if values is None else values.float(), ent
        return token_logprobs(logits, t.response_ids, self.temperature), None if values is None else values.float(), None

    @torch.no_grad()
    def reference(self, policy: Any, reference: Any | None, t: Trajectory) -> torch.Tensor:
        """Log-probs under the frozen reference: a separate frozen model for full fine-tuning, or — with
        LoRA — the very same policy with its adapters switched off (no second copy)."""
        model = reference if reference is not None else policy
        switch: AbstractContextManager[Any] = policy.disable_adapter() if reference is None else nullcontext()
        with switch:
            return self(model, t)[0]
