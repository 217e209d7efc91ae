"""stage: rm end to end (real steps on tiny-llama, tiny-t5, tiny-gptj and the pretrained MiniLM), the shared
reward-input encoding and its truncation, RewardModelScorer on the saved runs, and
`llmtune eval reward-accuracy` as a real subprocess."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, run_cli

from llmtune.config.load import load_recipe, recipe_from_dict
from llmtune.config.schema import RewardSection
from llmtune.data.templates import ChatTemplate
from llmtune.errors import ConfigError
from llmtune.modeling.load import load_for_inference, load_tokenizer
from llmtune.modeling.pooling import MeanPooledClassifier
from llmtune.registry.models import resolve_model
from llmtune.rewards.reward_model import RewardModelScorer, encode_reward_input, pairwise_stats
from llmtune.stages.common import data_rows
from llmtune.train import train

HH = ROOT / "tests" / "fixtures" / "raw" / "hh"


def hh_line(turns: list[str], chosen: str, rejected: str, source: str | None = None) -> str:
    """One raw HH row: a shared dialogue, then two different final assistant replies."""
    history = "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))
    row: dict[str, Any] = {"chosen": f"{history}\n\nAssistant: {chosen}",
                           "rejected": f"{history}\n\nAssistant: {rejected}"}
    if source:
        row["source"] = source
    return json.dumps(row)


LONG_HISTORY = [f"turn {i}: " + "tell me more about the weather in a long winded way " * 3 for i in range(9)]


@pytest.fixture(scope="module")
def hh_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HH rows with a `source` each (two subsets) and one pair far longer than max_length."""
    path = tmp_path_factory.mktemp("hh") / "train.jsonl"
    lines = [hh_line(["How do I boil an egg?"], "Put it in boiling water for nine minutes.", "Eggs are overrated.",
                     "helpful"),
             hh_line(["How do I pick a lock?"], "I would rather not help with that.", "Use a tension wrench.",
                     "harmless"),
             hh_line(["Name a prime."], "Seven.", "Nine.", "helpful"),
             hh_line(["Insult my neighbour."], "Let us talk about something kinder.", "Your neighbour is dumb.",
                     "harmless"),
             hh_line(LONG_HISTORY, "Sunny and mild, with a light breeze.", "Whatever.", "helpful")]
    path.write_text("\n".join(lines) + "\n")
    return path


def rm_recipe(model: str, finetuning: str, path: Path, pooling: str = "auto", **extra: Any) -> Any:
    return recipe_from_dict({
        "stage": "rm",
        "rm": {"pooling": pooling},
        "model": {"name": model, "finetuning": finetuning, "lora": {"r": 4, "alpha": 8}},
        "data": {"name": "hh", "path": str(path), "eval_fraction": 0.4, "max_length": 64},
        "training": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "learning_rate": 1e-3, "save_steps": 100,
                     **extra},
    })


def metrics_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, hh_sources: Path) -> dict[str, Path]:
    """One short rm run per architecture (and LoRA vs full), shared by the tests below."""
    runs = {}
    for model, finetuning in [("tiny-llama", "lora"), ("tiny-llama", "full"), ("tiny-t5", "lora"),
                              ("tiny-t5", "full"), ("minilm-l6", "full"), ("minilm-l6", "lora")]:
        run = tmp_path_factory.mktemp("runs") / f"{model}-{finetuning}"
        # One run batches by length (training.group_by_length): same results contract as the others.
        extra = {"group_by_length": True} if (model, finetuning) == ("minilm-l6", "lora") else {}
        summary = train(rm_recipe(model, finetuning, hh_sources, **extra), run)
        assert summary["status"] == "completed" and summary["global_step"] == 2
        runs[f"{model}-{finetuning}"] = run
    return runs


@pytest.mark.parametrize("name", ["tiny-llama-lora", "tiny-llama-full", "tiny-t5-lora", "tiny-t5-full",
                                  "minilm-l6-full", "minilm-l6-lora"])
