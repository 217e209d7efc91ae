"""`llmtune plan`: the arithmetic of a run (rows, tokens, steps, GPU memory) before any model loads.

Parameter counts come from the model itself, built from its config.json (local directories, tiny
models, the hub cache, or the published configs in models.yaml) on the meta device: accelerate's
`init_empty_weights` + transformers' `from_config`, with peft adding the recipe's LoRA adapters, so
trainable and 4-bit counts are what training will see, for any architecture. No weights are read
or allocated; the recipe is validated before torch is imported.

Memory per device, in bytes (P = parameters, T = trainable parameters, N = data-parallel processes):
  weights      full: P x w (w = 4 fp32, 2 bf16/fp16); lora: P x w + T x 4 (peft keeps adapters fp32);
               qlora: linear-layer weights x 0.516 (NF4 + double-quantised scales) + the rest x 2 + T x 4
  gradients    T x (2 if the trained weights are 16-bit else 4)
  optimizer    Adam m + v in fp32: T x 8 (8-bit optimizers: T x 2), plus an fp32 master copy
               T x 4 when DeepSpeed trains 16-bit weights (mixed precision keeps one)
  ZeRO         stage 2 divides gradients and optimizer by N, stage 3 also the weights;
               offload moves the optimizer (and with offload_params the weights) to CPU RAM
  activations  tokens x hidden x layers x k, k = 34 bytes with 16-bit activations, 68 with fp32
               (Korthikanti et al. 2022); tokens = micro-batch x max_length (x 2 for the chosen and
               rejected sequences of rm and dpo). Attention scores cost nothing with fused attention,
               but a learned position bias (T5) makes them exist: tokens x max_length x heads x 12
               bytes per attention layer (6 with 16-bit activations). Gradient checkpointing keeps only
               each layer's input (2 or 4 bytes per token x hidden) plus one layer being recomputed.
               A language-model head adds tokens x vocabulary x 12 bytes (fp32 logits, their
               log-softmax and a gradient).
  reference    dpo with full fine-tuning keeps a frozen 16-bit copy of the policy (LoRA uses the
               base with adapters disabled: no copy)
  overhead     1 GiB for the CUDA context and allocator fragmentation
The activation estimate is checked against the peak measured on the tiny models in fp32 on a CPU
(benchmarks/plan_activations.py): within +1 % (tiny-llama), -11 % (tiny-gptj) and -10 to -18 %
(tiny-t5). The 16-bit constants are not measured here. A run above ~90 % of a GPU is flagged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.config.checks.data import STAGE_SHAPE
from llmtune.config.schema import DATASET_FIELDS, Recipe
from llmtune.errors import ConfigError, DataError
from llmtune.modeling.precision import resolve
from llmtune.registry.models import ModelSpec, detect_kind, resolve_model

GIB = 1024**3
OVERHEAD_BYTES = GIB
QLORA_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 nibbles + 8-bit absmax per 64 + fp32 per 256 blocks
FIT_FRACTION = 0.9
# Measured on the tiny models (benchmarks/plan_activations.py), fp32 on the CPU:
LOGITS_BYTES = 12  # per token x vocabulary entry: fp32 logits, their log-softmax, one gradient at a time
SCORE_BYTES = 12  # per attention-score entry: scores, biased copy, softmax (half of it with 16-bit activations)


@dataclass
class Shape:
    """What the estimate needs from a model, counted on an instance of it built from its config on
    the meta device (real module structure, no weights, no memory)."""

    model_type: str
    hidden: int
    layers: int  # transformer blocks (encoder + decoder for seq2seq)
    vocab: int
    params: int
    trainable: int  # with the recipe's fine-tuning method (LoRA adapters as peft adds them)
    quantized: int  # parameters bitsandbytes stores in 4 bit under QLoRA (its linear layers)
    vocab_logits: bool  # the head scores the vocabulary (False for a reward model's one logit)
    heads: int
    score_layers: int  # attention layers that materialise their (heads x seq x seq) scores; 0 when fused


def model_shape(config: dict[str, Any], recipe: Recipe, spec: ModelSpec) -> Shape:
    """Build the model the recipe trains from `config` on the meta device (accelerate's
    `init_empty_weights` + transformers' `from_config`, peft for the adapters) and count it."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    from llmtune.modeling.load import TASK, auto_class

    kind = spec.kind or detect_kind(config, spec.name)
    head = "classifier" if recipe.stage == "rm" else kind
    values = {k: v for k, v in config.items() if k != "model_type"}
    if head == "classifier":
        values["num_labels"] = 1
    try:
        cfg = AutoConfig.for_model(config["model_type"], **values)
    except (KeyError, ValueError) as exc:  # no or an unknown model_type: transformers cannot build it
        reason = str(exc).split(". ")[0]  # transformers lists every model type after the first sentence
        raise ConfigError(f"model.name: cannot build '{spec.name}' from its config ({reason})") from None
    m = recipe.model
    with init_empty_weights(include_buffers=True):  # buffers too, or tied embeddings stay untied
        model = auto_class(head).from_config(cfg)
        params = sum(p.numel() for p in model.parameters())
        keep = get_keys_to_not_convert(model)
        quantized = sum(mod.weight.numel() for name, mod in model.named_modules()
                        if isinstance(mod, nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep))
        trainable = params
        if m.finetuning != "full":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, target_modules=m.lora.target_modules or
                              spec.lora_targets, task_type=TASK[head])
            trainable = sum(p.numel() for p in get_peft_model(model, lora).parameters() if p.requires_grad)
    decoder = (getattr(cfg, "num_decoder_layers", None) or cfg.num_hidden_layers) if cfg.is_encoder_decoder else 0
    layers = cfg.num_hidden_layers + decoder
    # Fused attention (SDPA) keeps no scores, unless a learned position bias is added to them (T5's
    # relative attention): then the scores exist, once per self-attention and per cross-attention.
    materialised = cfg._attn_implementation == "eager" or hasattr(cfg, "relative_attention_num_buckets")
    return Shape(cfg.model_type, cfg.hidden_size, layers, cfg.vocab_size, params, trainable, quantized,
                 vocab_logits=head != "classifier", heads=cfg.num_attention_heads,
                 score_layers=layers + decoder if materialised else 0)


