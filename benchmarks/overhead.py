"""What llmtune's recipe machinery costs over plain TRL: `llmtune train` for SFT, DPO and RM beside
a plain TRL script (the few lines a user would write: load with transformers, train with TRL's
trainer, save), with the same model, the same rows, the same hyperparameters and the same CPU
threads, A/B alternating (llmtune, TRL, then TRL, llmtune, ...) so that load from other processes
hits both sides alike. Wall time is the whole command: interpreter start, imports, data
preparation, model load, training, saving. Prints one JSON line per run (with the machine's load
average) and a Markdown table of medians with the ratio llmtune / TRL.

    python benchmarks/overhead.py --data ../shared/data/hh-harmless-sample.jsonl.gz
    python benchmarks/overhead.py --stages sft --model smollm2-135m-instruct --finetuning lora --steps 20

Both sides read the same canonical rows (TRL's conversational format; converted once from the HH
file by llmtune's data loader, not timed). TRL tokenises them with the model's own chat template
(llmtune's template, saved with the model), llmtune with its template code: the token counts are
close, not equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"sft": "sft", "dpo": "preference", "rm": "preference"}


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def recipe(stage: str, args: argparse.Namespace, finetuning: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "stage": stage,
        "model": {"name": args.model, "finetuning": finetuning, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {**data, "max_length": args.max_length, "max_prompt_length": args.max_length // 2},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                     "lr_scheduler": "linear", "warmup_steps": 0, "weight_decay": 0.0, "logging_steps": 10,
                     "save_steps": 10_000, "seed": 42, "threads": args.threads},
    }


# -- the plain TRL side (a child process) -------------------------------------------------------------

def plain_trl(stage: str, spec_file: Path, out: Path) -> None:
    """What a user would write with TRL alone (run as `overhead.py --trl STAGE SPEC OUT`)."""
    spec = json.loads(spec_file.read_text())
    r, model_dir, rows = spec["recipe"], spec["model_dir"], spec["rows"]
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(r["training"]["threads"])
    t, m = r["training"], r["model"]
    common = dict(output_dir=str(out), max_steps=t["max_steps"], per_device_train_batch_size=t["batch_size"],
                  learning_rate=t["learning_rate"], lr_scheduler_type=t["lr_scheduler"], warmup_steps=0,
                  weight_decay=t["weight_decay"], seed=t["seed"], data_seed=t["seed"], logging_steps=t["logging_steps"],
                  save_strategy="no", report_to="none", disable_tqdm=True, max_length=r["data"]["max_length"],
                  # TRL's configs default to bf16 and activation checkpointing; llmtune's recipe has neither on CPU
                  bf16=torch.cuda.is_available(), activation_checkpointing=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset("json", data_files=rows, split="train")
    peft = (LoraConfig(r=m["lora"]["r"], lora_alpha=m["lora"]["alpha"], lora_dropout=m["lora"]["dropout"],
                       target_modules=spec["lora_targets"], task_type="SEQ_CLS" if stage == "rm" else "CAUSAL_LM")
            if m["finetuning"] == "lora" else None)
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer: Any = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tok,
                                  peft_config=peft)
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1), train_dataset=data, processing_class=tok,
                             peft_config=peft)
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=data, processing_class=tok,
                                peft_config=peft)
    trainer.train()
    trainer.save_model(str(out / "model"))


# -- the parent: data once, then A/B runs -------------------------------------------------------------

def prepare(stage: str, args: argparse.Namespace, work: Path, finetuning: str) -> tuple[Path, Path]:
    """The llmtune recipe and the TRL side's spec: both read the same canonical rows (TRL's
    conversational columns), converted once from the HH file here, untimed."""
    from llmtune.config.load import dump, recipe_from_dict
    from llmtune.modeling.load import base_location
    from llmtune.registry.models import resolve_model
    from llmtune.stages.common import data_rows

    source = {"name": "hh", "path": str(Path(args.data).resolve()), "num_samples": args.steps * args.batch_size}
    rows, _ = data_rows(recipe_from_dict(recipe(stage, args, finetuning, source)), SHAPES[stage])
    rows_file = work / f"{stage}.rows.jsonl"
    with rows_file.open("w") as fh:
        for row in rows:
            fh.write(json.dumps({k: v for k, v in row.items() if k in ("messages", "prompt", "chosen", "rejected")})
                     + "\n")
    r = recipe(stage, args, finetuning, {"path": str(rows_file), "format": "canonical"})
    parsed = recipe_from_dict(r)
    spec = resolve_model(args.model)
    recipe_file = work / f"{stage}.yaml"
    recipe_file.write_text(dump(parsed))
    spec_file = work / f"{stage}.trl.json"
    spec_file.write_text(json.dumps({"recipe": r, "rows": str(rows_file), "model_dir": base_location(spec),
                                     "lora_targets": spec.lora_targets}))
    return recipe_file, spec_file


def timed(cmd: list[str], threads: int, log: Path) -> tuple[float, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    before = load()
    began = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return wall, [before, load()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl", nargs=3, metavar=("STAGE", "SPEC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/hh-harmless-sample.jsonl.gz"),
                    help="HH-format preference data (SFT trains on the chosen conversations)")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--stages", nargs="+", default=["sft", "dpo", "rm"], choices=list(SHAPES))
    ap.add_argument("--finetuning", help="full or lora (default: full for sft and rm, lora for dpo)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of both sides")
    ap.add_argument("--rounds", type=int, default=3, help="A/B pairs per stage")
    args = ap.parse_args()
    if args.trl:
        stage, spec, out = args.trl
        plain_trl(stage, Path(spec), Path(out))
        return

    work = Path(tempfile.mkdtemp(prefix="llmtune-overhead-"))
    table = []
    for stage in args.stages:
        finetuning = args.finetuning or ("lora" if stage == "dpo" else "full")
        recipe_file, spec_file = prepare(stage, args, work, finetuning)
        walls: dict[str, list[float]] = {"llmtune": [], "trl": []}
        for rnd in range(args.rounds):
            for side in (("llmtune", "trl") if rnd % 2 == 0 else ("trl", "llmtune")):
                out = work / f"{stage}-{side}-{rnd}"
                cmd = ([sys.executable, "-m", "llmtune.cli", "train", str(recipe_file), "--output-dir", str(out)]
                       if side == "llmtune" else
                       [sys.executable, str(Path(__file__).resolve()), "--trl", stage, str(spec_file), str(out)])
                wall, load_avg = timed(cmd, args.threads, work / f"{stage}-{side}-{rnd}.log")
                walls[side].append(wall)
                print(json.dumps({"stage": stage, "side": side, "round": rnd, "model": args.model,
                                  "finetuning": finetuning, "steps": args.steps, "threads": args.threads,
                                  "wall_s": round(wall, 2), "load": load_avg}), flush=True)
        ratios = [a / b for a, b in zip(walls["llmtune"], walls["trl"])]
        table.append(f"| {stage} ({args.model}, {finetuning}, {args.steps} steps) | "
                     f"{statistics.median(walls['llmtune']):.1f} s | {statistics.median(walls['trl']):.1f} s | "
                     f"{statistics.median(walls['llmtune']) / statistics.median(walls['trl']):.2f}x "
                     f"(per pair {', '.join(f'{r:.2f}' for r in ratios)}) |")
    print("\n| stage | llmtune train | plain TRL | llmtune / TRL |\n|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
