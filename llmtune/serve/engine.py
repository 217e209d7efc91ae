"""A loaded model ready to answer chats: the one object the terminal chat, the HTTP server, compare
and the web UI share. No HTTP here.

Why a single worker thread per model: generation is not thread-safe on one model and a CPU or GPU
runs one generate call efficiently at a time, so requests are queued FIFO on a one-thread executor.
Callers (threads of a web server, a REPL) only wait on their own result or their own streamer
queue, so a slow consumer never blocks the worker and the worker never waits for a free thread.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.config.schema import GenerationSection, RewardSection
from llmtune.data.templates import ChatTemplate, Message
from llmtune.errors import LLMTuneError

ROLES = ("system", "user", "assistant")


class RequestError(LLMTuneError):
    """A request the model cannot serve (bad messages, too long, wrong kind of model).

    `param` names the offending field and `code` is a machine-readable reason, so the HTTP layer can
    answer in OpenAI's error shape without knowing the engine's internals."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class Settings:
    """Per-request generation settings (OpenAI-style names). temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None

    def generation(self) -> GenerationSection:
        sample = self.temperature > 0
        return GenerationSection(max_new_tokens=self.max_new_tokens, min_new_tokens=1,
                                 temperature=self.temperature if sample else 1.0, top_p=self.top_p,
                                 top_k=self.top_k, do_sample=sample, repetition_penalty=self.repetition_penalty)


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)
    tokens: int


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


def default_name(ref: str) -> str:
    """A short model name for a reference: registry names as is, directories by their run name."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        return ref
    path = path.resolve()
    return path.parent.name if path.name == "model" and (path.parent / "run.json").exists() else path.name


def check_messages(messages: Any, param: str = "messages") -> list[Message]:
    """Canonical message list or a RequestError naming the bad item."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"'{param}' must be a non-empty list of messages", param)
    out: list[Message] = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string", f"{where}.content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise RequestError(f"the last message of '{param}' must not be an assistant turn", param)
    return out


class _StopFilter:
    """Streams text while holding back what could still become a stop string or trailing space,
    so the concatenated stream equals the non-streamed answer (cut at the stop, stripped)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.buf = ""
        self.started = False
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            self.stopped = True
            out, self.buf = self.buf[:cut].rstrip(), ""
            return self._lead(out)
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        keep = len(self.buf) - hold
        keep = len(self.buf[:keep].rstrip())
        out, self.buf = self.buf[:keep], self.buf[keep:]
        return self._lead(out)

    def finish(self) -> str:
        """What was held back as a possible stop-string start, once the answer has ended."""
        out, self.buf = ("" if self.stopped else self.buf.rstrip()), ""
        return self._lead(out)

    def _lead(self, out: str) -> str:
        if not self.started:
            out = out.lstrip()
            self.started = bool(out)
        return out


class TextStream:
    """Iterator of text deltas of one response; `finish_reason` and `tokens` are set once exhausted.

    Closing it early (e.g. the HTTP client went away) cancels the generation."""

    def __init__(self, engine: Engine, messages: list[Message], settings: Settings):
        from transformers import TextIteratorStreamer

        self.finish_reason: str | None = None
        self.tokens = 0
        self.prompt_tokens = 0
        self._cancel = threading.Event()
        self._streamer = TextIteratorStreamer(engine.tok, skip_prompt=True, skip_special_tokens=True)
        self._filter = _StopFilter(engine.stops(settings))
        self._future: Future[Completion] = engine._submit(messages, settings, self._streamer, self._cancel)

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._streamer:
                out = self._filter.feed(piece)
                if out:
                    yield out
            tail = self._filter.finish()
            if tail:
                yield tail
            result = self._future.result()
            self.finish_reason = result.choices[0].finish_reason
            self.tokens = result.choices[0].tokens
            self.prompt_tokens = result.prompt_tokens
        finally:
            self.close()

    def close(self) -> None:
        if not self._future.done():
            self._cancel.set()
            self._future.cancel()


