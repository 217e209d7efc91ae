"""stage: rs end to end on tiny models with rule rewards: per-round files, best-of-n selection checked
against samples.jsonl, threshold/percentile filtering, a real Ctrl-C + resume, saved models reload."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli

from llmtune.config.load import recipe_from_dict
from llmtune.config.schema import GenerationSection, RsSection
from llmtune.data.templates import ChatTemplate
from llmtune.errors import LLMTuneError
from llmtune.modeling.generate import generate
from llmtune.modeling.load import load_for_inference, load_for_training
from llmtune.rewards.rules import target_length
from llmtune.stages.rs import restore, score_stats, select
from llmtune.train import train

_SENT_SIGINT: list[bool] = []


def length_with_ctrl_c(prompt: list[dict[str, str]], response: str) -> float:
    """Scores like target_length(20 chars), but presses Ctrl-C (a real SIGINT) on its first call."""
    if not _SENT_SIGINT:
        _SENT_SIGINT.append(True)
        os.kill(os.getpid(), signal.SIGINT)
    return target_length(prompt, response, target=20)


def recipe(model: str, finetuning: str, reward: dict[str, Any], **rs: Any) -> dict[str, Any]:
    return {
        "stage": "rs",
        "model": {"name": model, "finetuning": finetuning, "lora": {"r": 4, "alpha": 8}},
        "data": {"name": "demo", "num_samples": 8, "max_length": 64, "max_prompt_length": 32},
        "reward": reward,
        "rs": {"iterations": 2, "num_samples": 3, "generation": {"max_new_tokens": 8, "top_k": 50}, **rs},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 1000},
    }


LENGTH = {"type": "rule", "function": "llmtune.rewards.rules:target_length", "kwargs": {"target": 20}}


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_round(run: Path, k: int, n_prompts: int, n_samples: int) -> tuple[list[dict], list[dict], float]:
    """samples.jsonl holds every response with its real score; kept.jsonl is the argmax per prompt."""
    samples = jsonl(run / f"rs/round-{k}/samples.jsonl")
    kept = jsonl(run / f"rs/round-{k}/kept.jsonl")
    assert [s["index"] for s in samples] == list(range(n_prompts))
    for s in samples:
        assert len(s["responses"]) == len(s["scores"]) == n_samples
        assert s["scores"] == [target_length(s["prompt"], r, target=20) for r in s["responses"]]
    by_index = {s["index"]: s for s in samples}
    for row in kept:
        s = by_index[row["index"]]
        best = int(np.argmax(s["scores"]))
        assert row["prompt"] == s["prompt"] and row["response"] == s["responses"][best]
        assert row["score"] == max(s["scores"])
    info = json.loads((run / f"rs/round-{k}/done.json").read_text())
    assert info["kept"] == len(kept) and info["round"] == k
    return samples, kept, info["threshold_used"]


def round_metrics(run: Path) -> list[dict[str, Any]]:
    return [r for r in jsonl(run / "metrics.jsonl") if "reward_mean" in r]


@pytest.mark.slow
def test_rs_tiny_llama_lora_rounds_and_extension(tmp_path: Path) -> None:
    run = tmp_path / "rs-llama"
    r = recipe_from_dict(recipe("tiny-llama", "lora", LENGTH))
    result = train(r, run)
    assert result["status"] == "completed" and result["prompts"] == 8 and result["global_step"] == 4
    for k in (1, 2):
        samples, kept, bar = check_round(run, k, 8, 3)
        assert len(kept) == 8 and bar == min(max(s["scores"]) for s in samples)  # no filter: every prompt
        assert (run / f"rs/round-{k}/model/adapter_config.json").exists()  # LoRA: every round kept
        assert not (run / f"rs/round-{k}/checkpoints").exists()
    metrics = round_metrics(run)
    assert [(m["round"], m["step"], m["kept"]) for m in metrics] == [(1, 0, 8), (2, 2, 8)]
    assert {"reward_best_mean", "threshold_used"} <= metrics[0].keys()
    train_rows = [m for m in jsonl(run / "metrics.jsonl") if "loss" in m]
    assert [(m["round"], m["step"]) for m in train_rows] == [(1, 1), (1, 2), (2, 3), (2, 4)]

    model, tok, spec = load_for_inference(str(run))
    assert spec.adapter and json.loads((run / "model/llmtune.json").read_text())["stage"] == "rs"
    out = generate(model, tok, ChatTemplate.get(spec.template), spec.kind or "causal",
                   [[{"role": "user", "content": "Hi"}]], GenerationSection(max_new_tokens=4, do_sample=False))
    assert len(out) == 1 and isinstance(out[0][0], str)

    # Resume with more iterations: finished rounds are not redone, round 3 starts from round 2's policy.
    before = {k: (run / f"rs/round-{k}/samples.jsonl").read_bytes() for k in (1, 2)}
    r3 = recipe_from_dict(recipe("tiny-llama", "lora", LENGTH, iterations=3))
    assert train(r3, run, resume=True)["global_step"] == 6
    assert all((run / f"rs/round-{k}/samples.jsonl").read_bytes() == b for k, b in before.items())
    check_round(run, 3, 8, 3)
    assert [(m["round"], m["step"]) for m in round_metrics(run)] == [(1, 0), (2, 2), (3, 4)]

    # restore() puts a round's adapter back into a freshly loaded policy.
    from peft import get_peft_model_state_dict, load_peft_weights

    fresh, _, _ = load_for_training(r3)
    saved = load_peft_weights(str(run / "rs/round-2/model"))
    assert any(not torch.equal(v, saved[k]) for k, v in get_peft_model_state_dict(fresh).items())
    restore(fresh, run / "rs/round-2/model")
    assert all(torch.equal(v, saved[k]) for k, v in get_peft_model_state_dict(fresh).items())


@pytest.mark.slow
def test_rs_tiny_t5_full_rising_percentile(tmp_path: Path) -> None:
    run = tmp_path / "rs-t5"
    r = recipe_from_dict(recipe("tiny-t5", "full", LENGTH, percentile=40, percentile_step=30, threshold=-0.95))
    assert train(r, run)["status"] == "completed"
    for k, pct in ((1, 40.0), (2, 70.0)):
        samples, kept, bar = check_round(run, k, 8, 3)
        best = [max(s["scores"]) for s in samples]
        assert bar == pytest.approx(max(-0.95, float(np.percentile(best, pct))))
        assert {row["index"] for row in kept} == {s["index"] for s, b in zip(samples, best) if b >= bar}
        assert 0 < len(kept) < 8 or len(set(best)) == 1
    assert [m["percentile_used"] for m in round_metrics(run)] == [40.0, 70.0]
    assert not (run / "rs/round-1/model").exists()  # full weights: only the latest round is kept
    model, tok, spec = load_for_inference(str(run))
    assert spec.kind == "seq2seq" and not spec.adapter
    final = {k: v for k, v in model.state_dict().items()}
    fresh, _, _ = load_for_training(r)
    restore(fresh, run / "rs/round-2/model")
    assert all(torch.equal(v.cpu(), final[k].cpu()) for k, v in fresh.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize(("model", "finetuning"), [("tiny-llama", "full"), ("tiny-gptj", "lora"), ("tiny-t5", "lora")])
def test_rs_other_architectures_and_methods(tmp_path: Path, model: str, finetuning: str) -> None:
    """The rest of the model x method grid: one round, best-of-n kept, saved, reloads and generates."""
    run = tmp_path / "rs"
    r = recipe_from_dict(recipe(model, finetuning, LENGTH, iterations=1))
    assert train(r, run)["status"] == "completed"
    _, kept, _ = check_round(run, 1, 8, 3)
    assert len(kept) == 8
    loaded, tok, spec = load_for_inference(str(run))
    assert bool(spec.adapter) == (finetuning == "lora")
    out = generate(loaded, tok, ChatTemplate.get(spec.template), spec.kind or "causal",
                   [[{"role": "user", "content": "Hi"}]], GenerationSection(max_new_tokens=4, do_sample=False))
    assert isinstance(out[0][0], str)


def test_select_threshold_and_percentile() -> None:
    samples = [{"index": i, "prompt": [], "responses": ["a", "b"], "scores": s}
               for i, s in enumerate([[0.1, 0.9], [0.5, 0.2], [0.3, 0.3], [-1.0, 0.0]])]
    kept, bar, pct = select(samples, RsSection(), 1)
    assert bar == 0.0 and pct is None and [(r["index"], r["response"]) for r in kept] == [
        (0, "b"), (1, "a"), (2, "a"), (3, "b")]
    kept, bar, _ = select(samples, RsSection(threshold=0.4), 1)
    assert bar == 0.4 and [r["index"] for r in kept] == [0, 1]
    kept, bar, pct = select(samples, RsSection(percentile=50, percentile_step=25), 2)
    assert pct == 75 and bar == pytest.approx(np.percentile([0.9, 0.5, 0.3, 0.0], 75))
    assert [r["index"] for r in kept] == [0]
    kept, bar, _ = select(samples, RsSection(threshold=2.0, percentile=10), 1)
    assert bar == 2.0 and kept == []


def test_nonfinite_scores_are_dropped_and_counted() -> None:
    """One NaN must not make the bar NaN (keeping nothing) nor be picked as the best response."""
    nan, inf = float("nan"), float("inf")
    samples = [{"index": i, "prompt": [], "responses": ["a", "b"], "scores": s}
               for i, s in enumerate([[nan, 0.2], [0.5, inf], [nan, nan], [0.1, 0.3]])]
    kept, bar, pct = select(samples, RsSection(percentile=0), 1)
    assert math.isfinite(bar) and bar == pytest.approx(0.2)
    assert [(r["index"], r["response"], r["score"]) for r in kept] == [(0, "b", 0.2), (1, "a", 0.5), (3, "b", 0.3)]
    stats = score_stats(samples)
    assert stats["nonfinite_scores"] == 4
    assert stats["reward_mean"] == pytest.approx((0.2 + 0.5 + 0.1 + 0.3) / 4)
    assert stats["reward_best_mean"] == pytest.approx((0.2 + 0.5 + 0.3) / 3)
    with pytest.raises(LLMTuneError, match="every score of round 2 is NaN or infinite"):
        select([{"index": 0, "prompt": [], "responses": ["a"], "scores": [nan]}], RsSection(), 2)


@pytest.mark.slow
def test_rs_ctrl_c_while_sampling_then_resume(tmp_path: Path) -> None:
    run = tmp_path / "rs-stop"
    reward = {"type": "rule", "function": f"{__name__}:length_with_ctrl_c"}
    r = recipe_from_dict(recipe("tiny-llama", "full", reward, iterations=1))
    assert train(r, run)["status"] == "interrupted"
    partial = jsonl(run / "rs/round-1/samples.jsonl")
    assert [s["index"] for s in partial] == [0, 1, 2, 3]  # one generation batch, then a clean stop
    assert not (run / "rs/round-1/kept.jsonl").exists() and not (run / "model").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    with (run / "rs/round-1/samples.jsonl").open("a") as fh:
        fh.write('{"index": 4, "prompt": [{"ro')  # a line cut by a crash: dropped on resume
    assert train(r, run, resume=True)["status"] == "completed"
    samples, kept, _ = check_round(run, 1, 8, 3)
    assert samples[:4] == partial and len(kept) == 8
    assert (run / "model/model.safetensors").exists()


@pytest.mark.slow
def test_rs_interrupt_while_training_then_resume(tmp_path: Path) -> None:
    run = tmp_path / "rs-term"
    args = ["recipes/rs-quickstart.yaml", "data.num_samples=8", "rs.iterations=2", "rs.num_samples=2",
            "rs.generation.max_new_tokens=8", "training.max_steps=400", "training.logging_steps=1",
            "training.save_steps=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "train", *args, "--output-dir", str(run)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and sum("loss" in r for r in metrics.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out
    checkpoints = sorted((run / "rs/round-1/checkpoints").glob("checkpoint-*"))
    assert checkpoints and not (run / "rs/round-1/done.json").exists()
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    samples = (run / "rs/round-1/samples.jsonl").read_bytes()

    resumed = run_cli("train", *args[:-3], f"training.max_steps={stopped_at + 3}", "training.logging_steps=1",
                      "training.save_steps=1000", "--output-dir", str(run), "--resume", check=True)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["global_step"] == 2 * (stopped_at + 3)
    assert (run / "rs/round-1/samples.jsonl").read_bytes() == samples  # round 1 was not sampled again
    rows = jsonl(metrics)
    steps = [m["step"] for m in rows if "loss" in m]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice
    assert [m["step"] for m in rows if "loss" in m and m["round"] == 1][-1] == stopped_at + 3
    assert [m["round"] for m in round_metrics(run)] == [1, 2]
    assert (run / "model/model.safetensors").exists()


def test_rs_recipes_validate(root: Path) -> None:
    proc = run_cli("validate", "recipes/rs-quickstart.yaml", "recipes/rs-llama2-hh.yaml", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "ok: recipes/rs-quickstart.yaml (stage rs" in proc.stdout
    bad = run_cli("validate", "recipes/rs-quickstart.yaml", "--set", "reward.function=llmtune.rewards.rules",
                  cwd=root)
    assert bad.returncode == 2 and "reward.function: expected 'package.module:function'" in bad.stderr
