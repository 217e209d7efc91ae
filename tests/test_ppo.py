"""Online RL (stages ppo and rl) end to end on the built-in tiny models: real rollouts and updates for
ppo, grpo, rloo and reinforce_pp, one copy of the weights with LoRA, no critic for the critic-free
algorithms, checkpoints, exact resume, Ctrl-C, the quickstarts raising held-out accuracy on the
verifiable task, `llmtune eval policy`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT, run_cli

from llmtune.config.load import recipe_from_dict
from llmtune.errors import ConfigError
from llmtune.runs.rundir import RunDir, StopFlag
from llmtune.stages.common import Context
from llmtune.stages.rl import RLTrainer
from llmtune.train import seed_everything, train

# Two shared CPU cores: one thread each avoids oversubscription stalls (30x slower otherwise).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEP_KEYS = ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clipfrac",
             "approx_kl", "response_length", "samples_per_s", "tokens_per_s")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_recipe(model: str, finetuning: str, **ppo: Any) -> dict[str, Any]:
    """A PPO recipe small enough for a few seconds per step on a shared CPU."""
    return {
        "stage": "ppo",
        "model": {"name": model, "finetuning": finetuning, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"name": "demo", "max_length": 64, "num_samples": 40},
        "training": {"max_steps": 2, "learning_rate": 5e-3, "batch_size": 4, "logging_steps": 1, "save_steps": 100,
                     "seed": 7},
        "reward": {"type": "rule", "function": "llmtune.rewards.rules:char_fraction", "kwargs": {"chars": "aeiou"}},
        "ppo": {"rollout_batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "sample_every": 1,
                "generation": {"max_new_tokens": 6}, **ppo},
    }


def trainer_for(tmp_path: Path, data: dict[str, Any]) -> RLTrainer:
    run = RunDir(tmp_path / "run")
    run.start("", 7, "ppo", False)
    seed_everything(7)
    return RLTrainer(recipe_from_dict(data), Context(run=run, resume=False, stop=StopFlag()))


def finite_rows(run: Path, critic: bool = True) -> list[dict[str, Any]]:
    """The run's step rows; every step metric there and finite (value_loss exactly when there is a critic)."""
    rows = [r for r in RunDir(run).metrics() if r["step"] > 0]
    for row in rows:
        for key in STEP_KEYS:
            if key == "value_loss" and not critic:
                assert key not in row
                continue
            assert math.isfinite(row[key]), (key, row)
    return rows


