"""`llmtune plan`: the arithmetic of a run (rows, tokens, steps, GPU memory) before any model loads.

No torch import: parameter counts come from the model's config.json (local directories, tiny
models, the hub cache) or from the published configs of the registry's hub models below, and the
per-module shapes of that config give LoRA and 4-bit sizes too.

Memory per device, in bytes (P = parameters, T = trainable parameters, N = data-parallel processes):
  weights      full: P x w (w = 4 fp32, 2 bf16/fp16); lora: P x w + T x 4 (peft keeps adapters fp32);
               qlora: linear-layer weights x 0.516 (NF4 + double-quantised scales) + the rest x 2 + T x 4
  gradients    T x (2 if the trained weights are 16-bit else 4)
  optimizer    Adam m + v in fp32: T x 8 (8-bit optimizers: T x 2), plus an fp32 master copy
               T x 4 when DeepSpeed trains 16-bit weights (mixed precision keeps one)
  ZeRO         stage 2 divides gradients and optimizer by N, stage 3 also the weights;
               offload moves the optimizer (and with offload_params the weights) to CPU RAM
  activations  batch x seq x hidden x layers x k, k = 34 bytes with 16-bit activations, 68 with
               fp32 (Korthikanti et al. 2022, attention scores not materialised as with SDPA);
               gradient checkpointing keeps only each layer's input (k = 2 / 4) plus one layer
               recomputed at k = 34 / 68; plus fp32 logits and their gradient: batch x seq x vocab x 8.
               rm and dpo run two sequences (chosen, rejected) per row: x 2.
  reference    dpo with full fine-tuning keeps a frozen 16-bit copy of the policy (LoRA uses the
               base with adapters disabled: no copy)
  overhead     1 GiB for the CUDA context and allocator fragmentation
These are estimates to within ~10-20 %; a run that lands above ~90 % of a GPU is flagged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.config.schema import DATASET_FIELDS, Recipe
from llmtune.errors import ConfigError, DataError
from llmtune.registry.models import ModelSpec, resolve_model

GIB = 1024**3
OVERHEAD_BYTES = GIB
QLORA_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 nibbles + 8-bit absmax per 64 + fp32 per 256 blocks
FIT_FRACTION = 0.9
STAGE_SHAPE = {"sft": "sft", "rm": "preference", "dpo": "preference", "rs": "prompt", "ppo": "prompt"}


@dataclass
class Linear:
    """`count` linear layers named `name` of shape fan_in x fan_out (what LoRA and NF4 act on)."""

    name: str
    fan_in: int
    fan_out: int
    count: int

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out * self.count


@dataclass
class Shape:
    """What the estimate needs from a model config."""

    model_type: str
    hidden: int
    layers: int  # transformer blocks (encoder + decoder for seq2seq)
    vocab: int
    linears: list[Linear]
    other_params: int  # embeddings, norms, biases, heads: never quantised, not LoRA targets

    @property
    def params(self) -> int:
        return sum(lin.params for lin in self.linears) + self.other_params

    def lora_params(self, targets: list[str] | str, r: int) -> int:
        chosen = self.linears if targets == "all-linear" else [lin for lin in self.linears if lin.name in targets]
        return sum(r * (lin.fan_in + lin.fan_out) * lin.count for lin in chosen)


def _llama(c: dict[str, Any]) -> Shape:
    h, n, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    i = c["intermediate_size"]
    lin = [Linear("q_proj", h, heads * hd, n), Linear("k_proj", h, kv * hd, n), Linear("v_proj", h, kv * hd, n),
           Linear("o_proj", heads * hd, h, n), Linear("gate_proj", h, i, n), Linear("up_proj", h, i, n),
           Linear("down_proj", i, h, n)]
    other = v * h + 2 * h * n + h + (0 if c.get("tie_word_embeddings") else v * h)
    return Shape(c.get("model_type", "llama"), h, n, v, lin, other)


def _gptj(c: dict[str, Any]) -> Shape:
    h, n, v = c["n_embd"], c["n_layer"], c["vocab_size"]
    i = c.get("n_inner") or 4 * h
    lin = [Linear(name, h, h, n) for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
    lin += [Linear("fc_in", h, i, n), Linear("fc_out", i, h, n)]
    # fc biases and ln_1 (weight, bias) per block; ln_f; untied lm_head with bias
    other = v * h + n * (i + h + 2 * h) + 2 * h + (0 if c.get("tie_word_embeddings") else v * h + v)
    return Shape("gptj", h, n, v, lin, other)


def _t5(c: dict[str, Any]) -> Shape:
    d, ff, v, heads = c["d_model"], c["d_ff"], c["vocab_size"], c["num_heads"]
    inner = heads * c.get("d_kv", d // heads)
    enc, dec = c["num_layers"], c.get("num_decoder_layers") or c["num_layers"]
    gated = str(c.get("feed_forward_proj", "relu")).startswith("gated")
    attn = enc + 2 * dec  # self-attention in every block, cross-attention in decoder blocks
    lin = [Linear("q", d, inner, attn), Linear("k", d, inner, attn), Linear("v", d, inner, attn),
           Linear("o", inner, d, attn)]
    lin += [Linear("wi_0", d, ff, enc + dec), Linear("wi_1", d, ff, enc + dec)] if gated \
        else [Linear("wi", d, ff, enc + dec)]
    lin += [Linear("wo", ff, d, enc + dec)]
    buckets = c.get("relative_attention_num_buckets", 32) * heads * 2  # first encoder and decoder block
    norms = d * (2 * enc + 3 * dec + 2)
    # No separate lm_head: transformers 5 ties T5's head to the shared embedding whatever
    # tie_word_embeddings says (so that is what gets loaded and trained).
    return Shape("t5", d, enc + dec, v, lin, v * d + buckets + norms)


def _bert(c: dict[str, Any]) -> Shape:
    h, n, v, i = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    lin = [Linear(name, h, h, n) for name in ("query", "key", "value")]
    lin += [Linear("dense", h, h, n), Linear("dense", h, i, n), Linear("dense", i, h, n)]
    emb = (v + c.get("max_position_embeddings", 512) + c.get("type_vocab_size", 2)) * h + 2 * h
    per_block = 4 * h + 2 * h + i + h + 2 * h  # biases of the six linears, two LayerNorms
    pooler_and_score = h * h + h + h + 1  # sequence-classification head with one logit
    return Shape("bert", h, n, v, lin, emb + n * per_block + pooler_and_score)


ARCHS = {"llama": _llama, "mistral": _llama, "qwen2": _llama, "gptj": _gptj, "t5": _t5, "bert": _bert}


def shape_from_config(config: dict[str, Any]) -> Shape:
    """Parameter layout from a transformers config.json (llama-like layout for unknown decoders)."""
    model_type = config.get("model_type", "")
    build = ARCHS.get(model_type, _llama)
    try:
        return build(config)
    except KeyError as exc:
        raise ConfigError(f"model.name: cannot size a '{model_type}' model from its config (no {exc})") from None


def _hub_cache_config(hub_id: str) -> Path | None:
    """config.json of a hub model already downloaded (HF_HUB_CACHE, else HF_HOME/hub)."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    root = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    found = sorted((root / f"models--{hub_id.replace('/', '--')}" / "snapshots").glob("*/config.json"))
    return found[-1] if found else None


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
        cached = _hub_cache_config(spec.hub_id)
        if cached:
            return json.loads(cached.read_text()), str(cached)
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
    from llmtune.data.load import load_mixture
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
        if hub:  # cached: read it without touching the network
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        spec = {k: getattr(src, k) for k in DATASET_FIELDS}
        try:
            train, evals = load_mixture([spec], shape=STAGE_SHAPE[recipe.stage], seed=recipe.training.seed,
                                        extra_registries=d.registry)
        except (DataError, ConfigError) as exc:
            raise DataError(f"data ({label}): {exc}") from None
        row.update(train_rows=len(train), eval_rows=len(evals))
        out.append(row)
    return out


