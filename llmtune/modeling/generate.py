"""Batched generation from canonical prompts: the one place that knows left padding for causal
models, the encoder path for seq2seq models, the template's generation prompt, its stop strings and
where a response ends.

`sample()` is the core: `n` responses per prompt from one batched `generate` call, returned token by
token (`Samples`: ids, masks, texts, why each ended). Everything that generates goes through it:
online-RL rollouts (which need the tokens), rejection sampling, evaluation, compare, the judge and
the server (which need the texts, via `generate()` or the serving engine).

`sample_rows()` is the same call for a batch whose rows differ: each row has its own `RowSpec`
(sampling settings and seed, length limit, stop strings, a cancel check) and can report each new
token as it is generated. The serving engine batches unrelated requests with it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
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
    query = {k: v.repeat_interleave(n, 0) for k, v in batch.items()}
    return _samples(tok, kind, query, seqs, [stop_list] * len(seqs), None, n)


def _samples(tok: Any, kind: str, query: dict[str, torch.Tensor], seqs: torch.Tensor,
             stop_lists: Sequence[tuple[str, ...]], lengths: list[int] | None, n: int) -> Samples:
    """Samples from generate's output: responses masked after their end (EOS, a stop string, or the
    row's own length when `lengths` says where each row stopped) and decoded."""
    # Keep only new tokens: drop the prompt (causal) or the decoder start token (seq2seq).
    responses = seqs[:, 1:] if kind == "seq2seq" else seqs[:, query["input_ids"].shape[1]:]
    mask, ended = response_mask(responses, tok.eos_token_id)
    if lengths is not None:  # a row stopped by its own limit or a cancel: what follows is padding
        mask = mask * (torch.arange(responses.shape[1], device=mask.device)[None] <
                       torch.tensor(lengths, device=mask.device)[:, None]).long()
    texts, stopped = [], []
    for row in range(len(responses)):
        ids = responses[row][mask[row].bool()].tolist()
        keep, hit = cut_tokens_at_stops(tok, ids, stop_lists[row])
        texts.append(tok.decode(ids[:keep], skip_special_tokens=True).strip())
        stopped.append(hit)
        if hit:  # the padding after a stopped row may read as EOS (pad == eos): it did not end by itself
            # An answer that is nothing but a stop string keeps its first token: the action its score lands on.
            mask[row, max(keep, 1):] = 0
            ended[row] = False
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, tok.pad_token_id))
    return Samples(query["input_ids"], query["attention_mask"], responses, mask, texts, ended, stopped, n)


