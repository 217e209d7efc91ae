"""stage: dpo on tiny models: TRL DPOTrainer (causal) and our encoder-decoder trainer (seq2seq).

Real training steps on the hh fixture rows (Anthropic's raw format), real saves and reloads, a real
CLI subprocess. The reference-model checks look at every tensor the trainer holds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.config.load import load_recipe, recipe_from_dict
from llmtune.config.schema import GenerationSection
from llmtune.data.templates import ChatTemplate
from llmtune.errors import ConfigError
from llmtune.modeling.generate import generate
from llmtune.modeling.load import load_for_inference, load_tokenizer
from llmtune.registry.models import resolve_model
from llmtune.runs.rundir import RunDir, StopFlag
from llmtune.stages.common import Context, data_rows
from llmtune.stages.dpo import (
    REWARD_METRICS,
    adds_bos,
    build_trainer,
    fit_pair,
    render_causal_pair,
    reply_text,
)
from llmtune.stages.seq2seq_dpo import dpo_loss, encode_seq2seq_pair
from llmtune.train import train

REPO = Path(__file__).resolve().parents[1]
HH = str(REPO / "tests" / "fixtures" / "raw" / "hh")
ROWS = [
    {"prompt": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven."},
                {"role": "user", "content": "And a bigger one?"}],
     "chosen": [{"role": "assistant", "content": "Eleven is the next prime after seven."}],
     "rejected": [{"role": "assistant", "content": "Nine."}]},
]


def recipe(model: str, finetuning: str = "lora", loss_type: str = "sigmoid", **over: Any) -> Any:
    data = {"name": "hh", "path": HH, "max_length": 64, **over.pop("data", {})}
    training = {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "learning_rate": 5e-3, "save_steps": 100,
                **over.pop("training", {})}
    return recipe_from_dict({"stage": "dpo", "model": {"name": model, "finetuning": finetuning,
                                                       "lora": {"r": 4, "alpha": 8}},
                             "data": data, "dpo": {"loss_type": loss_type, **over.pop("dpo", {})},
                             "training": training, **over})


def context(path: Path) -> Context:
    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    return Context(run=run, resume=False, stop=StopFlag())


def held_parameters(trainer: Any) -> dict[int, torch.Tensor]:
    """Every distinct parameter tensor reachable from the trainer's (and its accelerator's) modules."""
    found: dict[int, torch.Tensor] = {}
    for owner in (trainer, trainer.accelerator):
        for value in vars(owner).values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, torch.nn.Module):
                    found.update({p.data_ptr(): p for p in item.parameters()})
    return found


def base_numel(name: str, seq2seq: bool = False) -> int:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(resolve_model(name).location())
    return numel({p.data_ptr(): p for p in model.parameters()})


def numel(params: dict[int, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


# --- pure pieces --------------------------------------------------------------------------------


def test_fit_pair_trims_prompt_from_left_keeping_bos_then_cuts_responses() -> None:
    prompt = [1] + list(range(100, 120))
    p, (c, r) = fit_pair(prompt, [list(range(10)), [7, 8]], max_length=16, max_prompt_length=8, bos_id=1)
    assert p == [1] + list(range(113, 120))
    assert c == list(range(8)) and r == [7, 8]
    p, (c, r) = fit_pair([5, 6], [[1, 2], [3]], max_length=16, max_prompt_length=8, bos_id=1)
    assert (p, c, r) == ([5, 6], [1, 2], [3])


def test_reply_text_continues_the_prompt_and_ends_at_eos() -> None:
    reply = [{"role": "assistant", "content": "Hi."}]
    assert reply_text(ChatTemplate.get("hh"), reply, "<s>", "</s>") == " Hi.</s>"
    assert reply_text(ChatTemplate.get("llama2"), reply, "<s>", "</s>") == " Hi. </s>"
    # `plain` puts a turn separator after EOS; a final reply stops at EOS.
    assert reply_text(ChatTemplate.get("plain"), reply, "<s>", "</s>") == "Hi.</s>"


def test_dpo_loss_formulas() -> None:
    c, r = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    lc, lr = torch.tensor([4, 2]), torch.tensor([2, 1])
    beta = 0.5
    delta = (c - rc) - (r - rr)  # [2, -1]
    sig = dpo_loss(c, r, rc, rr, lc, lr, beta, "sigmoid")
    assert torch.allclose(sig, -torch.nn.functional.logsigmoid(beta * delta))
    eps = 0.2
    robust = dpo_loss(c, r, rc, rr, lc, lr, beta, "sigmoid", eps)
    x = beta * delta
    expected = (-(1 - eps) * torch.log(torch.sigmoid(x)) + eps * torch.log(torch.sigmoid(-x))) / (1 - 2 * eps)
    assert torch.allclose(robust, expected)
    ipo = dpo_loss(c, r, rc, rr, lc, lr, beta, "ipo")
    d = (c - rc) / lc - (r - rr) / lr
    assert torch.allclose(ipo, (d - 1 / (2 * beta)) ** 2)
    hinge = dpo_loss(c, r, rc, rr, lc, lr, beta, "hinge")
    assert torch.allclose(hinge, torch.tensor([0.0, 1.5]))
    # At the start policy == reference: the closed-form initial losses the runs below check.
    zero = torch.zeros(1)
    assert dpo_loss(zero, zero, zero, zero, lc[:1], lr[:1], 0.1, "sigmoid", 0.1).item() == pytest.approx(math.log(2))
    assert dpo_loss(zero, zero, zero, zero, lc[:1], lr[:1], 0.1, "ipo").item() == pytest.approx(25.0)


def test_dpo_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"dpo\.label_smoothing: only loss_type sigmoid"):
        recipe("tiny-llama", loss_type="ipo", dpo={"label_smoothing": 0.1})
    with pytest.raises(ConfigError, match=r"data\.max_prompt_length: 64 leaves no room"):
        recipe("tiny-llama", data={"max_prompt_length": 64})
    with pytest.raises(ConfigError, match=r"dpo\.loss_type: 'kto' is not one of"):
        recipe("tiny-llama", loss_type="kto")


def test_bos_the_tokenizer_adds_itself_is_not_rendered_twice() -> None:
    tok = load_tokenizer(resolve_model("tiny-llama"))
    template = ChatTemplate.get("llama2")
    assert not adds_bos(tok)
    plain = render_causal_pair(tok, template, ROWS[0], 512, 256, strip_bos=False)
    assert plain["prompt"].startswith("<s>[INST]")
    tok.add_bos_token = True  # as Llama-2's tokenizer does
    assert adds_bos(tok)
    pair = render_causal_pair(tok, template, ROWS[0], 512, 256, strip_bos=True)
    ids = tok(pair["prompt"])["input_ids"]  # how TRL tokenises text columns
    assert ids == tok(plain["prompt"], add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 2  # one per [INST] turn of the two-turn prompt, none doubled


def test_seq2seq_pair_encoding_prompt_to_encoder_responses_to_decoder() -> None:
    tok = load_tokenizer(resolve_model("tiny-t5"))
    template = ChatTemplate.get("flan")
    enc = encode_seq2seq_pair(tok, template, ROWS[0], max_length=20, max_prompt_length=12)
    full_prompt = tok(template.render_prompt(ROWS[0]["prompt"]))["input_ids"]  # T5's tokenizer appends EOS
    assert enc["input_ids"] == full_prompt[-12:] and full_prompt[-1] == tok.eos_token_id  # trimmed from the left
    nine = tok("Nine.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["rejected_labels"] == nine
    assert len(enc["chosen_labels"]) == 8  # 20 - 12: the long answer is cut from the right


# --- the reference model: one copy with LoRA ----------------------------------------------------


def test_causal_lora_reference_is_base_with_adapter_disabled_and_tokens_are_ours(tmp_path: Path) -> None:
    r = recipe("tiny-llama", data={"max_length": 24, "max_prompt_length": 12})
    trainer, tok, spec, counts = build_trainer(r, context(tmp_path / "run"))
    model = trainer.model
    assert trainer.ref_model is None
    assert list(model.peft_config) == ["default"]  # no "ref" adapter copy either
    held = held_parameters(trainer)
    assert held.keys() == {p.data_ptr() for p in model.parameters()}
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora > 0 and numel(held) == base_numel("tiny-llama") + lora

    # TRL tokenised the text we rendered into exactly our template's tokens, cut to our budget.
    template = ChatTemplate.get(spec.template)
    rows = data_rows(r, "preference")[0]  # the (shuffled) order the trainer got
    assert counts == {"train_rows": 3, "eval_rows": 0}
    for row, got in zip(rows, trainer.train_dataset):
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in
               (template.render_prompt(row["prompt"], tok.bos_token, tok.eos_token),
                *(reply_text(template, row[k], tok.bos_token, tok.eos_token) for k in ("chosen", "rejected")))]
        prompt, (chosen, rejected) = fit_pair(ids[0], ids[1:], 24, 12, tok.bos_token_id)
        assert got["prompt_ids"] == prompt
        assert (got["prompt_ids"] + got["chosen_ids"])[:24] == prompt + chosen
        assert (got["prompt_ids"] + got["rejected_ids"])[:24] == prompt + rejected
    multi_turn = next(i for i, row in enumerate(rows) if len(row["prompt"]) == 3)
    assert len(trainer.train_dataset[multi_turn]["prompt_ids"]) == 12


def test_seq2seq_reference_lora_shares_weights_full_holds_a_frozen_copy(tmp_path: Path) -> None:
    trainer, *_ = build_trainer(recipe("tiny-t5"), context(tmp_path / "lora"))
    model = trainer.model
    assert trainer.ref_model is None
    held = held_parameters(trainer)
    assert held.keys() == {p.data_ptr() for p in model.parameters()}
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = base_numel("tiny-t5", seq2seq=True)
    assert lora > 0 and numel(held) == base + lora

    trainer, *_ = build_trainer(recipe("tiny-t5", "full"), context(tmp_path / "full"))
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    assert numel(held_parameters(trainer)) == 2 * base  # full fine-tuning: policy + frozen reference


# --- real runs ----------------------------------------------------------------------------------

INITIAL_LOSS = {"sigmoid": math.log(2), "ipo": 1 / (4 * 0.1**2), "hinge": 1.0}


@pytest.mark.parametrize("model,finetuning,loss_type,smoothing,checkpointing", [
    ("tiny-llama", "lora", "sigmoid", 0.0, False),
    ("tiny-gptj", "lora", "ipo", 0.0, True),
    ("tiny-llama", "full", "hinge", 0.0, False),
    ("tiny-t5", "lora", "sigmoid", 0.1, True),
    ("tiny-t5", "full", "ipo", 0.0, False),
])
def test_dpo_trains_saves_reloads_and_generates(tmp_path: Path, model: str, finetuning: str, loss_type: str,
                                                smoothing: float, checkpointing: bool) -> None:
    run_dir = tmp_path / "run"
    r = recipe(model, finetuning, loss_type, dpo={"label_smoothing": smoothing}, data={"eval_split": "test"},
               training={"gradient_checkpointing": checkpointing})
    out = train(r, run_dir)
    assert out["status"] == "completed" and out["global_step"] == 2 and out["eval_rows"] == 1

    metrics = RunDir(run_dir).metrics()
    first = metrics[0]
    assert set(REWARD_METRICS) <= first.keys()
    # Step 1 runs on the initial weights: policy == reference, so rewards are 0 and the loss is
    # the closed form at delta = 0 (this fails if the reference is anything but the start model).
    assert first["loss"] == pytest.approx(INITIAL_LOSS[loss_type], rel=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert any(m["rewards/margins"] != 0 for m in metrics if "rewards/margins" in m)
    assert any("eval_rewards/accuracies" in m for m in metrics)

    saved = json.loads((run_dir / "model" / "llmtune.json").read_text())
    assert saved["stage"] == "dpo" and saved["finetuning"] == finetuning
    assert (run_dir / "model" / ("adapter_config.json" if finetuning == "lora" else "config.json")).is_file()
    loaded, tok, spec = load_for_inference(str(run_dir))
    texts = generate(loaded, tok, ChatTemplate.get(spec.template), spec.kind, [ROWS[0]["prompt"]],
                     GenerationSection(max_new_tokens=4, do_sample=False))
    assert len(texts) == 1 and isinstance(texts[0][0], str)


def test_seq2seq_dpo_learns_on_a_repeated_set(tmp_path: Path) -> None:
    r = recipe("tiny-t5", data={"weight": 4}, training={"max_steps": 8, "batch_size": 4, "learning_rate": 3e-3,
                                                        "lr_scheduler": "constant"})
    train(r, tmp_path / "run")
    metrics = [m for m in RunDir(tmp_path / "run").metrics() if "rewards/accuracies" in m]
    assert len(metrics) == 8
    assert metrics[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert metrics[0]["rewards/accuracies"] == 0.0
    last = metrics[-3:]
    assert max(m["loss"] for m in last) < 0.5 * math.log(2)
    assert min(m["rewards/accuracies"] for m in last) == 1.0
    assert min(m["rewards/margins"] for m in last) > 0


@pytest.mark.slow
def test_dpo_continues_from_an_sft_lora_run(tmp_path: Path) -> None:
    sft = recipe_from_dict({"stage": "sft", "model": {"name": "tiny-llama", "lora": {"r": 4, "alpha": 8}},
                            "data": {"name": "hh", "path": HH, "max_length": 64},
                            "training": {"max_steps": 2, "batch_size": 2, "learning_rate": 5e-2, "logging_steps": 1}})
    sft_dir = tmp_path / "sft"
    assert train(sft, sft_dir)["status"] == "completed"

    # The DPO reference (adapter disabled) is the SFT model: its logits match the SFT run's.
    r = recipe(str(sft_dir))
    trainer, tok, _, _ = build_trainer(r, context(tmp_path / "probe"))
    sft_model, _, _ = load_for_inference(str(sft_dir))
    base_model, _, _ = load_for_inference("tiny-llama")
    ids = torch.tensor([tok("[INST] Name a prime number. [/INST]", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), trainer.model.disable_adapter():
        ref_logits = trainer.model(input_ids=ids).logits
        expected = sft_model(input_ids=ids).logits
        base_logits = base_model(input_ids=ids).logits
    assert torch.allclose(ref_logits, expected, atol=1e-4)
    assert not torch.allclose(ref_logits, base_logits, atol=1e-3)  # SFT really changed the model
    assert list(trainer.model.peft_config) == ["default"]
    del trainer

    dpo_dir = tmp_path / "dpo"
    out = train(recipe(str(sft_dir)), dpo_dir)
    assert out["status"] == "completed"
    assert RunDir(dpo_dir).metrics()[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert json.loads((dpo_dir / "model" / "llmtune.json").read_text())["base"] == str((sft_dir / "model").resolve())
    model, tok, spec = load_for_inference(str(dpo_dir))
    texts = generate(model, tok, ChatTemplate.get(spec.template), spec.kind, [ROWS[0]["prompt"]],
                     GenerationSection(max_new_tokens=4, do_sample=False))
    assert isinstance(texts[0][0], str)


# --- recipes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpo-llama2-hh.yaml", "dpo-flan-t5-shp.yaml", "dpo-quickstart.yaml"])
def test_recipes_validate(name: str) -> None:
    r = load_recipe(REPO / "recipes" / name)
    assert r.stage == "dpo"
    assert resolve_model(r.model.name).kind == ("seq2seq" if "t5" in name else "causal")


@pytest.mark.slow
def test_quickstart_recipe_through_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmtune.cli", "train", "recipes/dpo-quickstart.yaml",
                           "training.max_steps=2", "--output-dir", str(tmp_path / "q")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rewards/accuracies=" in proc.stdout
    info = json.loads((tmp_path / "q" / "run.json").read_text())
    assert info["status"] == "completed"
    assert (tmp_path / "q" / "model" / "adapter_model.safetensors").is_file()
