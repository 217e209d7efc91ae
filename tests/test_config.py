"""Recipes: loading, inheritance, overrides, and every class of validation error (exit 2, one clear
message, no traceback), all through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from llmtune.config.load import load_dict, load_recipe, load_text
from llmtune.config.reference import BEGIN, END, markdown
from llmtune.errors import ConfigError

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


HH_SAMPLE = "../shared/data/hh-harmless-sample.jsonl.gz"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe: Path) -> None:
    overrides = []
    if f"path: {HH_SAMPLE}" in recipe.read_text() and not (ROOT / HH_SAMPLE).exists():
        # A checkout without the shared HH sample beside it: the same rows' format from our fixture.
        overrides = [f"data.path={ROOT / 'tests/fixtures/raw/hh/train.jsonl'}"]
    proc = run_cli("validate", str(recipe), *overrides)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok:")


def test_validate_takes_overrides_like_train() -> None:
    quickstart = str(ROOT / "recipes" / "sft-tiny.yaml")
    assert run_cli("validate", quickstart, "training.epochs=2", "--set", "data.max_length=32").returncode == 0
    bad = run_cli("validate", quickstart, "training.epochs=-1")
    assert bad.returncode == 2 and "training.epochs" in bad.stderr and "Traceback" not in bad.stderr
    assert "no recipe file" in run_cli("validate", "training.epochs=2").stderr


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
stage: sft
model: {name: tiny-llama}
data: {name: demo, max_length: 64}
training: {max_steps: 2}
"""


def bad(tmp_path: Path, text: str, *overrides: str) -> str:
    proc = run_cli("validate", str(write(tmp_path, text)), *[a for o in overrides for a in ("--set", o)])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_unknown_key_names_full_path_and_closest_key(tmp_path: Path) -> None:
    err = bad(tmp_path, BASE.replace("{name: tiny-llama}", "{name: tiny-llama, finetunning: full}"))
    assert "model.finetunning: unknown key" in err and "did you mean 'model.finetuning'" in err
    err = bad(tmp_path, BASE.replace("max_steps", "max_stepz"))
    assert "training.max_stepz" in err and "'training.max_steps'" in err


def test_wrong_type_and_range(tmp_path: Path) -> None:
    err = bad(tmp_path, BASE.replace("{name: tiny-llama}", "{name: tiny-llama, lora: {r: 0, dropout: lots}}"))
    assert "model.lora.r: 0 must be >= 1" in err
    assert "model.lora.dropout: expected a number, got 'lots'" in err
    assert "2 problems" in err
    err = bad(tmp_path, BASE, "training.batch_size=-3")
    assert "training.batch_size: -3 must be >= 1" in err
    err = bad(tmp_path, BASE.replace("stage: sft", "stage: sftt"))
    assert "stage: 'sftt' is not one of" in err and "did you mean 'sft'" in err


def test_unknown_model_and_dataset_list_near_matches(tmp_path: Path) -> None:
    err = bad(tmp_path, BASE, "model.name=tiny-lama")
    assert "unknown model 'tiny-lama'" in err and "tiny-llama" in err
    err = bad(tmp_path, BASE, "data.name=dolyy")
    assert "data.name: unknown dataset 'dolyy'" in err and "'dolly'" in err


