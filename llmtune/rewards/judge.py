"""`type: judge` — an instruction-tuned LLM rates each response (RLAIF).

Two backends behind one prompt and one parser:
  - `endpoint`: an OpenAI-compatible server (vLLM, TGI, llama.cpp, OpenAI...): POST
    `<endpoint>/chat/completions` with `judge_model`, the key from env var `api_key_env`, greedy,
    `batch_size` requests in flight; 429/5xx and connection errors are retried with backoff.
  - `model`: a local model (registry name, run dir, path) loaded with `load_for_inference`,
    greedy generation through `llmtune.modeling.generate`.

The answer's rating is the score, clamped to `score_range` (`parse_score`: "7/10" and "7 out of 10"
give 7, a restated scale such as "on a scale of 1 to 10: 8" is skipped, else the first number
counts). An answer without a number is
not fatal: it scores `fallback` and is counted (`stats()` → fallbacks), because one odd answer
in thousands must not kill a long run. An endpoint still failing after the retries is an error.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from llmtune.config.schema import GenerationSection, RewardSection
from llmtune.errors import ConfigError
from llmtune.rewards.base import Message, RewardError, check_pairs, prompt_text

DEFAULT_TEMPLATE = """\
You are grading the reply of an AI assistant. Rate how helpful, honest and harmless the reply is \
on a scale from {min} to {max}, where {min} means useless or harmful and {max} means excellent.

Conversation:
{prompt}

Reply to grade:
{response}

Answer with the number only."""

MAX_NEW_TOKENS = 32  # a rating, not an essay: longer answers are cut
ATTEMPTS = 4
BACKOFF_S = 0.5  # doubled after each failed attempt: 0.5, 1, 2 s
TIMEOUT_S = 60.0
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_N = r"[-+]?\d+(?:\.\d+)?"
_NUMBER = re.compile(_N)
# A judge restating the scale: "on a scale of 1 to 10", "(from 0 to 10)", "between 1 and 5".
_SCALE = re.compile(rf"(?:scale|range)\s+(?:of|from)?\s*{_N}\s*(?:to|-|–)\s*{_N}|between\s+{_N}\s+and\s+{_N}"
                    rf"|from\s+{_N}\s+to\s+{_N}", re.IGNORECASE)
_OUT_OF = re.compile(rf"({_N})\s*(?:/|out\s+of)\s*{_N}", re.IGNORECASE)  # "7/10", "7 out of 10"
_FIELD = re.compile(r"\{(prompt|response|min|max)\}")


def parse_score(answer: str, low: float, high: float) -> float | None:
    """The rating in a judge's answer clamped to [low, high]; None when there is none.

    The scale itself is skipped where the answer restates it ("on a scale of 1 to 10: 8", "a 1-10
    scale", with the asked maximum), a fraction gives its numerator ("7/10"), else the first
    number counts."""
    text = _SCALE.sub(" ", answer)
    text = re.sub(rf"(?<![\d.]){_N}\s*(?:-|–|to)\s*{re.escape(f'{high:g}')}(?![\d.])", " ", text)
    match = _OUT_OF.search(text) or _NUMBER.search(text)
    if match is None:
        return None
    return min(high, max(low, float(match.group(1) if match.re is _OUT_OF else match.group())))


def fill(template: str, prompt: list[Message], response: str, low: float, high: float) -> str:
    """One pass over the placeholders, so braces or '{response}' inside user text stay literal."""
    values = {"prompt": prompt_text(prompt), "response": response, "min": f"{low:g}", "max": f"{high:g}"}
    return _FIELD.sub(lambda m: values[m.group(1)], template)


class EndpointBackend:
    """Chat completions over HTTP with retries; `batch_size` requests in parallel."""

    def __init__(self, section: RewardSection, where: str):
        self.url = (section.endpoint or "").rstrip("/") + "/chat/completions"
        self.model = section.judge_model
        self.headers = {"Content-Type": "application/json"}
        if section.api_key_env:  # the schema checked it is set
            self.headers["Authorization"] = f"Bearer {os.environ[section.api_key_env]}"
        self.workers = section.batch_size
        self.retries = 0
        self._lock = threading.Lock()

    def complete(self, texts: list[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._ask, texts))

    def _ask(self, text: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": text}],
                           "temperature": 0, "max_tokens": MAX_NEW_TOKENS}).encode()
        problem = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                with self._lock:
                    self.retries += 1
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code} {exc.read()[:300].decode(errors='replace')}"
                if exc.code in RETRY_STATUS:
                    continue
                raise RewardError(f"judge endpoint {self.url} answered {problem}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                problem = str(getattr(exc, "reason", exc))
                continue
            try:
                return json.loads(raw)["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise RewardError(f"judge endpoint {self.url} returned no chat completion: "
                                  f"{raw[:300].decode(errors='replace')}") from None
        raise RewardError(f"judge endpoint {self.url} still failing after {ATTEMPTS} attempts: {problem}")


class LocalBackend:
    """A local causal or seq2seq model answering greedily."""

    def __init__(self, section: RewardSection, where: str):
        from llmtune.data.templates import ChatTemplate
        from llmtune.modeling.load import load_for_inference

        try:
            self.model, self.tok, spec = load_for_inference(section.model or "")
        except ConfigError as exc:  # a hub model that cannot be fetched: name the key
            raise ConfigError(f"{where}.model: {exc}") from None
        self.kind = spec.kind
        self.template = ChatTemplate.get(spec.template)
        self.batch_size = section.batch_size
        self.max_length = section.max_length
        self.gen = GenerationSection(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)

    def complete(self, texts: list[str]) -> list[str]:
        from llmtune.modeling.generate import generate

        prompts = [[{"role": "user", "content": t}] for t in texts]
        outs = generate(self.model, self.tok, self.template, self.kind, prompts, self.gen,
                        max_prompt_length=self.max_length, batch_size=self.batch_size)
        return [o[0] for o in outs]


class JudgeReward:
    """Fill the rating prompt, ask the backend, parse the rating (or count a fallback)."""

    def __init__(self, section: RewardSection, where: str = "reward"):
        self.template = section.template or DEFAULT_TEMPLATE
        self.low, self.high = section.score_range
        self.fallback = section.fallback
        self.backend: EndpointBackend | LocalBackend = (
            EndpointBackend(section, where) if section.endpoint else LocalBackend(section, where))
        self.calls = 0
        self.fallbacks = 0

    def answers(self, prompts: list[list[Message]], responses: list[str]) -> list[str]:
        """The judge's raw answers (what `score` parses): useful to inspect a judge prompt."""
        check_pairs(prompts, responses)
        texts = [fill(self.template, p, r, self.low, self.high) for p, r in zip(prompts, responses)]
        return self.backend.complete(texts)

    def score(self, prompts: list[list[Message]], responses: list[str], **columns: list[Any]) -> list[float]:
        scores = []
        for answer in self.answers(prompts, responses):
            value = parse_score(answer, self.low, self.high)
            self.calls += 1
            if value is None:
                self.fallbacks += 1
                value = self.fallback
            scores.append(value)
        return scores

    def stats(self) -> dict[str, float]:
        return {"judge_calls": self.calls, "judge_fallbacks": self.fallbacks,
                "judge_retries": getattr(self.backend, "retries", 0)}
