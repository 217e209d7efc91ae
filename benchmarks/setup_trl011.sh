#!/usr/bin/env bash
# A clean virtualenv with TRL 0.11.4 (the last release with the classic PPOTrainer) for the
# reference PPO throughput baseline (benchmarks/ppo_trl011_baseline.py). It is kept apart from
# llmtune's environment because TRL 0.11 needs transformers 4.x.
#   bash benchmarks/setup_trl011.sh [VENV_DIR]   (default /tmp/trl011)
set -euo pipefail
VENV="${1:-/tmp/trl011}"
PY="${PYTHON:-python3.11}"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# torch: the CPU wheel (pip find-links /opt/wheels holds it locally here; elsewhere add
# --index-url https://download.pytorch.org/whl/cpu).
"$VENV/bin/pip" install --quiet "torch==2.13.0"
"$VENV/bin/pip" install --quiet "trl==0.11.4" "transformers==4.46.3" "accelerate<1.2" "peft==0.13.2" \
    "datasets<3.2" "numpy<2.3" rich
"$VENV/bin/python" -c "import trl, transformers, torch; print('trl', trl.__version__, 'transformers', \
transformers.__version__, 'torch', torch.__version__)"
