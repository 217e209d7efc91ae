"""`llmtune serve` and `llmtune chat` against real tiny trained models: a real server subprocess on
127.0.0.1, raw HTTP, the official openai client, concurrency, and every kind of bad request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow  # real servers and end-to-end runs: the full suite, not `-m "not slow"`

API_KEY = "test-key"
HELLO = [{"role": "user", "content": "What is 2 plus 3?"}]


def _train(root: Path, name: str, *overrides: str, recipe: str = "recipes/sft-tiny.yaml") -> Path:
    out = root / name
    run_cli("train", recipe, "training.max_steps=4", "training.save_steps=1000", *overrides,
            "--output-dir", str(out), check=True)
    assert (out / "model" / "llmtune.json").is_file()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full SFT run, a LoRA SFT run and a reward model (stage rm), each a few real steps."""
    root = tmp_path_factory.mktemp("serve-runs")
    rm_recipe = root / "rm.yaml"
    rm_recipe.write_text(
        "stage: rm\nmodel: {name: tiny-llama, finetuning: full}\n"
        f"data: {{name: hh, path: {ROOT / 'tests/fixtures/raw/hh'}, max_length: 64}}\n"
        "training: {max_steps: 2, batch_size: 4, logging_steps: 1}\n")
    runs = {"full": _train(root, "full", "training.threads=1"), "lora": _train(root, "lora", "model.finetuning=lora"),
            "rm": _train(root, "rm", recipe=str(rm_recipe))}
    assert "CPU threads: 1 (training.threads)" in (runs["full"] / "train.log").read_text()
    return runs


