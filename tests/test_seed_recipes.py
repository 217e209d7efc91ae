"""Every seed recipe runs end to end on the tiny twin of its model with fixture data in the dataset's
own raw format — not only validates. Each run is a few optimizer steps: the point is that the recipe
as shipped (its stage, template, LoRA targets, gradient checkpointing, reward wiring, pipeline of runs)
works, with only the model, the data location and the sizes overridden.

sft-gptj-hh → rm-gptj-hh → ppo-gptj-hh; sft-llama2-dolly → rs-llama2-hh; dpo-llama2-hh;
sft-flan-t5-oasst; dpo-flan-t5-shp; ppo-flan-t5-toxicity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT

from llmtune.config.load import load_recipe
from llmtune.config.pipeline import load_pipeline
from llmtune.modeling.load import load_for_inference
from llmtune.train import train

pytestmark = pytest.mark.slow  # the seed recipes end to end: the full suite

RAW = ROOT / "tests" / "fixtures" / "raw"
SMALL = ["training.max_steps=2", "training.logging_steps=1", "training.save_steps=100",
         "training.gradient_accumulation_steps=1"]
TRAIN_BATCH = ["training.batch_size=2"]  # sft, rm, dpo, rs; ppo batches by ppo.mini_batch_size
TINY_PPO = ["ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1", "ppo.generation_batch_size=4",
            "ppo.generation.max_new_tokens=8", "ppo.generation.min_new_tokens=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def completed(recipe: Any, out: Path) -> dict[str, Any]:
    """Train one stage; it must complete and leave a loadable model recorded with its template."""
    summary = train(recipe, out)
    assert summary["status"] == "completed", summary
    meta = json.loads((out / "model" / "llmtune.json").read_text())
    assert meta["stage"] == recipe.stage and meta["template"] == recipe_template(recipe)
    return summary


def run(name: str, out: Path, *overrides: str) -> dict[str, Any]:
    """Train recipes/NAME (one stage) with the overrides."""
    recipe = load_recipe(ROOT / "recipes" / name, [*SMALL, *overrides])
    return completed(recipe, out)


def run_pipeline(name: str, root: Path, stage_overrides: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Train every stage of the pipeline recipes/NAME into ROOT/<stage>, each with SMALL and its overrides."""
    overrides = [f"stages.{stage}.{o}" for stage, extra in stage_overrides.items() for o in [*SMALL, *extra]]
    return {st.name: completed(st.recipe, st.run_dir)
            for st in load_pipeline(ROOT / "recipes" / name, overrides, str(root))}


def recipe_template(recipe: Any) -> str:
    from llmtune.registry.models import resolve_model

    return resolve_model(recipe.model.name, template=recipe.model.template).template


@pytest.fixture(scope="module")
def gptj_chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The seeds' RLHF pipeline (recipes/ppo-gptj-hh.yaml) on tiny-gptj: SFT, a reward model, then PPO
    from the SFT run against it."""
    root = tmp_path_factory.mktemp("gptj-hh")
    hh = [f"data.path={RAW / 'hh'}", "data.max_length=96"]
    run_pipeline("ppo-gptj-hh.yaml", root, {
        "sft": ["model.name=tiny-gptj", *hh, *TRAIN_BATCH],
        "rm": ["model.name=tiny-gptj", *hh, *TRAIN_BATCH],
        "ppo": [*hh, "data.max_prompt_length=64", "reward.max_length=96", *TINY_PPO],
    })
    return {k: root / k for k in ("sft", "rm", "ppo")}


def test_gptj_hh_sft_rm_ppo(gptj_chain: dict[str, Path]) -> None:
    sft_meta = json.loads((gptj_chain["sft"] / "model" / "llmtune.json").read_text())
    assert sft_meta["base"] == "tiny-gptj" and sft_meta["template"] == "hh"
    assert json.loads((gptj_chain["rm"] / "model" / "llmtune.json").read_text())["head"] == "classifier"
    ppo = gptj_chain["ppo"]
    rows = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_mean"] == r["reward_mean"] for r in rows)
    # PPO's base is the SFT run (its adapter merged in memory), recorded as such.
    assert json.loads((ppo / "model" / "llmtune.json").read_text())["base"] == str(gptj_chain["sft"] / "model")
    model, tok, spec = load_for_inference(str(ppo))
    assert spec.template == "hh" and spec.kind == "causal"


def test_llama2_dolly_sft_then_rs(tmp_path: Path) -> None:
    """sft-llama2-dolly, then the rs-llama2-hh pipeline (its MiniLM reward model, then best-of-n) starting
    from that SFT run."""
    sft = tmp_path / "sft"
    run("sft-llama2-dolly.yaml", sft, "model.name=tiny-llama", f"data.path={RAW / 'dolly'}", "data.eval_fraction=0",
        "data.max_length=96", *TRAIN_BATCH)
    summaries = run_pipeline("rs-llama2-hh.yaml", tmp_path / "rs-hh", {
        "rm": [f"data.path={RAW / 'hh'}", "data.eval_fraction=0", "data.max_length=96", *TRAIN_BATCH],
        "rs": [f"model.name={sft}", f"data.path={RAW / 'hh'}", "data.num_samples=3", "rs.iterations=2",
               "rs.num_samples=2", "rs.generation.max_new_tokens=8", "training.max_steps=1", "data.max_length=96",
               "data.max_prompt_length=64", "reward.max_length=96", "training.gradient_checkpointing=false",
               *TRAIN_BATCH],
    })
    assert len(summaries["rs"]["rounds"]) == 2 and summaries["rs"]["prompts"] == 3
    assert (tmp_path / "rs-hh" / "rs" / "rs" / "round-2" / "kept.jsonl").exists()


def test_llama2_hh_dpo(tmp_path: Path) -> None:
    summary = run("dpo-llama2-hh.yaml", tmp_path / "dpo", "model.name=tiny-llama", f"data.path={RAW / 'hh'}",
                  "data.max_length=96", "data.max_prompt_length=48", "training.eval_batch_size=2", *TRAIN_BATCH)
    assert summary["global_step"] == 2 and summary["eval_rows"] == 1


def test_flan_t5_oasst_sft(tmp_path: Path) -> None:
    summary = run("sft-flan-t5-oasst.yaml", tmp_path / "sft", "model.name=tiny-t5", f"data.path={RAW / 'oasst'}",
                  "data.eval_split=null", "data.eval_fraction=0", "data.max_length=96", *TRAIN_BATCH)
    assert summary["global_step"] == 2 and summary["train_rows"] >= 1


def test_flan_t5_shp_dpo(tmp_path: Path) -> None:
    summary = run("dpo-flan-t5-shp.yaml", tmp_path / "dpo", "model.name=tiny-t5", f"data.path={RAW / 'shp'}",
                  "data.eval_split=null", "data.max_length=96", "data.max_prompt_length=48", *TRAIN_BATCH)
    assert summary["train_rows"] == 2  # min_score_ratio 2.0 keeps two of the three pairs


def test_flan_t5_toxicity_ppo(tmp_path: Path) -> None:
    """The recipe's hate-speech classifier is a hub model: a rule reward stands in for it offline."""
    run("ppo-flan-t5-toxicity.yaml", tmp_path / "ppo", "model.name=tiny-t5", f"data.path={RAW / 'hh'}",
        "reward.type=rule", "reward.function=llmtune.rewards.rules:target_length", *TINY_PPO,
        "data.max_length=96", "data.max_prompt_length=64")
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
