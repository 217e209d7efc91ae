"""Reward sources for real: rule functions by dotted path, a tiny local classifier directory, a judge
against an OpenAI-compatible HTTP server on 127.0.0.1 and a local tiny judge model, and mixes."""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.config.load import recipe_from_dict
from llmtune.config.schema import RewardSection
from llmtune.errors import ConfigError
from llmtune.rewards import RewardError, build_reward, reward_stats
from llmtune.rewards.judge import DEFAULT_TEMPLATE, fill, parse_score
from llmtune.rewards.rules import distinct_ngrams, target_length

PROMPTS = [[{"role": "user", "content": "Say something short."}],
           [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Describe a {cat}."}],
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"}]]
RESPONSES = ["Fine.", "A cat is a small furry animal that purrs and sleeps a lot.", "good good good good"]


def not_a_number(prompt: list[dict[str, str]], response: str) -> str:
    return "high"


def wrong_length(prompts: list[Any], responses: list[str]) -> list[float]:
    return [1.0]


def validate_reward(section: dict[str, Any]) -> None:
    """A reward section through the recipe schema, where every reward check lives."""
    recipe_from_dict({"stage": "rs", "model": {"name": "tiny-llama"}, "data": {"name": "demo"}, "reward": section})


# --- rule ---------------------------------------------------------------------------------------


def test_rule_per_sample_and_batch_conventions() -> None:
    per_sample = build_reward(RewardSection(type="rule", function="llmtune.rewards.rules:target_length",
                                            kwargs={"target": 10, "unit": "chars"}))
    assert per_sample.score(PROMPTS, RESPONSES) == [target_length(p, r, 10, "chars")
                                                    for p, r in zip(PROMPTS, RESPONSES)]
    assert per_sample.score(PROMPTS[:1], ["x" * 10]) == [1.0]
    batch = build_reward(RewardSection(type="rule", function="llmtune.rewards.rules:distinct_ngrams", kwargs={"n": 1}))
    scores = batch.score(PROMPTS, RESPONSES)
    assert scores == distinct_ngrams(PROMPTS, RESPONSES, n=1) and scores[2] == 0.25
    keyword = build_reward(RewardSection(type="rule", function="llmtune.rewards.rules:keyword_density",
                                         kwargs={"keywords": ["cat", "purrs"]}))
    assert keyword.score(PROMPTS, RESPONSES) == [0.0, 2 / 13, 0.0]


@pytest.mark.parametrize("function, kwargs, match", [
    ("llmtune.rewards.nope:fn", {}, r"reward\.function: cannot import module 'llmtune.rewards.nope'"),
    ("llmtune.rewards.rules:missing", {}, r"reward\.function: module 'llmtune.rewards.rules' has no attribute"),
    ("llmtune.rewards.rules.target_length", {}, r"reward\.function: expected 'package.module:function'"),
    ("llmtune.rewards.rules:target_length", {"tagret": 3}, r"reward\.kwargs: .*target_length does not accept"),
])
def test_rule_bad_paths_are_config_errors(function: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_reward({"type": "rule", "function": function, "kwargs": kwargs})


def test_rule_bad_return_values_are_reward_errors() -> None:
    with pytest.raises(RewardError, match="returned 'high', not a number"):
        build_reward(RewardSection(type="rule", function=f"{__name__}:not_a_number")).score(PROMPTS, RESPONSES)
    with pytest.raises(RewardError, match="returned 1 scores for 3 responses"):
        build_reward(RewardSection(type="rule", function=f"{__name__}:wrong_length")).score(PROMPTS, RESPONSES)


# --- classifier ---------------------------------------------------------------------------------


def make_classifier(out: Path, num_labels: int) -> Path:
    """A real Llama sequence classifier (random init) with the shipped tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from llmtune.registry.tiny import TOKENIZER_DIR

    for f in TOKENIZER_DIR.iterdir():
        shutil.copyfile(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               num_labels=num_labels, pad_token_id=tok.pad_token_id,
                               architectures=["LlamaForSequenceClassification"])
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("classifier"), num_labels=3)


def _reference_logits(path: Path, texts: list[str | tuple[str, str]]) -> torch.Tensor:
    """Each text alone (no padding), straight through transformers: what batching must reproduce."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            enc = tok(*t, return_tensors="pt") if isinstance(t, tuple) else tok(t, return_tensors="pt")
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


def test_classifier_label_index_and_transforms(classifier_dir: Path) -> None:
    logits = _reference_logits(classifier_dir, RESPONSES)
    expected = {"none": logits, "sigmoid": torch.sigmoid(logits), "softmax": torch.softmax(logits, -1),
                "log_softmax": torch.log_softmax(logits, -1)}
    for transform, values in expected.items():
        for label in (0, 2):
            source = build_reward(RewardSection(type="classifier", model=str(classifier_dir), label_index=label,
                                                transform=transform, batch_size=2))
            got = source.score(PROMPTS, RESPONSES)
            assert got == pytest.approx(values[:, label].tolist(), abs=1e-5), (transform, label)
    softmax = [build_reward(RewardSection(type="classifier", model=str(classifier_dir), label_index=i,
                                         transform="softmax")).score(PROMPTS, RESPONSES) for i in range(3)]
    assert [sum(col) for col in zip(*softmax)] == pytest.approx([1.0, 1.0, 1.0])


def test_classifier_prompt_response_pairs(classifier_dir: Path) -> None:
    from llmtune.rewards.base import prompt_text

    pairs = [(prompt_text(p), r) for p, r in zip(PROMPTS, RESPONSES)]
    logits = _reference_logits(classifier_dir, pairs)
    source = build_reward(RewardSection(type="classifier", model=str(classifier_dir), input="prompt_response",
                                        label_index=1))
    assert source.score(PROMPTS, RESPONSES) == pytest.approx(logits[:, 1].tolist(), abs=1e-5)
    alone = build_reward(RewardSection(type="classifier", model=str(classifier_dir), label_index=1))
    assert alone.score(PROMPTS, RESPONSES) != pytest.approx(logits[:, 1].tolist(), abs=1e-5)


def test_classifier_errors_name_the_key(classifier_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"reward\.label_index: 3 is out of range.*has 3 labels"):
        validate_reward({"type": "classifier", "model": str(classifier_dir), "label_index": 3})
    with pytest.raises(ConfigError, match=r"reward\.model: cannot load classifier"):
        validate_reward({"type": "classifier", "model": str(tmp_path)})


def test_reward_model_kind_dispatches_to_the_rm_scorer(tmp_path: Path) -> None:
    from llmtune.rewards.reward_model import RewardModelScorer

    source = build_reward(RewardSection(type="reward_model", model=str(make_classifier(tmp_path, 1))))
    assert isinstance(source, RewardModelScorer)
    scores = source.score(PROMPTS, RESPONSES)
    assert len(scores) == 3 and all(math.isfinite(x) for x in scores) and len(set(scores)) == 3


# --- judge --------------------------------------------------------------------------------------


class JudgeServer:
    """A tiny OpenAI-compatible /v1/chat/completions server whose answer depends on the response."""

    def __init__(self, answers: dict[str, str], fail_first: set[str] | None = None, always_status: int = 0):
        self.answers = answers
        self.fail_first = set(fail_first or ())
        self.always_status = always_status
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.auth.append(self.headers.get("Authorization"))
                text = body["messages"][0]["content"]
                key = next((k for k in server.answers if f"<{k}>" in text), "")
                if server.always_status or key in server.fail_first:
                    server.fail_first.discard(key)
                    self._send(server.always_status or 500, {"error": {"message": "overloaded"}})
                    return
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": server.answers[key]}}]})

            def _send(self, status: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def judge_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("LLMTUNE_TEST_JUDGE_KEY", "sk-test-123")
    yield "LLMTUNE_TEST_JUDGE_KEY"


def test_parse_score_and_template_filling() -> None:
    assert parse_score("Score: 7/10", 0, 10) == 7.0
    assert parse_score("I'd say 8.5.", 0, 10) == 8.5
    assert parse_score("42", 0, 10) == 10.0 and parse_score("-3", 0, 10) == 0.0
    assert parse_score("excellent!", 0, 10) is None
    # A judge restating the scale is rated by its answer, not by the scale (issue 19).
    assert parse_score("on a scale of 1 to 10: 8", 0, 10) == 8.0
    assert parse_score("On a scale from 0 to 10, I rate it 7.", 0, 10) == 7.0
    assert parse_score("Rating (1-10): 6", 1, 10) == 6.0 and parse_score("I'd give it 8 out of 10", 0, 10) == 8.0
    assert parse_score("Between 1 and 5 I would say 4", 1, 5) == 4.0 and parse_score("7-8", 0, 10) == 7.0
    text = fill(DEFAULT_TEMPLATE, PROMPTS[1], "It is {response}-free", 1, 5)
    assert "from 1 to 5" in text and "User: Describe a {cat}." in text and "It is {response}-free" in text


@pytest.mark.slow
def test_judge_endpoint_scores_retries_and_fallbacks(judge_key: str) -> None:
    answers = {"good": "Score: 9", "bad": "2/10", "huge": "42", "weird": "I cannot rate this reply.", "flaky": "6"}
    responses = ["<good>", "<bad>", "<huge>", "<weird>", "<flaky>"]
    with JudgeServer(answers, fail_first={"flaky"}) as server:
        judge = build_reward(RewardSection(type="judge", endpoint=server.url, judge_model="grader-1",
                                           api_key_env=judge_key, fallback=-1.0, batch_size=3,
                                           template="Rate {response} for {prompt} from {min} to {max}"))
        scores = judge.score([PROMPTS[0]] * 5, responses)
    assert scores == [9.0, 2.0, 10.0, -1.0, 6.0]
    assert reward_stats(judge) == {"judge_calls": 5, "judge_fallbacks": 1, "judge_retries": 1}
    assert len(server.requests) == 6 and set(server.auth) == {"Bearer sk-test-123"}
    first = server.requests[0]
    assert first["model"] == "grader-1" and first["temperature"] == 0
    assert first["messages"][0]["content"].endswith("from 0 to 10")


@pytest.mark.slow
def test_judge_endpoint_errors_are_clear(judge_key: str) -> None:
    with JudgeServer({"": "5"}, always_status=503) as server:
        judge = build_reward(RewardSection(type="judge", endpoint=server.url, judge_model="m"))
        with pytest.raises(RewardError, match=r"still failing after 4 attempts: HTTP 503"):
            judge.score(PROMPTS[:1], ["x"])
    assert len(server.requests) == 4
    with JudgeServer({"": "5"}, always_status=401) as server:
        judge = build_reward(RewardSection(type="judge", endpoint=server.url, judge_model="m"))
        with pytest.raises(RewardError, match="answered HTTP 401"):
            judge.score(PROMPTS[:1], ["x"])
    assert len(server.requests) == 1
    with pytest.raises(ConfigError, match=r"reward\.api_key_env: environment variable NO_SUCH_KEY_VAR is not set"):
        validate_reward({"type": "judge", "endpoint": "http://127.0.0.1:9/v1", "judge_model": "m",
                         "api_key_env": "NO_SUCH_KEY_VAR"})
    with pytest.raises(ConfigError, match=r"reward\.template: must contain the \{response\}"):
        validate_reward({"type": "judge", "endpoint": "http://127.0.0.1:9/v1", "judge_model": "m",
                         "template": "Rate it"})


def test_judge_local_tiny_models_parse_or_fall_back() -> None:
    # A random-init judge answers gibberish: numbers in it are parsed and clamped, the rest falls back.
    llama = build_reward(RewardSection(type="judge", model="tiny-llama", fallback=-5.0, batch_size=2))
    answers = llama.answers(PROMPTS, RESPONSES)
    scores = llama.score(PROMPTS, RESPONSES)
    expected = [parse_score(a, 0.0, 10.0) for a in answers]
    assert scores == [-5.0 if e is None else e for e in expected]
    assert reward_stats(llama)["judge_fallbacks"] == expected.count(None)
    t5 = build_reward(RewardSection(type="judge", model="tiny-t5", fallback=-5.0))
    t5_answers = t5.answers(PROMPTS, RESPONSES)
    assert all(parse_score(a, 0, 10) is None for a in t5_answers)  # seq2seq path, no digits
    assert t5.score(PROMPTS, RESPONSES) == [-5.0] * 3
    assert reward_stats(t5) == {"judge_calls": 3, "judge_fallbacks": 3, "judge_retries": 0}
    with pytest.raises(ConfigError, match=r"reward\.model: .*unknown model 'tiny-lama'"):
        validate_reward({"type": "judge", "model": "tiny-lama"})


# --- mix ----------------------------------------------------------------------------------------


def _rule(function: str, **kw: Any) -> RewardSection:
    return RewardSection(type="rule", function=f"llmtune.rewards.rules:{function}", **kw)


def test_mix_weights_and_running_normalisation() -> None:
    length = _rule("target_length", kwargs={"target": 10})
    repeat = _rule("distinct_ngrams", kwargs={"n": 1}, weight=-2.0)
    a = target_length(None, RESPONSES[0], 10), target_length(None, RESPONSES[1], 10), target_length(None, RESPONSES[2], 10)
    d = distinct_ngrams(PROMPTS, RESPONSES, n=1)
    mix = build_reward(RewardSection(type="mix", components=[length, repeat]))
    assert mix.score(PROMPTS, RESPONSES) == pytest.approx([a[i] - 2.0 * d[i] for i in range(3)])

    normed = _rule("target_length", kwargs={"target": 10}, normalize=True, weight=0.5)
    mix = build_reward(RewardSection(type="mix", components=[normed, _rule("keyword_density", kwargs={"keywords": ["good"]})]))
    first = mix.score(PROMPTS, RESPONSES)
    mean = sum(a) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in a) / 2)
    assert first == pytest.approx([0.5 * (a[i] - mean) / std + [0, 0, 1][i] for i in range(3)])
    # The statistics run across calls: a second batch is standardised with all six values seen.
    second = mix.score(PROMPTS[:1] * 3, ["x" * 10] * 3)
    seen = list(a) + [1.0] * 3
    m6 = sum(seen) / 6
    s6 = math.sqrt(sum((x - m6) ** 2 for x in seen) / 5)
    assert second == pytest.approx([0.5 * (1.0 - m6) / s6] * 3)
    stats = reward_stats(mix)
    assert stats["0_rule/running_mean"] == pytest.approx(m6)


def test_mix_component_errors_carry_their_path() -> None:
    rule = {"type": "rule", "function": "llmtune.rewards.rules:target_length"}
    with pytest.raises(ConfigError, match=r"reward\.components\[1\]\.function: module .* has no attribute 'nope'"):
        validate_reward({"type": "mix", "components": [rule, {**rule, "function": "llmtune.rewards.rules:nope"}]})


def test_recipe_validation_of_reward_sections() -> None:
    base = {"stage": "rs", "model": {"name": "tiny-llama"}, "data": {"name": "demo"}}
    with pytest.raises(ConfigError, match=r"reward\.judge_model: required with `endpoint`"):
        recipe_from_dict({**base, "reward": {"type": "judge", "endpoint": "http://127.0.0.1:1/v1"}})
    with pytest.raises(ConfigError, match=r"reward\.input: 'prompt' is not one of"):
        recipe_from_dict({**base, "reward": {"type": "classifier", "model": "x", "input": "prompt"}})
    with pytest.raises(ConfigError, match=r"distributed\.strategy: stage rs samples and fine-tunes in one process"):
        recipe_from_dict({**base, "reward": {"type": "rule", "function": "llmtune.rewards.rules:target_length"},
                          "distributed": {"strategy": "ddp", "num_processes": 2}})
    recipe = recipe_from_dict({**base, "reward": {"type": "classifier", "model": "x", "input": "prompt_response"}})
    assert recipe.reward is not None and recipe.reward.input == "prompt_response"
