"""PPO throughput and peak memory: llmtune's PPO beside TRL 0.11.4's PPOTrainer, side by side in one run.

Both run the same workload (benchmarks/ppo_trl011_baseline.py: the same model directory and tokenizer, LoRA
r=16 on the attention and MLP projections, 16 rollouts per step, minibatches of 8, 2 PPO epochs, 16 sampled
tokens, fixed KL 0.05, the PPO quickstart's prompts and checker), alternating A/B/A/B, each in a fresh
process with the same thread count, and the ratio of the median samples/s is printed at the end with each
implementation's peak RSS.

    bash benchmarks/setup_trl011.sh /tmp/trl011        # once
    llmtune train recipes/ppo-quickstart.yaml          # its sft stage is the model (or any causal LM directory)
    OMP_NUM_THREADS=1 python benchmarks/ppo_throughput.py --model runs/ppo-quickstart/sft/model
    OMP_NUM_THREADS=1 python benchmarks/ppo_throughput.py --model smollm2-135m-instruct --steps 6 --learning-rate 1e-5

`--only llmtune` runs llmtune's side alone (what the A/B driver starts) and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "benchmarks" / "ppo_trl011_baseline.py"


def llmtune_side(model: str, steps: int, learning_rate: float, out: Path) -> dict[str, Any]:
    """One llmtune PPO run of the shared workload in this process."""
    from llmtune.config.load import recipe_from_dict
    from llmtune.runs.rundir import RunDir
    from llmtune.train import train

    recipe = recipe_from_dict({
        "stage": "ppo",
        "model": {"name": model, "finetuning": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {"name": "arithmetic", "max_length": 128, "max_prompt_length": 64},
        "training": {"max_steps": steps, "learning_rate": learning_rate, "lr_scheduler": "constant",
                     "logging_steps": 1, "save_steps": 100000, "seed": 42},
        "reward": {"type": "rule", "function": "llmtune.rewards.rules:numeric_answer"},
        "ppo": {"rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2, "kl_coef": 0.05,
                "generation_batch_size": 16, "sample_every": 100000, "generation": {"max_new_tokens": 16}},
    })
    started = time.perf_counter()
    train(recipe, out)
    wall = time.perf_counter() - started
    rows = [r for r in RunDir(out).metrics() if "samples_per_s" in r]
    timed = rows[1:] or rows  # the first step warms up
    return {"implementation": "llmtune", "model": model, "steps": len(rows),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "step_s": statistics.median(r["step_s"] for r in timed), "wall_s": round(wall, 1),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "reward_mean_last": rows[-1]["reward_mean"], "kl_last": rows[-1].get("kl")}


def model_dir(model: str) -> str:
    """A directory TRL can load: a run directory's model/, a registry model's converted directory."""
    from llmtune.modeling.load import base_location
    from llmtune.registry.models import resolve_model

    path = Path(model)
    if (path / "model").is_dir():
        return str(path / "model")
    return str(path) if path.is_dir() else base_location(resolve_model(model))


def last_json(text: str) -> dict[str, Any]:
    start = text.rindex("\n{") + 1 if "\n{" in text else text.index("{")
    return json.loads(text[start:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a causal LM directory, run directory or registry name")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--learning-rate", type=float, default=1e-2)
    ap.add_argument("--rounds", type=int, default=2, help="A/B pairs")
    ap.add_argument("--trl-python", default="/tmp/trl011/bin/python", help="the TRL 0.11.4 virtualenv's python")
    ap.add_argument("--only", choices=["llmtune"], help="run one side in this process and print its JSON")
    args = ap.parse_args()
    if args.only:
        with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
            print(json.dumps(llmtune_side(args.model, args.steps, args.learning_rate, Path(tmp) / "run")))
        return

    directory = model_dir(args.model)
    template = "chatml" if (Path(directory) / "chat_template.jinja").exists() and "im_start" in (
        Path(directory) / "chat_template.jinja").read_text() else "llama2"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ours = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
            "--learning-rate", str(args.learning_rate), "--only", "llmtune"]
    theirs = [args.trl_python, str(BASELINE), "--model", directory, "--steps", str(args.steps),
              "--learning-rate", str(args.learning_rate), "--template", template]
    results: dict[str, list[dict[str, Any]]] = {"llmtune": [], "trl": []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, cmd in (("llmtune", ours), ("trl", theirs)):
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(last_json(proc.stdout))
            print(json.dumps(results[name][-1]), flush=True)
            loads.append(os.getloadavg()[0])
    med = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in results.items()}
    print(json.dumps({
        "model": args.model, "steps": args.steps, "rounds": args.rounds, "threads": os.environ.get("OMP_NUM_THREADS"),
        "samples_per_s": med, "ratio_llmtune_over_trl": med["llmtune"] / med["trl"],
        "max_rss_mb": {k: max(r["max_rss_mb"] for r in v) for k, v in results.items()},
        "load_avg": [round(x, 2) for x in loads],
    }, indent=2))


if __name__ == "__main__":
    main()
