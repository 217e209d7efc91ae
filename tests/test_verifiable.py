"""The verifiable task: the bundled `arithmetic` set (deterministic, disjoint splits, graded levels), its
checker `numeric_answer`, and dataset columns reaching reward functions as TRL passes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmtune.config.schema import RewardSection, check, parse
from llmtune.data.demo import make_arithmetic
from llmtune.data.load import load_rows
from llmtune.errors import ConfigError
from llmtune.rewards import RewardError, build_reward
from llmtune.rewards.rules import final_number, numeric_answer

SHIPPED = Path(make_arithmetic.__file__).with_name("arithmetic")


def test_shipped_splits_are_what_the_script_writes_and_disjoint(tmp_path: Path) -> None:
    make_arithmetic.write(tmp_path)
    for split, size in make_arithmetic.SPLITS.items():
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (SHIPPED / f"{split}.jsonl").read_bytes()
        rows = [json.loads(line) for line in (SHIPPED / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == size and {r["level"] for r in rows} == {1, 2, 3, 4}
    questions = {s: {json.loads(line)["messages"][0]["content"] for line in (SHIPPED / f"{s}.jsonl").read_text().splitlines()}
                 for s in make_arithmetic.SPLITS}
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["dev"]
    assert not questions["dev"] & questions["test"]
    for row in (json.loads(line) for line in (SHIPPED / "test.jsonl").read_text().splitlines()):
        # the worked answer is right: the checker accepts it
        assert numeric_answer(row["messages"][:1], row["messages"][1]["content"], row["answer"]) == 1.0


def test_registered_with_columns_and_a_level_filter() -> None:
    rows = load_rows("arithmetic", None, split="test", shape="prompt").rows
    assert len(rows) == 400 and set(rows[0]) == {"prompt", "answer", "level"}
    assert rows[0]["prompt"][-1]["role"] == "user"
    easy = load_rows("arithmetic", None, split="test", shape="prompt", options={"where": {"level": [1, 2]}})
    assert len(easy.rows) == 200 and {r["level"] for r in easy.rows} == {1, 2}
    assert easy.report.filtered == 200
    base = {"stage": "rl", "model": {"name": "tiny-llama"}, "reward": {"type": "rule",
                                                                     "function": "llmtune.rewards.rules:numeric_answer"}}
    with pytest.raises(ConfigError, match="data.options.where: option 'where' expects dict"):
        check(parse({**base, "data": {"name": "arithmetic", "options": {"where": [1]}}}))


@pytest.mark.parametrize(("response", "expected"), [
    ("3 + 4 = 7. The answer is 7.", 1.0), ("The answer is 7", 1.0), ("7", 1.0), ("It is 7.0", 1.0),
    ("7 apples, so 8", 0.0), ("The answer is seven.", 0.0), ("", 0.0), ("-7", 0.0)])
def test_numeric_answer_reads_the_last_number(response: str, expected: float) -> None:
    assert numeric_answer([], response, 7) == expected


def test_final_number_handles_separators() -> None:
    assert final_number("a total of 1,200 coins") == 1200.0
    assert final_number("-3 and 4.5") == 4.5
    assert final_number("none") is None


def rule(function: str, **kwargs: Any) -> Any:
    return build_reward(RewardSection(type="rule", function=function, kwargs=kwargs))


def test_columns_reach_rule_functions_by_name() -> None:
    prompts = [[{"role": "user", "content": "What is 3 + 4?"}]] * 2
    reward = rule("llmtune.rewards.rules:numeric_answer")
    assert reward.score(prompts, ["7", "8"], answer=[7, 7], level=[1, 1]) == [1.0, 0.0]
    # a column the function does not take is not passed; a recipe kwarg wins over a column of the same name
    assert rule("llmtune.rewards.rules:target_length", target=1).score(prompts, ["7", "88"], target=[5, 5]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"needs the dataset column\(s\) answer, which the prompt rows do not have "
                                          r"\(their columns: level\)"):
        reward.score(prompts, ["7", "8"], level=[1, 1])


def every_column(prompts: list, responses: list, **columns: Any) -> list[float]:
    """Batch form with **kwargs: receives every column, as lists aligned with the responses."""
    return [float(a) + float(b) for a, b in zip(columns["answer"], columns["level"])]


def test_batch_rule_with_kwargs_gets_every_column() -> None:
    reward = rule(f"{__name__}:every_column")
    assert reward.score([[], []], ["x", "y"], answer=[1, 2], level=[10, 20]) == [11.0, 22.0]
