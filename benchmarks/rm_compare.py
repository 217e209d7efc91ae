"""The reward-model comparison, fair: llmtune's recipe and plain TRL with identical hyperparameters,
the learning rate chosen on a tuning split that is not reported.

1. On the tuning split (--tune-seed) run benchmarks/rm_minilm_hh.sh with each --lrs value (both
   sides, identical hyperparameters) and pick the learning rate with the best mean held-out accuracy
   of the two sides.
2. With that learning rate run the reported splits (--seeds) and print a Markdown table: held-out
   accuracy of each side (llmtune also on exactly the pairs TRL kept), pairs scored, wall time and
   the machine's load.

    python benchmarks/rm_compare.py --data ../shared/data/hh-harmless-sample.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def split(data: str, out: Path, seed: int, lr: float, threads: int) -> dict[str, Any]:
    """One rm_minilm_hh.sh run: {"llmtune": ..., "trl": ..., "same_pairs": ...}, kept in OUT.result.json
    so that a rerun skips the splits already done."""
    done = out.with_name(out.name + ".result.json")
    if done.exists():
        return json.loads(done.read_text())
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/rm_minilm_hh.sh"), data, str(out), str(seed), str(lr),
                           str(threads)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"rm_minilm_hh.sh failed (seed {seed}, lr {lr}):\n{proc.stderr[-3000:]}")
    # A line may carry a library's prompt before its JSON object (transformers asking about custom code).
    lines = [json.loads(line[line.index("{"):]) for line in proc.stdout.splitlines() if "{" in line]
    result = {"same_pairs": lines[-1]}
    result.update({line["side"]: line for line in lines[:-1]})
    done.write_text(json.dumps(result))
    print(json.dumps({"seed": seed, "learning_rate": lr, **result}), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/hh-harmless-sample.jsonl.gz"))
    ap.add_argument("--out", default="/tmp/llmtune-rm-compare")
    ap.add_argument("--tune-seed", type=int, default=0)
    ap.add_argument("--lrs", nargs="+", type=float, default=[2e-5, 5e-5, 1e-4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each side (they run at the same time)")
    args = ap.parse_args()
    out = Path(args.out)

    tuning = {lr: split(args.data, out / f"tune-{lr:g}", args.tune_seed, lr, args.threads) for lr in args.lrs}
    score = {lr: (r["llmtune"]["eval_accuracy"] + r["trl"]["eval_accuracy"]) / 2 for lr, r in tuning.items()}
    lr = max(score, key=lambda k: score[k])
    print(json.dumps({"tuning_split": args.tune_seed, "mean_accuracy_by_lr": score, "chosen_lr": lr}), flush=True)
    reported = [split(args.data, out / f"seed-{s}", s, lr, args.threads) for s in args.seeds]

    def accs(side: str) -> list[float]:
        return [r[side]["eval_accuracy"] for r in reported]

    same = [next(iter(r["same_pairs"]["pairs_trl_keeps"].values()))["accuracy"] for r in reported]
    kept = [r["trl"]["eval_pairs"] for r in reported]
    print("\n| learning rate (chosen on split {}: {}) | {} | mean |\n|---|{}---|".format(
        args.tune_seed, ", ".join(f"{k:g} → {v:.3f}" for k, v in score.items()),
        " | ".join(f"split {s}" for s in args.seeds), "---|" * len(args.seeds)))
    rows = [
        ("llmtune, all held-out pairs", accs("llmtune")),
        ("llmtune, on the pairs TRL keeps", same),
        ("plain TRL RewardTrainer (pairs it keeps: " + "/".join(map(str, kept)) + ")", accs("trl")),
    ]
    for name, values in rows:
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | **{statistics.mean(values):.3f}** |")
    for side in ("llmtune", "trl"):
        walls = [r[side]["wall_s"] for r in reported]
        print(f"| {side} wall (s; load {', '.join(str(r[side]['load_avg']) for r in reported)}) | "
              + " | ".join(f"{w:.0f}" for w in walls) + f" | {statistics.mean(walls):.0f} |")


if __name__ == "__main__":
    main()
