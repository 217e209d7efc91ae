"""`training.report_to` is honoured by the loops that are not a plain TRL trainer: online RL, rejection
sampling (accelerate's trackers, fed the rows of metrics.jsonl) and seq2seq DPO (transformers'
integrations); read back from the TensorBoard event files they write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmtune.config.load import recipe_from_dict
from llmtune.config.schema import check, parse
from llmtune.errors import ConfigError
from llmtune.runs.rundir import RunDir
from llmtune.train import train

pytestmark = pytest.mark.slow  # real runs writing tensorboard event files: the full suite

TB = ["tensorboard"]


def scalars(root: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file under ROOT: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(root.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event files under {root}"
    out: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_online_rl_logs_every_metrics_row_to_tensorboard(tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "stage": "rl", "model": {"name": "tiny-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"name": "arithmetic", "num_samples": 8, "max_length": 64},
        "training": {"max_steps": 2, "logging_steps": 1, "report_to": TB},
        "reward": {"type": "rule", "function": "llmtune.rewards.rules:numeric_answer"},
        "eval_reward": {"type": "rule", "function": "llmtune.rewards.rules:char_fraction"},
        "rl": {"algorithm": "rloo", "rollout_batch_size": 2, "num_generations": 2, "generation": {"max_new_tokens": 4}},
    }
    train(recipe_from_dict(data), tmp_path / "run")
    rows = RunDir(tmp_path / "run").metrics()
    logged = scalars(tmp_path / "run" / "logs")
    for key in ("reward_mean", "eval_reward_mean", "kl", "response_length", "samples_per_s"):
        assert logged[key] == pytest.approx({r["step"]: r[key] for r in rows}, rel=1e-5), key


def test_rejection_sampling_rounds_and_their_training_reach_tensorboard(tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "stage": "rs", "model": {"name": "tiny-llama", "lora": {"r": 4, "alpha": 8}},
        "data": {"name": "demo", "num_samples": 4, "max_length": 64, "max_prompt_length": 32},
        "reward": {"type": "rule", "function": "llmtune.rewards.rules:target_length", "kwargs": {"target": 20}},
        "rs": {"iterations": 2, "num_samples": 2, "generation": {"max_new_tokens": 6}},
        "training": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "report_to": TB},
    }
    train(recipe_from_dict(data), tmp_path / "run")
    rows = RunDir(tmp_path / "run").metrics()
    logged = scalars(tmp_path / "run" / "logs")
    # the round statistics at the step each round starts from, and the rounds' fine-tuning on one step axis
    assert logged["reward_best_mean"] == pytest.approx({r["step"]: r["reward_best_mean"] for r in rows
                                                        if "reward_best_mean" in r})
    assert logged["loss"] == pytest.approx({r["step"]: r["loss"] for r in rows if "loss" in r})
    assert sorted(logged["loss"]) == [1, 2, 3, 4]
    assert not list((tmp_path / "run" / "rs").rglob("events.out.tfevents.*"))


def test_seq2seq_dpo_logs_to_tensorboard(tmp_path: Path) -> None:
    hh = str(Path(__file__).resolve().parent / "fixtures" / "raw" / "hh")
    data: dict[str, Any] = {
        "stage": "dpo", "model": {"name": "tiny-t5", "lora": {"r": 4, "alpha": 8}},
        "data": {"name": "hh", "path": hh, "max_length": 64},
        "training": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "report_to": TB},
    }
    train(recipe_from_dict(data), tmp_path / "run")
    logged = scalars(tmp_path / "run")
    rows = [r for r in RunDir(tmp_path / "run").metrics() if "rewards/margins" in r]
    assert logged["train/rewards/margins"] == pytest.approx({r["step"]: r["rewards/margins"] for r in rows})


def test_unknown_or_missing_trackers_are_recipe_errors() -> None:
    base = {"stage": "rl", "model": {"name": "tiny-llama"}, "data": {"name": "arithmetic"},
            "reward": {"type": "rule", "function": "llmtune.rewards.rules:numeric_answer"},
            "rl": {"algorithm": "grpo"}}
    with pytest.raises(ConfigError, match=r"training.report_to: 'tensorbord' is not a tracker .*tensorboard"):
        check(parse({**base, "training": {"report_to": ["tensorbord"]}}))
    with pytest.raises(ConfigError, match=r"training.report_to: aim is not installed \(pip install aim\)"):
        check(parse({**base, "training": {"report_to": ["aim"]}}))