class Client:
    """Minimal HTTP helper over urllib: (status, parsed JSON or raw text)."""

    def __init__(self, base: str, key: str | None = API_KEY):
        self.base, self.key = base, key

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                key: str | None = API_KEY) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def chat(self, **body: Any) -> tuple[int, Any]:
        return self.request("POST", "/v1/chat/completions", body)

    def stream(self, **body: Any) -> tuple[str, list[dict[str, Any]]]:
        """(concatenated content, chunks) of a streamed completion; asserts the SSE framing."""
        status, text = self.chat(stream=True, **body)
        assert status == 200, text
        events = [e for e in text.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        content = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
        return content, chunks


@pytest.fixture(scope="module")
def server(runs: dict[str, Path]) -> Iterator[Client]:
    """One server for the module: the full run, the LoRA run as 'adapter', the reward model, tiny-t5."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtune.cli", "serve", str(runs["full"]), str(runs["rm"]), "tiny-t5",
         "--name", f"adapter={runs['lora']}", "--port", "0", "--api-key", API_KEY, "--max-tokens", "16"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            proc.kill()
            raise AssertionError(f"server did not start: {line}{proc.communicate()[1]}")
        base = line.split("listening on ")[1].split()[0].removesuffix("/v1")
        assert base.startswith("http://127.0.0.1:")
        yield Client(base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_health_and_models(server: Client) -> None:
    status, health = server.request("GET", "/health", key=None)
    assert status == 200 and health["status"] == "ok"
    status, models = server.request("GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {"full", "adapter", "tiny-t5"}  # what can chat; reward models apart
    assert [m["id"] for m in models["reward_models"]] == ["rm"]
    assert models["reward_models"][0]["llmtune"]["head"] == "classifier"
    status, rm = server.request("GET", "/v1/models/rm")
    assert status == 200 and rm["id"] == "rm" and rm["llmtune"]["head"] == "classifier"
    assert by_id["tiny-t5"]["llmtune"]["head"] == "seq2seq"
    assert by_id["adapter"]["llmtune"]["template"] == "llama2"


def test_plain_and_streamed_completion_agree(server: Client) -> None:
    body = {"model": "full", "messages": HELLO, "max_tokens": 12, "temperature": 0.9, "seed": 7}
    status, out = server.chat(**body)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["model"] == "full"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    text = choice["message"]["content"]
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    streamed, chunks = server.stream(**body)
    assert streamed == text  # same seed, same settings: the stream is the same answer
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert len({c["id"] for c in chunks}) == 1


def test_models_chosen_by_name_and_seq2seq(server: Client) -> None:
    for name in ("full", "adapter", "tiny-t5"):
        status, out = server.chat(model=name, messages=HELLO, temperature=0.8, seed=1, max_tokens=6)
        assert status == 200 and out["model"] == name, out
        streamed, _ = server.stream(model=name, messages=HELLO, temperature=0.8, seed=1, max_tokens=6)
        assert streamed == out["choices"][0]["message"]["content"]


def test_n_choices_stop_and_stream_usage(server: Client) -> None:
    status, out = server.chat(model="adapter", messages=HELLO, n=3, temperature=1.0, seed=3, max_tokens=8)
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1, 2]
    body = {"model": "full", "messages": HELLO, "temperature": 0.9, "seed": 11, "max_tokens": 10}
    status, full = server.chat(**body)
    text = full["choices"][0]["message"]["content"]
    assert len(text) > 2, full
    stop = text[1:3]
    status, cut = server.chat(**body, stop=[stop])
    assert status == 200 and cut["choices"][0]["message"]["content"] == text[: text.find(stop)].strip()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert server.stream(**body, stop=[stop])[0] == text[: text.find(stop)].strip()
    _, chunks = server.stream(model="full", messages=HELLO, max_tokens=5, seed=2, n=2,
                              stream_options={"include_usage": True})
    assert {ch["index"] for c in chunks for ch in c["choices"]} == {0, 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_sixteen_concurrent_requests(server: Client) -> None:
    def ask(i: int) -> str:
        body = {"model": ("full", "adapter")[i % 2], "messages": [{"role": "user", "content": f"Count to {i}"}],
                "max_tokens": 8, "temperature": 0.9, "seed": i}
        if i % 4 == 3:
            return server.stream(**body)[0]
        status, out = server.chat(**body)
        assert status == 200, out
        return out["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, range(16)))
    sequential = [ask(i) for i in range(16)]
    assert concurrent == sequential  # no cross-talk between queued requests


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server: Client) -> None:
    ok = {"model": "full", "messages": HELLO, "max_tokens": 4}
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({"raw": b"{not json"}, 400, "invalid_json"),
        ({"raw": b"[1, 2]"}, 400, "invalid_json"),
        ({"body": {"messages": HELLO}}, 400, "missing_required_parameter"),
        ({"body": {**ok, "model": "nope"}}, 404, "model_not_found"),
        ({"body": {"model": "full"}}, 400, "missing_required_parameter"),
        ({"body": {**ok, "messages": "hi"}}, 400, None),
        ({"body": {**ok, "messages": [{"role": "wizard", "content": "x"}]}}, 400, None),
        ({"body": {**ok, "messages": [{"role": "user", "content": 5}]}}, 400, None),
        ({"body": {**ok, "temperature": "hot"}}, 400, "invalid_type"),
        ({"body": {**ok, "temperature": 3}}, 400, "invalid_value"),
        ({"body": {**ok, "top_p": -0.1}}, 400, "invalid_value"),
        ({"body": {**ok, "max_tokens": 0}}, 400, "invalid_value"),
        ({"body": {**ok, "max_tokens": "ten"}}, 400, "invalid_type"),
        ({"body": {**ok, "n": 100}}, 400, "invalid_value"),
        ({"body": {**ok, "stop": 5}}, 400, "invalid_type"),
        ({"body": {**ok, "stream": "yes"}}, 400, "invalid_type"),
        ({"body": {**ok, "messages": [{"role": "user", "content": "word " * 3000}]}}, 400,
         "context_length_exceeded"),
        ({"body": {**ok, "max_tokens": 5000}}, 400, "context_length_exceeded"),
        ({"body": {**ok, "model": "rm"}}, 400, "model_not_generative"),
        ({"body": ok, "key": None}, 401, "invalid_api_key"),
        ({"body": ok, "key": "wrong"}, 401, "invalid_api_key"),
        # OpenAI fields not served here are refused, never silently ignored
        ({"body": {**ok, "messages": [{"role": "tool", "content": "4", "tool_call_id": "x"}]}}, 400, "unsupported_value"),
        ({"body": {**ok, "messages": [*HELLO, {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
                                      {"role": "user", "content": "go on"}]}}, 400, "unsupported_value"),
        ({"body": {**ok, "messages": [{"role": "user", "content": "hi", "name": "ann"}]}}, 400, "unsupported_parameter"),
        ({"body": {**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}}, 400, "unsupported_parameter"),
        ({"body": {**ok, "tool_choice": "auto"}}, 400, "unsupported_parameter"),
        ({"body": {**ok, "response_format": {"type": "json_object"}}}, 400, "unsupported_parameter"),
        ({"body": {**ok, "audio": {"voice": "alloy"}}}, 400, "unsupported_parameter"),
        ({"body": {**ok, "reasoning_effort": "low"}}, 400, "unsupported_parameter"),
        ({"body": {**ok, "store": True}}, 400, "unsupported_parameter"),
        ({"body": {**ok, "frobnicate": 1}}, 400, "unknown_parameter"),
        ({"body": {**ok, "top_logprobs": 2}}, 400, "invalid_value"),
        ({"body": {**ok, "logprobs": True, "stream": True}}, 400, "unsupported_parameter"),
        ({"body": {**ok, "stream_options": {"include_usage": True}}}, 400, "invalid_value"),
        ({"body": {**ok, "logit_bias": {"999999": 5}}}, 400, "invalid_value"),
    ]
    for case, status, code in cases:
        got, out = server.request("POST", "/v1/chat/completions", case.get("body"), case.get("raw"),
                                  case.get("key", API_KEY))
        assert got == status, (case, out)
        err = out["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], out
        if code is not None:
            assert err["code"] == code, (case, out)
        assert server.request("GET", "/health", key=None)[0] == 200
    status, out = server.request("GET", "/v1/chat/completions")
    assert status == 405 and "error" in out
    status, out = server.request("GET", "/v1/nothing-here")
    assert status == 404 and out["error"]["code"] == "not_found"
    status, out = server.chat(**ok)
    assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_plain_and_streaming(server: Client) -> None:
    from openai import AuthenticationError, NotFoundError, OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0)
    assert {m.id for m in client.models.list()} == {"full", "adapter", "tiny-t5"}
    assert client.models.retrieve("adapter").id == "adapter"
    with pytest.raises(NotFoundError):
        client.models.retrieve("missing")
    done = client.completions.create(model="full", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert done.object == "text_completion" and isinstance(done.choices[0].text, str)
    assert done.usage is not None and done.usage.completion_tokens > 0
    echoed = client.completions.create(model="full", prompt="Once upon a time", max_tokens=1, temperature=0,
                                       echo=True, logprobs=1)
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith("Once upon a time") and lp is not None
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == echoed.choices[0].text
    out = client.chat.completions.create(model="adapter", messages=HELLO, max_tokens=8, temperature=0.9, seed=5)
    text = out.choices[0].message.content
    assert isinstance(text, str) and out.usage is not None and out.usage.completion_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="adapter", messages=HELLO, max_tokens=8, temperature=0.9, seed=5, stream=True) if c.choices]
    assert "".join(pieces) == text
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="missing", messages=HELLO)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.base + "/v1", api_key="bad", max_retries=0).models.list()


def test_score_with_served_reward_model(server: Client, runs: dict[str, Path]) -> None:
    from llmtune.config.schema import RewardSection
    from llmtune.rewards import build_reward

    pairs = [{"prompt": "Is the sky blue?", "response": "Yes, on a clear day."},
             {"prompt": [{"role": "user", "content": "Hi"}], "response": "Go away."}]
    status, out = server.request("POST", "/v1/score", {"model": "rm", "pairs": pairs})
    assert status == 200, out
    scores = [d["score"] for d in out["data"]]
    expected = build_reward(RewardSection(type="reward_model", model=str(runs["rm"]))).score(
        [[{"role": "user", "content": "Is the sky blue?"}], [{"role": "user", "content": "Hi"}]],
        ["Yes, on a clear day.", "Go away."])
    assert scores == pytest.approx(expected, abs=1e-5)
    status, out = server.request("POST", "/v1/score", {"model": "full", "pairs": pairs})
    assert status == 400 and out["error"]["code"] == "model_not_reward_model"
    status, out = server.request("POST", "/v1/score", {"model": "rm", "pairs": [{"prompt": "x"}]})
    assert status == 400 and out["error"]["param"] == "pairs[0].response"


def test_chat_through_a_pipe(server: Client, runs: dict[str, Path]) -> None:
    lines = "What is 2 plus 3?\n\n/system Answer briefly.\nAnd 4 plus 4?\n/system\nWhat is 2 plus 3?\n"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "llmtune.cli", "chat", str(runs["full"]), "--seed", "4",
                           "--temperature", "0.9", "--max-new-tokens", "10"], input=lines, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.splitlines()
    assert len(answers) == 3, (proc.stdout, time.time() - start)
    # Piped turns are independent: the same prompt and seed gives the same answer, which is also
    # what the server answers for the same request.
    assert answers[0] == answers[2]
    status, out = server.chat(model="full", messages=HELLO, max_tokens=10, temperature=0.9, seed=4)
    assert " ".join(out["choices"][0]["message"]["content"].split()) == answers[0]


def test_chat_on_a_terminal(runs: dict[str, Path]) -> None:
    """The interactive REPL on a real pseudo-terminal: streamed answers, /system, /reset, /exit."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child becomes `llmtune chat` with the pty as its terminal
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "llmtune.cli", "chat", str(runs["full"]), "--seed", "4",
                                  "--temperature", "0.9", "--max-new-tokens", "10"])
    seen = b""

    def until(marker: bytes, timeout: float = 240) -> bytes:
        nonlocal seen
        end = time.time() + timeout
        while marker not in seen and time.time() < end:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        assert marker in seen, seen.decode(errors="replace")
        out, seen = seen, seen[seen.index(marker) + len(marker):]
        return out

    reaped = False
    try:
        until(b"you> ")
        os.write(fd, b"What is 2 plus 3?\n")
        first = until(b"you> ")
        assert b"full> " in first
        os.write(fd, b"/system Be brief.\n")
        assert b"system prompt set" in until(b"you> ")
        os.write(fd, b"/reset\n")
        assert b"conversation reset" in until(b"you> ")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        reaped = True
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_completions_echo_logprobs_equal_a_forward_pass(server: Client, runs: dict[str, Path]) -> None:
    """lm-evaluation-harness's loglikelihood request: token-id prompts, echo, logprobs, one new token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = runs["full"] / "model"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [tok("The cat sat on the mat")["input_ids"], tok("Two plus three is five")["input_ids"]]
    status, out = server.request("POST", "/v1/completions", {
        "model": "full", "prompt": prompts, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 2,
        "seed": 1234})
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for ids, choice in zip(prompts, out["choices"]):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and all(len(t) <= 2 for t in lp["top_logprobs"][1:])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        expected = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(expected.tolist(), abs=1e-4)
        # greedy: the new token is the likeliest, as lm-eval's is_greedy check reads it
        assert lp["token_logprobs"][-1] == pytest.approx(logprobs[-1].max().item(), abs=1e-4)
        assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-5)
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    # max_tokens 0 with echo scores the prompt alone
    status, scored = server.request("POST", "/v1/completions", {
        "model": "full", "prompt": prompts[0], "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200, scored
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == out["choices"][0]["logprobs"]["token_logprobs"][:-1]


def test_completions_forms_and_stream(server: Client) -> None:
    body = {"model": "full", "prompt": ["Once upon", "A long time ago"], "max_tokens": 6, "temperature": 0.9,
            "seed": 4, "n": 2}
    status, out = server.request("POST", "/v1/completions", body)
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    status, single = server.request("POST", "/v1/completions", {**body, "prompt": "A long time ago"})
    assert [c["text"] for c in single["choices"]] == [c["text"] for c in out["choices"][2:]]
    status, text = server.request("POST", "/v1/completions", {**body, "prompt": "Once upon", "n": 1, "stream": True,
                                                              "echo": True})
    assert status == 200
    events = [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e and e != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in events) == "Once upon" + out["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    for bad, code in (({"suffix": "x"}, "unsupported_parameter"), ({"best_of": 3}, "unsupported_parameter"),
                      ({"prompt": [1.5]}, "invalid_type"), ({"max_tokens": 0}, "invalid_value"),
                      ({"prompt": None}, "missing_required_parameter")):
        status, err = server.request("POST", "/v1/completions", {**body, **bad})
        assert status == 400 and err["error"]["code"] == code, (bad, err)


def test_chat_logprobs_developer_role_and_top_p_zero(server: Client) -> None:
    body = {"model": "full", "messages": HELLO, "max_tokens": 6, "temperature": 0}
    status, out = server.chat(**body, logprobs=True, top_logprobs=3)
    assert status == 200, out
    content = out["choices"][0]["logprobs"]["content"]
    assert 0 < len(content) <= out["usage"]["completion_tokens"]
    for item in content:  # greedy: every chosen token is the likeliest one
        assert len(item["top_logprobs"]) == 3 and item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"])
    assert "".join(i["token"] for i in content).strip() == out["choices"][0]["message"]["content"]
    status, plain = server.chat(**body)
    assert plain["choices"][0]["logprobs"] is None
    status, nucleus = server.chat(**{**body, "temperature": 1.5, "top_p": 0, "seed": 3})
    assert nucleus["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    system = [{"role": "system", "content": "Answer briefly."}, *HELLO]
    developer = [{"role": "developer", "content": "Answer briefly."}, *HELLO]
    assert server.chat(**{**body, "messages": system})[1]["choices"] == server.chat(**{**body, "messages": developer})[1]["choices"]


@pytest.fixture(scope="module")
def busy() -> Iterator[Client]:
    """A server with room for two waiting requests per model (tiny-t5: an answer without a context limit)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtune.cli", "serve", "tiny-t5", "--port", "0", "--api-key", API_KEY,
         "--max-queue", "2", "--threads", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=os.environ.copy())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield Client(line.split("listening on ")[1].split()[0].removesuffix("/v1"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_batching_queue_full_and_disconnect(busy: Client) -> None:
    """Requests waiting together run in one batch (the engine's counters say so); a third waiting one
    is answered 429; a client that closes its stream stops the generation within a few tokens and
    frees the worker for the next requests."""
    import httpx

    def stats() -> dict[str, int]:
        return busy.request("GET", "/v1/models/tiny-t5")[1]["llmtune"]["stats"]

    def until(check: Callable[[dict[str, int]], bool]) -> dict[str, int]:
        end = time.monotonic() + 120
        while not check(now := stats()):
            assert time.monotonic() < end, now
            time.sleep(0.05)
        return now

    short = {"model": "tiny-t5", "messages": HELLO, "max_tokens": 4, "temperature": 0}
    start = stats()
    with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=120) as http:
        with http.stream("POST", busy.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                         json={**short, "max_tokens": 100_000, "ignore_eos": True, "stream": True}) as long:
            lines = long.iter_lines()
            assert next(lines).startswith("data: ")  # the long answer is being generated
            waiting = [pool.submit(busy.chat, **short) for _ in range(2)]
            until(lambda s: s["waiting"] == 2)
            status, out = busy.chat(**short)
            assert status == 429 and out["error"]["code"] == "queue_full", out
            assert set(out["error"]) == {"message", "type", "param", "code"}
            at_close = stats()["tokens"]
        # the stream is closed: the long answer stops, the two waiting requests run, together
        answers = [f.result(timeout=120) for f in waiting]
    end = until(lambda s: s["running"] == 0 and s["waiting"] == 0)
    assert all(status == 200 for status, _ in answers), answers
    short_tokens = sum(out["usage"]["completion_tokens"] for _, out in answers)
    assert end["tokens"] - at_close - short_tokens < 500, "the closed stream kept generating"
    assert end["batches"] - start["batches"] == 2 and end["requests"] - start["requests"] == 3
    assert end["largest_batch"] >= 2 and end["cancelled"] - start["cancelled"] == 1
    assert end["rejected"] - start["rejected"] == 1


@pytest.mark.parametrize("flag", [["--threads", "0"], ["--max-queue", "0"], ["--max-batch-size", "0"]])
def test_bad_serve_flags_exit_2(flag: list[str]) -> None:
    proc = run_cli("serve", "tiny-llama", "--port", "0", *flag, timeout=120)
    assert proc.returncode == 2 and flag[0] in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