def model_config(spec: ModelSpec) -> tuple[dict[str, Any], str]:
    """(config dict, where it came from) without loading or downloading the model."""
    while spec.base is not None:  # an adapter run: the base model's shape
        spec = spec.base
    if spec.tiny:
        from llmtune.registry.tiny import shape_config

        return shape_config(spec.name), f"built-in tiny model {spec.name}"
    if spec.path and (Path(spec.path) / "config.json").exists():
        return json.loads((Path(spec.path) / "config.json").read_text()), str(Path(spec.path) / "config.json")
    if spec.hub_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.hub_id, "config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text()), cached
        if spec.extra.get("config"):  # the registry carries the published config (models.yaml)
            return dict(spec.extra["config"]), f"published config of {spec.hub_id}"
    raise ConfigError(f"model.name: no config.json for '{spec.name}' here (not a local directory, not in the "
                      "hub cache); download it or point model.name at a local copy to plan with it")


# --------------------------------------------------------------------------------------------------
# Data: rows, tokens, steps.

def _hub_cached(hub_id: str) -> bool:
    base = Path(os.environ.get("HF_DATASETS_CACHE") or Path.home() / ".cache" / "huggingface" / "datasets")
    return (base / hub_id.replace("/", "___")).is_dir()


def count_rows(recipe: Recipe) -> list[dict[str, Any]]:
    """Per dataset entry: name, source and train/eval row counts (None when only on the hub and not
    cached: plan never downloads)."""
    from llmtune.data.registry import get_entry

    d = recipe.data
    out = []
    for i, src in enumerate(d.datasets or [d]):
        entry = get_entry(src.name, d.registry) if src.name else None
        local = src.path or (entry.path if entry else None)
        label = src.name or src.path or f"datasets[{i}]"
        hub = entry.hub_id if entry and not local else None
        row: dict[str, Any] = {"dataset": label, "source": local or f"hub {hub}", "train_rows": None,
                               "eval_rows": None}
        if hub and not _hub_cached(hub):
            row["note"] = "on the hub, not cached: rows unknown"
            out.append(row)
            continue
        job = {"spec": {k: getattr(src, k) for k in DATASET_FIELDS}, "shape": STAGE_SHAPE[recipe.stage],
               "seed": recipe.training.seed, "registries": d.registry}
        try:
            train, evals = _count_offline(job) if hub else _count(job)
        except (DataError, ConfigError) as exc:
            raise DataError(f"data ({label}): {exc}") from None
        row.update(train_rows=train, eval_rows=evals)
        out.append(row)
    return out