def test_missing_files(tmp_path: Path) -> None:
    err = bad(tmp_path, BASE, "data.path=/no/such/file.jsonl")
    assert "data.path: no such file or directory: /no/such/file.jsonl" in err
    proc = run_cli("validate", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr
    err = bad(tmp_path, BASE + "\nbase: missing-base.yaml\n")
    assert "missing-base.yaml" in err


def test_incompatible_options(tmp_path: Path) -> None:
    err = bad(tmp_path, BASE, "model.finetuning=qlora")
    assert "model.finetuning: qlora needs a CUDA GPU" in err
    err = bad(tmp_path, BASE.replace("stage: sft", "stage: ppo"))
    assert "reward: stage 'ppo' needs a reward source" in err
    err = bad(tmp_path, BASE, "distributed.num_processes=2")
    assert "distributed.strategy: more than one process needs" in err


def test_yaml_and_override_syntax_errors(tmp_path: Path) -> None:
    err = bad(tmp_path, "stage: sft\nmodel: [unclosed\n")
    assert "r.yaml" in err
    proc = run_cli("train", str(write(tmp_path, BASE)), "training.max_steps")
    assert proc.returncode == 2 and "expected KEY=VALUE" in proc.stderr


def test_inheritance_interpolation_and_overrides(tmp_path: Path) -> None:
    write(tmp_path, BASE.replace("{max_steps: 2}", "{max_steps: 2, learning_rate: 1.0e-3, logging_steps: 1}"),
          "parent.yaml")
    child = write(tmp_path, "base: parent.yaml\nmodel: {name: tiny-t5}\n"
                  "training: {learning_rate: 5.0e-4, save_steps: '${training.max_steps}'}\n"
                  "output_dir: runs/${stage}-${model.name}\n", "child.yaml")
    recipe = load_recipe(child, ["training.max_steps=7", "data.max_length=96"])
    assert recipe.model.name == "tiny-t5"  # child overrides parent
    assert recipe.training.learning_rate == 5e-4 and recipe.training.logging_steps == 1  # merged
    assert recipe.training.max_steps == 7 and recipe.training.save_steps == 7  # override + interpolation
    assert recipe.data.max_length == 96 and recipe.output_dir == "runs/sft-tiny-t5"
    loop = write(tmp_path, "base: loop.yaml\n", "loop.yaml")
    with pytest.raises(ConfigError, match="inheritance loops"):
        load_recipe(loop)



def test_recipe_text_merges_bases_like_files(tmp_path: Path) -> None:
    """The web UI's editor text goes through the same base merging and interpolation as a file."""
    parent = write(tmp_path, BASE, "parent.yaml")
    text = "base: parent.yaml\ntraining: {max_steps: 5, save_steps: '${training.max_steps}'}\n"
    data = load_text(text, "editor", lambda ref: tmp_path / ref)
    assert data["training"]["save_steps"] == 5 and data["model"] == load_dict(parent)["model"]
    with pytest.raises(ConfigError, match="editor: not valid YAML"):
        load_text("stage: [sft", "editor", lambda ref: tmp_path / ref)
    with pytest.raises(ConfigError, match="editor: a recipe must be a mapping"):
        load_text("- sft\n", "editor", lambda ref: tmp_path / ref)

def test_light_commands_do_not_import_torch(tmp_path: Path) -> None:
    recipe = write(tmp_path, BASE)
    code = ("import sys, llmtune.cli as c\n"
            f"for argv in (['validate', {str(recipe)!r}], ['models'], ['datasets']):\n"
            "    assert c.main(argv) == 0, argv\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'gradio') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_readme_reference_matches_schema() -> None:
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, "README must embed the generated recipe reference"
    embedded = text[text.index(BEGIN):text.index(END) + len(END)]
    assert embedded == markdown(), "README recipe reference is stale: run `llmtune reference` and paste it"


def test_listings() -> None:
    models = run_cli("models", check=True).stdout
    for name in ("gpt-j-6b", "llama-2-7b", "llama-2-7b-chat", "llama-2-13b", "llama-2-13b-chat", "flan-t5-small",
                 "flan-t5-base", "flan-t5-large", "flan-t5-xl", "tiny-llama", "tiny-gptj", "tiny-t5"):
        assert name in models
    datasets = run_cli("datasets", check=True).stdout
    for name in ("hh", "shp", "dolly", "oasst", "demo"):
        assert name in datasets


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes" / "gpu").glob("*.yaml")), ids=lambda p: p.name)
def test_gpu_recipes_validate_apart_from_this_machines_devices(recipe: Path) -> None:
    """GPU recipes (QLoRA, ZeRO) are refused on a CPU machine, but everything else about them is valid."""
    from llmtune.config.load import load_dict
    from llmtune.config.schema import check, parse

    check(parse(load_dict(recipe), str(recipe)), str(recipe), device_checks=False)
