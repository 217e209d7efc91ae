"""`llmtune plan`: parameter counts, memory, rows, tokens and steps checked against hand-computed
figures (and against the real tiny models), through the real CLI, without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

GIB = 1024**3
OVERHEAD = GIB
QUICKSTART = str(ROOT / "recipes" / "sft-tiny.yaml")


def plan_json(*args: str, env: dict | None = None) -> dict:
    proc = run_cli("plan", *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_tiny_llama_full_fp32_adam_by_hand() -> None:
    # tiny-llama: vocab 2000, hidden 64, 2 layers, 4 heads of 16 (2 kv heads), MLP 128, untied head.
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q k v o, gate up down, 2 norms
    params = 2000 * 64 + 2000 * 64 + 2 * per_layer + 64  # embeddings, lm_head, blocks, final norm
    assert params == 330048

    p = plan_json(QUICKSTART, "training.batch_size=8", "data.max_length=128")
    assert p["stage"] == "sft" and p["model"]["params"] == params == p["model"]["trainable_params"]
    mem = p["memory"]
    assert mem["precision"] == "fp32" and mem["weights_dtype"] == "float32"  # no GPU: CPU training
    b = mem["per_device_bytes"]
    assert b["weights"] == params * 4 and b["gradients"] == params * 4 and b["optimizer"] == params * 8
    assert b["master_weights"] == 0 and b["reference_model"] == 0
    # batch x seq x hidden x layers x 68 (fp32 activations) + fp32 logits, log-softmax and a gradient
    assert b["activations"] == 8 * 128 * 64 * 2 * 68 + 8 * 128 * 2000 * 12
    assert mem["per_device_total_bytes"] == params * 16 + b["activations"] + OVERHEAD

    # The printed table shows the same figures.
    table = run_cli("plan", QUICKSTART, "training.batch_size=8", "data.max_length=128", check=True).stdout
    assert "330.05k params" in table and "330,048 of 330,048" in table
    assert f"{params * 4 / 1024**2:9.3f} MiB" in table and f"{params * 8 / 1024**2:9.3f} MiB" in table
    assert f"{mem['per_device_total_bytes'] / GIB:9.3f} GiB" in table


def test_parameter_counts_match_the_real_tiny_models() -> None:
    """The meta-device counts equal the loaded models', and the LoRA counts peft's on the real model."""
    from llmtune.config.load import recipe_from_dict
    from llmtune.launch.plan import model_config, model_shape
    from llmtune.modeling.load import load_for_training
    from llmtune.registry.tiny import TINY_MODELS

    for name in TINY_MODELS:
        for finetuning in ("full", "lora"):
            recipe = recipe_from_dict({"stage": "sft", "model": {"name": name, "finetuning": finetuning},
                                       "data": {"name": "demo"}})
            model, _, spec = load_for_training(recipe)
            shape = model_shape(model_config(spec)[0], recipe, spec)
            assert shape.params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n), name
            assert shape.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad), name


@pytest.mark.slow
def test_llama2_7b_lora_bf16_on_a_24gb_gpu() -> None:
    P = 6_738_415_616  # Llama-2-7B
    # LoRA r=16 on q k v o (4096x4096) and gate up down (4096x11008), 32 layers
    T = 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert T == 39_976_960
    p = plan_json(QUICKSTART, "model.name=llama-2-7b", "model.finetuning=lora", "training.batch_size=2",
                  "data.max_length=512", "--gpu-memory", "24")
    assert p["model"]["params"] == P and p["model"]["trainable_params"] == T
    mem = p["memory"]
    assert mem["precision"] == "bf16" and mem["weights_dtype"] == "bfloat16" and mem["gpu_memory_gib"] == 24
    b = mem["per_device_bytes"]
    assert b["weights"] == P * 2 + T * 4  # frozen bf16 base + fp32 adapters
    assert b["gradients"] == T * 4 and b["optimizer"] == T * 8 and b["master_weights"] == 0
    assert b["activations"] == 2 * 512 * 4096 * 32 * 34 + 2 * 512 * 32000 * 12
    total = P * 2 + T * 16 + b["activations"] + OVERHEAD
    assert mem["per_device_total_bytes"] == total
    assert 17 < total / GIB < 19 and p["warnings"] == []

    small = plan_json(QUICKSTART, "model.name=llama-2-7b", "model.finetuning=full", "--gpu-memory", "16")
    assert any("will not fit 16.0 GiB" in w for w in small["warnings"])
    text = run_cli("plan", QUICKSTART, "model.name=llama-2-7b", "model.finetuning=full", "--gpu-memory", "16").stdout
    assert "warning: estimated" in text and "will not fit" in text


@pytest.mark.slow
def test_zero3_shards_everything_and_offload_moves_it_to_cpu() -> None:
    P = 13_015_864_320  # Llama-2-13B
    recipe = str(ROOT / "recipes" / "gpu" / "sft-llama2-13b-zero3.yaml")
    p = plan_json(recipe, "--gpu-memory", "80")
    assert p["distributed"] == {"strategy": "deepspeed", "world_size": 8, "zero_stage": 3,
                                "offload_optimizer": False, "offload_params": False}
    b = p["memory"]["per_device_bytes"]
    assert b["weights"] == round(P * 2 / 8) and b["gradients"] == round(P * 2 / 8)
    assert b["optimizer"] == round(P * 8 / 8) and b["master_weights"] == round(P * 4 / 8)
    assert p["global_batch"] == 4 * 4 * 8

    off = plan_json(recipe, "distributed.offload_optimizer=true", "distributed.offload_params=true",
                    "--gpu-memory", "80")
    ob = off["memory"]["per_device_bytes"]
    assert ob["weights"] == ob["optimizer"] == ob["master_weights"] == 0
    assert off["memory"]["cpu_offload_gib"] == round((P * 2 / 8 + P * 8 / 8 + P * 4 / 8) / GIB, 3)

    zero2 = plan_json(recipe, "distributed.zero_stage=2", "--gpu-memory", "80")
    assert zero2["memory"]["per_device_bytes"]["weights"] == P * 2  # stage 2 keeps whole weights


@pytest.mark.slow
def test_qlora_dpo_counts_4bit_linears_and_pairs() -> None:
    P, T = 6_738_415_616, 39_976_960
    other = 2 * 32000 * 4096 + 2 * 4096 * 32 + 4096  # embeddings, head, norms stay 16-bit
    p = plan_json(str(ROOT / "recipes" / "gpu" / "dpo-llama2-7b-qlora-ddp.yaml"), "--gpu-memory", "24")
    b = p["memory"]["per_device_bytes"]
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)
    assert b["weights"] == round((P - other) * nf4 + other * 2 + T * 4)
    assert b["optimizer"] == T * 2  # paged_adamw_8bit
    # gradient checkpointing, chosen + rejected: 2 x batch 4 x 512 tokens
    assert b["activations"] == 2 * 4 * 512 * 4096 * (32 * 2 + 34) + 2 * 4 * 512 * 32000 * 12
    assert b["reference_model"] == 0  # LoRA: the reference is the base with adapters disabled
    full = plan_json(str(ROOT / "recipes" / "gpu" / "dpo-llama2-7b-qlora-ddp.yaml"), "model.finetuning=full",
                     "--gpu-memory", "80")
    assert full["memory"]["per_device_bytes"]["reference_model"] == P * 2


@pytest.mark.slow
def test_rows_tokens_and_steps_of_local_data(tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    with data.open("w") as fh:
        for i in range(50):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                              {"role": "assistant", "content": f"a{i}"}]}) + "\n")
    common = [QUICKSTART, "data.name=null", f"data.path={data}", "data.eval_fraction=0.2", "data.max_length=64",
              "training.batch_size=3", "training.gradient_accumulation_steps=2", "training.epochs=2.5",
              "distributed.strategy=ddp", "distributed.num_processes=2"]
    p = plan_json(*common)
    assert p["datasets"][0]["train_rows"] == 40 and p["datasets"][0]["eval_rows"] == 10
    assert p["train_rows"] == 40 and p["dataset_tokens_max"] == 40 * 64
    # ceil(40 / (3 x 2 processes)) = 7 batches -> ceil(7 / 2) = 4 steps per epoch -> ceil(2.5 x 4) = 10
    assert p["global_batch"] == 12 and p["optimizer_steps"] == 10
    assert p["trained_tokens_max"] == 10 * 12 * 64
    assert plan_json(*common, "training.max_steps=7")["optimizer_steps"] == 7


@pytest.mark.slow
def test_hub_dataset_not_cached_is_unknown_not_downloaded(tmp_path: Path) -> None:
    env = {"HF_DATASETS_CACHE": str(tmp_path / "empty-cache")}
    p = plan_json(QUICKSTART, "data.name=dolly", "data.eval_fraction=0", env=env)
    assert p["datasets"][0]["train_rows"] is None and "not cached" in p["datasets"][0]["note"]
    assert p["optimizer_steps"] is None and p["trained_tokens_max"] is None
    assert plan_json(QUICKSTART, "data.name=dolly", "data.eval_fraction=0", "training.max_steps=100",
                     env=env)["optimizer_steps"] == 100


@pytest.mark.slow
def test_config_only_directory_of_llama_1b_random(tmp_path: Path) -> None:
    out = tmp_path / "llama-1b-random"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llama_1b_random.py"), str(out), "--config-only"],
                   check=True, cwd=ROOT)
    assert not list(out.glob("*.safetensors"))
    p = plan_json(QUICKSTART, f"model.name={out}", "--gpu-memory", "80")
    assert p["model"]["params"] == 1_100_048_384  # the TinyLlama-1.1B shape
    assert p["model"]["config"] == str(out / "config.json")


def test_plan_validates_before_importing_torch() -> None:
    code = ("import sys; from llmtune.cli import main; "
            f"rc = main(['plan', {QUICKSTART!r}, 'training.batch_sise=2', '--json']); "
            "assert rc == 2 and 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
    bad = run_cli("plan", QUICKSTART, "training.batch_sise=2")
    assert bad.returncode == 2 and "training.batch_sise: unknown key" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sft-llama2-13b-zero3.yaml", "dpo-llama2-7b-qlora-ddp.yaml"])
def test_scale_out_recipes_plan_anywhere(recipe: str) -> None:
    """GPU recipes are planned (and validated apart from the device) on a machine without GPUs."""
    p = plan_json(str(ROOT / "recipes" / "gpu" / recipe), "--gpu-memory", "80")
    assert p["memory"]["per_device_total_gib"] < 80 * 0.9 and p["warnings"] == []


@pytest.mark.slow
def test_pipeline_plans_every_stage_with_the_model_it_will_start_from(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(f"""
output_dir: {tmp_path / "runs"}
model: {{name: tiny-llama, finetuning: lora}}
training: {{batch_size: 2, max_steps: 10}}
stages:
  sft: {{stage: sft, data: {{name: demo, max_length: 64}}}}
  dpo:
    stage: dpo
    model: {{name: "${{run:sft}}"}}
    data: {{name: hh, path: {ROOT / "tests" / "fixtures" / "raw" / "hh"}, max_length: 64}}
