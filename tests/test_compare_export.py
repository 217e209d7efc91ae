"""`llmtune compare` (two tiny models, a rule judge, the three output files) and `llmtune export`
(merged model reloads in plain transformers and decodes like the adapter version)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow  # real servers and end-to-end runs: the full suite, not `-m "not slow"`

HELLO = [{"role": "user", "content": "What is 2 plus 3?"}]
TESTS = Path(__file__).resolve().parent
PROMPTS = [
    "<script>alert('x')</script> & what is 1 + 1?",
    "Reverse the word: apple",
    "Say | pipes | and **stars**",
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "sft-lora"
    run_cli("train", "recipes/sft-tiny.yaml", "training.max_steps=4", "model.finetuning=lora",
            "--output-dir", str(out), check=True)
    return out


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS))
    return path


def test_compare_two_models_with_rule_judge(lora_run: Path, prompt_file: Path, tmp_path: Path) -> None:
    from compare_rules import letters

    from llmtune.serve.engine import Engine, Settings

    out = tmp_path / "cmp"
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("compare", "--models", str(lora_run), "tiny-llama", "--prompts", "canonical", "--path",
                   str(prompt_file), "-n", "3", "--judge", "rule:compare_rules:letters", "--out", str(out),
                   "--max-new-tokens", "8", "--seed", "3", env=env, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    names = ["sft-lora", "tiny-llama"]
    assert list(summary["models"]) == names and summary["prompts"] == 3

    rows = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    assert [r["prompt"][0]["content"] for r in rows] == PROMPTS  # same prompts, in order, for both
    for r in rows:
        assert set(r["responses"]) == set(names)
        assert [r["scores"][m] for m in names] == letters([], [r["responses"][m] for m in names])

    # The same seed and settings reproduce an answer outside compare (prompt i uses seed + i).
    engine = Engine.load(str(lora_run))
    again = engine.chat(rows[1]["prompt"], Settings(max_new_tokens=8, temperature=0.7, seed=3 + 1))
    assert again == rows[1]["responses"]["sft-lora"]

    matrix = summary["matrix"]
    ab, ba = matrix["sft-lora"]["tiny-llama"], matrix["tiny-llama"]["sft-lora"]
    assert ab["win"] + ab["tie"] + ab["loss"] == 3
    assert (ab["win"], ab["tie"], ab["loss"]) == (ba["loss"], ba["tie"], ba["win"])
    wins = sum(r["scores"]["sft-lora"] > r["scores"]["tiny-llama"] for r in rows)
    assert ab["win"] == wins
    means = {m: sum(r["scores"][m] for r in rows) / 3 for m in names}
    assert summary["mean_scores"] == pytest.approx(means)

    page = (out / "compare.html").read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; what is 1 + 1?" in page
    assert "<script>" not in page and "http" not in page  # escaped, and no external assets
    md = (out / "summary.md").read_text()
    assert "Win / tie / loss" in md and "| sft-lora |" in md and "> user: Say | pipes |" in md


def test_compare_rejects_bad_input(lora_run: Path, prompt_file: Path, tmp_path: Path) -> None:
    from llmtune.errors import ConfigError
    from llmtune.serve.compare import parse_judge

    proc = run_cli("compare", "--models", str(lora_run), "--prompts", "canonical", "--path", str(prompt_file),
                   "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "at least two models" in proc.stderr
    proc = run_cli("compare", "--models", str(lora_run), "tiny-llama", "--prompts", "canonical", "--path",
                   str(prompt_file), "--judge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--judge" in proc.stderr and "Traceback" not in proc.stderr

    section = tmp_path / "judge.yaml"
    section.write_text("type: rule\nfunction: compare_rules:letters\n")
    assert parse_judge(str(section)).function == "compare_rules:letters"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reward: {type: classifier, model: some/toxicity-model, label_index: 1}\n")
    assert (parse_judge(str(recipe)).type, parse_judge(str(recipe)).label_index) == ("classifier", 1)
    section.write_text("type: rules\n")
    with pytest.raises(ConfigError, match="reward.type"):
        parse_judge(str(section))


def _greedy_ids(model: object, tok: object, text: str) -> list[int]:
    import torch

    enc = tok(text, add_special_tokens=False, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False,  # type: ignore[attr-defined]
                             pad_token_id=tok.pad_token_id)  # type: ignore[attr-defined]
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_export_merge_reloads_in_plain_transformers(lora_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.data.templates import ChatTemplate
    from llmtune.modeling.load import load_for_inference
    from llmtune.serve.engine import Engine, Settings

    out = tmp_path / "merged"
    proc = run_cli("export", str(lora_run), "--out", str(out), "--merge", check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["merged"] is True  # last line: other libs log above
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()

    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    text = tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert text == ChatTemplate.get("llama2").render_prompt(HELLO, tok.bos_token, tok.eos_token)

    adapter_model, adapter_tok, _ = load_for_inference(str(lora_run))
    assert type(adapter_model).__name__.startswith("Peft")
    assert _greedy_ids(merged, tok, text) == _greedy_ids(adapter_model, adapter_tok, text)

    # The engine (adapter unmerged) and plain transformers on the export give the same greedy text.
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    plain = merged.generate(**enc, max_new_tokens=12, min_new_tokens=1, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    plain_text = tok.decode(plain[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert Engine.load(str(lora_run)).chat(HELLO, Settings(temperature=0, max_new_tokens=12)) == plain_text


def test_export_adapter_with_readme(lora_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.modeling.load import load_for_inference

    out = tmp_path / "adapter"
    run_cli("export", str(lora_run), "--out", str(out), check=True)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    readme = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in readme
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "tiny-llama" and base in readme  # portable: a registry name, not this machine's store path
    fetched = json.loads(run_cli("models", "fetch", base, check=True).stdout)["path"]

    tok = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fetched), out)
    text = tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    reference, ref_tok, _ = load_for_inference(str(lora_run))
    assert _greedy_ids(model, tok, text) == _greedy_ids(reference, ref_tok, text)

    proc = run_cli("export", str(lora_run), "--out", str(out))
    assert proc.returncode == 2 and "not empty" in proc.stderr