def _count(job: dict[str, Any]) -> tuple[int, int]:
    """(train rows, eval rows) of one dataset entry, loaded as the run will load it."""
    from llmtune.data.load import load_mixture

    train, evals = load_mixture([job["spec"]], shape=job["shape"], seed=job["seed"],
                                extra_registries=job["registries"])
    return len(train), len(evals)


def _count_offline(job: dict[str, Any]) -> tuple[int, int]:
    """`_count` of a cached hub dataset in a child process with the hub switched off: plan never
    downloads, and datasets and huggingface_hub read that switch once per process, so it must not
    be set in this one (the web UI plans inside its server)."""
    code = ("import json, sys\nfrom llmtune.errors import LLMTuneError\nfrom llmtune.launch.plan import _count\n"
            "try:\n    print(json.dumps(_count(json.loads(sys.argv[1]))))\n"
            "except LLMTuneError as exc:\n    sys.exit(str(exc))\n")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(job)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise DataError((proc.stderr.strip().splitlines() or ["counting rows failed"])[-1])
    train, evals = json.loads(proc.stdout)
    return train, evals


def micro_batch(recipe: Recipe) -> int:
    """Sequences per device in one forward/backward pass."""
    if recipe.stage in ("ppo", "rl"):
        return recipe.online.mini_batch_size // recipe.training.gradient_accumulation_steps
    return recipe.training.batch_size