class Engine:
    """A model (generation or reward head), its tokenizer and chat template, behind one FIFO worker."""

    def __init__(self, name: str, ref: str, model: Any, tok: Any, template: ChatTemplate, kind: str, head: str,
                 context_length: int | None, scorer: Any = None):
        self.name = name
        self.ref = ref
        self.model = model
        self.tok = tok
        self.template = template
        self.kind = kind  # causal | seq2seq | encoder (the architecture)
        self.head = head  # causal | seq2seq (generates) | classifier (a reward model: scores)
        self.context_length = context_length
        self._scorer = scorer
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llmtune-{name}")

    @classmethod
    def load(cls, ref: str, name: str | None = None, dtype: str = "auto") -> Engine:
        """Any run dir, registry name, hub id or path. Reward models (classifier head) are served
        through the reward-model scorer so scores match `llmtune eval` and training exactly."""
        from llmtune.modeling.load import resolve_kind
        from llmtune.registry.models import resolve_model

        spec = resolve_model(ref)
        kind = resolve_kind(spec)
        name = name or default_name(ref)
        if kind == "encoder" or spec.extra.get("head") == "classifier":
            from llmtune.rewards import build_reward

            scorer = build_reward(RewardSection(type="reward_model", model=ref))
            return cls(name, ref, None, None, ChatTemplate.get(spec.template), kind, "classifier",
                       spec.context_length, scorer=scorer)
        from llmtune.modeling.load import load_for_inference

        model, tok, spec = load_for_inference(ref, dtype=dtype)
        return cls(name, ref, model, tok, ChatTemplate.get(spec.template), kind, kind, _context_length(spec, model))

    @property
    def generates(self) -> bool:
        return self.head != "classifier"

    def stops(self, settings: Settings) -> tuple[str, ...]:
        return tuple(s for s in (*self.template.stop, *settings.stop) if s)

    # -- prompts ------------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The full (untrimmed) generation prompt, rendered exactly as in training."""
        from llmtune.data.templates import encode_prompt

        return encode_prompt(self.tok, self.template, messages, 1 << 30)

    def prompt_budget(self, settings: Settings) -> int:
        """Prompt tokens that fit: the context minus the answer for decoder-only models."""
        if self.context_length is None:
            return 1 << 30
        if self.kind == "seq2seq":
            return self.context_length
        return self.context_length - settings.max_new_tokens

    def check_prompt(self, messages: list[Message], settings: Settings) -> int:
        """Prompt length in tokens, or a RequestError when prompt + answer exceed the context.

        The server rejects such requests (as OpenAI does); chat and compare instead trim the
        history from the left, keeping the latest turns."""
        self._need_generator()
        n = len(self.prompt_ids(messages))
        budget = self.prompt_budget(settings)
        if n > budget:
            raise RequestError(
                f"this model's context is {self.context_length} tokens; the messages take {n} tokens and "
                f"max_tokens asks for {settings.max_new_tokens} more ({n + settings.max_new_tokens} in total). "
                "Shorten the messages or lower max_tokens", "messages", "context_length_exceeded")
        return n

    # -- generation ---------------------------------------------------------------------------------
    def complete(self, messages: list[Message], settings: Settings) -> Completion:
        """`settings.n` answers to one conversation (blocking; queued behind earlier requests)."""
        self._need_generator()
        return self._submit(messages, settings, None, threading.Event()).result()

    def chat(self, messages: list[Message], settings: Settings | None = None) -> str:
        """One answer as text."""
        return self.complete(messages, settings or Settings()).choices[0].text

    def stream(self, messages: list[Message], settings: Settings | None = None) -> TextStream:
        """One answer as an iterator of text deltas (settings.n is ignored: one stream, one answer)."""
        self._need_generator()
        return TextStream(self, messages, settings or Settings())

    def _need_generator(self) -> None:
        if not self.generates:
            raise RequestError(f"'{self.name}' is a reward model: it scores (prompt, response) pairs and "
                               "cannot generate text", "model", "model_not_generative")

    def _submit(self, messages: list[Message], settings: Settings, streamer: Any,
                cancel: threading.Event) -> Future[Completion]:
        if settings.max_new_tokens < 1:
            raise RequestError("max_tokens must be at least 1", "max_tokens")
        if self.prompt_budget(settings) < 1:
            raise RequestError(f"max_tokens {settings.max_new_tokens} leaves no room for the prompt in this "
                               f"model's {self.context_length}-token context", "max_tokens",
                               "context_length_exceeded")
        return self._worker.submit(self._generate, messages, settings, streamer, cancel)

    def _generate(self, messages: list[Message], settings: Settings, streamer: Any,
                  cancel: threading.Event) -> Completion:
        """Runs on the worker thread only."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from llmtune.modeling.generate import batch_prompts, cut_at_stop, generation_kwargs

        try:
            gen = settings.generation()
            device = next(self.model.parameters()).device
            # Sampled answers are n rows of one batch; greedy ones are all the same, so one row.
            n = settings.n if gen.do_sample and streamer is None else 1
            batch = batch_prompts(self.tok, self.template, [messages] * n, self.prompt_budget(settings), self.kind,
                                  device)
            # Decode "greedily" over logits that _seeded_sampler has already warped and perturbed:
            # an exact sample whose randomness is private to this request (see _seeded_sampler).
            kwargs = generation_kwargs(dataclasses.replace(gen, do_sample=False), self.tok)
            processors = [_seeded_sampler(gen, settings.seed, device)] if gen.do_sample else []
            stops = self.stops(settings)
            if stops:
                kwargs.update(stop_strings=list(stops), tokenizer=self.tok)
            with torch.inference_mode():
                seqs = self.model.generate(**batch, streamer=streamer,
                                           logits_processor=LogitsProcessorList(processors),
                                           stopping_criteria=StoppingCriteriaList([_cancelled(cancel)]), **kwargs)
        except BaseException:
            if streamer is not None:
                streamer.end()
            raise
        # Keep only new tokens: drop the prompt (causal) or the decoder start token (seq2seq).
        seqs = seqs[:, 1:] if self.kind == "seq2seq" else seqs[:, batch["input_ids"].shape[1]:]
        choices = []
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        for row in seqs.tolist():
            while row and row[-1] == pad and pad != eos:  # padding after an early EOS in a batch
                row.pop()
            full = self.tok.decode(row, skip_special_tokens=True)
            text = cut_at_stop(full, stops).strip()
            ended = (bool(row) and row[-1] == eos) or len(text) < len(full.strip())
            reason = "length" if len(row) >= gen.max_new_tokens and not ended else "stop"
            choices.append(Choice(text, reason, len(row)))
        if streamer is None:
            choices = [choices[i % len(choices)] for i in range(settings.n)]
        return Completion(choices, prompt_tokens=int(batch["attention_mask"][0].sum()))

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, prompt: list[Message], response: str) -> float:
        """Reward of one response to a conversation (reward models only)."""
        return self.score_batch([prompt], [response])[0]

    def score_batch(self, prompts: list[list[Message]], responses: list[str]) -> list[float]:
        if self._scorer is None:
            raise RequestError(f"'{self.name}' is not a reward model (its head is {self.head}); serve a model "
                               "trained with stage rm to score", "model", "model_not_reward_model")
        return self._worker.submit(self._scorer.score, prompts, responses).result()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "ref": self.ref, "kind": self.kind, "head": self.head,
                "template": self.template.name, "context_length": self.context_length}

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _context_length(spec: Any, model: Any) -> int | None:
    """The registry's context length, else the model config's position limit (None: unbounded)."""
    if spec.context_length:
        return int(spec.context_length)
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _cancelled(cancel: threading.Event) -> Any:
    """A stopping criterion that ends generation once the consumer has gone away."""
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return Cancelled()


def _seeded_sampler(gen: GenerationSection, seed: int | None, device: Any) -> Any:
    """Sampling with a per-request random generator, via the Gumbel-max trick.

    Why: `generate(do_sample=True)` draws from torch's global RNG, which every engine thread shares,
    so two models answering at once would disturb each other's seeded answers. Adding Gumbel noise
    from a private generator to the temperature/top-k/top-p-warped logits and taking the argmax
    draws from exactly the same distribution as multinomial sampling, reproducibly per request."""
    import torch
    from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = []
    if gen.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k:
        warpers.append(TopKLogitsWarper(gen.top_k))
    if gen.top_p < 1.0:
        warpers.append(TopPLogitsWarper(gen.top_p))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))

    class SeededSampler(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            scores = scores.float()
            for warp in warpers:
                scores = warp(input_ids, scores)
            u = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(1e-10, 1 - 1e-7)
            return scores - torch.log(-torch.log(u))

    return SeededSampler()