def optimizer_steps(rows: int | None, recipe: Recipe, world: int) -> int | None:
    """Steps as transformers counts them: ceil(ceil(rows / (batch x world)) / accum) per epoch."""
    t = recipe.training
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
    world = d.num_processes * d.num_nodes
    precision = t.precision if t.precision != "auto" else ("bf16" if on_gpu else "fp32")
    dtype = m.dtype if m.dtype != "auto" else (spec.dtype if on_gpu else "float32")
    deepspeed = d.strategy == "deepspeed"
    half = precision in ("bf16", "fp16")
    P = shape.params
    targets = m.lora.target_modules or spec.lora_targets
    T = P if m.finetuning == "full" else shape.lora_params(targets, m.lora.r)

    if m.finetuning == "full":
        w = 2 if (deepspeed and half) else _dtype_bytes(dtype)
        weights = P * w
        grad_bytes = w
    elif m.finetuning == "lora":
        weights = P * _dtype_bytes(dtype) + T * 4
        grad_bytes = 4
    else:  # qlora
        linear = sum(lin.params for lin in shape.linears)
        weights = linear * QLORA_BYTES + (P - linear) * 2 + T * 4
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
    tokens = t.batch_size * seq * pairs
    if t.gradient_checkpointing:  # each layer's input (2 or 4 bytes) + one layer being recomputed
        activations = tokens * shape.hidden * (shape.layers * (2 if half else 4) + act_k)
    else:
        activations = tokens * shape.hidden * shape.layers * act_k
    activations += tokens * shape.vocab * 8
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
    world = d.num_processes * d.num_nodes
    spec = resolve_model(model_name or recipe.model.name, template=recipe.model.template,
                         gguf_file=None if model_name else recipe.model.gguf_file)
    config, config_source = model_config(spec)
    shape = shape_from_config(config)
    gpus = gpus_present() if gpus is None else gpus
    target = gpu_memory_gb if gpu_memory_gb is not None else (min(gpus) if gpus else None)
    mem = memory_estimate(recipe, shape, spec, on_gpu=target is not None)

    datasets = count_rows(recipe)
    known = [r["train_rows"] for r in datasets]
    rows = None if any(r is None for r in known) else sum(known)
    steps = optimizer_steps(rows, recipe, world)
    global_batch = t.batch_size * t.gradient_accumulation_steps * world
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
