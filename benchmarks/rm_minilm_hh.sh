#!/usr/bin/env bash
# recipes/rm-minilm-hh.yaml beside benchmarks/rm_trl_baseline.py: same data file, same held-out
# pairs (eval_fraction 0.2, seed 42 unless SEED is given), same epochs, same machine. Runs llmtune (train + a separate
# `llmtune eval reward-accuracy` on the held-out pairs), then the plain TRL baseline, back to back,
# and prints one JSON line for each: held-out accuracy, pairs scored, wall time, machine load. Then the
# baseline again at the recipe's own data.max_length (TRL drops the pairs longer than that), and the
# llmtune model's accuracy on exactly the held-out pairs each TRL run kept (rm_same_pairs.py).
#   benchmarks/rm_minilm_hh.sh [DATA] [OUT_DIR] [SEED]     (SEED: the split and training seed of both runs)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/hh-harmless-sample.jsonl.gz}
OUT=${2:-/tmp/llmtune-bench-rm-minilm-hh}
SEED=${3:-42}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
read -r EPOCHS MAX_LENGTH < <(python -c "from llmtune.config.load import load_recipe
r = load_recipe('recipes/rm-minilm-hh.yaml', ['data.path=$DATA']); print(r.training.epochs, r.data.max_length)")
rm -rf "$OUT" && mkdir -p "$(dirname "$OUT")"

load() { cut -d' ' -f1 /proc/loadavg; }
start=$(date +%s.%N); load_before=$(load)
python -m llmtune.cli train recipes/rm-minilm-hh.yaml "data.path=$DATA" "training.seed=$SEED" --output-dir "$OUT" > "$OUT.train.log" 2>&1
result=$(python -m llmtune.cli eval reward-accuracy --model "$OUT" --data hh --path "$DATA" --split train \
  --eval-fraction 0.2 --seed "$SEED" 2> "$OUT.eval.log")
end=$(date +%s.%N)
python - "$result" "$start" "$end" "$load_before" "$(load)" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(json.dumps({"llmtune": "recipes/rm-minilm-hh.yaml + eval reward-accuracy", "eval_accuracy": round(r["accuracy"], 4),
                  "eval_pairs": r["n"], "mean_margin": round(r["mean_margin"], 4),
                  "wall_s": round(float(sys.argv[3]) - float(sys.argv[2]), 1), "load_avg": [sys.argv[4], sys.argv[5]]}))
PY

for length in 512 "$MAX_LENGTH"; do
  load_before=$(load)
  baseline=$(python benchmarks/rm_trl_baseline.py --data "$DATA" --epochs "$EPOCHS" --seed "$SEED" --max-length "$length" \
    2> "$OUT.baseline$length.log" | tail -1)
  python - "$baseline" "$load_before" "$(load)" <<'PY'
import json, sys
print(json.dumps({**json.loads(sys.argv[1]), "load_avg": [sys.argv[2], sys.argv[3]]}))
PY
done
python benchmarks/rm_same_pairs.py "$OUT" --data "$DATA" --seed "$SEED" --max-length 512 "$MAX_LENGTH" 2> "$OUT.same_pairs.log"