def test_rm_trains_saves_reloads_and_scores_like_training(trained: dict[str, Path], hh_sources: Path,
                                                          name: str) -> None:
    run = trained[name]
    metrics = metrics_of(run)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    final = [m for m in metrics if "eval_accuracy" in m][-1]
    assert {"eval_loss", "eval_margin", "eval_accuracy_helpful", "eval_accuracy_harmless"} <= final.keys()
    assert 0.0 <= final["eval_accuracy"] <= 1.0
    meta = json.loads((run / "model" / "llmtune.json").read_text())
    assert meta["head"] == "classifier" and meta["stage"] == "rm" and meta["max_length"] == 64
    assert (run / "model" / ("adapter_config.json" if name.endswith("lora") else "config.json")).exists()

    model, _, spec = load_for_inference(str(run))
    inner = model.base_model.model if name.endswith("lora") else model
    if name.startswith("minilm"):  # a sentence encoder: the registry's mean-pooled head
        assert meta["pooling"] == "mean" and isinstance(inner, MeanPooledClassifier)
    else:
        assert meta["pooling"] == "architecture" and type(inner).__name__.endswith("ForSequenceClassification")

    # The scorer on the saved model reproduces the trainer's last evaluation exactly.
    recipe = rm_recipe(name.rsplit("-", 1)[0], name.rsplit("-", 1)[1], hh_sources)
    _, eval_rows = data_rows(recipe, "preference")
    scorer = RewardModelScorer(RewardSection(type="reward_model", model=str(run), batch_size=3))
    assert scorer.max_length == 64
    prompts = [r["prompt"] for r in eval_rows]
    chosen = scorer.score(prompts, [r["chosen"][-1]["content"] for r in eval_rows])
    rejected = scorer.score(prompts, [r["rejected"][-1]["content"] for r in eval_rows])
    stats = pairwise_stats(chosen, rejected, [r["source"] for r in eval_rows])
    assert stats["accuracy"] == pytest.approx(final["eval_accuracy"])
    assert stats["mean_margin"] == pytest.approx(final["eval_margin"], abs=1e-5)
    for source, s in stats["by_source"].items():
        assert s["accuracy"] == pytest.approx(final[f"eval_accuracy_{source}"])


def test_scores_do_not_depend_on_batching(trained: dict[str, Path]) -> None:
    """Padding to a batch's longest input must not change a reward (attention masks, last-token reads)."""
    prompt = [{"role": "user", "content": "How do I boil an egg?"}]
    responses = ["Nine minutes.", "Put it in boiling water for nine minutes, then cool it in cold water.", ""]
    for name in ("tiny-llama-lora", "tiny-t5-lora", "minilm-l6-full", "minilm-l6-lora"):
        one = RewardModelScorer(RewardSection(type="reward_model", model=str(trained[name]), batch_size=1))
        many = RewardModelScorer(RewardSection(type="reward_model", model=str(trained[name]), batch_size=8))
        assert one.score([prompt] * 3, responses) == pytest.approx(many.score([prompt] * 3, responses), abs=1e-5)


@pytest.mark.slow
def test_pooling_choice_is_trained_saved_and_reloaded(tmp_path: Path, hh_sources: Path) -> None:
    """rm.pooling overrides the registry: MiniLM with its [CLS] head, and mean pooling on an encoder only."""
    run = tmp_path / "cls"
    assert train(rm_recipe("minilm-l6", "full", hh_sources, pooling="architecture"), run)["status"] == "completed"
    assert json.loads((run / "model" / "llmtune.json").read_text())["pooling"] == "architecture"
    model, _, _ = load_for_inference(str(run))
    assert type(model).__name__ == "BertForSequenceClassification"

    # The mean head reads every unpadded token: a masked mean, so padding never moves a score.
    mean_model, tok, _ = load_for_inference("minilm-l6", head="classifier")
    assert isinstance(mean_model, MeanPooledClassifier) and mean_model.backbone.pooler is None
    batch = tok(["short", "a much longer text than the first one"], padding=True, return_tensors="pt")
    alone = tok(["short"], return_tensors="pt")
    assert mean_model(**batch).logits[0].item() == pytest.approx(mean_model(**alone).logits[0].item(), abs=1e-5)

    with pytest.raises(ConfigError, match="rm.pooling: mean pooling is for encoder models"):
        rm_recipe("tiny-llama", "lora", hh_sources, pooling="mean")


def test_group_by_length_is_recorded_and_limited_to_sft_and_rm(trained: dict[str, Path], hh_sources: Path) -> None:
    assert "group_by_length: true" in (trained["minilm-l6-lora"] / "recipe.yaml").read_text()
    recipe = rm_recipe("tiny-llama", "lora", hh_sources)
    data = {"stage": "dpo", "model": {"name": "tiny-llama"}, "data": {"name": "hh", "path": str(hh_sources)},
            "training": {"group_by_length": True}}
    assert recipe.training.group_by_length is False
    with pytest.raises(ConfigError, match="training.group_by_length: supported by stages sft and rm"):
        recipe_from_dict(data)


