"""The one typed schema for every recipe, and the only place recipes are validated.

A recipe dict (already loaded and merged by `load.py`) is turned into nested dataclasses by
`parse()`. Every problem is collected with its full key path (`model.lora.r`), so the user sees all
of them at once, with a did-you-mean for unknown keys. `check()` then runs the semantic checks of
each section (`checks/`: model, data, reward, the stage, distributed), which need the registries,
the file system or this machine. What passes here, the run accepts: stages and loaders re-check
nothing. Nothing here imports torch: `llmtune validate` must start fast.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from llmtune.config.checks.data import check_data
from llmtune.config.checks.distributed import check_distributed
from llmtune.config.checks.model import check_model
from llmtune.config.checks.reward import check_reward
from llmtune.config.checks.stages import GROUPED, check_stage
from llmtune.errors import ConfigError, hint, problems

STAGES = ("sft", "rm", "dpo", "rs", "ppo", "rl")
Stage = Literal["sft", "rm", "dpo", "rs", "ppo", "rl"]


def _f(default: Any = dataclasses.MISSING, *, doc: str, ge: float | None = None, le: float | None = None,
       gt: float | None = None, lt: float | None = None, factory: Any = None, ref: str | None = None,
       same_as: str | None = None) -> Any:
    """A dataclass field carrying its documentation and numeric range (used by README reference).

    `same_as` names another section of the same type whose keys the reference lists instead (stage
    ppo's `ppo` section is `rl`'s).

    `ref` marks a key that reaches outside the recipe: "path" (a file or directory), "data" (a path
    or `package:` data), "model" (a registry name or a model directory), "rule" (a Python function),
    "env" (an environment variable). The web UI confines each kind (config/confine.py)."""
    meta = {"doc": doc, "ge": ge, "le": le, "gt": gt, "lt": lt, "ref": ref, "same_as": same_as}
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
                   "or a .gguf file (converted once into $LLMTUNE_HOME/models).", ref="model")
    gguf_file: str | None = _f(None, doc="A GGUF file inside the directory model.name names (instead of naming the "
                               ".gguf file itself).")
    finetuning: Literal["lora", "qlora", "full"] = _f(
        "lora", doc="lora: adapters on a frozen base; qlora: adapters on a 4-bit base (CUDA); full: all weights.")
    lora: LoraSection = _f(doc="LoRA adapter settings (lora and qlora).", factory=LoraSection)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", doc="Weights dtype; auto: the registry default on CUDA, float32 on CPU.")
    template: str | None = _f(None, doc="Chat template name overriding the registry's (see models.yaml).")
    revision: str | None = _f(None, doc="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = _f(False, doc="Allow custom modeling code from the hub.")


@dataclass
class DatasetSection:
    name: str | None = _f(None, doc="Data registry entry (`llmtune datasets`).")
    path: str | None = _f(None, doc="Local copy: a file or directory of jsonl/json/jsonl.gz/csv/parquet.", ref="data")
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
    registry: list[str] = _f(doc="Extra data registry JSON files to read.", factory=list, ref="path")

    @property
    def prompt_length(self) -> int:
        """Prompt tokens kept for generation and preference pairs: max_prompt_length, else half of
        max_length (the one place this default is computed)."""
        return self.max_prompt_length or self.max_length // 2


@dataclass
class TrainingSection:
    epochs: float = _f(1.0, doc="Passes over the training data (ignored when max_steps > 0).", gt=0)
    max_steps: int = _f(-1, doc="Optimizer steps to run; -1: derived from epochs.")
    learning_rate: float = _f(2e-4, doc="Peak learning rate.", gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = _f(
        "cosine", doc="Learning-rate schedule.")
    warmup_ratio: float = _f(0.0, doc="Fraction of steps for linear warmup.", ge=0, lt=1)
    warmup_steps: int = _f(0, doc="Warmup steps (overrides warmup_ratio when > 0).", ge=0)
    batch_size: int = _f(4, doc="Per-device train batch size (stages ppo and rl train on minibatches of "
                         "mini_batch_size rollouts instead).", ge=1)
    eval_batch_size: int | None = _f(None, doc="Per-device eval batch size (sft, rm, dpo); default batch_size.", ge=1)
    gradient_accumulation_steps: int = _f(1, doc="Micro-batches per optimizer step.", ge=1)
    weight_decay: float = _f(0.0, doc="AdamW weight decay.", ge=0)
    max_grad_norm: float = _f(1.0, doc="Gradient clipping norm (0 disables).", ge=0)
    optimizer: str = _f("adamw_torch", doc="transformers optimizer name (adamw_torch, paged_adamw_8bit, ...).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", doc="Mixed precision; auto: bf16 on CUDA that supports it, else fp32.")
    gradient_checkpointing: bool = _f(False, doc="Trade compute for activation memory.")
    seed: int = _f(42, doc="Seed for data order, initialization and sampling.")
    logging_steps: int = _f(10, doc="Write metrics every N optimizer steps.", ge=1)
    eval_steps: int | None = _f(None, doc="Evaluate every N steps; default: at the end of each epoch when eval data exists.", ge=1)
    save_steps: int = _f(500, doc="Save a checkpoint every N steps (and always on interrupt).", ge=1)
    save_total_limit: int | None = _f(2, doc="Keep at most N checkpoints.", ge=1)
    num_workers: int = _f(0, doc="DataLoader worker processes.", ge=0)
    threads: int | None = _f(
        None, doc="CPU threads for this run's tensor math (torch intra-op threads); default: OMP_NUM_THREADS if "
        "set (the web UI sets it for the runs it launches, see README: CPU notes), else one per core. On a CPU "
        "shared with other busy processes, fewer threads are often much faster.", ge=1)
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
    model: str | None = _f(None, doc="reward_model: rm run dir or model path; classifier: hub id or path; judge: local LLM.",
                           ref="model")
    label_index: int = _f(0, doc="classifier: index of the logit used as reward.", ge=0)
    transform: Literal["none", "sigmoid", "softmax", "log_softmax"] = _f(
        "none", doc="classifier: transform applied to logits before taking label_index.")
    input: Literal["response", "prompt_response"] = _f(
        "response", doc="classifier: score the response alone (toxicity, sentiment) or prompt+response as a text pair.")
    endpoint: str | None = _f(None, doc="judge: base URL of an OpenAI-compatible server (…/v1).")
    judge_model: str | None = _f(None, doc="judge: model name sent to the endpoint.")
    api_key_env: str | None = _f(None, doc="judge: environment variable holding the endpoint's API key.", ref="env")
    template: str | None = _f(None, doc="judge: prompt template with {prompt} and {response}.")
    score_range: list[float] = _f(doc="judge: [min, max] of the asked score; answers are clamped.", factory=lambda: [0.0, 10.0])
    fallback: float = _f(0.0, doc="judge: reward when the answer holds no number.")
    function: str | None = _f(None, doc="rule: dotted path `package.module:function`.", ref="rule")
    kwargs: dict[str, Any] = _f(doc="rule: keyword arguments for the function.", factory=dict)
    components: list[RewardSection] | None = _f(None, doc="mix: the weighted reward sources.")
    weight: float = _f(1.0, doc="Weight of this source inside a mix.")
    normalize: bool = _f(False, doc="Standardize this source's scores with running mean/std over all calls (in a mix: before weighting).")
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
    generation_batch_size: int = _f(4, doc="Prompts per generation batch (each sampled num_samples times).", ge=1)



@dataclass
class RlSection:
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = _f(
        "ppo", doc="How each response's advantage is estimated; the rest of the loop (sampling, scoring, KL to the "
        "frozen reference, clipped update) is shared. ppo: a value head and GAE (Schulman et al.); grpo: reward minus "
        "its group's mean, divided by the group's std (DeepSeekMath); rloo: reward minus the mean of the other samples "
        "of the same prompt (Ahmadian et al.); reinforce_pp: REINFORCE++, token-level KL in the reward, returns "
        "normalised over the whole batch (Hu et al.; with num_generations > 1 the group mean is subtracted first). "
        "Critic-free algorithms allocate no value head.")
    rollout_batch_size: int = _f(16, doc="Prompts sampled per step (each num_generations times).", ge=1)
    num_generations: int | None = _f(
        None, doc="Responses sampled per prompt, in one batched generate call (a group); default 1 for ppo and "
        "reinforce_pp, 8 for grpo and rloo.", ge=1)
    mini_batch_size: int = _f(4, doc="Rollouts per optimization minibatch (one optimizer step each).", ge=1)
    ppo_epochs: int | None = _f(
        None, doc="Optimization passes over each rollout batch; default 4 for ppo, 1 for the critic-free algorithms "
        "(one pass: the old log-probs are the new ones, so no extra forward pass is spent on them).", ge=1)
    gamma: float = _f(1.0, doc="Discount (ppo's GAE, reinforce_pp's returns).", ge=0, le=1)
    lam: float = _f(0.95, doc="GAE lambda (ppo).", ge=0, le=1)
    cliprange: float = _f(0.2, doc="Policy ratio clip: the ratio is kept within [1 - cliprange, 1 + cliprange_high].",
                          gt=0)
    cliprange_high: float | None = _f(
        None, doc="Upper ratio clip (clip-higher, DAPO: e.g. 0.28 keeps low-probability tokens exploring); default "
        "cliprange.", gt=0)
    ratio_threshold: float | None = _f(
        10.0, doc="Skip (zero the loss of) a micro-batch whose mean ratio new/old policy exceeds this: a guard against "
        "loss spikes (TRL 0.11's ratio_threshold); counted in skipped_batches.", gt=1)
    cliprange_value: float = _f(0.2, doc="Value clip (ppo).", gt=0)
    vf_coef: float = _f(0.1, doc="Value loss coefficient (ppo).", ge=0)
    kl_coef: float = _f(0.05, doc="Initial KL coefficient (beta); 0 skips the reference model's forward pass.", ge=0)
    kl_in: Literal["reward", "loss"] | None = _f(
        None, doc="Where the KL to the reference enters: reward (per token for ppo and reinforce_pp, summed per response "
        "for grpo and rloo, before their baselines) or loss (beta * KL per token added to the policy loss, as GRPO "
        "does); default loss for grpo, reward otherwise.")
    kl_estimator: Literal["k1", "k2", "k3"] | None = _f(
        None, doc="Per-token KL estimator with r = log p - log p_ref: k1 = r (TRL 0.11's kl), k2 = r^2/2 (mse), k3 = "
        "exp(-r) - 1 + r (low variance, never negative); default k1 in the reward, k3 in the loss.")
    adaptive_kl: bool = _f(False, doc="Adapt kl_coef towards target_kl.")
    target_kl: float = _f(6.0, doc="Target KL for the adaptive controller.", gt=0)
    kl_horizon: int = _f(10000, doc="Horizon of the adaptive KL controller.", ge=1)
    scale_rewards: bool = _f(
        True, doc="grpo: divide by the group's reward std; false: only subtract the mean (Dr. GRPO: no bias towards "
        "groups that are nearly solved or nearly failed).")
    skip_zero_variance_groups: bool = _f(
        True, doc="grpo and rloo: leave groups whose rewards are all equal out of the update (their advantage is 0; "
        "DAPO's dynamic-sampling filter); counted in zero_variance_groups.")
    loss_aggregation: Literal["token_mean", "sequence_mean", "token_sum_norm"] = _f(
        "token_mean", doc="How per-token losses make a minibatch's loss: token_mean (every token of the minibatch "
        "weighs the same; DAPO, TRL's default 'dapo'), sequence_mean (each response's token mean, then the mean over "
        "responses; the GRPO paper, TRL 'grpo'), token_sum_norm (the sum divided by responses x max_new_tokens; Dr. "
        "GRPO, TRL 'dr_grpo').")
    whiten_advantages: bool = _f(True, doc="ppo: standardize advantages per batch (zero mean, unit variance).")
    reward_normalize: bool = _f(False, doc="Standardize the reward (after the missing-EOS penalty) with running statistics over all processes.")
    reward_clip: float | None = _f(None, doc="Clip rewards to [-x, x].", gt=0)
    missing_eos_penalty: float | None = _f(None, doc="Subtracted from the reward of responses that do not end.", ge=0)
    value_model: Literal["shared", "separate"] = _f(
        "shared", doc="ppo: value head on the policy trunk, or a separate model.")
    value_model_path: str | None = _f(
        None, doc="ppo: initial weights of a separate value model (default: the reward model).", ref="model")
    sample_every: int = _f(10, doc="Write sample rollouts to samples.jsonl every N steps.", ge=1)
    generation: GenerationSection = _f(
        doc="Rollout sampling settings; log-probabilities are computed at the sampling temperature.",
        factory=GenerationSection)
    generation_batch_size: int = _f(
        4, doc="Prompts per generate call while sampling rollouts (each sampled num_generations times in that call) "
        "and evaluating.", ge=1)

    def __post_init__(self) -> None:
        """Fill the defaults that depend on the algorithm, so the saved recipe.yaml says what ran."""
        critic_free = self.algorithm != "ppo"
        if self.num_generations is None:
            self.num_generations = 8 if self.algorithm in GROUPED else 1
        if self.ppo_epochs is None:
            self.ppo_epochs = 1 if critic_free else 4
        if self.kl_in is None:
            self.kl_in = "loss" if self.algorithm == "grpo" else "reward"
        if self.kl_estimator is None:
            self.kl_estimator = "k3" if self.kl_in == "loss" else "k1"

    @property
    def rollouts(self) -> int:
        """Responses per step and process: prompts x group size."""
        return self.rollout_batch_size * (self.num_generations or 1)


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
    deepspeed_config: str | None = _f(None, doc="Your own DeepSpeed JSON (replaces the generated one).", ref="path")
    accelerate_config: str | None = _f(None, doc="Your own accelerate config file.", ref="path")
    hostfile: str | None = _f(None, doc="DeepSpeed hostfile for multi-node launches.", ref="path")
    backend: str | None = _f(None, doc="torch.distributed backend; default nccl on CUDA, gloo on CPU.")

    @property
    def world_size(self) -> int:
        """Processes over all nodes: the data-parallel degree (and what ZeRO shards across)."""
        return self.num_processes * self.num_nodes


@dataclass
class Recipe:
    stage: Stage = _f(REQUIRED, doc="Training stage: sft, rm, dpo, rs, ppo or rl (online RL: rl.algorithm ppo, grpo, "
                      "rloo or reinforce_pp; stage ppo is rl with algorithm ppo, set in the ppo section).")
    model: ModelSection = _f(REQUIRED, doc="The model to train.")
    data: DataSection = _f(REQUIRED, doc="Training (and eval) data.")
    training: TrainingSection = _f(doc="Optimization, logging and saving.", factory=TrainingSection)
    distributed: DistributedSection = _f(doc="Multi-GPU / multi-node settings.", factory=DistributedSection)
    output_dir: str | None = _f(None, doc="Run directory; default runs/<stage>-<model>-<time>.", ref="path")
    description: str = _f("", doc="Free text shown in listings.")
    reward: RewardSection | None = _f(None, doc="Reward source (rs, ppo, rl).")
    eval_reward: RewardSection | None = _f(
        None, doc="ppo, rl: a second reward source scored on the same samples, for monitoring only (a judge, a held-out "
        "checker): reward rising while it falls is reward hacking, visible in metrics.jsonl (eval_reward_mean), "
        "reward_curve.png and samples.jsonl.")
    rm: RmSection = _f(doc="Reward-model stage settings.", factory=RmSection)
    dpo: DpoSection = _f(doc="DPO stage settings.", factory=DpoSection)
    rs: RsSection = _f(doc="Rejection-sampling stage settings.", factory=RsSection)
    ppo: RlSection = _f(doc="Stage ppo's settings: the keys of `rl` (below), with algorithm ppo.", factory=RlSection,
                        same_as="rl")
    rl: RlSection = _f(doc="Online RL settings (stage rl): one loop of rollout, score, advantage and clipped update.",
                       factory=RlSection)
    answers: AnswersSection = _f(doc="Answers to show before and after training (what tuning changed).",
                                 factory=AnswersSection)

    @property
    def online(self) -> RlSection:
        """The online-RL section this stage reads: `ppo` for stage ppo, `rl` for stage rl."""
        return self.ppo if self.stage == "ppo" else self.rl

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
        raise ConfigError(problems(source, errors))
    return recipe


# --------------------------------------------------------------------------------------------------
# Semantic checks (llmtune/config/checks/, one module per section). Still no torch import.

def check(recipe: Recipe, source: str = "recipe", device_checks: bool = True,
          pending: frozenset[str] = frozenset()) -> Recipe:
    """Everything a run would refuse that can be known before it starts: names in the registries,
    files, combinations of keys, this machine. Raises one ConfigError listing every problem.

    device_checks=False skips what depends on this machine's GPUs and installed extras (`llmtune
    plan` sizes a GPU run from a laptop). `pending` holds run directories an earlier pipeline stage
    will create."""
    errors: list[str] = []
    spec = check_model(recipe, errors, device_checks, pending)
    check_data(recipe, errors)
    if recipe.reward is not None:
        check_reward(recipe.reward, "reward", errors, pending)
    if recipe.eval_reward is not None:
        check_reward(recipe.eval_reward, "eval_reward", errors, pending)
    check_stage(recipe, spec, errors, pending)
    check_distributed(recipe, errors, device_checks)
    if errors:
        raise ConfigError(problems(source, errors))
    return recipe


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
        if f.metadata.get("same_as"):
            continue
        if inner and inner[0] is not cls:
            yield from iter_keys(inner[0], path)
        elif list_inner is not None and dataclasses.is_dataclass(list_inner) and list_inner is not cls:
            yield from iter_keys(list_inner, path + "[]")
