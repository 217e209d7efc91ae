"""OpenAI-compatible HTTP server over one or more engines (FastAPI + uvicorn, both shipped with gradio).

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (plain or `stream: true` SSE),
POST /v1/score (reward models). Request bodies are validated here by hand rather than with
pydantic models so every error, whatever the cause, comes back in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with the parameter named.

Hardened for a shared machine: bodies over `max_body_bytes` are refused (413) from Content-Length
or while streaming in, before any parsing; JSON nested deeper than MAX_DEPTH is refused; the bearer
scheme is case-insensitive and the key compared in constant time; responses never carry absolute
server paths (model references are shown relative to the working directory) nor internal error
details (those go to the server log).

Generation never runs on the event loop: non-streamed calls wait in a thread pool and streamed
ones are sync generators that Starlette iterates in a thread pool, so one long stream does not hold
up other requests; each engine's own FIFO worker keeps one generate call per model at a time.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmtune.serve.engine import Engine, RequestError, Settings, check_messages

MAX_N = 16
MAX_DEPTH = 32  # JSON nesting; an OpenAI chat body needs 5 (body → messages → message → content → part)
MAX_BODY_BYTES = 4 * 2**20
log = logging.getLogger("llmtune.serve")


class APIError(Exception):
    """An error answered to the client in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    return tuple(s for s in value if s)


def settings_from(body: dict[str, Any], default_max_tokens: int) -> Settings:
    """OpenAI request fields → engine settings (unsupported extras such as presence_penalty are ignored)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return Settings(
        max_new_tokens=_integer({key: max_tokens}, key, default_max_tokens, 1) or default_max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=_stop(body),
        n=_integer(body, "n", 1, 1, MAX_N) or 1,
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
    )


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

    def engine(self, body: dict[str, Any], generates: bool) -> Engine:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "'model' is required: one of " + ", ".join(self.engines), "model",
                           "missing_required_parameter")
        engine = self.engines.get(name)
        if engine is None:
            raise APIError(404, f"the model '{name}' does not exist here; served: {', '.join(self.engines)}",
                           "model", "model_not_found")
        if generates and not engine.generates:
            raise APIError(400, f"'{name}' is a reward model; score with POST /v1/score", "model",
                           "model_not_generative")
        if not generates and engine.generates:
            raise APIError(400, f"'{name}' generates text; /v1/score needs a reward model (stage rm)", "model",
                           "model_not_reward_model")
        return engine

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "llmtune",
             "llmtune": {**e.info(), "ref": public_ref(e.ref)}}
            for name, e in self.engines.items()]}

    def completion(self, engine: Engine, messages: list[dict[str, str]], settings: Settings) -> dict[str, Any]:
        result = engine.complete(messages, settings)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": engine.name, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": c.finish_reason} for i, c in enumerate(result.choices)],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    def stream(self, engine: Engine, messages: list[dict[str, str]], settings: Settings,
               include_usage: bool) -> Iterator[str]:
        """SSE lines of `chat.completion.chunk` objects; n > 1 streams the choices one after another."""
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: dict[str, Any], finish: str | None, usage: Any = None) -> str:
            obj: dict[str, Any] = {
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                "system_fingerprint": None,
                "choices": [] if index < 0 else [{"index": index, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        prompt_tokens = completion_tokens = 0
        # Headers are sent: a failure is reported in-band, as OpenAI does, and the stream still ends.
        try:
            for i in range(settings.n):
                seed = None if settings.seed is None else settings.seed + i
                one = dataclasses.replace(settings, n=1, seed=seed)
                stream = engine.stream(messages, one)
                yield chunk(i, {"role": "assistant", "content": ""}, None)
                try:
                    for piece in stream:
                        yield chunk(i, {"content": piece}, None)
                finally:
                    stream.close()
                prompt_tokens = stream.prompt_tokens
                completion_tokens += stream.tokens
                yield chunk(i, {}, stream.finish_reason)
        except RequestError as exc:
            yield f"data: {json.dumps(APIError(400, str(exc), exc.param, exc.code).body())}\n\n"
        except Exception as exc:
            log.error("streamed completion failed", exc_info=exc)
            yield f"data: {json.dumps(internal_error(exc).body())}\n\n"
        else:
            if include_usage:
                yield chunk(-1, {}, None, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                           "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"


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


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="llmtune", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

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

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        server.check_auth(request)
        body = await _json_body(request, server.max_body_bytes)
        engine = server.engine(body, generates=True)
        if "messages" not in body:
            raise APIError(400, "'messages' is required", "messages", "missing_required_parameter")
        messages = check_messages(body["messages"])
        settings = settings_from(body, server.default_max_tokens)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", "stream", "invalid_type")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
        if not await run_in_threadpool(engine.check_prompt, messages, settings):
            raise APIError(400, f"the messages make an empty prompt for '{engine.name}' (its chat template shows "
                           "no conversation without a user message); add a user message", "messages",
                           "invalid_value")
        if stream:
            return StreamingResponse(server.stream(engine, messages, settings, bool(options.get("include_usage"))),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await run_in_threadpool(server.completion, engine, messages, settings)

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
