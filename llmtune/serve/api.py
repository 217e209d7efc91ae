"""OpenAI-compatible HTTP server over one or more engines (FastAPI + uvicorn, both shipped with gradio).

Routes: GET /health, GET /v1/models (chat models; reward models listed apart), GET /v1/models/{id},
POST /v1/chat/completions and POST /v1/completions (plain or `stream: true` SSE; log-probabilities,
and `echo` for scoring prompts as lm-evaluation-harness does), POST /v1/score (reward models).
Request bodies are validated here by hand rather than with pydantic models so every error, whatever
the cause, comes back in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with the
parameter named. Every field of OpenAI's request bodies is either honoured or refused with a 400
that says why; unknown fields are refused too (nothing is silently ignored). A full queue answers
429.

Hardened for a shared machine: bodies over `max_body_bytes` are refused (413) from Content-Length
or while streaming in, before any parsing; JSON nested deeper than MAX_DEPTH is refused; the bearer
scheme is case-insensitive and the key compared in constant time; responses never carry absolute
server paths (model references are shown relative to the working directory) nor internal error
details (those go to the server log).

Generation never runs on the event loop: each engine batches the requests waiting for it on its own
worker thread. A non-streamed request awaits its job's future; a streamed one is iterated in a thread
pool. Either way a client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmtune.serve.engine import (
    Completion,
    Engine,
    EngineBusy,
    Job,
    RequestError,
    Settings,
    TextStream,
    TokenLogprob,
    alternative_piece,
    check_messages,
    token_pieces,
)

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_DEPTH = 32  # JSON nesting; an OpenAI chat body needs 5 (body → messages → message → content → part)
MAX_BODY_BYTES = 4 * 2**20
THREADS = 256  # the thread pool streamed responses wait in (anyio's default of 40 caps concurrent streams)
log = logging.getLogger("llmtune.serve")

# Fields of OpenAI's request bodies (https://platform.openai.com/docs/api-reference) and what becomes
# of them here. Extensions (vLLM's names): top_k, repetition_penalty, min_tokens, ignore_eos.
COMMON = {"model", "stream", "stream_options", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
          "frequency_penalty", "logit_bias", "user", "top_k", "repetition_penalty", "min_tokens", "ignore_eos"}
CHAT_FIELDS = COMMON | {"messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "metadata",
                        "store", "service_tier", "response_format", "modalities", "tools", "tool_choice",
                        "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
COMPLETION_FIELDS = COMMON | {"prompt", "max_tokens", "logprobs", "echo", "best_of", "suffix"}
# Refused whatever their value (null aside), with the reason.
REFUSED = {
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported: the models here produce text",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning_effort is for reasoning models; the models here have no such setting",
    "verbosity": "verbosity is not supported: control the length with max_tokens",
    "web_search_options": "web search is not supported",
    "suffix": "insertion (suffix) is not supported: the models here only continue a prompt",
}


class APIError(Exception):
    """An error answered to the client in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def busy(exc: EngineBusy) -> APIError:
    return APIError(429, str(exc), None, "queue_full", "rate_limit_error")


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{key}' must be a number, got {value!r}", key, "invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(400, f"'{key}' must be in {bound}, got {value}", key, "invalid_value")
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{key}' must be an integer, got {value!r}", key, "invalid_type")
    if value < lo or (hi is not None and value > hi):
        raise APIError(400, f"'{key}' must be between {lo} and {hi if hi is not None else 'inf'}, got {value}",
                       key, "invalid_value")
    return value


def _boolean(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be true or false", key, "invalid_type")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    return tuple(s for s in value if s)


def _logit_bias(body: dict[str, Any], vocab: int) -> dict[int, float] | None:
    value = body.get("logit_bias")
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "'logit_bias' must map token ids to biases", "logit_bias", "invalid_type")
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not str(key).isdigit() or int(key) >= vocab:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab - 1})",
                           "logit_bias", "invalid_value")
        out[int(key)] = _number({f"logit_bias[{key}]": bias}, f"logit_bias[{key}]", 0.0, -100.0, 100.0)
    return out


