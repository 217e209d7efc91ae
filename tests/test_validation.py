"""`llmtune validate` refuses what the run would refuse: a table of bad recipes, each one exiting 2
with the key path of the problem, all validated in one process that never imports torch. Every
check that used to live in a stage, loader or reward source is here (issue 19)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, run_cli

HH = str(ROOT / "tests" / "fixtures" / "raw" / "hh")
DOLLY_FILE = str(ROOT / "tests" / "fixtures" / "raw" / "dolly" / "train.jsonl")
UNSET_KEY = "LLMTUNE_TEST_NEVER_SET_KEY"

SFT = {"stage": "sft", "model": {"name": "tiny-llama"}, "data": {"name": "demo", "max_length": 64}}
DPO = {"stage": "dpo", "model": {"name": "tiny-llama"}, "data": {"name": "hh", "path": HH, "max_length": 64}}
RULE = {"type": "rule", "function": "llmtune.rewards.rules:target_length"}
PPO = {"stage": "ppo", "model": {"name": "tiny-llama"}, "data": {"name": "demo"}, "reward": RULE}
RS = {**PPO, "stage": "rs"}


def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def judge(**keys: Any) -> dict[str, Any]:
    return merge(RS, {"reward": {"type": "judge", "function": None, **keys}})


# (case id, recipe, the key path the message must start with)
CASES: list[tuple[str, Any, str]] = [
    # the cases reported in issue 19
    ("split-nonsense", merge(SFT, {"data": {"split": "nonsense"}}), "data.split: dataset 'demo' has no split"),
    ("options-bogus", merge(SFT, {"data": {"options": {"bogus": 1}}}), "data.options.bogus: unknown option 'bogus'"),
    ("subset-xyz", merge(DPO, {"data": {"subset": "xyz"}}), "data.subset: unknown subset 'xyz' of dataset 'hh'"),
    ("ppo-sizes", merge(PPO, {"ppo": {"rollout_batch_size": 10, "mini_batch_size": 4}}), "ppo.mini_batch_size: 4 must divide"),
    ("ppo-adafactor", merge(PPO, {"training": {"optimizer": "adafactor"}}), "training.optimizer: the PPO stage uses AdamW"),
    ("missing-run-dir", merge(PPO, {"model": {"name": "runs/sft-never-trained"}}),
     "model.name: no such model directory: runs/sft-never-trained"),
    ("missing-rm-run-dir", merge(PPO, {"reward": {"type": "reward_model", "model": "runs/rm-never-trained",
                                                  "function": None}}), "reward.model: no such model directory"),
    ("threads-zero", merge(SFT, {"training": {"threads": 0}}), "training.threads"),
    # from stages/ppo.py
    ("ppo-accumulation", merge(PPO, {"ppo": {"mini_batch_size": 4}, "training": {"gradient_accumulation_steps": 3}}),
     "training.gradient_accumulation_steps: 3 must divide ppo.mini_batch_size"),
    ("ppo-separate-seq2seq", merge(PPO, {"model": {"name": "tiny-t5"}, "ppo": {"value_model": "separate",
                                                                          "value_model_path": "tiny-llama"}}),
     "ppo.value_model: a separate value model is supported for causal policies"),
    ("ppo-separate-no-model", merge(PPO, {"ppo": {"value_model": "separate"}}), "ppo.value_model_path: required"),
    ("ppo-separate-encoder", merge(PPO, {"ppo": {"value_model": "separate", "value_model_path": "tiny-t5"}}),
     "ppo.value_model_path: the separate value model 'tiny-t5' is a seq2seq model"),
    ("ppo-path-unused", merge(PPO, {"ppo": {"value_model_path": "tiny-llama"}}),
     "ppo.value_model_path: only used with ppo.value_model: separate"),
    # training.batch_size is the per-device train batch; generation has its own key
    ("ppo-batch-size", merge(PPO, {"training": {"batch_size": 16}}), "training.batch_size: stage ppo trains on"),
    ("ppo-eval-batch-size", merge(PPO, {"training": {"eval_batch_size": 16}}), "training.eval_batch_size: stage ppo"),
    ("rs-eval-batch-size", merge(RS, {"training": {"eval_batch_size": 16}}), "training.eval_batch_size: stage rs"),
    # from stages/rs.py and stages/ppo.py: a reward source
    ("rs-no-reward", {k: v for k, v in RS.items() if k != "reward"}, "reward: stage 'rs' needs a reward source"),
    # from rewards/judge.py
    ("judge-template", judge(endpoint="http://127.0.0.1:9/v1", judge_model="m", template="Rate it"),
     "reward.template: must contain the {response} placeholder"),
    ("judge-no-model-name", judge(endpoint="http://127.0.0.1:9/v1"), "reward.judge_model: required with `endpoint`"),
    ("judge-key-unset", judge(endpoint="http://127.0.0.1:9/v1", judge_model="m", api_key_env=UNSET_KEY),
     f"reward.api_key_env: environment variable {UNSET_KEY} is not set"),
    ("judge-nothing", judge(), "reward: a judge needs `model`"),
    ("judge-unknown-model", judge(model="tiny-lama"), "reward.model: unknown model 'tiny-lama'"),
    ("judge-encoder", judge(model="minilm-l6"), "reward.model: a judge must be a generative model"),
    # from rewards/classifier.py (directories made by the fixture)
    ("classifier-not-a-model", "classifier-empty", "reward.model: cannot load classifier"),
    ("classifier-label", "classifier-label", "reward.label_index: 5 is out of range"),
    # from rewards/rule.py
    ("rule-module", merge(RS, {"reward": {"function": "llmtune.rewards.nope:fn"}}),
     "reward.function: cannot import module 'llmtune.rewards.nope'"),
    ("rule-attribute", merge(RS, {"reward": {"function": "llmtune.rewards.rules:missing"}}),
     "reward.function: module 'llmtune.rewards.rules' has no attribute 'missing'"),
    ("rule-not-callable", merge(RS, {"reward": {"function": "llmtune.rewards.rules:annotations"}}),
     "reward.function: 'llmtune.rewards.rules:annotations' is not callable"),
    ("rule-format", merge(RS, {"reward": {"function": "llmtune.rewards.rules.target_length"}}),
     "reward.function: expected 'package.module:function'"),
    ("rule-kwargs", merge(RS, {"reward": {"kwargs": {"tagret": 3}}}), "reward.kwargs: llmtune.rewards.rules:target_length"),
    # from rewards/mix.py and rewards/reward_model.py
    ("mix-empty", merge(RS, {"reward": {"type": "mix", "function": None, "components": []}}), "reward.components: required"),
    ("mix-component", merge(RS, {"reward": {"type": "mix", "function": None, "components": [
        RULE, {**RULE, "function": "llmtune.rewards.rules:nope"}]}}), "reward.components[1].function: module"),
    ("rm-source-missing-dir", merge(RS, {"reward": {"type": "reward_model", "function": None, "model": "./no-rm"}}),
     "reward.model: no such model directory: ./no-rm"),
    # from data/load.py and data/converters.py
    ("dataset-cannot-give-shape", merge(DPO, {"data": {"name": "dolly", "path": None}}),
     "data.name: dataset 'dolly' cannot give preference rows"),
    ("format-cannot-give-shape", merge(DPO, {"data": {"name": None, "path": DOLLY_FILE, "format": "dolly"}}),
     "data.format: format 'dolly' gives sft rows, which cannot become preference rows"),
    ("weight-zero", merge(SFT, {"data": {"name": None, "datasets": [{"name": "demo", "weight": 0}]}}),
     "data.datasets[0].weight: 0.0 must be > 0"),
    ("entry-without-source", merge(SFT, {"data": {"name": None, "datasets": [{"weight": 2}]}}),
     "data.datasets[0]: give a dataset `name`"),
    ("beside-a-list", merge(SFT, {"data": {"name": None, "eval_fraction": 0.1, "datasets": [{"name": "demo"}]}}),
     "data.eval_fraction: set it on each entry of data.datasets"),
    ("columns-wrong-format", merge(SFT, {"data": {"name": None, "path": DOLLY_FILE, "format": "dolly",
                                                   "columns": {"prompt": "q"}}}), "data.columns: a column mapping is only used"),
    ("columns-bad-role", merge(SFT, {"data": {"name": None, "path": DOLLY_FILE, "columns": {"prompt": "q", "answer": "a"}}}),
     "data.columns: unknown column role 'answer'"),
    ("option-type", merge(DPO, {"data": {"name": "shp", "options": {"min_score_ratio": "high"}}}),
     "data.options.min_score_ratio: option 'min_score_ratio' expects int or float"),
    ("split-of-a-file", merge(SFT, {"data": {"name": None, "path": DOLLY_FILE, "split": "test"}}),
     "data.split: "),
    ("eval-split-of-a-directory", merge(DPO, {"data": {"eval_split": "validation"}}),
     "data.eval_split: no files named validation"),
    ("eval-split-and-fraction", merge(DPO, {"data": {"eval_split": "test", "eval_fraction": 0.2}}),
     "data.eval_fraction: give eval_split or eval_fraction, not both"),
    ("bad-data-registry", merge(SFT, {"data": {"registry": ["/no/such/registry.json"]}}),
     "data.registry: data registry file not found"),
    # from launch/deepspeed.py and models
    ("deepspeed-json", "deepspeed-json", "distributed.deepspeed_config: "),
    ("unknown-template", merge(SFT, {"model": {"template": "chatml-ish"}}), "model.template: unknown chat template"),
    ("unknown-architecture", "mystery-model", "model.name: "),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Validate every case through `llmtune.cli.main` in one fresh interpreter; report exit codes,
    messages and the heavy modules that got imported."""
    tmp = tmp_path_factory.mktemp("bad-recipes")
    empty = tmp / "classifier-empty"
    empty.mkdir()
    two_labels = tmp / "classifier-two-labels"
    two_labels.mkdir()
    (two_labels / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}))
    mystery = tmp / "mystery"
    mystery.mkdir()
    (mystery / "config.json").write_text(json.dumps({"model_type": "mystery", "architectures": ["MysteryModel"]}))
    own = tmp / "ds.json"
    own.write_text('{"zero_optimization": {"stage": 2,}}')
    made = {
        "classifier-empty": merge(RS, {"reward": {"type": "classifier", "function": None, "model": str(empty)}}),
        "classifier-label": merge(RS, {"reward": {"type": "classifier", "function": None, "model": str(two_labels),
                                                  "label_index": 5}}),
        "deepspeed-json": merge(SFT, {"distributed": {"strategy": "deepspeed", "deepspeed_config": str(own)}}),
        "mystery-model": merge(SFT, {"model": {"name": str(mystery)}}),
    }
    paths = {}
    for case, recipe, _ in CASES:
        data = made[recipe] if isinstance(recipe, str) else recipe
        paths[case] = str(tmp / f"{case}.yaml")
        Path(paths[case]).write_text(yaml.safe_dump(data))
    code = """
import contextlib, io, json, sys
from llmtune.cli import main
out = {}
for case, path in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["validate", path])
    out[case] = [rc, err.getvalue()]
out["heavy"] = [m for m in ("torch", "transformers", "trl", "peft", "gradio", "webui.cli") if m in sys.modules]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(paths)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("case, expected", [(c, e) for c, _, e in CASES], ids=[c for c, _, _ in CASES])
def test_bad_recipe_exits_2_with_the_key_path(results: dict[str, Any], case: str, expected: str) -> None:
    rc, message = results[case]
    assert rc == 2, message
    assert expected in message, message
    assert "Traceback" not in message


def test_validating_them_imports_no_torch(results: dict[str, Any]) -> None:
    assert results["heavy"] == []


def test_the_reported_cases_through_the_real_cli(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(PPO))
    proc = run_cli("validate", str(recipe), "data.split=nonsense", "data.options={bogus: 1}",
                   "ppo.rollout_batch_size=10", "training.optimizer=adafactor")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for key in ("data.split:", "data.options.bogus:", "ppo.mini_batch_size:", "training.optimizer:"):
        assert key in proc.stderr, proc.stderr


def test_cli_reward_sources_go_through_the_same_checks(tmp_path: Path) -> None:
    """`--reward`/`--judge` sources written on the command line are checked like recipe sections."""
    proc = run_cli("eval", "policy", "--model", "tiny-llama", "--baseline", "tiny-llama", "--prompts", "demo",
                   "-n", "1", "--reward", "rule:llmtune.rewards.rules:missing")
    assert proc.returncode == 2 and "--reward.function: module 'llmtune.rewards.rules' has no attribute" in proc.stderr


# --------------------------------------------------------------------------------------------------
# Silent fallbacks made explicit, and the package's import-time side effects.

def test_unknown_architecture_is_an_error_and_a_default_template_is_logged(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    from llmtune.errors import ConfigError
    from llmtune.registry.models import resolve_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "architectures": ["MysteryModel"]}))
    with pytest.raises(ConfigError, match=r"cannot tell whether model_type 'mystery'.*llmtune\.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "llmtune.json").write_text(json.dumps({"kind": "causal"}))
    with caplog.at_level("INFO", logger="llmtune.registry"):
        spec = resolve_model(str(tmp_path))
    assert spec.kind == "causal" and spec.template == "plain"
    assert "records no chat template: using 'plain'" in caplog.text


def test_importing_llmtune_sets_no_environment_variable() -> None:
    code = ("import os, sys\nbefore = dict(os.environ)\nimport llmtune, llmtune.cli, llmtune.config.schema\n"
            "from llmtune.cli import main\nmain(['validate', 'recipes/sft-tiny.yaml'])\n"
            "assert dict(os.environ) == before, set(os.environ) ^ set(before)\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_webui_without_gradio_says_which_extra_to_install(tmp_path: Path) -> None:
    """gradio is the `webui` extra, not a requirement of the core: without it the command says how to
    get it (the import is blocked the way Python blocks a module that is absent)."""
    code = ("import sys\nsys.modules['gradio'] = None\nfrom llmtune.cli import main\n"
            f"sys.exit(main(['webui', '--workspace', {str(tmp_path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'llmtune[webui]'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_plan_does_not_switch_the_hub_off_for_its_own_process(tmp_path: Path) -> None:
    """A cached hub dataset is counted in an offline child process; plan's own process (the web UI's
    server, when it plans) keeps its network settings."""
    cache = tmp_path / "datasets"
    (cache / "databricks___databricks-dolly-15k").mkdir(parents=True)  # looks cached, holds nothing
    code = ("import os, sys\nfrom llmtune.cli import main\n"
            "rc = main(['plan', 'recipes/sft-tiny.yaml', 'data.name=dolly', 'data.eval_fraction=0', '--json'])\n"
            "assert rc == 2, rc\n"
            "assert 'HF_HUB_OFFLINE' not in os.environ and 'HF_DATASETS_OFFLINE' not in os.environ\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_DATASETS_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "data (dolly): " in proc.stderr and "Traceback" not in proc.stderr