def optimizer_steps(rows: int | None, recipe: Recipe, world: int) -> int | None:
    """Steps as transformers counts them: ceil(ceil(rows / (batch x world)) / accum) per epoch; for
    online RL (ppo, rl), its updates: steps x ppo_epochs x minibatches per rollout batch."""
    t = recipe.training
    if recipe.stage in ("ppo", "rl"):
        p = recipe.online
        steps = t.max_steps if t.max_steps > 0 else \
            None if rows is None else max(1, math.ceil(t.epochs * rows / (p.rollout_batch_size * world)))
        return None if steps is None else steps * (p.ppo_epochs or 1) * (p.rollouts // p.mini_batch_size)
    if t.max_steps > 0:
        return t.max_steps
    if rows is None:
        return None
    batches = math.ceil(rows / (t.batch_size * world))
    per_epoch = max(math.ceil(batches / t.gradient_accumulation_steps), 1)
    return math.ceil(t.epochs * per_epoch)


# --------------------------------------------------------------------------------------------------
# Memory.

def gpus_present() -> list[float]:
    """Memory (GiB) of each visible NVIDIA GPU, from nvidia-smi; empty without one."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [float(x) / 1024 for x in out.split() if x.strip().replace(".", "", 1).isdigit()]


def _dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2


def memory_estimate(recipe: Recipe, shape: Shape, spec: ModelSpec, on_gpu: bool) -> dict[str, Any]:
    """Per-device memory components in bytes (see the module docstring for every formula)."""
    m, t, d = recipe.model, recipe.training, recipe.distributed
    world = d.world_size
    precision = resolve(t.precision, cuda=on_gpu)
    dtype = m.dtype if m.dtype != "auto" else (spec.dtype if on_gpu else "float32")
    deepspeed = d.strategy == "deepspeed"
    half = precision in ("bf16", "fp16")
    P, T = shape.params, shape.trainable

    if m.finetuning == "full":
        w = 2 if (deepspeed and half) else _dtype_bytes(dtype)
        weights = P * w
        grad_bytes = w
    elif m.finetuning == "lora":
        weights = P * _dtype_bytes(dtype) + T * 4
        grad_bytes = 4
    else:  # qlora
        weights = shape.quantized * QLORA_BYTES + (P - shape.quantized) * 2 + T * 4
        grad_bytes = 4
    gradients = T * grad_bytes
    optimizer = T * (2 if "8bit" in t.optimizer else 8)
    master = T * 4 if (deepspeed and grad_bytes == 2) else 0

    cpu = 0.0
    if deepspeed:
        gradients /= world
        optimizer /= world
        master /= world
        if d.zero_stage == 3:
            weights /= world
        if d.offload_optimizer:
            cpu += optimizer + master
            optimizer = master = 0
        if d.offload_params and d.zero_stage == 3:
            cpu += weights
            weights = 0

    act_k = 34 if half else 68
    seq = recipe.data.max_length
    pairs = 2 if recipe.stage in ("rm", "dpo") else 1
    tokens = micro_batch(recipe) * seq * pairs
    scores = tokens * seq * shape.heads * (SCORE_BYTES // 2 if half else SCORE_BYTES)  # one attention layer
    if t.gradient_checkpointing:  # each layer's input (2 or 4 bytes) + one layer being recomputed
        activations = tokens * shape.hidden * (shape.layers * (2 if half else 4) + act_k) + min(shape.score_layers, 1) * scores
    else:
        activations = tokens * shape.hidden * shape.layers * act_k + shape.score_layers * scores
    if shape.vocab_logits:
        activations += tokens * shape.vocab * LOGITS_BYTES
    reference = P * 2 if (recipe.stage == "dpo" and m.finetuning == "full") else 0
    if deepspeed and d.zero_stage == 3:
        reference /= world
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "master_weights": master,
             "activations": activations, "reference_model": reference, "overhead": OVERHEAD_BYTES}
    return {
        "params": P, "trainable_params": T, "precision": precision, "weights_dtype": dtype,
        "activation_bytes_per_token_layer_hidden": act_k,
        "bytes": {k: int(round(v)) for k, v in parts.items()},
        "total_bytes": int(round(sum(parts.values()))),
        "cpu_offload_bytes": int(round(cpu)),
    }


# --------------------------------------------------------------------------------------------------

def make_plan(recipe: Recipe, gpu_memory_gb: float | None = None, gpus: list[float] | None = None,
              model_name: str | None = None) -> dict[str, Any]:
    """Everything `llmtune plan` prints, as a dict (the --json output).

    gpus: memory of the GPUs present (default: nvidia-smi); gpu_memory_gb plans for a target instead.
    model_name: the model to size instead of recipe.model.name (a pipeline stage whose model is an
    earlier stage's run, not trained yet, has that stage's model's shape)."""
    d, t = recipe.distributed, recipe.training
    world = d.world_size
    spec = resolve_model(model_name or recipe.model.name, template=recipe.model.template,
                         gguf_file=None if model_name else recipe.model.gguf_file)
    config, config_source = model_config(spec)
    shape = model_shape(config, recipe, spec)
    gpus = gpus_present() if gpus is None else gpus
    target = gpu_memory_gb if gpu_memory_gb is not None else (min(gpus) if gpus else None)
    mem = memory_estimate(recipe, shape, spec, on_gpu=target is not None)

    datasets = count_rows(recipe)
    known = [r["train_rows"] for r in datasets]
    rows = None if any(r is None for r in known) else sum(known)
    steps = optimizer_steps(rows, recipe, world)
    global_batch = micro_batch(recipe) * t.gradient_accumulation_steps * world
    seq = recipe.data.max_length

    warnings = []
    if target is not None and mem["total_bytes"] > FIT_FRACTION * target * GIB:
        warnings.append(f"estimated {mem['total_bytes'] / GIB:.1f} GiB per device will not fit "
                        f"{target:.1f} GiB GPUs: use lora/qlora, gradient_checkpointing, a smaller batch_size "
                        "or max_length, or DeepSpeed ZeRO-3 over more GPUs")
    if gpus and gpu_memory_gb is None and d.num_processes > len(gpus):
        warnings.append(f"distributed.num_processes is {d.num_processes} but {len(gpus)} GPU(s) are visible")
    if target is None:
        warnings.append("no GPU visible: memory assumes fp32 on CPU; pass --gpu-memory GB to plan for a GPU")
    return {
        "stage": recipe.stage,
        "model": {"name": recipe.model.name, "config": config_source, "model_type": shape.model_type,
                  "params": shape.params, "trainable_params": mem["trainable_params"],
                  "finetuning": recipe.model.finetuning, "hidden": shape.hidden, "layers": shape.layers,
                  "vocab": shape.vocab},
        "datasets": datasets,
        "train_rows": rows,
        "max_length": seq,
        "dataset_tokens_max": rows * seq if rows is not None else None,
        "distributed": {"strategy": d.strategy, "world_size": world, "zero_stage": d.zero_stage
                        if d.strategy == "deepspeed" else None, "offload_optimizer": d.offload_optimizer,
                        "offload_params": d.offload_params},
        "global_batch": global_batch,
        "optimizer_steps": steps,
        "trained_tokens_max": steps * global_batch * seq if steps is not None else None,
        "memory": {"precision": mem["precision"], "weights_dtype": mem["weights_dtype"],
                   "activation_k": mem["activation_bytes_per_token_layer_hidden"],
                   "per_device_bytes": mem["bytes"], "per_device_total_bytes": mem["total_bytes"],
                   "per_device_total_gib": round(mem["total_bytes"] / GIB, 3),
                   "cpu_offload_gib": round(mem["cpu_offload_bytes"] / GIB, 3),
                   "gpu_memory_gib": target, "gpus_visible": len(gpus)},
        "warnings": warnings,
    }


def _n(x: float | None) -> str:
    if x is None:
        return "unknown"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(int(x))


def _gib(b: float) -> str:
    return f"{b / GIB:9.3f} GiB" if b >= GIB else f"{b / 1024**2:9.3f} MiB"


def plan_pipeline(stages: list[Any], gpu_memory_gb: float | None = None) -> dict[str, Any]:
    """Plans of a pipeline's stages in order; a stage starting from an earlier stage's run is sized
    with the model that run will hold."""
    produced: dict[str, str] = {}
    gpus = gpus_present()
    plans = []
    for st in stages:
        name = st.recipe.model.name
        source = produced.get(str(Path(name).expanduser().resolve()), name)
        plan = make_plan(st.recipe, gpu_memory_gb, gpus=gpus, model_name=source)
        plans.append({"name": st.name, "run_dir": str(st.run_dir), **plan})
        produced[str(Path(st.run_dir).expanduser().resolve())] = source
    return {"pipeline": [f"{p['name']} ({p['stage']})" for p in plans], "stages": plans}


def render_pipeline(p: dict[str, Any]) -> str:
    parts = ["pipeline       " + " -> ".join(p["pipeline"])]
    for st in p["stages"]:
        parts.append(f"\n[{st['name']}] -> {st['run_dir']}\n" + render(st))
    return "\n".join(parts)


def render(p: dict[str, Any]) -> str:
    """The human-readable table."""
    m, mem, dist = p["model"], p["memory"], p["distributed"]
    lines = [f"stage          {p['stage']}",
             f"model          {m['name']} ({m['model_type']}, {_n(m['params'])} params from {m['config']})",
             f"finetuning     {m['finetuning']}: {_n(m['trainable_params'])} trainable "
             f"({m['trainable_params']:,} of {m['params']:,})",
             "datasets"]
    for r in p["datasets"]:
        rows = "unknown" if r["train_rows"] is None else f"{r['train_rows']:,} train / {r['eval_rows']:,} eval"
        lines.append(f"  {r['dataset']:12} {rows:28} {r['source']}" + (f"  ({r['note']})" if r.get("note") else ""))
    zero = f", ZeRO-{dist['zero_stage']}" if dist["zero_stage"] else ""
    lines += [
        f"tokens         <= {_n(p['dataset_tokens_max'])} per epoch (rows x max_length {p['max_length']}); "
        f"<= {_n(p['trained_tokens_max'])} trained",
        f"distributed    {dist['strategy']}, {dist['world_size']} process(es){zero}",
        f"steps          {p['optimizer_steps'] if p['optimizer_steps'] is not None else 'unknown'} optimizer "
        f"steps of {p['global_batch']} sequences",
        f"memory/device  (precision {mem['precision']}, weights {mem['weights_dtype']}, "
        f"activations k={mem['activation_k']})",
    ]
    for k, v in mem["per_device_bytes"].items():
        if v:
            lines.append(f"  {k:16} {_gib(v)}")
    lines.append(f"  {'total':16} {_gib(mem['per_device_total_bytes'])}"
                 + (f"  of {mem['gpu_memory_gib']:.1f} GiB" if mem["gpu_memory_gib"] else ""))
    if mem["cpu_offload_gib"]:
        lines.append(f"  {'cpu offload':16} {mem['cpu_offload_gib']:9.3f} GiB (host RAM)")
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)