def check_fields(body: dict[str, Any], allowed: set[str], endpoint: str) -> None:
    """Refuse fields this server does not honour: unknown ones, the REFUSED ones, and values of
    known ones that would ask for something it cannot do."""
    for key, value in body.items():
        if value is None:  # an explicit null is the default
            continue
        if key in REFUSED:
            raise APIError(400, f"'{key}': {REFUSED[key]}", key, "unsupported_parameter")
        if key not in allowed:
            raise APIError(400, f"unrecognized request argument '{key}' for {endpoint}", key, "unknown_parameter")
    if body.get("tools"):
        raise APIError(400, "'tools': tool calling is not supported", "tools", "unsupported_parameter")
    if body.get("tool_choice") not in (None, "none"):
        raise APIError(400, "'tool_choice': tool calling is not supported", "tool_choice", "unsupported_parameter")
    if body.get("store") not in (None, False):
        raise APIError(400, "'store': completions are not stored here", "store", "unsupported_parameter")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise APIError(400, "'service_tier': only 'auto' and 'default' are served", "service_tier",
                       "unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise APIError(400, "'modalities': the models here produce text only", "modalities", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(400, "'response_format': only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
                       "response_format", "unsupported_parameter")
    for key in ("metadata",):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise APIError(400, f"'{key}' must be an object", key, "invalid_type")
    for key in ("user", "prompt_cache_key", "safety_identifier"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise APIError(400, f"'{key}' must be a string", key, "invalid_type")
    _boolean(body, "parallel_tool_calls")


def settings_from(body: dict[str, Any], default_max_tokens: int, vocab: int, min_max_tokens: int = 1) -> Settings:
    """OpenAI request fields → engine settings. `top_p: 0` (like `temperature: 0`) asks for greedy
    decoding."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _integer(body, key, default_max_tokens, min_max_tokens)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    ignore_eos = _boolean(body, "ignore_eos")
    return Settings(
        max_new_tokens=default_max_tokens if max_new is None else max_new,
        temperature=0.0 if top_p == 0 else temperature,
        top_p=top_p or 1.0,
        top_k=_integer(body, "top_k", 0, 0) or 0,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        stop=_stop(body),
        n=_integer(body, "n", 1, 1, MAX_N) or 1,
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body, vocab),
        min_tokens=_integer(body, "min_tokens", 1, 0) or 0,
        ignore_eos=ignore_eos,
    )


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    """include_usage from stream_options (which only streamed requests may carry)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options",
                       "invalid_value")
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    for key, value in options.items():
        if key == "include_obfuscation" and value in (None, False):
            continue
        if key != "include_usage":
            raise APIError(400, f"stream_options.{key} is not supported", f"stream_options.{key}",
                           "unsupported_parameter")
    return _boolean(options, "include_usage")


