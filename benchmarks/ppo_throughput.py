"""PPO throughput and peak memory of llmtune's PPO stage on the quickstart recipe.

Runs `recipes/ppo-quickstart.yaml` (or --recipe) in this process through `llmtune.train.train` and
prints one JSON object: PPO samples/s and response tokens/s (median over steps, first step excluded
as warm-up), wall time, peak RSS (MB) and the learning result (mean reward over the first and last
tenth of the steps, KL).

    OMP_NUM_THREADS=1 python benchmarks/ppo_throughput.py --model runs/quickstart
Compare with the TRL 0.11 reference: benchmarks/ppo_trl011_baseline.py (same sizes and lengths).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/ppo-quickstart.yaml")
    ap.add_argument("--model", help="override model.name (e.g. the SFT quickstart run directory)")
    ap.add_argument("--output-dir", help="run directory (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more recipe overrides")
    args = ap.parse_args()

    from llmtune.config.load import load_recipe
    from llmtune.runs.rundir import RunDir
    from llmtune.train import train

    overrides = list(args.overrides) + ([f"model.name={args.model}"] if args.model else [])
    recipe = load_recipe(args.recipe, overrides)
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="ppo-bench-")) / "run"
    started = time.perf_counter()
    summary = train(recipe, out)
    wall = time.perf_counter() - started
    rows = RunDir(out).metrics()
    timed = rows[1:] or rows
    tenth = max(1, len(rows) // 10)
    result = {
        "implementation": "llmtune",
        "recipe": args.recipe, "model": recipe.model.name, "finetuning": recipe.model.finetuning,
        "steps": summary["global_step"], "rollout_batch_size": recipe.ppo.rollout_batch_size,
        "mini_batch_size": recipe.ppo.mini_batch_size, "ppo_epochs": recipe.ppo.ppo_epochs,
        "max_new_tokens": recipe.ppo.generation.max_new_tokens,
        "samples_per_s": statistics.median(r["samples_per_s"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_s": statistics.median(r["step_s"] for r in timed),
        "wall_s": round(wall, 1),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reward_first_tenth": sum(r["reward_mean"] for r in rows[:tenth]) / tenth,
        "reward_last_tenth": sum(r["reward_mean"] for r in rows[-tenth:]) / tenth,
        "kl_last_tenth": sum(r["kl"] for r in rows[-tenth:]) / tenth,
        "kl_max": max(r["kl"] for r in rows),
        "run_dir": str(out),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