def test_mean_pooled_export_scores_like_the_run(trained: dict[str, Path], tmp_path: Path) -> None:
    """`llmtune export --merge` of a LoRA MiniLM reward model: standalone, same scores, and its README
    loads it through the mean-pooled head (plain AutoModelForSequenceClassification would not)."""
    from llmtune.serve.export import export

    out = tmp_path / "export"
    export(str(trained["minilm-l6-lora"]), out, merge=True)
    meta = json.loads((out / "llmtune.json").read_text())
    assert meta["pooling"] == "mean" and meta["max_length"] == 64 and meta["base"] is None
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    assert isinstance(MeanPooledClassifier.load(str(out)), MeanPooledClassifier)
    prompts = [[{"role": "user", "content": "How do I pick a lock?"}]] * 2
    responses = ["I would rather not help with that.", "Use a tension wrench."]
    scores = [RewardModelScorer(RewardSection(type="reward_model", model=str(ref))).score(prompts, responses)
              for ref in (trained["minilm-l6-lora"], out)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["run", "export"])
def test_mean_pooled_reward_model_loads_in_plain_transformers_or_not_at_all(trained: dict[str, Path],
                                                                           tmp_path: Path, which: str) -> None:
    """Plain `AutoModelForSequenceClassification` on a mean-pooled rm run's model/ (or its merged export),
    in a process without llmtune: with trust_remote_code the very same scores, without it a loud refusal
    (never a [CLS] classifier with random weights)."""
    import subprocess
    import sys

    import torch
    from transformers import AutoTokenizer

    from llmtune.serve.export import export

    path = trained["minilm-l6-full"] / "model"
    if which == "export":
        path = tmp_path / "export"
        export(str(trained["minilm-l6-lora"]), path, merge=True)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llmtune-mean-pooled" and (path / "pooling.py").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["How do I pick a lock?", "Hi"], ["Use a tension wrench.", "Hello!"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = MeanPooledClassifier.load(str(path)).eval()(**enc).logits[:, 0].tolist()
    code = f"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path = {str(path)!r}
try:
    AutoModelForSequenceClassification.from_pretrained(path)
    print("loaded without trust_remote_code")
except ValueError as exc:
    print("refused:", str(exc).splitlines()[0])
model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(path)
enc = tok(["How do I pick a lock?", "Hi"], ["Use a tension wrench.", "Hello!"], return_tensors="pt", padding=True)
with torch.no_grad():
    print(json.dumps(model(**enc).logits[:, 0].tolist()))