class EventStream:
    """The SSE lines of one streamed request. Iterate it in a thread (it blocks on the model);
    `close()` from anywhere cancels the generation (the client went away). Failures after the
    headers are sent are reported in-band, as OpenAI does, and the stream still ends with [DONE]."""

    def __init__(self, submit: Callable[[], list[tuple[int, TextStream, str]]],
                 chunk: Callable[[int, str | None, str | None, bool], dict[str, Any]], base: dict[str, Any],
                 include_usage: bool):
        self._submit, self._chunk, self._base, self._include_usage = submit, chunk, base, include_usage
        self._streams: list[TextStream] = []
        self._closed = False
        self._lock = threading.Lock()

    def _event(self, obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def __iter__(self) -> Iterator[str]:
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        try:
            entries = self._submit()
            with self._lock:
                self._streams = [s for _, s, _ in entries]
                closed = self._closed
            if closed:
                self.close()
                return
            prompts: set[int] = set()
            for index, stream, head in entries:
                yield self._event({**self._base, **self._chunk(index, head, None, True), **self._usage(None)})
                for piece in stream:
                    yield self._event({**self._base, **self._chunk(index, piece, None, False), **self._usage(None)})
                yield self._event({**self._base, **self._chunk(index, None, stream.finish_reason, False),
                                   **self._usage(None)})
                if id(stream._job) not in prompts:
                    prompts.add(id(stream._job))
                    usage["prompt_tokens"] += stream.prompt_tokens
                usage["completion_tokens"] += stream.tokens
        except RequestError as exc:
            yield self._event(APIError(400, str(exc), exc.param, exc.code).body())
        except EngineBusy as exc:
            yield self._event(busy(exc).body())
        except Exception as exc:
            log.error("streamed completion failed", exc_info=exc)
            yield self._event(internal_error(exc).body())
        else:
            if self._include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield self._event({**self._base, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    def _usage(self, usage: Any) -> dict[str, Any]:
        return {"usage": usage} if self._include_usage else {}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for stream in streams:
            stream.close()


class Server:
    """The engines by name plus the request handling that does not depend on FastAPI."""

    def __init__(self, engines: list[Engine], api_key: str | None = None, default_max_tokens: int = 256,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.engines: dict[str, Engine] = {}
        for e in engines:
            if e.name in self.engines:
                raise RequestError(f"two models are named '{e.name}'; name them with --name NAME=MODEL")
            self.engines[e.name] = e
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", "authentication_error")

    def find(self, name: Any) -> Engine:
        if not isinstance(name, str) or not name:
            raise APIError(400, "'model' is required: one of " + ", ".join(self.engines), "model",
                           "missing_required_parameter")
        engine = self.engines.get(name)
        if engine is None:
            raise APIError(404, f"the model '{name}' does not exist here; served: {', '.join(self.engines)}",
                           "model", "model_not_found")
        return engine

    def engine(self, body: dict[str, Any], generates: bool) -> Engine:
        engine = self.find(body.get("model"))
        if generates and not engine.generates:
            raise APIError(400, f"'{engine.name}' is a reward model; score with POST /v1/score", "model",
                           "model_not_generative")
        if not generates and engine.generates:
            raise APIError(400, f"'{engine.name}' generates text; /v1/score needs a reward model (stage rm)", "model",
                           "model_not_reward_model")
        return engine

    def model(self, engine: Engine) -> dict[str, Any]:
        info = {**engine.info(), "ref": public_ref(engine.ref)}
        if engine.generates:
            info["stats"] = engine.stats()
        return {"id": engine.name, "object": "model", "created": self.created, "owned_by": "llmtune", "llmtune": info}

    def models(self) -> dict[str, Any]:
        """Chat and completion models in `data` (what OpenAI clients list); reward models, which only
        score (POST /v1/score), apart in `reward_models`."""
        return {"object": "list", "data": [self.model(e) for e in self.engines.values() if e.generates],
                "reward_models": [self.model(e) for e in self.engines.values() if not e.generates]}

    # -- chat ---------------------------------------------------------------------------------------
    def submit_chat(self, engine: Engine, messages: list[dict[str, str]], settings: Settings,
                    logprobs: int | None = None, need_prompt: bool = False) -> Job:
        """Encode, check the length and queue (EngineBusy when the queue is full). NEED_PROMPT: an
        empty prompt is the client's error (the HTTP layer), not a failure of the engine."""
        ids = engine.prompt_ids(messages)
        if need_prompt and not ids:
            raise APIError(400, f"the messages make an empty prompt for '{engine.name}' (its chat template shows "
                           "no conversation without a user message); add a user message", "messages",
                           "invalid_value")
        engine.check_length(len(ids), settings)
        return engine.submit(ids, settings, engine.stops(settings), logprobs=logprobs)

    def completion(self, engine: Engine, result: Completion, logprobs: bool) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(result.choices):
            lp = {"content": chat_logprobs(engine, c.logprobs or []), "refusal": None} if logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": engine.name, "system_fingerprint": None, "choices": choices, "usage": usage(result)}

    def stream(self, engine: Engine, messages: list[dict[str, str]], settings: Settings,
               include_usage: bool) -> EventStream:
        """SSE lines of `chat.completion.chunk` objects; n > 1 streams the choices one after another."""
        return self.chat_events(lambda: self.submit_chat(engine, messages, settings), engine, settings, include_usage)

    def chat_events(self, submit: Callable[[], Job], engine: Engine, settings: Settings,
                    include_usage: bool) -> EventStream:
        def entries() -> list[tuple[int, TextStream, str]]:
            return [(i, s, "") for i, s in enumerate(engine.streams(submit(), settings.n))]

        def chunk(index: int, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            return {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": engine.name, "system_fingerprint": None}
        return EventStream(entries, chunk, base, include_usage)

    # -- completions --------------------------------------------------------------------------------
    def submit_prompts(self, engine: Engine, prompts: list[tuple[str | None, list[int]]], settings: Settings,
                       logprobs: int | None, echo: bool) -> list[Job]:
        """Queue raw prompts (no chat template, no template stop strings); all or none."""
        jobs: list[Job] = []
        try:
            for _, ids in prompts:
                engine.check_length(len(ids), settings, "prompt")
                jobs.append(engine.submit(ids, settings, settings.stop, strip=False, logprobs=logprobs, echo=echo))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return jobs

    def text_completion(self, engine: Engine, prompts: list[tuple[str | None, list[int]]], results: list[Completion],
                        logprobs: int | None, echo: bool) -> dict[str, Any]:
        choices = []
        for p, ((text, ids), result) in enumerate(zip(prompts, results)):
            head = (text if text is not None else engine.tok.decode(ids, skip_special_tokens=True)) if echo else ""
            for j, c in enumerate(result.choices):
                lp = None
                if logprobs is not None:
                    tokens = [*(result.prompt_logprobs or []), *(c.logprobs or [])] if echo else (c.logprobs or [])
                    context = [] if echo else ids
                    lp = completion_logprobs(engine, tokens, context)
                choices.append({"index": p * len(result.choices) + j, "text": head + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        total = Completion([c for r in results for c in r.choices], sum(r.prompt_tokens for r in results))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": engine.name, "system_fingerprint": None, "choices": choices, "usage": usage(total)}

    def completion_events(self, jobs: list[Job], engine: Engine, prompts: list[tuple[str | None, list[int]]],
                          settings: Settings, echo: bool, include_usage: bool) -> EventStream:
        def entries() -> list[tuple[int, TextStream, str]]:
            out = []
            for p, ((text, ids), job) in enumerate(zip(prompts, jobs)):
                head = (text if text is not None else engine.tok.decode(ids, skip_special_tokens=True)) if echo else ""
                out += [(p * settings.n + j, s, head) for j, s in enumerate(engine.streams(job, settings.n))]
            return out

        def chunk(index: int, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            return {"choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": engine.name, "system_fingerprint": None}
        return EventStream(entries, chunk, base, include_usage)


def usage(result: Completion) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def chat_logprobs(engine: Engine, tokens: list[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's chat `logprobs.content`: each answer token's text, bytes, log-prob and alternatives."""
    ids = [t.id for t in tokens]
    out = []
    for i, (t, piece) in enumerate(zip(tokens, token_pieces(engine.tok, ids))):
        top = [{"token": (alt := alternative_piece(engine.tok, ids[:i], a)), "logprob": v, "bytes": list(alt.encode())}
               for a, v in t.top]
        out.append({"token": piece, "logprob": t.logprob, "bytes": list(piece.encode()), "top_logprobs": top})
    return out


def completion_logprobs(engine: Engine, tokens: list[TokenLogprob], context: list[int]) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs`: tokens, token_logprobs (None for the first token of an
    echoed prompt), top_logprobs (alternative text → log-prob) and text_offset."""
    ids = [t.id for t in tokens]
    pieces = token_pieces(engine.tok, [*context, *ids])[len(context):]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    tops: list[dict[str, float] | None] = []
    for i, t in enumerate(tokens):
        if t.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for a, v in t.top:
            top.setdefault(alternative_piece(engine.tok, [*context, *ids[:i]], a), v)
        tops.append(top)
    return {"tokens": pieces, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
            "text_offset": offsets}


def completion_prompts(engine: Engine, value: Any) -> list[tuple[str | None, list[int]]]:
    """OpenAI's four prompt forms (a string, strings, token ids, lists of token ids) → (text or None,
    token ids) per prompt."""
    vocab = len(engine.tok)

    def ids_of(item: Any, where: str) -> list[int]:
        if not item or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in item):
            raise APIError(400, f"'{where}' must be a non-empty list of token ids (0 to {vocab - 1})", "prompt",
                           "invalid_value")
        return list(item)

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt", "missing_required_parameter" if value is None else "invalid_type")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [(None, ids_of(value, "prompt"))]
    out: list[tuple[str | None, list[int]]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            ids = engine.text_ids(item)
            if not ids:
                raise APIError(400, f"'prompt[{i}]' encodes to no tokens", "prompt", "invalid_value")
            out.append((item, ids))
        elif isinstance(item, list):
            out.append((None, ids_of(item, f"prompt[{i}]")))
        else:
            raise APIError(400, f"'prompt[{i}]' must be a string or a list of token ids", "prompt", "invalid_type")
    return out


def internal_error(exc: BaseException) -> APIError:
    """A 500 for the client that names only the exception type: its text may hold server paths."""
    return APIError(500, f"internal error ({type(exc).__name__}); the server log has the details", None,
                    "internal_error", "server_error")


def public_ref(ref: str) -> str:
    """A model reference as clients see it: registry names and hub ids as given, local paths relative
    to the server's working directory, else only the directory name (never an absolute path)."""
    path = Path(ref).expanduser()
    if not path.exists():
        return ref
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return path.name


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node)
                         if isinstance(v, (dict, list)))
    return deepest


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object of a request, refusing oversized bodies before reading (Content-Length) or
    as soon as the streamed bytes pass LIMIT, and nesting deeper than MAX_DEPTH."""
    too_large = APIError(413, f"the request body is larger than the {limit} bytes this server accepts "
                         "(llmtune serve --max-body-mb)", None, "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    deep = APIError(400, f"the request body nests JSON deeper than {MAX_DEPTH} levels", None, "invalid_json")
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError:
        raise deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    if json_depth(body) > MAX_DEPTH:
        raise deep
    return body


async def _results(request: Request, jobs: list[Job]) -> list[Completion] | None:
    """The jobs' completions, or None once the client has disconnected (the jobs are then cancelled)."""
    futures = [asyncio.wrap_future(job.future) for job in jobs]

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    gathered = asyncio.ensure_future(asyncio.gather(*futures))
    try:
        await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return gathered.result() if gathered.done() else None
    finally:
        watcher.cancel()
        if not gathered.done():
            gathered.cancel()
        for job in jobs:
            if not job.future.done():
                job.cancel()


async def _sse(events: EventStream) -> AsyncIterator[str]:
    """Iterate EVENTS in the thread pool; close them (cancelling the generation) when the response
    ends early: a client disconnect cancels this generator (Starlette listens for it)."""
    iterator = iter(events)
    try:
        while True:
            chunk = await run_in_threadpool(next, iterator, None)
            if chunk is None:
                return
            yield chunk
    finally:
        events.close()


def _submit(fn: Callable[..., Any], *args: Any) -> Any:
    """Call an engine submission, turning a full queue into 429."""
    try:
        return fn(*args)
    except EngineBusy as exc:
        raise busy(exc) from None


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        yield

    app = FastAPI(title="llmtune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc), exc.param, exc.code).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), None, code).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:  # Starlette re-raises it to the log
        return JSONResponse(internal_error(exc).body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(server.engines)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.check_auth(request)
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        server.check_auth(request)
        return server.model(server.find(model_id))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        server.check_auth(request)
        body = await _json_body(request, server.max_body_bytes)
        engine = server.engine(body, generates=True)
        check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
        if body.get("messages") is None:
            raise APIError(400, "'messages' is required", "messages", "missing_required_parameter")
        messages = check_messages(body["messages"])
        settings = settings_from(body, server.default_max_tokens, len(engine.tok))
        stream = _boolean(body, "stream")
        include_usage = _stream_options(body, stream)
        want_logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want_logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        if want_logprobs and stream:
            raise APIError(400, "'logprobs' are not supported with 'stream' here; ask without streaming",
                           "logprobs", "unsupported_parameter")
        logprobs = (top or 0) if want_logprobs else None
        job = await run_in_threadpool(_submit, server.submit_chat, engine, messages, settings, logprobs, True)
        if stream:
            events = server.chat_events(lambda: job, engine, settings, include_usage)
            return StreamingResponse(_sse(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _results(request, [job])
        if results is None:
            return Response(status_code=499)  # nobody is listening
        return await run_in_threadpool(server.completion, engine, results[0], want_logprobs)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        server.check_auth(request)
        body = await _json_body(request, server.max_body_bytes)
        engine = server.engine(body, generates=True)
        check_fields(body, COMPLETION_FIELDS, "/v1/completions")
        echo = _boolean(body, "echo")
        settings = settings_from(body, server.default_max_tokens, len(engine.tok), min_max_tokens=0 if echo else 1)
        best_of = _integer(body, "best_of", None, 1, MAX_N)
        if best_of is not None and best_of != settings.n:
            raise APIError(400, "'best_of' other than n is not supported (answers are not ranked here)", "best_of",
                           "unsupported_parameter")
        stream = _boolean(body, "stream")
        include_usage = _stream_options(body, stream)
        logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        if logprobs is not None and stream:
            raise APIError(400, "'logprobs' are not supported with 'stream' here; ask without streaming",
                           "logprobs", "unsupported_parameter")
        if echo and logprobs is not None and engine.kind == "seq2seq":
            raise APIError(400, f"'{engine.name}' is an encoder-decoder model: its prompt is the encoder's input, "
                           "which has no log-probabilities to echo", "echo", "unsupported_value")
        if stream and settings.max_new_tokens == 0:
            raise APIError(400, "'max_tokens' must be at least 1 when streaming", "max_tokens", "invalid_value")
        prompts = await run_in_threadpool(completion_prompts, engine, body.get("prompt"))
        jobs = await run_in_threadpool(_submit, server.submit_prompts, engine, prompts, settings, logprobs, echo)
        if stream:
            events = server.completion_events(jobs, engine, prompts, settings, echo, include_usage)
            return StreamingResponse(_sse(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _results(request, jobs)
        if results is None:
            return Response(status_code=499)
        return await run_in_threadpool(server.text_completion, engine, prompts, results, logprobs, echo)

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        """Body: {"model", "pairs": [{"prompt": str | messages, "response": str}, ...]}."""
        server.check_auth(request)
        body = await _json_body(request, server.max_body_bytes)
        engine = server.engine(body, generates=False)
        pairs = body.get("pairs")
        if not isinstance(pairs, list) or not pairs:
            raise APIError(400, "'pairs' must be a non-empty list of {prompt, response} objects", "pairs",
                           "missing_required_parameter" if pairs is None else "invalid_type")
        prompts, responses = [], []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, dict):
                raise APIError(400, f"pairs[{i}] must be an object", f"pairs[{i}]", "invalid_type")
            prompt = pair.get("prompt")
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            prompts.append(check_messages(prompt, f"pairs[{i}].prompt"))
            if not isinstance(pair.get("response"), str):
                raise APIError(400, f"pairs[{i}].response must be a string", f"pairs[{i}].response",
                               "invalid_type")
            responses.append(pair["response"])
        scores = await run_in_threadpool(engine.score_batch, prompts, responses)
        return {"object": "list", "model": engine.name,
                "data": [{"index": i, "score": float(s)} for i, s in enumerate(scores)]}

    return app


def run(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Bind first (port 0 picks a free one), print the address, then serve until interrupted."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RequestError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)  # accept into the backlog now: clients may connect as soon as the address is printed
    bound = sock.getsockname()[1]
    display = f"[{host}]" if ":" in host else host
    print(f"llmtune serve: listening on http://{display}:{bound}/v1 (models: {', '.join(server.engines)})",
          flush=True)
    config = uvicorn.Config(create_app(server), log_level=log_level, access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
