#!/usr/bin/env bash
# Scale-out figures on a GPU machine: SFT and DPO with QLoRA, SFT (full) with DeepSpeed ZeRO-2 and
# ZeRO-3, each on tiny-llama and on llama-1b-random (a 1.1B TinyLlama-shaped random-init Llama built
# by benchmarks/llama_1b_random.py). Prints tokens/s and the peak GPU memory of every run, next to
# what `llmtune plan` predicted.
#
#   bash benchmarks/gpu_scaleout.sh [OUT_DIR]        # default benchmarks/out/scaleout
#   STEPS=60 GPUS=4 bash benchmarks/gpu_scaleout.sh  # more steps / fewer GPUs than visible
#
# Needs: NVIDIA GPU(s) with nvidia-smi, llmtune installed with bitsandbytes and deepspeed (the
# Docker image has both). Everything is offline: the data is the bundled demo set (SFT) and
# preference pairs derived from it (DPO). tokens/s = tokens trained (TRL's num_tokens, all ranks)
# / train_runtime; peak memory = the highest memory.used nvidia-smi reported on any GPU (sampled
# every 200 ms; includes the CUDA context).
set -euo pipefail

OUT=${1:-benchmarks/out/scaleout}
STEPS=${STEPS:-40}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "GPUs used for ZeRO runs: $GPUS; optimizer steps per run: $STEPS"

LLAMA_1B="$OUT/llama-1b-random"
if [ ! -f "$LLAMA_1B/model.safetensors" ] && [ ! -f "$LLAMA_1B/model.safetensors.index.json" ]; then
  python benchmarks/llama_1b_random.py "$LLAMA_1B" --device cuda
fi

# Preference pairs from the demo conversations: chosen = the real answer, rejected = another row's.
PAIRS="$OUT/pairs.jsonl"
python - "$PAIRS" <<'EOF'
import json, sys
from llmtune.data.load import load_rows
rows = load_rows("demo", None, shape="sft").rows
with open(sys.argv[1], "w") as fh:
    for i, r in enumerate(rows):
        msgs = r["messages"]
        other = rows[(i + 7) % len(rows)]["messages"][-1]["content"]
        fh.write(json.dumps({"prompt": msgs[:-1], "chosen": [msgs[-1]],
                             "rejected": [{"role": "assistant", "content": other}]}) + "\n")
EOF

report() {  # NAME: tokens/s and peak memory of a finished run
  python - "$OUT/$1" "$OUT/$1.mem" "$OUT/$1.plan.json" <<'EOF'
import json, sys
from pathlib import Path
run, mem, plan = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
final = next(r for r in reversed(rows) if "train_runtime" in r)
tokens = max((r["num_tokens"] for r in rows if "num_tokens" in r), default=None)
steps = max((r["step"] for r in rows), default=0)
peak = max((int(x) for line in mem.read_text().splitlines() for x in line.split(",") if x.strip().isdigit()),
           default=0)
predicted = json.loads(plan.read_text())["memory"]["per_device_total_gib"]
tps = f"{tokens / final['train_runtime']:,.0f} tokens/s" if tokens else \
    f"{final['train_samples_per_second']:.1f} samples/s (no token count logged)"
print(f"{run.name:28} {tps:>26}  peak {peak / 1024:7.2f} GiB/GPU  (plan: {predicted:.2f} GiB)  "
      f"steps {steps}  train_loss {final.get('train_loss')}")
EOF
}

bench() {  # NAME RECIPE OVERRIDES...: plan, train with a memory sampler, report
  local name=$1 recipe=$2; shift 2
  rm -rf "${OUT:?}/$name"
  llmtune plan "$recipe" "$@" --json > "$OUT/$name.plan.json"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$name.mem" &
  local sampler=$!
  llmtune train "$recipe" "$@" training.max_steps="$STEPS" training.logging_steps=5 training.save_steps=100000 \
    --output-dir "$OUT/$name" > "$OUT/$name.log" 2>&1 || { kill "$sampler"; echo "$name FAILED: see $OUT/$name.log"; return 0; }
  kill "$sampler"
  report "$name" | tee -a "$OUT/summary.txt"
}

SFT=recipes/quickstart.yaml
COMMON=(data.eval_fraction=0 data.max_length=512 training.batch_size=8 training.precision=bf16)
DPO=(stage=dpo data.name=null data.path="$PAIRS" data.max_prompt_length=256 model.lora.r=16)
: > "$OUT/summary.txt"
for model in tiny-llama "$LLAMA_1B"; do
  tag=$(basename "$model")
  bench "$tag-sft-qlora" $SFT model.name="$model" model.finetuning=qlora "${COMMON[@]}" \
    training.gradient_checkpointing=true training.learning_rate=2e-4
  bench "$tag-dpo-qlora" $SFT model.name="$model" model.finetuning=qlora "${COMMON[@]}" "${DPO[@]}" \
    training.gradient_checkpointing=true training.learning_rate=5e-5
  bench "$tag-sft-zero2" $SFT model.name="$model" model.finetuning=full "${COMMON[@]}" \
    distributed.strategy=deepspeed distributed.zero_stage=2 distributed.num_processes="$GPUS" training.learning_rate=1e-5
  bench "$tag-sft-zero3" $SFT model.name="$model" model.finetuning=full "${COMMON[@]}" \
    distributed.strategy=deepspeed distributed.zero_stage=3 distributed.num_processes="$GPUS" training.learning_rate=1e-5
done
echo; echo "summary ($OUT/summary.txt):"; cat "$OUT/summary.txt"