""")
    p = plan_json(str(pipeline))
    assert p["pipeline"] == ["sft (sft)", "dpo (dpo)"]
    sft, dpo = p["stages"]
    assert sft["run_dir"] == str(tmp_path / "runs" / "sft") and dpo["model"]["name"] == str(tmp_path / "runs" / "sft")
    assert sft["model"]["params"] == dpo["model"]["params"] == 330048  # the sft run is tiny-llama + LoRA
    assert sft["model"]["trainable_params"] == 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert dpo["train_rows"] == 3 and sft["train_rows"] == 300
    # chosen + rejected: twice the activations of one sequence per row
    assert dpo["memory"]["per_device_bytes"]["activations"] == 2 * sft["memory"]["per_device_bytes"]["activations"]
    text = run_cli("plan", str(pipeline), check=True).stdout
    assert text.startswith("pipeline       sft (sft) -> dpo (dpo)") and "[dpo] -> " in text


@pytest.mark.slow
def test_activation_estimate_against_the_measured_peak_on_the_tiny_models() -> None:
    """benchmarks/plan_activations.py measures the peak of one training pass of each tiny model; the
    README states the error it prints, so the estimate must stay within it."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_activations.py")], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 9 and {r["model"] for r in rows} == {"tiny-llama", "tiny-gptj", "tiny-t5"}
    assert all(abs(r["error"]) <= 0.2 for r in rows), rows
