"""Scale-out: a real 2-process DDP run (gloo on CPU) through the CLI's accelerate re-launch, the
DeepSpeed ZeRO configs generated from recipes (checked by transformers' and DeepSpeed's own
validators), the launch command lines, and the up-front validation of distributed combinations."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_cli

from llmtune.config.checks.device import cuda_present
from llmtune.config.load import load_dict
from llmtune.config.schema import Recipe, check, parse
from llmtune.errors import ConfigError
from llmtune.launch.deepspeed import build_config, deepspeed_config_for
from llmtune.launch.relaunch import launch_command, launch_env, needs_relaunch, train_args
from llmtune.runs.rundir import RunDir, StopFlag

QUICKSTART = ROOT / "recipes" / "sft-tiny.yaml"


def recipe(*overrides: str, device_checks: bool = False) -> Recipe:
    """The quickstart recipe with overrides, validated without this machine's GPU checks (so GPU
    recipes can be turned into configs and commands here)."""
    return check(parse(load_dict(QUICKSTART, list(overrides))), device_checks=device_checks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# A real multi-process run.

@pytest.mark.slow
def test_ddp_two_processes_one_run_directory_written_by_rank_zero(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli("train", str(QUICKSTART), "distributed.strategy=ddp", "distributed.num_processes=2",
                   f"distributed.main_process_port={free_port()}", "data.num_samples=80", "training.max_steps=4",
                   "training.logging_steps=2", "training.save_steps=100", "--output-dir", str(run), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launching 2 processes" in proc.stderr and "accelerate.commands.launch" in proc.stderr
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"status"')]
    assert len(summaries) == 1 and summaries[0]["status"] == "completed"  # printed by rank 0 only

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["summary"]["global_step"] == 4
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 4]  # one row per logging step, not two
    assert sum("train_runtime" in m for m in metrics) == 1
    # 80 rows - 8 held out = 72; 2 ranks x batch 8 = 16 rows per step -> 5 steps per epoch, so step 4 is
    # epoch 0.8. A lone process (or two that each trained alone) would be at 4/9 of an epoch.
    assert metrics[-1]["epoch"] == pytest.approx(0.8)
    assert info["summary"]["train_rows"] == 72

    model = run / "model"
    assert {"model.safetensors", "config.json", "llmtune.json", "tokenizer.json"} <= {p.name for p in model.iterdir()}
    assert json.loads((model / "llmtune.json").read_text())["finetuning"] == "full"
    assert [p.name for p in run.iterdir() if p.name.startswith("model")] == ["model"]
    assert (run / "train.log").read_text().count("done: model saved") == 1
    assert not (run / "deepspeed.json").exists()

    from llmtune.modeling.load import load_for_inference

    reloaded, tok, _ = load_for_inference(str(run))
    assert sum(p.numel() for p in reloaded.parameters()) == 330048


@pytest.mark.slow
def test_ddp_sigterm_to_the_launching_process_checkpoints_every_rank_at_one_step(tmp_path: Path) -> None:
    """What the web UI's Stop does: SIGTERM to `llmtune train`. The parent forwards it, torchrun hands it
    to each worker, the ranks agree on one stopping step (a rank leaving alone would hang the others in
    the next all-reduce), rank 0 writes the checkpoint, and the exit code says interrupted."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "llmtune.cli", "train", str(QUICKSTART), "distributed.strategy=ddp",
           "distributed.num_processes=2", f"distributed.main_process_port={free_port()}", "training.max_steps=5000",
           "training.logging_steps=1", "training.save_steps=100000", "--output-dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, out + err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted"
    checkpoints = list((run / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").exists()
    assert not (run / "model").exists()


# --------------------------------------------------------------------------------------------------
# DeepSpeed configs.

@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_generated_zero_config_follows_the_recipe(tmp_path: Path, stage: int, precision: str) -> None:
    r = recipe("distributed.strategy=deepspeed", f"distributed.zero_stage={stage}", "distributed.num_processes=4",
               "distributed.num_nodes=2", "distributed.main_process_ip=10.0.0.1", "training.batch_size=3",
               "training.gradient_accumulation_steps=5", "training.max_grad_norm=0.7",
               f"training.precision={precision}")
    path = Path(deepspeed_config_for(r, RunDir(tmp_path / "run")))
    assert path == tmp_path / "run" / "deepspeed.json"
    cfg = json.loads(path.read_text())
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 5
    assert cfg["train_batch_size"] == 3 * 5 * 8  # micro x accum x (4 processes x 2 nodes)
    assert cfg["gradient_clipping"] == 0.7
    if precision == "auto":
        assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    else:
        assert cfg["bf16"]["enabled"] is (precision == "bf16")
        assert cfg["fp16"]["enabled"] is (precision == "fp16")
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)
    assert "offload_optimizer" not in zero and "offload_param" not in zero and "optimizer" not in cfg


def test_offload_sections_and_deepspeed_cpu_adam(tmp_path: Path) -> None:
    r = recipe("distributed.strategy=deepspeed", "distributed.zero_stage=3", "distributed.offload_optimizer=true",
               "distributed.offload_params=true")
    cfg = build_config(r)
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert cfg["optimizer"]["type"] == "AdamW"  # ZeRO-Offload refuses a torch optimizer
    assert build_config(r, num_processes=0)["train_batch_size"] == "auto"


@pytest.mark.parametrize("stage", [2, 3])
def test_generated_config_passes_transformers_and_deepspeed_validation(tmp_path: Path, stage: int) -> None:
    """transformers refuses a DeepSpeed config that disagrees with its TrainingArguments, and DeepSpeed
    validates the ZeRO section; both must accept what we generate from the same recipe."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from transformers import AutoConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from llmtune.registry.tiny import materialize
    from llmtune.stages.common import Context, training_args

    r = recipe("distributed.strategy=deepspeed", f"distributed.zero_stage={stage}", "distributed.num_processes=2",
               "training.batch_size=4", "training.gradient_accumulation_steps=2", "training.max_grad_norm=0.5",
               "training.precision=bf16", "distributed.offload_optimizer=true")
    ctx = Context(run=RunDir(tmp_path / "run"), resume=False, stop=StopFlag())
    kwargs = training_args(r, ctx, dict, has_eval=False)  # the exact TrainingArguments keywords
    args = SimpleNamespace(**kwargs, world_size=2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                           save_on_each_node=False, fp16_full_eval=False, bf16_full_eval=False,
                           get_warmup_steps=lambda steps: 0)
    args.bf16 = True  # what precision_flags gives on a bf16 GPU (this CPU machine reports none)
    hf = HfTrainerDeepSpeedConfig(kwargs["deepspeed"])
    hf.trainer_config_process(args)
    model = SimpleNamespace(config=AutoConfig.from_pretrained(materialize("tiny-llama")))
    hf.trainer_config_finalize(args, model, num_training_steps=10)  # raises on any mismatch
    assert hf.mismatches == []
    final = hf.config
    assert "auto" not in json.dumps(final)
    assert final["train_batch_size"] == 4 * 2 * 2 and final["bf16"]["enabled"] is True
    assert final["optimizer"]["params"]["lr"] == r.training.learning_rate
    DeepSpeedZeroConfig(**final["zero_optimization"])


def test_user_deepspeed_config_is_copied_and_bad_json_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    r = recipe("distributed.strategy=deepspeed", f"distributed.deepspeed_config={own}")
    path = deepspeed_config_for(r, RunDir(tmp_path / "run"))
    assert json.loads(Path(path).read_text()) == json.loads(own.read_text())
    own.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"distributed.deepspeed_config: .*mine.json:1: invalid JSON"):
        deepspeed_config_for(r, RunDir(tmp_path / "run2"))
    # A worker other than rank 0 never writes into the run directory.
    monkeypatch.setenv("RANK", "1")
    other = recipe("distributed.strategy=deepspeed")
    path = Path(deepspeed_config_for(other, RunDir(tmp_path / "run3")))
    assert not (tmp_path / "run3").exists() and json.loads(path.read_text())["zero_optimization"]["stage"] == 2
    assert deepspeed_config_for(other, RunDir(tmp_path / "run4")) == str(path)  # same content, same file


# --------------------------------------------------------------------------------------------------
# Launch commands (checked against accelerate's own argument parser).

def _accelerate_args(cmd: list[str]) -> argparse.Namespace:
    from accelerate.commands.launch import launch_command_parser

    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(cmd[3:])


def test_cpu_ddp_command_and_environment(tmp_path: Path) -> None:
    r = recipe("distributed.strategy=ddp", "distributed.num_processes=2", "distributed.main_process_port=29811")
    argv = train_args("recipes/sft-tiny.yaml", ["training.max_steps=3"], tmp_path / "run", resume=True)
    cmd = launch_command(r, argv, tmp_path / "run", cuda=False)
    parsed = _accelerate_args(cmd)
    assert parsed.multi_gpu and not parsed.use_deepspeed and parsed.num_processes == 2
    assert parsed.num_machines == 1 and parsed.main_process_port == 29811 and parsed.mixed_precision == "no"
    assert parsed.module and parsed.training_script == "llmtune.cli"
    assert parsed.training_script_args == ["train", "recipes/sft-tiny.yaml", "training.max_steps=3",
                                           "--output-dir", str(tmp_path / "run"), "--resume"]
    env = launch_env(cuda=False)
    assert env["ACCELERATE_USE_CPU"] == "true" and int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 300


def test_deepspeed_commands_single_and_multi_node(tmp_path: Path) -> None:
    r = recipe("distributed.strategy=deepspeed", "distributed.zero_stage=3", "distributed.num_processes=8",
               "training.precision=bf16")
    parsed = _accelerate_args(launch_command(r, ["train", "x.yaml"], tmp_path / "one", cuda=True))
    assert parsed.use_deepspeed and not parsed.multi_gpu and parsed.num_processes == 8
    assert parsed.mixed_precision == "bf16"
    assert json.loads(Path(parsed.deepspeed_config_file).read_text())["zero_optimization"]["stage"] == 3
    assert Path(parsed.deepspeed_config_file) == tmp_path / "one" / "deepspeed.json"

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    r = recipe("distributed.strategy=deepspeed", "distributed.num_processes=8", "distributed.num_nodes=2",
               "distributed.machine_rank=1", "distributed.main_process_ip=10.1.2.3", f"distributed.hostfile={hostfile}")
    parsed = _accelerate_args(launch_command(r, ["train", "x.yaml"], tmp_path / "two", cuda=True))
    assert parsed.num_processes == 16 and parsed.num_machines == 2 and parsed.machine_rank == 1
    assert parsed.main_process_ip == "10.1.2.3" and parsed.deepspeed_hostfile == str(hostfile)
    assert parsed.deepspeed_multinode_launcher == "pdsh"
    assert json.loads((tmp_path / "two" / "deepspeed.json").read_text())["train_batch_size"] == 8 * 16


def test_users_accelerate_config_replaces_the_strategy_flag(tmp_path: Path) -> None:
    cfg = ROOT / "recipes" / "accelerate" / "multi_node_ddp.yaml"
    r = recipe("distributed.strategy=ddp", "distributed.num_processes=2", f"distributed.accelerate_config={cfg}")
    cmd = launch_command(r, ["train", "x.yaml"], tmp_path / "run", cuda=True)
    parsed = _accelerate_args(cmd)
    assert parsed.config_file == str(cfg) and not parsed.multi_gpu and parsed.num_processes == 2


def test_relaunch_only_from_the_users_process(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not needs_relaunch(recipe())
    assert needs_relaunch(recipe("distributed.strategy=ddp", "distributed.num_processes=2"))
    assert needs_relaunch(recipe("distributed.strategy=deepspeed"))  # one GPU still needs a launcher env
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not needs_relaunch(recipe("distributed.strategy=ddp", "distributed.num_processes=2"))


# --------------------------------------------------------------------------------------------------
# Up-front validation.

@pytest.mark.parametrize(("overrides", "message"), [
    (["model.finetuning=qlora", "distributed.strategy=deepspeed", "distributed.zero_stage=3"],
     "distributed.zero_stage: QLoRA's 4-bit weights cannot be sharded by ZeRO-3"),
    (["distributed.strategy=deepspeed", "distributed.offload_params=true"],
     "distributed.offload_params: parameter offload needs zero_stage: 3"),
    (["distributed.strategy=ddp", "distributed.offload_optimizer=true"],
     "CPU offload needs strategy: deepspeed"),
    (["distributed.num_processes=2"], "distributed.strategy: more than one process needs strategy ddp or deepspeed"),
    (["distributed.strategy=ddp", "distributed.num_nodes=2"], "distributed.main_process_ip: required when num_nodes > 1"),
    (["distributed.strategy=ddp", "distributed.num_nodes=2", "distributed.main_process_ip=h", "distributed.machine_rank=2"],
     "distributed.machine_rank: 2 must be < num_nodes (2)"),
    (["distributed.strategy=deepspeed", "distributed.hostfile=/nonexistent/hosts"],
     "distributed.hostfile: no such file: /nonexistent/hosts"),
    (["distributed.strategy=ddp", "distributed.deepspeed_config=/nonexistent/ds.json"],
     "distributed.deepspeed_config: only used with strategy: deepspeed"),
    (["distributed.strategy=deepspeed", "distributed.zero_stage=1"], "distributed.zero_stage: 1 must be >= 2"),
])
def test_invalid_distributed_combinations(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        recipe(*overrides)
    assert message in str(err.value)


@pytest.mark.skipif(cuda_present(), reason="checks the refusal of GPU-only features on a machine without a GPU")
def test_gpu_only_features_refused_without_cuda() -> None:
    with pytest.raises(ConfigError) as err:
        recipe("distributed.strategy=deepspeed", "model.finetuning=qlora", device_checks=True)
    assert "distributed.strategy: deepspeed needs CUDA GPUs" in str(err.value)
    assert "model.finetuning: qlora needs a CUDA GPU" in str(err.value)
    proc = run_cli("train", str(QUICKSTART), "distributed.strategy=deepspeed", "distributed.zero_stage=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "llmtune: error:" in proc.stderr and "deepspeed needs CUDA GPUs" in proc.stderr
