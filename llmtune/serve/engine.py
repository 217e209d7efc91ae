"""A loaded model ready to answer: the one object the terminal chat, the HTTP server, compare and
the web UI share. No HTTP here.

Requests are batched. A request is a `Job` (one prompt, its settings, n answers) put on a bounded
queue; one worker thread per model takes every waiting job it can batch with the first (rows up to
`max_batch_size`, and for decoder-only models prompt + answer lengths that fit the context) and
generates them together with `modeling.generate.sample_rows`: one `generate` call over the KV cache
in which each row keeps its own sampling settings, seed, stop strings and length. Each new token is
handed to its job as it is made, so streams flow while the batch runs, a job whose rows have all
ended completes at once, and a job cancelled by its caller (a client that went away, a Ctrl-C) ends
its rows at the next step. When more answers were in flight at once during the previous batch
than are now waiting, the worker waits a little for the rest to arrive (clients that got their
answers together send their next requests together): `batch_wait_s`, or a
twentieth of the last batch's time if that is longer (at most a quarter second), since a request
that just misses a batch waits for all of it. A lone client never waits. (Requests join between
batches, not inside one: a short request that arrives during a long batch waits for it to end.)

Why one worker per model: a model serves one forward pass at a time efficiently, and batching
does the rest. Callers only wait on their own job; a slow consumer never blocks the worker.
Why not transformers' continuous batching (`generate_batch`, 5.24): it serves decoder-only models
only (we serve seq2seq too), has no stop strings and no per-request seeded sampling, and on a CPU it
is slow: tiny-llama, 8 prompts x 64 greedy tokens, one thread, took 74 s there against 0.4-0.6 s with
`sample_rows` (measured side by side on this project's 2-core machine).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmtune.config.schema import RewardSection
from llmtune.data.templates import ChatTemplate, Message
from llmtune.errors import LLMTuneError

ROLES = ("system", "user", "assistant")
ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
TOOL_ROLES = ("tool", "function")
MESSAGE_KEYS = {"role", "content"}
NULL_MESSAGE_KEYS = {"refusal", "audio", "tool_calls", "function_call", "annotations"}  # accepted when null


class RequestError(LLMTuneError):
    """A request the model cannot serve (bad messages, too long, wrong kind of model).

    `param` names the offending field and `code` is a machine-readable reason, so the HTTP layer can
    answer in OpenAI's error shape without knowing the engine's internals."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class EngineBusy(LLMTuneError):
    """The model's queue is full: the caller should retry later (HTTP 429)."""


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
    seed: int | None = None        # answer j of a request is sampled with seed + j
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 1            # EOS is not allowed before this many tokens
    ignore_eos: bool = False       # generate exactly max_new_tokens (unless a stop string ends it)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    """A token, its log-probability given everything before it (None for the very first token) and
    the likeliest alternatives at its position as (token id, log-probability)."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens reached) or "cancelled"
    tokens: int
    logprobs: list[TokenLogprob] | None = None  # the answer's tokens, when asked for


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None  # with echo: the prompt's tokens

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
    """Canonical message list or a RequestError naming the bad item. OpenAI's `developer` role is
    the system role; tool calls and tool results are refused (no template here renders them)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"'{param}' must be a non-empty list of messages", param)
    out: list[Message] = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m.get("content")
        role = ALIASES.get(role, role) if isinstance(role, str) else role
        if role in TOOL_ROLES or m.get("tool_calls") or m.get("function_call"):
            raise RequestError(f"{where}: tool and function calls are not supported: llmtune's chat templates "
                               "render only system, user and assistant text", where, "unsupported_value")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of system (or developer), user, assistant, got {role!r}",
                               f"{where}.role")
        extra = sorted(k for k, v in m.items() if k not in MESSAGE_KEYS and not (k in NULL_MESSAGE_KEYS and v is None))
        if extra:
            raise RequestError(f"{where}: unsupported field {extra[0]!r} (messages take role and content; "
                               "participant names are not part of the chat templates)", f"{where}.{extra[0]}",
                               "unsupported_parameter")
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
    """Streams text while holding back what could still become a stop string (or, for chat answers,
    trailing space), so the concatenated stream equals the non-streamed answer."""

    def __init__(self, stops: tuple[str, ...], strip: bool = True):
        self.stops = stops
        self.strip = strip
        self.buf = ""
        self.started = not strip
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            self.stopped = True
            out, self.buf = self._rstrip(self.buf[:cut]), ""
            return self._lead(out)
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        keep = len(self._rstrip(self.buf[:len(self.buf) - hold]))
        out, self.buf = self.buf[:keep], self.buf[keep:]
        return self._lead(out)

    def finish(self) -> str:
        """What was held back as a possible stop-string start, once the answer has ended."""
        out, self.buf = ("" if self.stopped else self._rstrip(self.buf)), ""
        return self._lead(out)

    def _rstrip(self, text: str) -> str:
        return text.rstrip() if self.strip else text

    def _lead(self, out: str) -> str:
        if not self.started:
            out = out.lstrip()
            self.started = bool(out)
        return out


class IncrementalDecoder:
    """Text deltas of a growing token list whose concatenation is the decoded whole. A delta is held
    back while the text ends in an incomplete character (U+FFFD: a multi-byte character split over
    byte tokens), so no character is ever split across deltas; decoding restarts from a recent
    token, so each token costs O(1) (the scheme of TGI and vLLM)."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted (context for the next delta)
        self.read = 0

    def feed(self, new: Sequence[int]) -> str:
        self.ids.extend(new)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end included)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


