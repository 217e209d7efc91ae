"""The one typed schema for every recipe, and the only place recipes are validated.

A recipe dict (already loaded and merged by `load.py`) is turned into nested dataclasses by
`parse()`. Every problem is collected with its full key path (`model.lora.r`), so the user sees all
of them at once, with a did-you-mean for unknown keys. `check()` then does the semantic checks that
need the registries or the file system (unknown model/dataset, missing file, incompatible options).
Nothing here imports torch: `llmtune validate` must start fast.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmtune.errors import ConfigError, hint

STAGES = ("sft", "rm", "dpo", "rs", "ppo")
Stage = Literal["sft", "rm", "dpo", "rs", "ppo"]


def _f(default: Any = dataclasses.MISSING, *, doc: str, ge: float | None = None, le: float | None = None,
       gt: float | None = None, lt: float | None = None, factory: Any = None) -> Any:
    """A dataclass field carrying its documentation and numeric range (used by README reference)."""
    meta = {"doc": doc, "ge": ge, "le": le, "gt": gt, "lt": lt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED = dataclasses.MISSING


@dataclass
class LoraSection:
    r: int = _f(16, doc="LoRA rank.", ge=1)
    alpha: int = _f(32, doc="LoRA scaling alpha (effective scale alpha/r).", ge=1)
    dropout: float = _f(0.05, doc="Dropout on the LoRA branch.", ge=0, lt=1)
    target_modules: list[str] | None = _f(
        None, doc="Module names to adapt; default: the model registry's targets (or 'all-linear').")


@dataclass
class ModelSection:
    name: str = _f(REQUIRED, doc="Model registry name (`llmtune models`), hub id, local directory, run directory, "
                   "or a .gguf file (converted once into $LLMTUNE_HOME/models).")
    gguf_file: str | None = _f(None, doc="A GGUF file inside the directory model.name names (instead of naming the "
                               ".gguf file itself).")
    finetuning: Literal["lora", "qlora", "full"] = _f(
        "lora", doc="lora: adapters on a frozen base; qlora: adapters on a 4-bit base (CUDA); full: all weights.")
    lora: LoraSection = _f(doc="LoRA adapter settings (lora and qlora).", factory=LoraSection)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", doc="Weights dtype; auto: the registry default on CUDA, float32 on CPU.")
    template: str | None = _f(None, doc="Chat template name overriding the registry's (see models.yaml).")
    revision: str | None = _f(None, doc="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = _f(False, doc="Allow custom modelling code from the hub.")


@dataclass
class DatasetSection:
    name: str | None = _f(None, doc="Data registry entry (`llmtune datasets`).")
    path: str | None = _f(None, doc="Local copy: a file or directory of jsonl/json/jsonl.gz/csv/parquet.")
    split: str = _f("train", doc="Split to train on.")
    eval_split: str | None = _f(None, doc="Split to evaluate on (e.g. test).")
    eval_fraction: float = _f(0.0, doc="Fraction of rows held out for eval when no eval_split.", ge=0, lt=1)
    num_samples: int | None = _f(None, doc="Use only the first N converted rows.", ge=1)
    weight: float = _f(1.0, doc="Mixing weight: rows taken = weight x rows (repeats when > 1).", gt=0)
    format: str | None = _f(None, doc="Raw format (hh, shp, dolly, oasst, canonical, columns); default from the registry.")
    columns: dict[str, str] | None = _f(None, doc="Column mapping for `columns` files, e.g. {prompt: q, response: a}.")
    subset: str | None = _f(None, doc="Hub data_dir / subset (e.g. harmless-base for hh).")
    options: dict[str, Any] = _f(doc="Converter options (e.g. min_score_ratio for shp, lang for oasst).", factory=dict)


# The keys of one dataset entry (data.* or data.datasets[i].*) that the data loader takes.
DATASET_FIELDS = tuple(f.name for f in dataclasses.fields(DatasetSection))


@dataclass
class DataSection(DatasetSection):
    datasets: list[DatasetSection] | None = _f(None, doc="A list of dataset entries to mix (instead of name/path).")
    max_length: int = _f(512, doc="Max tokens per example; history is trimmed from the left to keep the response.", ge=8)
    max_prompt_length: int | None = _f(None, doc="Max prompt tokens (preference and prompt stages); default max_length/2.", ge=4)
    registry: list[str] = _f(doc="Extra data registry JSON files to read.", factory=list)


@dataclass
class TrainingSection:
    epochs: float = _f(1.0, doc="Passes over the training data (ignored when max_steps > 0).", gt=0)
    max_steps: int = _f(-1, doc="Optimizer steps to run; -1: derived from epochs.")
    learning_rate: float = _f(2e-4, doc="Peak learning rate.", gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = _f(
        "cosine", doc="Learning-rate schedule.")
    warmup_ratio: float = _f(0.0, doc="Fraction of steps for linear warmup.", ge=0, lt=1)
    warmup_steps: int = _f(0, doc="Warmup steps (overrides warmup_ratio when > 0).", ge=0)
    batch_size: int = _f(4, doc="Per-device train batch size.", ge=1)
    eval_batch_size: int | None = _f(None, doc="Per-device eval batch size; default batch_size.", ge=1)
    gradient_accumulation_steps: int = _f(1, doc="Micro-batches per optimizer step.", ge=1)
    weight_decay: float = _f(0.0, doc="AdamW weight decay.", ge=0)
    max_grad_norm: float = _f(1.0, doc="Gradient clipping norm (0 disables).", ge=0)
    optimizer: str = _f("adamw_torch", doc="transformers optimizer name (adamw_torch, paged_adamw_8bit, ...).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", doc="Mixed precision; auto: bf16 on CUDA that supports it, else fp32.")
    gradient_checkpointing: bool = _f(False, doc="Trade compute for activation memory.")
    seed: int = _f(42, doc="Seed for data order, initialisation and sampling.")
    logging_steps: int = _f(10, doc="Write metrics every N optimizer steps.", ge=1)
    eval_steps: int | None = _f(None, doc="Evaluate every N steps; default: at the end of each epoch when eval data exists.", ge=1)
    save_steps: int = _f(500, doc="Save a checkpoint every N steps (and always on interrupt).", ge=1)
    save_total_limit: int | None = _f(2, doc="Keep at most N checkpoints.", ge=1)
    num_workers: int = _f(0, doc="DataLoader worker processes.", ge=0)
    group_by_length: bool = _f(
        False, doc="stages sft and rm: batch examples of similar length together (transformers' LengthGroupedSampler, "
        "still shuffled in large groups): far less padding, so a longer data.max_length costs little more.")
    report_to: list[str] = _f(doc="Extra trackers (tensorboard, wandb); metrics.jsonl is always written.", factory=list)


@dataclass
class GenerationSection:
    max_new_tokens: int = _f(64, doc="Maximum tokens generated per response.", ge=1)
    min_new_tokens: int = _f(1, doc="Minimum tokens generated per response.", ge=0)
    temperature: float = _f(1.0, doc="Sampling temperature.", gt=0)
    top_p: float = _f(1.0, doc="Nucleus sampling mass.", gt=0, le=1)
    top_k: int = _f(0, doc="Top-k sampling (0 disables).", ge=0)
    do_sample: bool = _f(True, doc="Sample (true) or greedy decode (false).")
    repetition_penalty: float = _f(1.0, doc="Penalty > 1 discourages repeats.", gt=0)


@dataclass
class RewardSection:
    type: Literal["reward_model", "classifier", "judge", "rule", "mix"] = _f(REQUIRED, doc="Reward source kind.")
    model: str | None = _f(None, doc="reward_model: rm run dir or model path; classifier: hub id or path; judge: local LLM.")
    label_index: int = _f(0, doc="classifier: index of the logit used as reward.", ge=0)
    transform: Literal["none", "sigmoid", "softmax", "log_softmax"] = _f(
        "none", doc="classifier: transform applied to logits before taking label_index.")
    input: Literal["response", "prompt_response"] = _f(
        "response", doc="classifier: score the response alone (toxicity, sentiment) or prompt+response as a text pair.")
    endpoint: str | None = _f(None, doc="judge: base URL of an OpenAI-compatible server (…/v1).")
    judge_model: str | None = _f(None, doc="judge: model name sent to the endpoint.")
    api_key_env: str | None = _f(None, doc="judge: environment variable holding the endpoint's API key.")
    template: str | None = _f(None, doc="judge: prompt template with {prompt} and {response}.")
    score_range: list[float] = _f(doc="judge: [min, max] of the asked score; answers are clamped.", factory=lambda: [0.0, 10.0])
    fallback: float = _f(0.0, doc="judge: reward when the answer holds no number.")
    function: str | None = _f(None, doc="rule: dotted path `package.module:function`.")
    kwargs: dict[str, Any] = _f(doc="rule: keyword arguments for the function.", factory=dict)
    components: list[RewardSection] | None = _f(None, doc="mix: the weighted reward sources.")
    weight: float = _f(1.0, doc="Weight of this source inside a mix.")
    normalize: bool = _f(False, doc="Standardise this source's scores with running mean/std over all calls (in a mix: before weighting).")
    batch_size: int = _f(8, doc="Scoring batch size.", ge=1)
    max_length: int = _f(512, doc="Max tokens of prompt+response for model-based scorers.", ge=8)


@dataclass
class RmSection:
    center_rewards: float | None = _f(None, doc="Coefficient of the auxiliary loss pushing rewards to zero mean.", ge=0)
    pooling: Literal["auto", "architecture", "mean"] = _f(
        "auto", doc="What the reward head reads. architecture: transformers' own sequence-classification head "
        "(the [CLS] pooler for BERT-style encoders, the last token for causal LMs, the EOS state for T5); mean: the "
        "masked mean of an encoder's token states, as sentence encoders were trained (encoder models only); auto: "
        "the model registry's choice (mean for minilm-l6), else architecture.")


@dataclass
class DpoSection:
    beta: float = _f(0.1, doc="Strength of the KL constraint to the reference.", gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = _f("sigmoid", doc="DPO loss variant.")
    label_smoothing: float = _f(
        0.0, doc="sigmoid loss only: assumed chance that a pair's label is flipped (robust DPO); 0: plain DPO.",
        ge=0, lt=0.5)


@dataclass
class RsSection:
    iterations: int = _f(1, doc="Rounds of sample → score → keep → fine-tune.", ge=1)
    num_samples: int = _f(4, doc="Responses sampled per prompt.", ge=1)
    threshold: float | None = _f(None, doc="Keep the best response only when its score is at least this.")
    percentile: float | None = _f(
        None, doc="Keep the best response only when it reaches this percentile of the round's best-per-prompt "
        "scores (30: drop the weakest 30% of prompts).", ge=0, lt=100)
    percentile_step: float = _f(0.0, doc="Raise the percentile by this much each round (capped at 100).", ge=0)
    generation: GenerationSection = _f(doc="Sampling settings.", factory=GenerationSection)


@dataclass
class PpoSection:
    rollout_batch_size: int = _f(16, doc="Prompts sampled per PPO step.", ge=1)
    mini_batch_size: int = _f(4, doc="Rollouts per optimisation minibatch.", ge=1)
    ppo_epochs: int = _f(4, doc="Optimisation passes over each rollout batch.", ge=1)
    gamma: float = _f(1.0, doc="GAE discount.", ge=0, le=1)
    lam: float = _f(0.95, doc="GAE lambda.", ge=0, le=1)
    cliprange: float = _f(0.2, doc="Policy ratio clip.", gt=0)
    cliprange_value: float = _f(0.2, doc="Value clip.", gt=0)
    vf_coef: float = _f(0.1, doc="Value loss coefficient.", ge=0)
    kl_coef: float = _f(0.05, doc="Initial per-token KL penalty coefficient.", ge=0)
    adaptive_kl: bool = _f(False, doc="Adapt kl_coef towards target_kl.")
    target_kl: float = _f(6.0, doc="Target KL for the adaptive controller.", gt=0)
    kl_horizon: int = _f(10000, doc="Horizon of the adaptive KL controller.", ge=1)
    whiten_advantages: bool = _f(True, doc="Normalise advantages per batch.")
    reward_normalize: bool = _f(False, doc="Standardise rewards with running statistics.")
    reward_clip: float | None = _f(None, doc="Clip rewards to [-x, x].", gt=0)
    missing_eos_penalty: float | None = _f(None, doc="Subtracted from the reward of responses that do not end.", ge=0)
    value_model: Literal["shared", "separate"] = _f("shared", doc="Value head on the policy trunk, or a separate model.")
    value_model_path: str | None = _f(None, doc="Initial weights of a separate value model (default: the reward model).")
    sample_every: int = _f(10, doc="Write sample rollouts every N steps.", ge=1)
    generation: GenerationSection = _f(doc="Rollout sampling settings.", factory=GenerationSection)


@dataclass
class AnswersSection:
    prompts: list[str] = _f(doc="stages sft and dpo: questions (single user turns) the model answers greedily before "
                            "and after training; printed, and saved to answers.jsonl in the run directory.",
                            factory=list)
    max_new_tokens: int = _f(96, doc="Answer length limit in tokens.", ge=1)


@dataclass
class DistributedSection:
    strategy: Literal["none", "ddp", "deepspeed"] = _f("none", doc="Multi-process strategy.")
    num_processes: int = _f(1, doc="Processes per node (usually GPUs per node).", ge=1)
    num_nodes: int = _f(1, doc="Number of machines.", ge=1)
    machine_rank: int = _f(0, doc="This machine's rank.", ge=0)
    main_process_ip: str | None = _f(None, doc="Address of rank 0 for multi-node runs.")
    main_process_port: int = _f(29500, doc="Port of rank 0.", ge=1, le=65535)
    zero_stage: int = _f(2, doc="DeepSpeed ZeRO stage (2 or 3).", ge=2, le=3)
    offload_optimizer: bool = _f(False, doc="DeepSpeed: offload optimizer states to CPU.")
    offload_params: bool = _f(False, doc="DeepSpeed ZeRO-3: offload parameters to CPU.")
    deepspeed_config: str | None = _f(None, doc="Your own DeepSpeed JSON (replaces the generated one).")
    accelerate_config: str | None = _f(None, doc="Your own accelerate config file.")
    hostfile: str | None = _f(None, doc="DeepSpeed hostfile for multi-node launches.")
    backend: str | None = _f(None, doc="torch.distributed backend; default nccl on CUDA, gloo on CPU.")


@dataclass
class Recipe:
    stage: Stage = _f(REQUIRED, doc="Training stage: sft, rm, dpo, rs or ppo.")
    model: ModelSection = _f(REQUIRED, doc="The model to train.")
    data: DataSection = _f(REQUIRED, doc="Training (and eval) data.")
    training: TrainingSection = _f(doc="Optimisation, logging and saving.", factory=TrainingSection)
    distributed: DistributedSection = _f(doc="Multi-GPU / multi-node settings.", factory=DistributedSection)
    output_dir: str | None = _f(None, doc="Run directory; default runs/<stage>-<model>-<time>.")
    description: str = _f("", doc="Free text shown in listings.")
    reward: RewardSection | None = _f(None, doc="Reward source (rs, ppo).")
    rm: RmSection = _f(doc="Reward-model stage settings.", factory=RmSection)
    dpo: DpoSection = _f(doc="DPO stage settings.", factory=DpoSection)
    rs: RsSection = _f(doc="Rejection-sampling stage settings.", factory=RsSection)
    ppo: PpoSection = _f(doc="PPO stage settings.", factory=PpoSection)
    answers: AnswersSection = _f(doc="Answers to show before and after training (what tuning changed).",
                                 factory=AnswersSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Parsing: dict -> dataclasses, every error with its key path.

_HINTS = typing.get_type_hints  # resolved lazily per class (handles the recursive RewardSection)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], path, errors)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        errors.append(f"{path}: {value!r} is not one of {', '.join(map(str, allowed))}"
                      + (hint(str(value), map(str, allowed)) if isinstance(value, str) else ""))
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return _build(tp, value, path, errors)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return None
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return None


def _check_range(value: Any, meta: dict, path: str, errors: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            errors.append(f"{path}: {value} must be {word} {bound}")


def _build(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    hints = _HINTS(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            errors.append(f"{path}: unknown key" + hint(path, [f"{prefix}.{k}" if prefix else k for k in fields]))
            continue
        converted = _convert(value, hints[key], path, errors)
        _check_range(converted, dict(fields[key].metadata), path, errors)
        kwargs[key] = converted
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            path = f"{prefix}.{name}" if prefix else name
            errors.append(f"{path}: required key is missing ({f.metadata.get('doc', '')})")
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})
    except TypeError:
        return None  # a required field failed; the error is already recorded


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def parse(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build a typed Recipe or raise one ConfigError listing every problem with its key path."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    recipe = _build(Recipe, data, "", errors)
    if errors:
        raise ConfigError(_format(source, errors))
    return recipe


def _format(source: str, errors: list[str]) -> str:
    if len(errors) == 1:
        return f"{source}: {errors[0]}"
    return f"{source}: {len(errors)} problems\n" + "\n".join(f"  - {e}" for e in errors)


# --------------------------------------------------------------------------------------------------
# Semantic checks: names, files, combinations. Still no torch import.

def cuda_present() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (validate must stay fast)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def visible_gpus() -> int | None:
    """How many NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES, else /dev/nvidiaN), without
    torch; None when unknown."""
    if not cuda_present():
        return 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip()])
    return len(list(Path("/dev").glob("nvidia[0-9]*"))) or None


def check(recipe: Recipe, source: str = "recipe", base_dir: Path | None = None,
          device_checks: bool = True, pending: frozenset[str] = frozenset()) -> Recipe:
    """Semantic validation that needs registries and the file system. Raises one ConfigError.

    device_checks=False skips what depends on this machine's GPUs (`llmtune plan` sizes a GPU run
    from a laptop). `pending` holds run directories an earlier pipeline stage will create."""
    from llmtune.data.registry import FORMATS, list_entries
    from llmtune.registry.models import resolve_model
    from llmtune.stages import MODULES, implemented

    errors: list[str] = []
    if not implemented(recipe.stage):
        errors.append(f"stage: '{recipe.stage}' is not implemented yet in this version of llmtune (available: "
                      + ", ".join(s for s in MODULES if implemented(s)) + ")")
    spec = None
    try:
        if recipe.model.name not in pending:
            spec = resolve_model(recipe.model.name, template=recipe.model.template, gguf_file=recipe.model.gguf_file)
    except ConfigError as exc:
        errors.append(f"model.name: {exc}")
    _check_gguf_file(recipe.model, errors)
    _check_ppo_strategy(recipe, errors)
    _check_answers(recipe, errors)

    if device_checks and recipe.model.finetuning == "qlora" and not cuda_present():
        errors.append("model.finetuning: qlora needs a CUDA GPU (bitsandbytes 4-bit); none is visible here. "
                      "Use lora or full on this machine")

    data = recipe.data
    entries: list[tuple[str, DatasetSection]] = []
    if data.datasets:
        if data.name or data.path:
            errors.append("data: give either name/path or a datasets list, not both")
        entries = [(f"data.datasets[{i}]", d) for i, d in enumerate(data.datasets)]
    elif data.name or data.path:
        entries = [("data", data)]
    else:
        errors.append("data: give a dataset `name` (see `llmtune datasets`), a local `path`, or a `datasets` list")
    try:
        registry = list_entries(data.registry)
    except ConfigError as exc:
        errors.append(f"data.registry: {exc}")
        registry = {}
    for where, ds in entries:
        if ds.name and registry and ds.name not in registry:
            errors.append(f"{where}.name: unknown dataset '{ds.name}'" + hint(ds.name, registry))
        if ds.path and not ds.path.startswith("package:") and not Path(ds.path).expanduser().exists():
            errors.append(f"{where}.path: no such file or directory: {ds.path}")
        if ds.format and ds.format not in FORMATS:
            errors.append(f"{where}.format: unknown format '{ds.format}'" + hint(ds.format, FORMATS))
        if ds.format == "columns" and not ds.columns:
            errors.append(f"{where}.columns: format 'columns' needs a column mapping")

    if recipe.stage in ("rs", "ppo") and recipe.reward is None:
        errors.append(f"reward: stage '{recipe.stage}' needs a reward source (type: reward_model, classifier, "
                      "judge, rule or mix)")
    if recipe.reward is not None:
        _check_reward(recipe.reward, "reward", errors, pending)
    if recipe.stage == "rs" and recipe.distributed.strategy != "none":
        errors.append("distributed.strategy: stage rs samples and fine-tunes in one process; use strategy: none")
    if recipe.stage == "dpo":
        if recipe.dpo.label_smoothing and recipe.dpo.loss_type != "sigmoid":
            errors.append(f"dpo.label_smoothing: only loss_type sigmoid uses it (loss_type is "
                          f"'{recipe.dpo.loss_type}'); set it to 0")
        if data.max_prompt_length is not None and data.max_prompt_length >= data.max_length:
            errors.append(f"data.max_prompt_length: {data.max_prompt_length} leaves no room for the responses; "
                          f"it must be smaller than data.max_length ({data.max_length})")
    if recipe.training.group_by_length and recipe.stage not in ("sft", "rm"):
        errors.append(f"training.group_by_length: supported by stages sft and rm, not '{recipe.stage}'")
    if recipe.stage == "rm" and recipe.rm.pooling == "mean" and spec is not None and spec.kind not in (None, "encoder"):
        errors.append(f"rm.pooling: mean pooling is for encoder models; '{recipe.model.name}' is {spec.kind} "
                      "(use pooling: architecture)")
    if spec is not None and spec.kind == "encoder" and recipe.stage != "rm":
        errors.append(f"model.name: '{recipe.model.name}' is an encoder-only model; it can only be trained "
                      "with stage: rm")

    dist = recipe.distributed
    if device_checks and dist.strategy == "deepspeed" and not cuda_present():
        errors.append("distributed.strategy: deepspeed needs CUDA GPUs; use ddp (gloo) on CPU")
    gpus = visible_gpus() if device_checks else None
    if gpus and dist.strategy != "none" and dist.num_processes > gpus:
        errors.append(f"distributed.num_processes: {dist.num_processes} processes but {gpus} GPU(s) visible on "
                      "this machine (one process per GPU)")
    if (dist.offload_optimizer or dist.offload_params) and dist.strategy != "deepspeed":
        errors.append("distributed.offload_optimizer/offload_params: CPU offload needs strategy: deepspeed")
    if dist.deepspeed_config and dist.strategy != "deepspeed":
        errors.append("distributed.deepspeed_config: only used with strategy: deepspeed")
    if dist.hostfile and (dist.strategy != "deepspeed" or dist.num_nodes < 2):
        errors.append("distributed.hostfile: only used by multi-node DeepSpeed runs (strategy: deepspeed, "
                      "num_nodes > 1)")
    if dist.machine_rank >= dist.num_nodes:
        errors.append(f"distributed.machine_rank: {dist.machine_rank} must be < num_nodes ({dist.num_nodes})")
    if dist.strategy == "deepspeed" and dist.zero_stage == 3 and recipe.model.finetuning == "qlora":
        errors.append("distributed.zero_stage: QLoRA's 4-bit weights cannot be sharded by ZeRO-3; use zero_stage: 2")
    if dist.offload_params and dist.zero_stage != 3:
        errors.append("distributed.offload_params: parameter offload needs zero_stage: 3")
    if dist.strategy == "none" and (dist.num_processes > 1 or dist.num_nodes > 1):
        errors.append("distributed.strategy: more than one process needs strategy ddp or deepspeed")
    for key in ("deepspeed_config", "accelerate_config", "hostfile"):
        value = getattr(dist, key)
        if value and not Path(value).expanduser().exists():
            errors.append(f"distributed.{key}: no such file: {value}")
    if dist.num_nodes > 1 and not dist.main_process_ip:
        errors.append("distributed.main_process_ip: required when num_nodes > 1")

    if errors:
        raise ConfigError(_format(source, errors))
    return recipe


def _check_gguf_file(m: ModelSection, errors: list[str]) -> None:
    if m.gguf_file and not Path(m.name).expanduser().is_dir():
        errors.append(f"model.gguf_file: names a file inside the directory model.name, but '{m.name}' is not a "
                      "local directory (give the .gguf path as model.name instead)")


def _check_ppo_strategy(recipe: Recipe, errors: list[str]) -> None:
    """PPO is our own accelerate loop: its checkpoints and final save read full parameters and do not
    gather ZeRO-partitioned ones (ZeRO-3 would save empty weights), so DeepSpeed is refused."""
    if recipe.stage == "ppo" and recipe.distributed.strategy == "deepspeed":
        errors.append("distributed.strategy: stage ppo does not support deepspeed (its checkpoints and final model "
                      "would not gather ZeRO-partitioned weights); use strategy: ddp, with finetuning: lora or qlora "
                      "to fit large models")


def _check_answers(recipe: Recipe, errors: list[str]) -> None:
    if not recipe.answers.prompts:
        return
    if recipe.stage not in ("sft", "dpo"):
        errors.append(f"answers.prompts: shown by stages sft and dpo, not '{recipe.stage}'")
    if recipe.distributed.strategy == "deepspeed" and recipe.distributed.zero_stage == 3:
        errors.append("answers.prompts: not with ZeRO-3 (rank 0 alone cannot generate from sharded weights)")


def _check_reward(r: RewardSection, where: str, errors: list[str], pending: frozenset[str] = frozenset()) -> None:
    need = {"reward_model": "model", "classifier": "model", "rule": "function", "mix": "components"}
    key = need.get(r.type)
    if key and not getattr(r, key):
        errors.append(f"{where}.{key}: required for reward type '{r.type}'")
    if r.type == "judge" and not (r.model or r.endpoint):
        errors.append(f"{where}: a judge needs `model` (local LLM) or `endpoint` (OpenAI-compatible URL)")
    if r.type == "judge" and r.endpoint and not r.judge_model:
        errors.append(f"{where}.judge_model: required with `endpoint` (the model name the server serves)")
    if r.type == "rule" and r.function and ":" not in r.function:
        errors.append(f"{where}.function: expected 'package.module:function', got '{r.function}'")
    if r.type == "reward_model" and r.model and r.model.startswith((".", "/", "~")) \
            and not Path(r.model).expanduser().exists() and r.model not in pending:
        errors.append(f"{where}.model: no such directory: {r.model}")
    if len(r.score_range) != 2 or r.score_range[0] >= r.score_range[1]:
        errors.append(f"{where}.score_range: expected [min, max] with min < max")
    for i, c in enumerate(r.components or []):
        _check_reward(c, f"{where}.components[{i}]", errors, pending)


def iter_keys(cls: type = Recipe, prefix: str = "") -> typing.Iterator[tuple[str, str, Any, str]]:
    """(key path, type, default, doc) for every recipe key: feeds the README reference."""
    hints = _HINTS(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or (
            [tp] if dataclasses.is_dataclass(tp) else [])
        list_inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            default = None if dataclasses.is_dataclass(default) else default
        else:
            default = "required"
        yield path, _type_name(tp), default, f.metadata.get("doc", "")
        if inner and inner[0] is not cls:
            yield from iter_keys(inner[0], path)
        elif list_inner is not None and dataclasses.is_dataclass(list_inner) and list_inner is not cls:
            yield from iter_keys(list_inner, path + "[]")