@pytest.mark.parametrize("finetuning", ["lora", "full"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gptj", "tiny-t5"])
def test_ppo_trains_causal_and_seq2seq(tmp_path: Path, model: str, finetuning: str) -> None:
    trainer = trainer_for(tmp_path, small_recipe(model, finetuning))
    ac = trainer.unwrapped
    policy_params = sum(p.numel() for p in ac.policy.parameters())
    head_params = sum(p.numel() for p in ac.value_head.parameters())
    trainable = {k: v.detach().clone() for k, v in ac.named_parameters() if v.requires_grad}
    frozen = {k: v.detach().clone() for k, v in ac.named_parameters() if not v.requires_grad}
    if finetuning == "lora":
        # The reference is the policy with adapters disabled: no second model, one copy of the base.
        assert trainer.reference is None
        assert trainer.held_parameters() == policy_params + head_params
        assert frozen, "LoRA keeps the base weights frozen"
    else:
        assert trainer.reference is not None
        assert not any(p.requires_grad for p in trainer.reference.parameters())
        assert trainer.held_parameters() == 2 * policy_params + head_params
        reference = {k: v.detach().clone() for k, v in trainer.reference.named_parameters()}

    summary = trainer.train()

    assert summary["global_step"] == 2
    rows = finite_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4), "policy == reference before the first update"
    changed = [k for k, v in ac.named_parameters() if v.requires_grad and not torch.equal(v, trainable[k])]
    assert any("value_head" in k for k in changed) and any("value_head" not in k for k in changed)
    assert all(torch.equal(v, frozen[k]) for k, v in ac.named_parameters() if not v.requires_grad)
    if finetuning == "full":
        assert all(torch.equal(v, reference[k]) for k, v in trainer.reference.named_parameters())
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all({"prompt", "response", "reward"} <= set(s) for s in samples)
    assert (tmp_path / "run" / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from llmtune.modeling.load import load_for_inference

    loaded, tok, spec = load_for_inference(str(tmp_path / "run"))
    assert spec.kind == ("seq2seq" if model == "tiny-t5" else "causal")
    assert sum(p.numel() for p in loaded.parameters()) == policy_params


@pytest.mark.parametrize(("algorithm", "model", "finetuning"), [
    ("grpo", "tiny-t5", "lora"), ("rloo", "tiny-llama", "lora"), ("reinforce_pp", "tiny-gptj", "lora"),
    ("grpo", "tiny-llama", "full")])
def test_critic_free_algorithms_train_without_a_value_head(tmp_path: Path, algorithm: str, model: str,
                                                           finetuning: str) -> None:
    data = grpo_recipe(model, finetuning, algorithm=algorithm, cliprange_high=0.28)
    data["eval_reward"] = {"type": "rule", "function": "llmtune.rewards.rules:target_length", "kwargs": {"target": 5}}
    trainer = trainer_for(tmp_path, data)
    policy = trainer.unwrapped
    assert not any("value" in k for k, _ in policy.named_parameters()), "no critic is allocated"
    params = sum(p.numel() for p in policy.parameters())
    assert trainer.held_parameters() == (params if finetuning == "lora" else 2 * params)
    trainable = {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}
    assert trainer.train()["global_step"] == 2
    rows = finite_rows(tmp_path / "run", critic=False)
    assert all(math.isfinite(r["eval_reward_mean"]) and r["response_length"] > 0 for r in rows)
    assert any(not torch.equal(v, trainable[k]) for k, v in policy.named_parameters() if v.requires_grad)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "response", "reward", "eval_reward", "length", "kl", "advantage", "group"} <= set(samples[0])
    assert [s["group"] for s in samples if s["step"] == 1] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.slow
def test_separate_value_model(tmp_path: Path) -> None:
    data = small_recipe("tiny-llama", "lora", value_model="separate", value_model_path="tiny-t5")
    with pytest.raises(ConfigError, match="ppo.value_model_path: .* is a seq2seq model"):
        trainer_for(tmp_path, data)
    data["ppo"]["value_model_path"] = "tiny-llama"
    data["training"]["max_steps"] = 1
    trainer = trainer_for(tmp_path / "ok", data)
    ac = trainer.unwrapped
    assert ac.value_model is not None and trainer.reference is None
    critic = sum(p.numel() for p in ac.value_model.parameters())
    assert trainer.held_parameters() == sum(p.numel() for p in ac.policy.parameters()) + critic + 65
    before = {k: v.detach().clone() for k, v in ac.value_model.named_parameters() if v.requires_grad}
    trainer.train()
    finite_rows(tmp_path / "ok" / "run")
    assert any(not torch.equal(v, before[k]) for k, v in ac.value_model.named_parameters() if v.requires_grad)


@pytest.mark.slow
def test_reward_model_run_as_reward_and_critic_init(tmp_path: Path) -> None:
    rm = tmp_path / "rm"
    run_cli("train", "recipes/rm-gptj-hh.yaml", "model.name=tiny-gptj", "data.path=tests/fixtures/raw/hh",
            "training.max_steps=1", "training.gradient_checkpointing=false", "--output-dir", str(rm),
            env=ONE_THREAD, check=True)
    data = small_recipe("tiny-gptj", "lora", value_model="separate")
    data["reward"] = {"type": "reward_model", "model": str(rm)}
    data["training"]["max_steps"] = 1
    trainer = trainer_for(tmp_path, data)
    from safetensors.torch import load_file

    adapter = load_file(str(rm / "model" / "adapter_model.safetensors"))
    score = next(v for k, v in adapter.items() if k.endswith("score.weight"))
    # The critic starts from the reward model: its trunk and its trained score head.
    assert torch.equal(trainer.unwrapped.value_head.summary.weight.detach(), score)
    trainer.train()
    rows = finite_rows(tmp_path / "run")
    assert rows[0]["reward_mean"] != 0.0


@pytest.mark.parametrize("model", ["tiny-gptj", "tiny-t5"])
def test_rollouts_stop_at_stop_strings_and_end_tokens_and_mask_there(model: str) -> None:
    """A stop string (standing in for a hallucinated "\\n\\nHuman:" turn: here a piece of the answer the
    model gives without one) ends generation; the tokens and the mask end before it, so KL and the score
    land only on what the reward saw; and such a response has not ended by itself (no EOS), so
    missing_eos_penalty still applies."""
    import dataclasses

    from llmtune.config.schema import GenerationSection
    from llmtune.data.templates import ChatTemplate
    from llmtune.modeling.generate import sample
    from llmtune.modeling.load import load_for_inference

    policy, tok, spec = load_for_inference(model)
    free = dataclasses.replace(ChatTemplate.get(spec.template), stop=())
    prompt = [[{"role": "user", "content": "Hello there, how are you today?"}]]
    gen = GenerationSection(max_new_tokens=16, min_new_tokens=16, top_k=50)
    torch.manual_seed(3)
    whole = sample(policy, tok, free, spec.kind, prompt, gen, 64)
    ids = whole.response_ids[0][whole.response_mask[0].bool()].tolist()
    assert len(ids) == 16
    full = tok.decode(ids, skip_special_tokens=True)

    def text(upto: int) -> str:
        return tok.decode(ids[:upto], skip_special_tokens=True)

    # Two tokens from the middle of the answer, the first one visible, whose text first occurs right there.
    at, stop = next((i, tok.decode(ids[i:i + 2], skip_special_tokens=True)) for i in range(2, 14)
                    if text(i + 1) != text(i) and text(i + 2).startswith(text(i)) and (piece := text(i + 2)[len(text(i)):]).strip()
                    and "\ufffd" not in piece and full.find(piece) == len(text(i)))

    torch.manual_seed(3)  # the same sample, now with the stop string
    cut = sample(policy, tok, dataclasses.replace(free, stop=(stop,)), spec.kind, prompt, gen, 64)
    assert cut.response_ids.shape[1] < 16, "generation went on after the stop string"
    kept = cut.response_mask[0].sum().item()
    assert kept == max(at, 1) and cut.response_ids[0, :kept].tolist() == ids[:kept]
    assert (cut.response_ids[0, kept:] == tok.pad_token_id).all()
    assert cut.texts[0] == text(at).strip() and stop not in cut.texts[0]  # what the reward scores
    assert not cut.ended[0]


def test_deepspeed_is_refused_for_ppo_by_validate_and_plan(tmp_path: Path) -> None:
    """PPO's checkpoints and final save do not gather ZeRO-partitioned weights (ZeRO-3 would save empty
    ones): the recipe is refused up front, naming distributed.strategy, also when planned for GPUs."""
    from llmtune.config.schema import check, parse

    data = small_recipe("tiny-llama", "lora")
    data["distributed"] = {"strategy": "deepspeed", "num_processes": 2, "zero_stage": 3}
    with pytest.raises(ConfigError, match="distributed.strategy: stage ppo does not support deepspeed"):
        check(parse(data), device_checks=False)
    path = tmp_path / "ppo-ds.yaml"
    path.write_text(yaml.safe_dump(data))
    plan = run_cli("plan", str(path), "--gpu-memory", "80")
    assert plan.returncode == 2 and "stage ppo does not support deepspeed" in plan.stderr
    assert "Traceback" not in plan.stderr
    data["distributed"] = {"strategy": "ddp", "num_processes": 2}
    check(parse(data), device_checks=False)  # ddp is the way to scale PPO out


def test_batch_size_errors_name_the_key(tmp_path: Path) -> None:
    data = small_recipe("tiny-llama", "lora", mini_batch_size=3)
    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size: 3 must divide ppo.rollout_batch_size \(4\)"):
        trainer_for(tmp_path, data)
    data = small_recipe("tiny-llama", "lora")
    data["training"]["gradient_accumulation_steps"] = 4
    with pytest.raises(ConfigError, match="training.gradient_accumulation_steps"):
        trainer_for(tmp_path, data)


def grpo_recipe(model: str, finetuning: str, **rl: Any) -> dict[str, Any]:
    """The small recipe as stage rl, algorithm grpo: 2 prompts x 4 samples per step, one minibatch of 4."""
    data = small_recipe(model, finetuning)
    data["stage"] = "rl"
    data["rl"] = {**data.pop("ppo"), "algorithm": "grpo", "rollout_batch_size": 2, "num_generations": 4,
                  "mini_batch_size": 4, **rl}
    return data


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_resume_continues_exactly_from_the_saved_step(tmp_path: Path, algorithm: str) -> None:
    data = small_recipe("tiny-llama", "lora") if algorithm == "ppo" else grpo_recipe(
        "tiny-llama", "lora", adaptive_kl=True, target_kl=0.01, kl_horizon=10, ppo_epochs=2)
    # A constant LR: the schedule would otherwise depend on max_steps, which differs between the runs.
    data["training"].update(max_steps=4, save_steps=2, gradient_accumulation_steps=2, lr_scheduler="constant")
    whole = train(recipe_from_dict(data), tmp_path / "whole")
    assert whole["global_step"] == 4

    data["training"]["max_steps"] = 2
    first = train(recipe_from_dict(data), tmp_path / "split")
    assert first["global_step"] == 2 and (tmp_path / "split" / "checkpoints" / "checkpoint-2").is_dir()
    data["training"]["max_steps"] = 4
    resumed = train(recipe_from_dict(data), tmp_path / "split", resume=True)
    assert resumed["global_step"] == 4
    assert "resuming from" in (tmp_path / "split" / "train.log").read_text()

    critic = algorithm == "ppo"
    a, b = finite_rows(tmp_path / "whole", critic), finite_rows(tmp_path / "split", critic)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ("reward_mean", "kl", "policy_loss", "kl_coef", "entropy", "clipfrac", "approx_kl", "grad_norm",
            "value_loss" if algorithm == "ppo" else "zero_variance_groups")
    for ra, rb in zip(a, b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert a[-1]["kl"] > 0, "the policy moved"
    assert (a[-1]["kl_coef"] != a[0]["kl_coef"]) == (algorithm == "grpo"), "grpo's adaptive coefficient moved"
    # accelerate's save_state: the trainable weights only (adapters, value head), optimizer, RNG states, and the
    # registered scheduler, KL controller, reward statistics and step.
    ckpt = tmp_path / "split" / "checkpoints" / "checkpoint-4"
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= {p.name for p in ckpt.iterdir()}
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved and all("lora_" in k or "value_head" in k for k in saved)
    assert any("value_head" in k for k in saved) == (algorithm == "ppo")
    assert checkpointed(ckpt)["progress"] == {"step": 4}


def checkpointed(ckpt: Path) -> dict[str, Any]:
    """The objects the trainer registers with accelerate, in registration order."""
    names = ("scheduler", "kl_controller", "reward_stats", "progress")
    return {name: torch.load(ckpt / f"custom_checkpoint_{i}.pkl", weights_only=False) for i, name in enumerate(names)}


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path: Path) -> None:
    data = small_recipe("tiny-gptj", "lora", adaptive_kl=True, target_kl=1.0, kl_horizon=100)
    data["training"].update(max_steps=200)
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    env = {**os.environ, **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "train", str(recipe), "--output-dir", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ppo step 2/"):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(lines) + rest
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted"
    saved = RunDir(out).last_checkpoint()
    assert saved is not None
    step = int(saved.name.split("-")[-1])
    assert step >= 2
    assert checkpointed(saved)["kl_controller"]["value"] != 0.05, "the adaptive KL coefficient is part of the checkpoint"

    done = run_cli("train", str(recipe), f"training.max_steps={step + 2}", "--output-dir", str(out), "--resume",
                   env=ONE_THREAD, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1])["global_step"] == step + 2
    assert [r["step"] for r in RunDir(out).metrics()] == list(range(1, step + 3))
    assert (out / "model" / "adapter_config.json").exists()


def run_quickstart(recipe: str, out: Path, *overrides: str) -> dict[str, Path]:
    """A quickstart pipeline (SFT on the arithmetic task, then online RL on top of it), as a user runs it."""
    proc = run_cli("train", recipe, *overrides, "--output-dir", str(out), env=ONE_THREAD, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "completed"
    return {p.name: p for p in out.iterdir() if p.is_dir()}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ppo-quickstart")
    runs = run_quickstart("recipes/ppo-quickstart.yaml", base)
    again = run_cli("train", "recipes/ppo-quickstart.yaml", "--output-dir", str(base), env=ONE_THREAD, check=True)
    assert "already completed" in again.stderr  # finished stages are skipped
    return runs


def heldout(run: Path) -> list[float]:
    """Held-out accuracy on the test split (greedy answers, scored by the checker): before RL, then every
    eval_steps and at the end."""
    return [r["heldout_reward_mean"] for r in RunDir(run).metrics() if "heldout_reward_mean" in r]


def assert_learns_the_task(run: Path, critic: bool) -> None:
    """The quickstart's promise: held-out accuracy clearly above where RL started (100 test problems, 0.1
    is more than two standard errors at these accuracies), not only the training reward."""
    rows = finite_rows(run, critic)
    accuracy = heldout(run)
    assert len(accuracy) == 4 and rows[-1]["heldout_n"] == 100
    assert accuracy[-1] > accuracy[0] + 0.1, accuracy
    tenth = len(rows) // 10
    first = sum(r["reward_mean"] for r in rows[:tenth]) / tenth
    last = sum(r["reward_mean"] for r in rows[-tenth:]) / tenth
    assert last > first + 0.1, (first, last)
    assert max(r["kl"] for r in rows) < 20
    assert (run / "reward_curve.png").exists() and (run / "model" / "llmtune.json").exists()


@pytest.mark.slow
def test_ppo_quickstart_raises_heldout_accuracy(quickstart: dict[str, Path]) -> None:
    assert_learns_the_task(quickstart["ppo"], critic=True)
    assert all(r["samples_per_s"] > 0 and r["kl_coef"] == 0.05 for r in finite_rows(quickstart["ppo"]))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_grpo_quickstart_raises_heldout_accuracy(tmp_path: Path, model: str) -> None:
    runs = run_quickstart("recipes/grpo-quickstart.yaml", tmp_path / "q", f"stages.sft.model.name={model}")
    assert_learns_the_task(runs["grpo"], critic=False)
    samples = [json.loads(line) for line in (runs["grpo"] / "samples.jsonl").read_text().splitlines()]
    assert {"answer", "level", "reward", "length", "kl", "advantage"} <= set(samples[0])


@pytest.mark.slow
def test_eval_policy_compares_with_the_baseline(quickstart: dict[str, Path], tmp_path: Path) -> None:
    reward_file = tmp_path / "reward.yaml"
    reward_file.write_text(yaml.safe_dump({"reward": {"type": "rule", "function": "llmtune.rewards.rules:char_fraction",
                                                      "kwargs": {"chars": "="}}}))
    proc = run_cli("eval", "policy", "--model", str(quickstart["ppo"]), "--baseline", str(quickstart["sft"]),
                   "--prompts", "arithmetic", "--split", "test", "-n", "24", "--reward", str(reward_file),
                   "--max-new-tokens", "16", env=ONE_THREAD, check=True)
    result = json.loads(proc.stdout)
    assert result["n"] == 24 and result["wins"] + result["ties"] + result["losses"] == 24
    assert result["kl_model_baseline"] > 0
    same = run_cli("eval", "policy", "--model", str(quickstart["sft"]), "--baseline", str(quickstart["sft"]),
                   "--prompts", "arithmetic", "--split", "test", "-n", "4", "--reward",
                   "rule:llmtune.rewards.rules:char_fraction", env=ONE_THREAD, check=True)
    twin = json.loads(same.stdout)
    assert twin["ties"] == 4 and twin["kl_model_baseline"] == pytest.approx(0.0, abs=1e-4)


def test_eval_policy_bad_reward_source_is_a_clean_error(tmp_path: Path) -> None:
    proc = run_cli("eval", "policy", "--model", "tiny-llama", "--baseline", "tiny-llama", "--prompts", "demo",
                   "--reward", str(tmp_path / "missing"), env=ONE_THREAD)
    assert proc.returncode == 2
    assert "--reward" in proc.stderr and "Traceback" not in proc.stderr
