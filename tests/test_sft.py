"""SFT end to end on the tiny models (real steps, real files), the quickstart, and interrupt/resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from llmtune.config.load import load_recipe
from llmtune.data.templates import ChatTemplate, encode_sft_causal
from llmtune.train import train

FIXTURES = ROOT / "tests" / "fixtures" / "raw"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gptj", "tiny-t5"])
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_sft_trains_saves_reloads_and_generates(tmp_path: Path, model: str, finetuning: str) -> None:
    recipe = load_recipe(ROOT / "recipes" / "sft-tiny.yaml", [
        f"model.name={model}", f"model.finetuning={finetuning}", "training.max_steps=4", "training.logging_steps=1",
        "training.batch_size=4", "data.num_samples=40", "data.eval_fraction=0.25"])
    summary = train(recipe, tmp_path / "run")
    assert summary["status"] == "completed" and summary["global_step"] == 4
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["seed"] == 42 and info["versions"]["transformers"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert any("eval_loss" in m for m in metrics)
    assert (run / "recipe.yaml").exists()
    saved = run / "model"
    assert (saved / ("adapter_config.json" if finetuning == "lora" else "config.json")).exists()
    assert json.loads((saved / "llmtune.json").read_text())["kind"] == ("seq2seq" if model == "tiny-t5" else "causal")

    # Reload with plain transformers / peft (no llmtune) and generate.
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    auto = AutoModelForSeq2SeqLM if model == "tiny-t5" else AutoModelForCausalLM
    if finetuning == "lora":
        from peft import PeftModel

        from llmtune.registry.tiny import materialize

        # The adapter names its base portably (the registry name), not by this machine's model store.
        base = json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == model and os.environ["LLMTUNE_HOME"] not in (saved / "README.md").read_text()
        loaded = PeftModel.from_pretrained(auto.from_pretrained(materialize(base)), saved)
    else:
        loaded = auto.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(saved)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = loaded.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > (0 if model == "tiny-t5" else ids["input_ids"].shape[1])


def test_saved_chat_template_matches_training_rendering(tmp_path: Path) -> None:
    """The Jinja template saved with the model renders exactly what training tokenised."""
    from transformers import AutoTokenizer

    from llmtune.registry.tiny import materialize

    tok = AutoTokenizer.from_pretrained(materialize("tiny-llama"))
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    for name in ("llama2", "hh", "plain", "flan"):
        template = ChatTemplate.get(name)
        tok.chat_template = template.to_jinja()
        rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert rendered == template.render_prompt(conv, tok.bos_token, tok.eos_token), name


def test_truncation_keeps_the_response(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from llmtune.registry.tiny import materialize

    tok = AutoTokenizer.from_pretrained(materialize("tiny-llama"))
    history = [{"role": "user", "content": "long history " * 200}]
    messages = history + [{"role": "assistant", "content": "The final answer is forty two."}]
    enc = encode_sft_causal(tok, ChatTemplate.get("llama2"), messages, max_length=64)
    assert len(enc["input_ids"]) == 64
    trained = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100])
    assert "The final answer is forty two." in trained
    assert enc["input_ids"][0] == tok.bos_token_id  # BOS survives the left trim


def test_trl_trainers_checkpoint_gradients_only_when_the_recipe_says(tmp_path: Path) -> None:
    """TRL's configs default to gradient checkpointing on (a third slower); the recipe's default is off."""
    from trl import DPOConfig, SFTConfig

    from llmtune.runs.rundir import RunDir, StopFlag
    from llmtune.stages.common import Context, training_args

    ctx = Context(run=RunDir(tmp_path), resume=False, stop=StopFlag())
    for cls in (SFTConfig, DPOConfig):
        off = load_recipe(ROOT / "recipes" / "sft-tiny.yaml")
        assert training_args(off, ctx, cls, False).activation_checkpointing is False
        on = load_recipe(ROOT / "recipes" / "sft-tiny.yaml", ["training.gradient_checkpointing=true"])
        assert training_args(on, ctx, cls, False).activation_checkpointing is True


@pytest.mark.slow
def test_tiny_sft_loss_falls(tmp_path: Path) -> None:
    proc = run_cli("train", "recipes/sft-tiny.yaml", "--output-dir", str(tmp_path / "qs"), check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed"
    losses = [m["loss"] for m in map(json.loads, (tmp_path / "qs" / "metrics.jsonl").read_text().splitlines())
              if "loss" in m]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert (tmp_path / "qs" / "model" / "model.safetensors").exists()
    assert "step " in proc.stdout  # one clean line per log when not a terminal


@pytest.mark.slow
def test_interrupt_saves_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["recipes/sft-tiny.yaml", "training.max_steps=400", "training.logging_steps=1",
            "training.save_steps=1000", "data.max_length=64", "--output-dir", str(run)]
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out  # 128 + SIGTERM, as a shell reports it
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted", info
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "an interrupted run must leave a checkpoint"
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 5 <= stopped_at < 400
    assert not (run / "model").exists()

    again = run_cli("train", "recipes/sft-tiny.yaml", "--output-dir", str(run))
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently overwritten

    resumed = run_cli("train", *args[:-2], "training.max_steps=" + str(stopped_at + 6), "--output-dir", str(run),
                      "--resume", check=True)
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["global_step"] == stopped_at + 6
    steps = [m["step"] for m in map(json.loads, metrics.read_text().splitlines()) if "loss" in m]
    assert steps == sorted(steps) and steps[-1] == stopped_at + 6
    assert len(steps) == len(set(steps))  # no step logged twice across the resume
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed"] == 1


def test_data_preview_converts_the_whole_hh_sample() -> None:
    """Acceptance: all 1,800 real HH rows convert and prompt + chosen reproduces the transcript."""
    import gzip

    from llmtune.data.converters import render_hh

    sample = ROOT.parent / "shared" / "data" / "hh-harmless-sample.jsonl.gz"
    if not sample.exists():
        pytest.skip(f"shared HH sample not present at {sample}")
    proc = run_cli("data", "preview", "hh", "--path", str(sample), "-n", "0", check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout holds JSON lines only
    raw = [json.loads(line) for line in gzip.open(sample, "rt")]
    assert len(rows) == len(raw) == 1800
    for row, original in zip(rows, raw):
        assert render_hh(row["prompt"] + row["chosen"]) == original["chosen"]
        assert render_hh(row["prompt"] + row["rejected"]) == original["rejected"]