def token_pieces(tok: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded sequence (a token inside a multi-byte character adds
    nothing until the token that completes it)."""
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.feed([i]) for i in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


def alternative_piece(tok: Any, before: Sequence[int], token: int) -> str:
    """The text TOKEN would add after the tokens BEFORE (a few of them are enough context)."""
    context = list(before[-4:])
    head = tok.decode(context, skip_special_tokens=True)
    text = tok.decode([*context, token], skip_special_tokens=True)
    return text[len(head):] if text.startswith(head) else tok.decode([token], skip_special_tokens=True)


class Job:
    """One request inside the engine: a tokenised prompt, its settings, and its answers' tokens as
    they are generated. `rows` answers are generated (a greedy request needs one for any n)."""

    def __init__(self, prompt: list[int], settings: Settings, stops: tuple[str, ...], strip: bool,
                 logprobs: int | None, echo: bool):
        self.prompt, self.settings, self.stops, self.strip = prompt, settings, stops, strip
        self.logprobs, self.echo = logprobs, echo
        self.rows = 0 if settings.max_new_tokens == 0 else (1 if settings.greedy else settings.n)
        self.ids: list[list[int]] = [[] for _ in range(self.rows)]
        self.reasons: list[str | None] = [None] * self.rows
        self.future: Future[Completion] = Future()
        self.cancelled = False
        self.error: BaseException | None = None
        self._cond = threading.Condition()

    def spec(self, row: int) -> Any:
        """The row's sampling and stopping for `sample_rows`."""
        from llmtune.modeling.generate import RowSpec

        s = self.settings
        seed = None if s.seed is None else s.seed + row
        min_new = s.max_new_tokens if s.ignore_eos else max(1, s.min_tokens)
        return RowSpec(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                       seed=seed, min_new_tokens=min(min_new, s.max_new_tokens),
                       repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
                       frequency_penalty=s.frequency_penalty, logit_bias=s.logit_bias, stops=self.stops,
                       cancelled=lambda: self.cancelled)

    def push(self, row: int, token: int, reason: str | None) -> bool:
        """A new token of answer ROW (worker thread); True once every answer has ended."""
        with self._cond:
            self.ids[row].append(token)
            if reason is not None:
                self.reasons[row] = reason
            self._cond.notify_all()
            return all(r is not None for r in self.reasons)

    def end_all(self, reason: str) -> None:
        with self._cond:
            self.reasons = [r or reason for r in self.reasons]
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            self._cond.notify_all()
        if not self.future.done():
            self.future.set_exception(error)

    def cancel(self) -> None:
        """The caller is gone: the job leaves the queue, or its rows end at the next step."""
        self.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def wait(self, row: int, seen: int) -> tuple[list[int], str | None]:
        """Tokens of answer ROW after the first SEEN, once there are any or the answer ended."""
        with self._cond:
            while (len(self.ids[row]) <= seen and self.reasons[row] is None and self.error is None
                   and not self.cancelled):
                self._cond.wait()
            if self.error is not None:
                raise self.error
            reason = self.reasons[row] or ("cancelled" if self.cancelled else None)
            return self.ids[row][seen:], reason


class TextStream:
    """Iterator of text deltas of one answer; `finish_reason` and `tokens` are set once exhausted.

    Closing it early (e.g. the HTTP client went away) cancels the generation."""

    def __init__(self, engine: Engine, job: Job, row: int = 0):
        self.finish_reason: str | None = None
        self.tokens = 0
        self.prompt_tokens = len(job.prompt)
        self._engine, self._job, self._row = engine, job, row
        self._filter = _StopFilter(job.stops, job.strip)
        self._decoder = IncrementalDecoder(engine.tok)
        self._ended = False

    def __iter__(self) -> Iterator[str]:
        try:
            seen = 0
            while True:
                new, reason = self._job.wait(self._row, seen)
                seen += len(new)
                out = self._filter.feed(self._decoder.feed(new)) if new else ""
                if out:
                    yield out
                if reason is not None:
                    break
            tail = self._filter.feed(self._decoder.flush()) + self._filter.finish()
            if tail:
                yield tail
            choice = self._engine.choice(self._job, self._row)
            self.finish_reason, self.tokens = choice.finish_reason, choice.tokens
            self._ended = True
        finally:
            self.close()

    def close(self) -> None:
        if not self._ended:
            self._job.cancel()


class Engine:
    """A model (generation or reward head), its tokenizer and chat template, behind one batching
    worker (generation) or a lock (scoring)."""

    def __init__(self, name: str, ref: str, model: Any, tok: Any, template: ChatTemplate, kind: str, head: str,
                 context_length: int | None, scorer: Any = None, *, max_batch_size: int = 32, max_queue: int = 256,
                 batch_wait_s: float = 0.01):
        self.name = name
        self.ref = ref
        self.model = model
        self.tok = tok
        self.template = template
        self.kind = kind  # causal | seq2seq | encoder (the architecture)
        self.head = head  # causal | seq2seq (generates) | classifier (a reward model: scores)
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self._scorer = scorer
        self._score_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._active = 0  # answers submitted and not yet complete
        self._peak = 0  # the most answers in flight at once since the last batch began
        self._expect = 1  # ... during the last batch: how many the next one should wait for
        self._last_batch_s = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stats = {"batches": 0, "requests": 0, "rows": 0, "tokens": 0, "largest_batch": 0, "cancelled": 0,
                       "rejected": 0}

    @classmethod
    def load(cls, ref: str, name: str | None = None, dtype: str = "auto", **options: Any) -> Engine:
        """Any run dir, registry name, hub id or path. Reward models (classifier head) are served
        through the reward-model scorer so scores match `llmtune eval` and training exactly.
        OPTIONS: max_batch_size, max_queue, batch_wait_s (see the module doc)."""
        from llmtune.modeling.load import resolve_kind
        from llmtune.registry.models import resolve_model

        spec = resolve_model(ref)
        kind = resolve_kind(spec)
        name = name or default_name(ref)
        if kind == "encoder" or spec.extra.get("head") == "classifier":
            from llmtune.rewards import build_reward

            scorer = build_reward(RewardSection(type="reward_model", model=ref))
            return cls(name, ref, None, None, ChatTemplate.get(spec.template), kind, "classifier",
                       spec.context_length, scorer=scorer, **options)
        from llmtune.modeling.load import load_for_inference

        model, tok, spec = load_for_inference(ref, dtype=dtype)
        return cls(name, ref, model, tok, ChatTemplate.get(spec.template), kind, kind, _context_length(spec, model),
                   **options)

    @property
    def generates(self) -> bool:
        return self.head != "classifier"

    def stops(self, settings: Settings) -> tuple[str, ...]:
        """A chat answer's stop strings: the template's and the request's."""
        return tuple(s for s in (*self.template.stop, *settings.stop) if s)

    # -- prompts ------------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The full (untrimmed) generation prompt, rendered exactly as in training."""
        from llmtune.data.templates import encode_prompt

        return encode_prompt(self.tok, self.template, messages, 1 << 30, self.kind)

    def text_ids(self, text: str) -> list[int]:
        """A raw completion prompt as the tokenizer encodes it (BOS and all)."""
        self._need_generator()
        return list(self.tok(text)["input_ids"])

    def prompt_budget(self, settings: Settings) -> int:
        """Prompt tokens that fit: the context minus the answer for decoder-only models."""
        if self.context_length is None:
            return 1 << 30
        if self.kind == "seq2seq":
            return self.context_length
        return self.context_length - settings.max_new_tokens

    def check_length(self, n: int, settings: Settings, param: str = "messages") -> None:
        """A RequestError when N prompt tokens + the answer exceed the context (as OpenAI answers)."""
        if n > self.prompt_budget(settings):
            raise RequestError(
                f"this model's context is {self.context_length} tokens; the prompt takes {n} tokens and "
                f"max_tokens asks for {settings.max_new_tokens} more ({n + settings.max_new_tokens} in total). "
                f"Shorten the {param} or lower max_tokens", param, "context_length_exceeded")

    def _trimmed(self, messages: list[Message], settings: Settings) -> list[int]:
        from llmtune.data.templates import encode_prompt

        self._check_settings(settings)
        return encode_prompt(self.tok, self.template, messages, self.prompt_budget(settings), self.kind)

    # -- generation ---------------------------------------------------------------------------------
    def complete(self, messages: list[Message], settings: Settings) -> Completion:
        """`settings.n` answers to one conversation (blocking; batched with whatever else is waiting)."""
        return self.complete_many([(messages, settings)])[0]

    def complete_many(self, requests: Sequence[tuple[list[Message], Settings]]) -> list[Completion]:
        """Answers to many conversations at once, generated in as few batches as the engine allows."""
        self._need_generator()
        prompts = [self._trimmed(m, s) for m, s in requests]
        with self._cv:  # queued together (the lock is re-entrant; a full queue's wait releases it)
            jobs = [self.submit(p, s, self.stops(s), block=True) for p, (_, s) in zip(prompts, requests)]
        try:
            return [job.future.result() for job in jobs]
        finally:
            for job in jobs:
                if not job.future.done():
                    job.cancel()

    def chat(self, messages: list[Message], settings: Settings | None = None) -> str:
        """One answer as text."""
        return self.complete(messages, settings or Settings()).choices[0].text

    def stream(self, messages: list[Message], settings: Settings | None = None) -> TextStream:
        """One answer as an iterator of text deltas (settings.n is ignored: one stream, one answer)."""
        self._need_generator()
        settings = settings or Settings()
        one = replace(settings, n=1)
        job = self.submit(self._trimmed(messages, one), one, self.stops(one), block=True)
        return TextStream(self, job)

    def streams(self, job: Job, n: int) -> list[TextStream]:
        """N text streams of a submitted job, one per answer (a greedy job's one answer, N times)."""
        return [TextStream(self, job, i if job.rows > 1 else 0) for i in range(n)]

    def submit(self, prompt: list[int], settings: Settings, stops: tuple[str, ...], *, strip: bool = True,
               logprobs: int | None = None, echo: bool = False, block: bool = False) -> Job:
        """Queue a tokenised prompt. A full queue raises EngineBusy, or with BLOCK waits for room.
        STRIP: trim the answer's surrounding space (chat answers); LOGPROBS: with the answer's token
        log-probabilities and that many alternatives; ECHO: with the prompt's too."""
        self._need_generator()
        self._check_settings(settings, scoring=logprobs is not None or echo)
        if not prompt:
            raise ValueError(f"'{self.name}': the prompt renders to no tokens")
        job = Job(prompt, settings, stops, strip, logprobs, echo)
        with self._cv:
            while len(self._queue) >= self.max_queue and not self._closed:
                if not block:
                    self._stats["rejected"] += 1
                    raise EngineBusy(f"'{self.name}' has {len(self._queue)} requests waiting (the most it queues); "
                                     "retry later")
                self._cv.wait()
            if self._closed:
                raise RequestError(f"'{self.name}' has been unloaded", "model", "model_not_found")
            self._queue.append(job)
            self._active += max(job.rows, 1)
            self._peak = max(self._peak, self._active)
            job.future.add_done_callback(lambda _: self._settled(job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"llmtune-{self.name}", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return job

    def choice(self, job: Job, row: int) -> Choice:
        """Answer ROW of a job as text: cut before its first stop string (and stripped, for chat)."""
        from llmtune.modeling.generate import cut_at_stop

        if job.rows == 0:
            return Choice("", "length", 0)
        ids, reason = job.ids[row], job.reasons[row]
        full = self.tok.decode(ids, skip_special_tokens=True)
        text = cut_at_stop(full, job.stops)
        if len(text) < len(full) or reason in ("eos", "stop"):
            finish = "stop"
        else:
            finish = reason or "cancelled"
        return Choice(text.strip() if job.strip else text, finish, len(ids))

    def stats(self) -> dict[str, int]:
        """Counters since loading: batches run, requests and rows (answers) in them, tokens made, the
        most requests one batch held, cancelled and rejected (queue full) requests; and now, how many
        requests are waiting and running."""
        with self._cv:
            return {**self._stats, "waiting": len(self._queue), "running": len(self._running)}

    def _check_settings(self, settings: Settings, scoring: bool = False) -> None:
        """SCORING: a request for log-probabilities or an echo may ask for no new token (max_tokens 0)."""
        if settings.max_new_tokens < (0 if scoring else 1):
            raise RequestError("max_tokens must be at least 1", "max_tokens")
        if self.prompt_budget(settings) < 1:
            raise RequestError(f"max_tokens {settings.max_new_tokens} leaves no room for the prompt in this "
                               f"model's {self.context_length}-token context", "max_tokens",
                               "context_length_exceeded")

    def _need_generator(self) -> None:
        if not self.generates:
            raise RequestError(f"'{self.name}' is a reward model: it scores (prompt, response) pairs and "
                               "cannot generate text", "model", "model_not_generative")

    # -- the worker ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            began = time.monotonic()
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 — every job of the batch learns why
                for job in batch:
                    job.fail(exc)
            finally:
                with self._cv:
                    self._running = []
                    self._expect, self._peak = min(self.max_batch_size, self._peak), self._active
                    self._last_batch_s = time.monotonic() - began
                    self._cv.notify_all()

    def _settled(self, job: Job) -> None:
        """A job's future is done (answered, failed or cancelled): it is no longer in flight."""
        with self._cv:
            self._active -= max(job.rows, 1)

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job plus every waiting job that fits with it."""
        with self._cv:
            while True:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                deadline = time.monotonic() + max(self.batch_wait_s, min(0.25, self._last_batch_s / 20))
                while True:
                    for job in [j for j in self._queue if j.cancelled]:
                        self._queue.remove(job)
                        self._stats["cancelled"] += 1
                        job.end_all("cancelled")
                        job.future.cancel()
                    batch = self._fit()
                    left = deadline - time.monotonic()
                    if not batch or sum(max(j.rows, 1) for j in batch) >= self._expect or left <= 0:
                        break
                    self._cv.wait(left)
                    if self._closed:
                        return None
                if not batch:
                    continue
                for job in batch:
                    self._queue.remove(job)
                self._running = batch
                self._stats["batches"] += 1
                self._stats["requests"] += len(batch)
                self._stats["rows"] += sum(j.rows for j in batch)
                self._stats["largest_batch"] = max(self._stats["largest_batch"], len(batch))
                self._cv.notify_all()  # room in the queue
                return batch

    def _fit(self) -> list[Job]:
        """Waiting jobs, oldest first, that batch together: at most max_batch_size rows, and (decoder-only
        models) the longest prompt plus the longest answer within the context, since every row of
        the batch advances in positions until the last one ends."""
        batch: list[Job] = []
        rows = longest_prompt = longest_answer = 0
        for job in self._queue:
            prompt = max(longest_prompt, len(job.prompt))
            answer = max(longest_answer, job.settings.max_new_tokens)
            fits = (self.kind == "seq2seq" or self.context_length is None or prompt + answer <= self.context_length)
            if batch and (rows + job.rows > self.max_batch_size or not fits):
                continue
            batch.append(job)
            rows, longest_prompt, longest_answer = rows + job.rows, prompt, answer
        return batch

    def _run(self, batch: list[Job]) -> None:
        """Generate a batch (worker thread only); each job completes as soon as its answers end."""
        import torch

        from llmtune.modeling.generate import sample_rows

        owners = [(job, row) for job in batch for row in range(job.rows)]

        def on_token(i: int, token: int, reason: str | None) -> None:
            job, row = owners[i]
            self._stats["tokens"] += 1
            if job.push(row, token, reason) and job.logprobs is None:
                self._finish(job)

        if owners:
            with torch.inference_mode():
                sample_rows(self.model, self.tok, self.kind, [job.prompt for job, _ in owners],
                            [job.spec(row) for job, row in owners], on_token)
        for job in batch:
            if not job.future.done():
                job.end_all("cancelled" if job.cancelled else "length")
                self._finish(job)

    def _finish(self, job: Job) -> None:
        """Complete a job's future: its answers as text (and log-probabilities when asked for)."""
        if job.cancelled:
            self._stats["cancelled"] += 1
        choices = [self.choice(job, row) for row in range(max(job.rows, 1))]
        prompt_logprobs = None
        if job.logprobs is not None and not job.cancelled:
            prompt_logprobs = self._logprobs(job, choices)
        if job.rows <= 1:
            choices = [choices[0]] * job.settings.n  # greedy: every answer is the same one
        job.future.set_result(Completion(choices, len(job.prompt), prompt_logprobs))

    def _logprobs(self, job: Job, choices: list[Choice]) -> list[TokenLogprob] | None:
        """Each answer's token log-probabilities from a forward pass over prompt + answer (the tokens
        that make its text: up to a stop string, without the EOS); with echo, the prompt's too."""
        import torch

        from llmtune.modeling.generate import cut_tokens_at_stops, token_logprobs

        start = getattr(self.model.config, "decoder_start_token_id", None)
        prompt_logprobs = None
        for row, choice in enumerate(choices):
            ids = job.ids[row] if job.rows else []
            keep, _ = cut_tokens_at_stops(self.tok, ids, job.stops)
            ids = ids[:keep]
            if ids and ids[-1] == self.tok.eos_token_id:
                ids = ids[:-1]
            with torch.inference_mode():
                values, tops = token_logprobs(self.model, self.kind, job.prompt, ids, job.logprobs or 0, start)
            seq = [*job.prompt, *ids] if self.kind != "seq2seq" else ids
            logprobs = [TokenLogprob(t, v, top) for t, v, top in zip(seq, values, tops)]
            if self.kind != "seq2seq":
                if row == 0 and job.echo:
                    prompt_logprobs = logprobs[:len(job.prompt)]
                logprobs = logprobs[len(job.prompt):]
            choice.logprobs = logprobs
        return prompt_logprobs

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, prompt: list[Message], response: str) -> float:
        """Reward of one response to a conversation (reward models only)."""
        return self.score_batch([prompt], [response])[0]

    def score_batch(self, prompts: list[list[Message]], responses: list[str]) -> list[float]:
        if self._scorer is None:
            raise RequestError(f"'{self.name}' is not a reward model (its head is {self.head}); serve a model "
                               "trained with stage rm to score", "model", "model_not_reward_model")
        with self._score_lock:
            return self._scorer.score(prompts, responses)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "ref": self.ref, "kind": self.kind, "head": self.head,
                "template": self.template.name, "context_length": self.context_length}

    def close(self) -> None:
        """Stop the worker: waiting jobs fail, running ones are cancelled."""
        with self._cv:
            self._closed = True
            for job in self._queue:
                job.fail(RequestError(f"'{self.name}' has been unloaded", "model", "model_not_found"))
            self._queue.clear()
            for job in self._running:
                job.cancel()
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)  # a cancelled batch ends at its next step


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
