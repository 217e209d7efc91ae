# llmtune on NVIDIA GPUs: one image for training (single GPU, multi-GPU DDP / DeepSpeed ZeRO, QLoRA)
# and for the web UI.
#
#   docker build -t llmtune .
#   # train; the run directory lands in ./runs on the host
#   docker run --rm --gpus all --ipc=host -v $PWD/runs:/workspace/runs llmtune \
#       llmtune train recipes/quickstart.yaml
#   # several GPUs: same command, the recipe says how many processes (re-launched through accelerate)
#   docker run --rm --gpus all --ipc=host -v $PWD/runs:/workspace/runs llmtune \
#       llmtune train recipes/gpu/sft-llama2-13b-zero3.yaml distributed.num_processes=8
#   # web UI on http://localhost:7860 (runs and models from ./runs)
#   docker run --rm --gpus all -v $PWD/runs:/workspace/runs -p 7860:7860 llmtune \
#       llmtune webui --host 0.0.0.0
#   # estimate memory before renting GPUs (no GPU needed)
#   docker run --rm llmtune llmtune plan recipes/gpu/sft-llama2-13b-zero3.yaml --gpu-memory 80
#
# Flags: --gpus all (or --gpus '"device=0,1"') exposes GPUs (needs the NVIDIA Container Toolkit);
# --ipc=host (or --shm-size=16g) gives the DataLoader workers and NCCL enough shared memory;
# -v $PWD/runs:/workspace/runs keeps run directories (checkpoints, metrics, models) on the host;
# -v $HOME/.cache/huggingface:/workspace/.cache/huggingface reuses hub downloads (models, datasets);
# -e HF_TOKEN=... for gated models (Llama 2). Multi-node: add --network host and run the same
# command on every node with distributed.num_nodes / machine_rank / main_process_ip set.
#
# The devel image (nvcc, g++) is needed because DeepSpeed compiles its ops (CPU Adam for optimizer
# offload, fused kernels) just in time on first use.

FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/workspace/.cache/huggingface \
    LLMTUNE_HOME=/workspace/.cache/llmtune \
    GRADIO_SERVER_NAME=0.0.0.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git pdsh \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV

# torch first (CUDA 12.8 wheels), then DeepSpeed built against it (its setup imports torch).
RUN pip install --upgrade pip \
    && pip install torch --index-url https://download.pytorch.org/whl/cu128 \
    && pip install --no-build-isolation deepspeed

COPY . /opt/llmtune
RUN pip install "/opt/llmtune[gpu,webui]" \
    && mkdir -p /workspace/runs \
    && cp -r /opt/llmtune/recipes /workspace/recipes

WORKDIR /workspace
EXPOSE 7860
CMD ["llmtune", "--help"]