@dataclass
class RowSpec:
    """How one row of a `sample_rows` batch is sampled and when it stops; rows of one batch may all
    differ. temperature 0 decodes greedily. Penalties and logit_bias follow OpenAI's definitions
    (presence/frequency over the tokens generated so far; repetition_penalty is transformers' over the
    whole sequence)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None        # None: fresh randomness
    min_new_tokens: int = 1        # EOS is blocked before this many tokens
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    stops: tuple[str, ...] = ()    # the row ends once its text ends with one of these
    cancelled: Callable[[], bool] | None = None  # polled every step: True ends the row at once


def row_spec(gen: GenerationSection, seed: int | None = None, stops: tuple[str, ...] = ()) -> RowSpec:
    """A recipe's generation settings as one row's spec (greedy when do_sample is off)."""
    return RowSpec(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature if gen.do_sample else 0.0,
                   top_p=gen.top_p, top_k=gen.top_k, seed=seed, min_new_tokens=gen.min_new_tokens,
                   repetition_penalty=gen.repetition_penalty, stops=stops)

class RowSampler:
    """A logits processor that samples every row with its own settings and random generator.

    Why not `generate(do_sample=True)`: its settings are one per batch and it draws from torch's
    global RNG, which every thread shares, so a seeded answer would depend on what else was in the
    batch or running at the same time. Here each row's warped logits get Gumbel noise from the row's
    own generator and generate's argmax takes the sample: the same distribution as multinomial
    sampling (the Gumbel-max trick), reproducible per row whatever the batch. Greedy rows get no noise."""

    def __init__(self, rows: Sequence[RowSpec], start: int, eos_id: int | None, device: torch.device):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.start, self.eos_id, self.device = start, eos_id, device
        self.warpers: list[tuple[torch.Tensor, list[Any]]] = []  # rows sharing settings, their warpers
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, r in enumerate(rows):
            if r.temperature > 0:
                groups.setdefault((r.temperature, r.top_k, r.top_p), []).append(i)
        for (temperature, top_k, top_p), idx in groups.items():
            warps: list[Any] = []
            if temperature != 1.0:
                warps.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warps.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                warps.append(TopPLogitsWarper(top_p))
            if warps:  # None: every row of the batch
                self.warpers.append((None if len(idx) == len(rows) else torch.tensor(idx, device=device), warps))
        self.seeded = [(i, _generator(r.seed, device)) for i, r in enumerate(rows)
                       if r.temperature > 0 and r.seed is not None]
        fresh = [i for i, r in enumerate(rows) if r.temperature > 0 and r.seed is None]
        self.fresh = torch.tensor(fresh, device=device) if fresh else None
        self.fresh_generator = _generator(None, device)
        self.min_new = torch.tensor([r.min_new_tokens for r in rows], device=device)
        self.min_until = max(r.min_new_tokens for r in rows)  # no EOS blocking from this step on
        rep = [i for i, r in enumerate(rows) if r.repetition_penalty != 1.0]
        self.rep = (torch.tensor(rep, device=device),
                    torch.tensor([[rows[i].repetition_penalty] for i in rep], device=device)) if rep else None
        self.presence = torch.tensor([[r.presence_penalty] for r in rows], device=device)
        self.frequency = torch.tensor([[r.frequency_penalty] for r in rows], device=device)
        self.penalised = bool(self.presence.any() or self.frequency.any())
        self.counts: torch.Tensor | None = None  # generated-token counts, for presence/frequency
        self.bias = [(i, r.logit_bias) for i, r in enumerate(rows) if r.logit_bias]
        self.bias_tensor: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        generated = input_ids.shape[1] - self.start
        if self.bias:
            if self.bias_tensor is None:
                self.bias_tensor = torch.zeros_like(scores)
                for i, bias in self.bias:
                    ids = torch.tensor(list(bias), device=scores.device)
                    self.bias_tensor[i, ids] = torch.tensor(list(bias.values()), device=scores.device)
            scores = scores + self.bias_tensor
        if self.rep is not None:  # transformers' RepetitionPenaltyLogitsProcessor, with a penalty per row
            idx, penalty = self.rep
            seen = scores[idx].gather(1, input_ids[idx])
            seen = torch.where(seen < 0, seen * penalty, seen / penalty)
            scores[idx] = scores[idx].scatter(1, input_ids[idx], seen)
        if self.penalised:
            if self.counts is None:
                self.counts = torch.zeros_like(scores)
            if generated > 0:
                self.counts.scatter_add_(1, input_ids[:, -1:], torch.ones_like(scores[:, :1]))
            scores = scores - self.frequency * self.counts - self.presence * (self.counts > 0)
        if self.eos_id is not None and generated < self.min_until:
            scores[generated < self.min_new, self.eos_id] = -float("inf")
        for idx, warps in self.warpers:
            rows_ids, warped = (input_ids, scores) if idx is None else (input_ids[idx], scores[idx])
            for warp in warps:
                warped = warp(rows_ids, warped)
            if idx is None:
                scores = warped
            else:
                scores[idx] = warped
        for i, generator in self.seeded:
            scores[i] -= _gumbel((scores.shape[1],), generator, scores.device)
        if self.fresh is not None:
            scores[self.fresh] -= _gumbel((len(self.fresh), scores.shape[1]), self.fresh_generator, scores.device)
        return scores


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return generator


def _gumbel(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """-Gumbel noise: subtracting it from logits and taking the argmax samples from their softmax."""
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-10, 1 - 1e-7)
    return torch.log(-torch.log(u))


class RowStops:
    """A stopping criterion that ends each row on its own: EOS, one of its stop strings (over the
    generated tokens only), its max_new_tokens, or its cancel check. It records each row's length and
    why it ended ("eos", "stop", "length", "cancelled") and the step it ended at. The bookkeeping is
    plain Python over one list of last tokens: a handful of rows, every step, costs less so than
    a dozen small tensor operations."""

    def __init__(self, tok: Any, rows: Sequence[RowSpec], start: int, eos_id: int | None):
        from transformers import StopStringCriteria

        self.start, self.eos_id = start, eos_id
        self.limits = [r.max_new_tokens for r in rows]
        self.lengths = [0] * len(rows)
        self.reasons: list[str | None] = [None] * len(rows)
        self.finished_at: list[int | None] = [None] * len(rows)
        self.step = 0
        by_stops: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(rows):
            if r.stops:
                by_stops.setdefault(tuple(sorted(set(r.stops))), []).append(i)
        self.stop_groups = [(idx, StopStringCriteria(tok, list(stops))) for stops, idx in by_stops.items()]
        self.cancels = [r.cancelled for r in rows]

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.step += 1
        last = input_ids[:, -1].tolist()
        stopped: set[int] = set()
        for idx, criterion in self.stop_groups:
            hits = criterion(input_ids[idx, self.start:], None).tolist()
            stopped.update(i for i, hit in zip(idx, hits) if hit)
        for i, token in enumerate(last):
            if self.reasons[i] is not None:
                continue
            self.lengths[i] += 1
            cancelled = self.cancels[i]
            reason = ("eos" if token == self.eos_id else "stop" if i in stopped
                      else "length" if self.lengths[i] >= self.limits[i]
                      else "cancelled" if cancelled is not None and cancelled() else None)
            if reason is not None:
                self.reasons[i], self.finished_at[i] = reason, self.step
        return torch.tensor([r is not None for r in self.reasons], device=input_ids.device)


class RowStreamer:
    """A generate streamer that splits each step's new tokens by row: `on_token(row, token, reason)`
    for every row that produced one (reason is set on the row's last token). Rows that ended get no
    padding tokens."""

    def __init__(self, stops: RowStops, on_token: Callable[[int, int, str | None], None]):
        self.stops, self.on_token = stops, on_token
        self.prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:  # generate hands over the prompt (or the decoder start) first
            self.prompt = False
            return
        step = self.stops.step
        for row, token in enumerate(value.tolist()):
            at = self.stops.finished_at[row]
            if at is None or at == step:
                self.on_token(row, token, self.stops.reasons[row] if at == step else None)

    def end(self) -> None:
        pass


@torch.no_grad()
def sample_rows(model: Any, tok: Any, kind: str, prompts: Sequence[Sequence[int]], rows: Sequence[RowSpec],
                on_token: Callable[[int, int, str | None], None] | None = None) -> Samples:
    """One response per already-tokenised prompt, each row sampled and stopped by its own `RowSpec`,
    in one batched `generate` call. `on_token(row, token, reason)` sees every token as it is made
    (reason: why the row ended, on its last token). Texts are cut before each row's stop strings and
    `Samples.lengths` honour each row's own end."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in pad_batch(prompts, tok.pad_token_id,
                                                      "right" if kind == "seq2seq" else "left").items()}
    start = 1 if kind == "seq2seq" else batch["input_ids"].shape[1]
    eos = tok.eos_token_id
    stops = RowStops(tok, rows, start, eos)
    gen = GenerationSection(max_new_tokens=max(r.max_new_tokens for r in rows), min_new_tokens=0, do_sample=False)
    extra: dict[str, Any] = {"streamer": RowStreamer(stops, on_token)} if on_token is not None else {}
    from transformers import LogitsProcessorList, StoppingCriteriaList

    seqs = model.generate(**batch, **generation_kwargs(gen, tok),
                          logits_processor=LogitsProcessorList([RowSampler(rows, start, eos, device)]),
                          stopping_criteria=StoppingCriteriaList([stops]), **extra)
    return _samples(tok, kind, batch, seqs, [r.stops for r in rows], stops.lengths, 1)


@torch.no_grad()
def token_logprobs(model: Any, kind: str, prompt: Sequence[int], response: Sequence[int], top: int = 0,
                   decoder_start_id: int | None = None) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """log p(token | everything before it) under MODEL for each token of prompt + response (causal;
    the first token has none), or of the response only (seq2seq: the prompt is the encoder's input),
    from one forward pass, with the `top` likeliest alternatives (id, log-prob) at each position."""
    device = next(model.parameters()).device
    if kind == "seq2seq":
        start = decoder_start_id if decoder_start_id is not None else 0
        targets = torch.tensor([list(response)], device=device)
        logits = model(input_ids=torch.tensor([list(prompt)], device=device),
                       decoder_input_ids=torch.tensor([[start, *response[:-1]]], device=device)).logits[0]
        first: list[float | None] = []
    else:
        ids = torch.tensor([[*prompt, *response]], device=device)
        logits, targets = model(input_ids=ids).logits[0, :-1], ids[:, 1:]
        first = [None]
    logprobs = torch.log_softmax(logits.float(), -1)
    chosen = logprobs.gather(1, targets.T).squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in first]
    if top > 0:
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), -1)
        tops += [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops += [[] for _ in chosen]
    return first + chosen, tops


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