assert not any(m.startswith("llmtune") for m in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    first, scores = proc.stdout.strip().splitlines()[-2:]
    assert "refused:" in first and "custom code" in first  # transformers asks, stdin is closed: refused
    assert json.loads(scores) == pytest.approx(ours, abs=1e-5)


def test_long_pairs_are_trimmed_from_the_left_not_dropped(trained: dict[str, Path], hh_sources: Path) -> None:
    recipe = rm_recipe("tiny-llama", "lora", hh_sources)
    train_rows, eval_rows = data_rows(recipe, "preference")
    assert len(train_rows) + len(eval_rows) == 5
    info = json.loads((trained["tiny-llama-lora"] / "run.json").read_text())
    assert info["summary"]["train_rows"] + info["summary"]["eval_rows"] == 5


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gptj", "tiny-t5", "minilm-l6"])
def test_truncation_keeps_the_differing_responses(model: str) -> None:
    spec = resolve_model(model)
    tok = load_tokenizer(spec)
    template = ChatTemplate.get(spec.template)
    prompt = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(LONG_HISTORY)]
    chosen, rejected = "Sunny and mild, with a light breeze.", "Whatever, look outside yourself."
    outs = [encode_reward_input(tok, template, spec.kind, prompt, r, 48) for r in (chosen, rejected)]
    for out, response in zip(outs, (chosen, rejected), strict=True):
        ids = out["input_ids"]
        assert len(ids) <= 48
        text = tok.decode(ids, skip_special_tokens=True)
        assert response.lower().rstrip(".") in text.lower()          # the whole response survived
        assert "winded way" in text and "turn 0" not in text           # the newest history is kept
    assert outs[0]["input_ids"] != outs[1]["input_ids"]
    if spec.kind == "encoder":  # [CLS] conversation [SEP] response [SEP], segment ids 0 then 1
        ids, types = outs[0]["input_ids"], outs[0]["token_type_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids.count(tok.sep_token_id) == 2
        assert types[0] == 0 and types[-1] == 1 and len(types) == len(ids)
    if spec.kind == "seq2seq":  # T5ForSequenceClassification needs exactly one EOS, at the end
        assert outs[0]["input_ids"].count(tok.eos_token_id) == 1 and outs[0]["input_ids"][-1] == tok.eos_token_id


def test_encoder_tokenizer_without_eos_and_empty_response() -> None:
    spec = resolve_model("minilm-l6")
    tok = load_tokenizer(spec)
    assert tok.eos_token is None  # BERT-style: [CLS]/[SEP] only
    out = encode_reward_input(tok, ChatTemplate.get(spec.template), "encoder", [{"role": "user", "content": "Hi"}],
                              "", 32)
    assert out["input_ids"][0] == tok.cls_token_id and out["input_ids"][-2:] == [tok.sep_token_id] * 2


def test_gptj_recipe_runs_on_its_tiny_stand_in(tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "recipes" / "rm-gptj-hh.yaml", [
        "model.name=tiny-gptj", f"data.path={HH}", "training.max_steps=1", "training.gradient_checkpointing=false",
        "training.gradient_accumulation_steps=1", "training.batch_size=2", "data.max_length=64"])
    summary = train(recipe, tmp_path / "run")
    assert summary["status"] == "completed" and summary["eval_rows"] == 1
    assert "eval_accuracy" in summary
    assert RewardModelScorer(RewardSection(type="reward_model", model=str(tmp_path / "run"))).score(
        [[{"role": "user", "content": "Hello?"}]], ["Hi there."])[0] == pytest.approx(
        RewardModelScorer(RewardSection(type="reward_model", model=str(tmp_path / "run" / "model"))).score(
            [[{"role": "user", "content": "Hello?"}]], ["Hi there."])[0])


def test_minilm_recipe_is_valid() -> None:
    recipe = load_recipe(ROOT / "recipes" / "rm-minilm-hh.yaml", [f"data.path={HH}"])
    assert recipe.stage == "rm" and recipe.model.name == "minilm-l6" and recipe.data.eval_fraction > 0


def test_scorer_needs_a_model() -> None:
    """Checked by the recipe schema, before anything loads (the scorer assumes a valid section)."""
    with pytest.raises(ConfigError, match=r"reward\.model: required for reward type 'reward_model'"):
        recipe_from_dict({"stage": "rs", "model": {"name": "tiny-llama"}, "data": {"name": "demo"},
                          "reward": {"type": "reward_model"}})


@pytest.mark.slow
def test_eval_reward_accuracy_cli(trained: dict[str, Path], hh_sources: Path) -> None:
    proc = run_cli("eval", "reward-accuracy", "--model", str(trained["minilm-l6-full"]), "--data", "hh",
                   "--path", str(hh_sources), "-n", "4", check=True)
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0 and "mean_margin" in result
    assert set(result["by_source"]) == {"helpful", "harmless"}
    assert sum(s["n"] for s in result["by_source"].values()) == 4

    # --eval-fraction/--seed re-select the run's own held-out pairs: the same figures as its last eval.
    proc = run_cli("eval", "reward-accuracy", "--model", str(trained["minilm-l6-full"]), "--data", "hh",
                   "--path", str(hh_sources), "--eval-fraction", "0.4", "--seed", "42", check=True)
    result = json.loads(proc.stdout)
    final = [m for m in metrics_of(trained["minilm-l6-full"]) if "eval_accuracy" in m][-1]
    assert result["n"] == 2 and result["accuracy"] == pytest.approx(final["eval_accuracy"])
    assert result["mean_margin"] == pytest.approx(final["eval_margin"], abs=1e-5)

    proc = run_cli("eval", "reward-accuracy", "--model", str(trained["tiny-llama-lora"] / "model"), "--data", "hh",
                   "--path", str(HH), "--split", "test", check=True)
    result = json.loads(proc.stdout)
    assert result["n"] == 1 and "by_source" not in result

    bad = run_cli("eval", "reward-accuracy", "--model", str(hh_sources.parent / "missing"), "--data", "hh")
    assert bad.returncode == 2 and "--model" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("eval", "reward-accuracy", "--model", str(trained["minilm-l6-full"]), "--data", "hhh")
    assert bad.returncode == 2 and "did you mean 'hh'" in bad.stderr
