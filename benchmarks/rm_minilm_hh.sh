#!/usr/bin/env bash
# recipes/rm-minilm-hh.yaml beside benchmarks/rm_trl_baseline.py with identical hyperparameters: the
# recipe's learning rate (or LR), schedule, warmup, weight decay, batch size, epochs and max_length
# go to both sides; same data file, same held-out pairs (eval_fraction 0.2; SEED is the split and
# training seed of both). The two run at the same time with THREADS threads each (default 1), so
# load from other processes hits both alike. Prints one JSON line for each (held-out accuracy, pairs
# scored, wall time, machine load), then the llmtune model's accuracy on exactly the held-out pairs
# the TRL run kept (rm_same_pairs.py: TRL drops the pairs longer than max_length, llmtune trims them).
#   benchmarks/rm_minilm_hh.sh [DATA] [OUT_DIR] [SEED] [LR] [THREADS]
# benchmarks/rm_compare.py runs it on a tuning split and on the reported ones and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/hh-harmless-sample.jsonl.gz}
OUT=${2:-/tmp/llmtune-bench-rm-minilm-hh}
SEED=${3:-42}
THREADS=${5:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
read -r EPOCHS MAX_LENGTH LR_RECIPE SCHEDULER WARMUP DECAY BATCH < <(python -c "from llmtune.config.load import load_recipe
r = load_recipe('recipes/rm-minilm-hh.yaml', ['data.path=$DATA']); t = r.training
print(t.epochs, r.data.max_length, t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.weight_decay, t.batch_size)")
LR=${4:-$LR_RECIPE}
rm -rf "$OUT" && mkdir -p "$(dirname "$OUT")"

load() { cut -d' ' -f1 /proc/loadavg; }
load_before=$(load)
(
  start=$(date +%s.%N)
  python -m llmtune.cli train recipes/rm-minilm-hh.yaml "data.path=$DATA" "training.seed=$SEED" \
    "training.learning_rate=$LR" "training.threads=$THREADS" --output-dir "$OUT" > "$OUT.train.log" 2>&1
  python -m llmtune.cli eval reward-accuracy --model "$OUT" --data hh --path "$DATA" --split train \
    --eval-fraction 0.2 --seed "$SEED" > "$OUT.eval.json" 2> "$OUT.eval.log"
  echo "$start $(date +%s.%N)" > "$OUT.wall"
) &
python benchmarks/rm_trl_baseline.py --data "$DATA" --epochs "$EPOCHS" --seed "$SEED" --max-length "$MAX_LENGTH" \
  --learning-rate "$LR" --lr-scheduler "$SCHEDULER" --warmup-ratio "$WARMUP" --weight-decay "$DECAY" \
  --batch-size "$BATCH" --threads "$THREADS" 2> "$OUT.baseline.log" | tail -1 > "$OUT.baseline.json"
wait
python - "$OUT" "$SEED" "$LR" "$load_before" "$(load)" <<'PY'
import json, sys
out, seed, lr, before, after = sys.argv[1:]
r = json.loads(open(out + ".eval.json").read())
start, end = map(float, open(out + ".wall").read().split())
print(json.dumps({"side": "llmtune", "split_seed": int(seed), "learning_rate": float(lr),
                  "eval_accuracy": round(r["accuracy"], 4), "eval_pairs": r["n"], "mean_margin": round(r["mean_margin"], 4),
                  "wall_s": round(end - start, 1), "load_avg": [before, after]}))
print(json.dumps({"side": "trl", "split_seed": int(seed), "learning_rate": float(lr),
                  **json.loads(open(out + ".baseline.json").read()), "load_avg": [before, after]}))
PY
python benchmarks/rm_same_pairs.py "$OUT" --data "$DATA" --seed "$SEED" --max-length "$MAX_LENGTH" 2> "$OUT.same_pairs.log"
