"""Loading models and tokenizers for training and inference: base, LoRA, QLoRA, full; causal,
seq2seq and sequence-classification heads. Every stage and the server load through here.

Continuing from an earlier LoRA run (e.g. DPO after SFT) merges that adapter into the base in
memory and adds a fresh adapter: the frozen reference is then "the SFT model" with adapters
disabled, and there is still one copy of the weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from llmtune.config.schema import Recipe
from llmtune.data.templates import ChatTemplate, install_chat_template
from llmtune.errors import ConfigError
from llmtune.registry.models import META_FILE, ModelSpec, detect_kind, resolve_model
from llmtune.runs.rundir import follow_umask

log = logging.getLogger("llmtune.modeling")

TASK = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "classifier": "SEQ_CLS"}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_dtype(name: str, spec: ModelSpec | None = None) -> torch.dtype:
    """float32 on CPU; on CUDA the recipe's dtype or the registry's preferred one."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        name = spec.dtype if spec else "bfloat16"
        if name == "bfloat16" and not torch.cuda.is_bf16_supported():
            name = "float16"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _hub_error(ref: str, exc: Exception) -> ConfigError:
    return ConfigError(f"cannot load model '{ref}': {str(exc).splitlines()[0]}. Without network access, "
                       "point model.name at a local directory (or a tiny-* model)")


def base_location(spec: ModelSpec) -> str:
    """The original base weights under any chain of adapters."""
    while spec.base is not None:
        spec = spec.base
    return spec.location()


def resolve_kind(spec: ModelSpec) -> str:
    """The architecture kind, reading the config for hub ids the registry does not know."""
    if spec.kind:
        return spec.kind
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(spec.location())
    except OSError as exc:
        raise _hub_error(spec.location(), exc) from None
    spec.kind = detect_kind(cfg.to_dict(), spec.location())
    return spec.kind


def load_tokenizer(spec: ModelSpec, template: ChatTemplate | None = None) -> Any:
    """Tokenizer with a pad token and our chat template installed."""
    from transformers import AutoTokenizer

    ref = spec.adapter if spec.adapter and (Path(spec.adapter) / "tokenizer_config.json").exists() \
        else base_location(spec)
    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except OSError as exc:
        raise _hub_error(ref, exc) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    install_chat_template(tok, template or ChatTemplate.get(spec.template))
    return tok


def auto_class(head: str) -> Any:
    import transformers

    return {"causal": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "classifier": transformers.AutoModelForSequenceClassification}[head]


def _from_pretrained(head: str, ref: str, pooling: str | None = None, **kwargs: Any) -> Any:
    try:
        if head == "classifier" and pooling == "mean":
            from llmtune.modeling.pooling import MeanPooledClassifier

            return MeanPooledClassifier.load(ref, **kwargs)
        return auto_class(head).from_pretrained(ref, **kwargs)
    except OSError as exc:
        raise _hub_error(ref, exc) from None


def _load_weights(spec: ModelSpec, head: str, kwargs: dict[str, Any], merge_top: bool,
                  pooling: str | None = None) -> Any:
    """Base weights with the chain of earlier adapters applied (merged, except maybe the last).

    pooling: the reward head's pooling for the whole chain (the top model's, see `head_pooling`)."""
    from peft import PeftModel

    if spec.adapter and spec.base is not None:
        model = _load_weights(spec.base, head, kwargs, merge_top=True, pooling=pooling)
        model = PeftModel.from_pretrained(model, spec.adapter)
        return model.merge_and_unload() if merge_top else model
    return _from_pretrained(head, spec.location(), pooling=pooling, **kwargs)


def head_pooling(recipe: Recipe, spec: ModelSpec) -> str | None:
    """The pooling of an rm stage's reward head: the recipe's rm.pooling, else the spec's (registry
    default, or what an earlier rm run trained with)."""
    if recipe.rm.pooling != "auto":
        return "mean" if recipe.rm.pooling == "mean" else None
    return spec.pooling


def load_for_training(recipe: Recipe, head: str | None = None, spec: ModelSpec | None = None,
                      model_name: str | None = None) -> tuple[Any, Any, ModelSpec]:
    """(model, tokenizer, spec) ready to train as the recipe says.

    head: causal | seq2seq | classifier (a one-logit reward model); default from the model kind.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    mcfg = recipe.model
    spec = spec or resolve_model(model_name or mcfg.name, template=mcfg.template,
                                 gguf_file=None if model_name else mcfg.gguf_file)
    kind = resolve_kind(spec)
    head = head or kind
    if kind == "encoder" and head != "classifier":
        raise ConfigError(f"model.name: '{spec.name}' is an encoder model; only stage rm can train it")
    tok = load_tokenizer(spec)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(mcfg.dtype, spec)}
    if head == "classifier":
        kwargs.update(num_labels=1)
        kwargs["pad_token_id"] = tok.pad_token_id
    if mcfg.finetuning == "qlora":
        from transformers import BitsAndBytesConfig

        # The 4-bit matmuls compute in the training precision when one is chosen, else the model's.
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.training.precision) \
            or torch_dtype(mcfg.dtype if mcfg.dtype != "float32" else "auto", spec)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute
        # Quantised weights cannot be moved after loading: each DDP rank loads onto its own GPU
        # (without this every rank would quantise onto GPU 0).
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if head == "classifier":
        spec.pooling = head_pooling(recipe, spec)  # what this model is, and what save_model records
    # Start from an earlier run's adapted weights merged in: they become the new frozen base.
    model = _load_weights(spec, head, kwargs, merge_top=True, pooling=spec.pooling)
    if head == "classifier" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if mcfg.finetuning == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.training.gradient_checkpointing)
    if mcfg.finetuning in ("lora", "qlora"):
        targets = mcfg.lora.target_modules or spec.lora_targets
        # PEFT trains and saves heads named classifier/score; T5's is classification_head.
        heads = ["classification_head"] if head == "classifier" and hasattr(model, "classification_head") else None
        lcfg = LoraConfig(r=mcfg.lora.r, lora_alpha=mcfg.lora.alpha, lora_dropout=mcfg.lora.dropout,
                          target_modules=targets, task_type=TASK[head], modules_to_save=heads)
        try:
            model = get_peft_model(model, lcfg)
        except ValueError as exc:
            raise ConfigError(f"model.lora.target_modules: {exc}") from None
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model, tok, spec


def load_for_inference(ref: str, head: str | None = None, dtype: str = "auto") -> tuple[Any, Any, ModelSpec]:
    """Any run dir, registry name, hub id or path → (eval-mode model on the device, tokenizer, spec).

    LoRA adapters are applied unmerged (no export needed to serve)."""
    spec = resolve_model(ref)
    kind = resolve_kind(spec)
    head = head or ("classifier" if kind == "encoder" or spec.extra.get("head") == "classifier" else kind)
    tok = load_tokenizer(spec)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, spec)}
    if head == "classifier":
        kwargs["num_labels"] = 1
    model = _load_weights(spec, head, kwargs, merge_top=False, pooling=spec.pooling)
    if head == "classifier" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device()).eval()
    return model, tok, spec


def _name_base_portably(out: Path, spec: ModelSpec) -> None:
    """Name the base in the adapter_config.json and model card peft just wrote by a portable reference
    (the hub id when known, else the registry name or GGUF file) instead of the directory it was loaded
    from — often a machine-local cache path, which would tie the run directory to this machine.
    (Rewritten after saving: before it, peft would look the name up on the hub.)"""
    from huggingface_hub import ModelCard

    root = spec
    while root.base is not None:
        root = root.base
    ref = root.hub_ref()
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = ref
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if (out / "README.md").exists():
        card = ModelCard.load(out / "README.md")
        card.data.base_model = ref
        card.data.tags = [f"base_model:adapter:{ref}" if t.startswith("base_model:adapter:") else t
                          for t in card.data.tags or []]
        card.save(out / "README.md")


def save_model(model: Any, tok: Any, out: Path, spec: ModelSpec, recipe: Recipe, head: str,
               state_dict: dict[str, Any] | None = None) -> None:
    """Save weights (or adapter) + tokenizer + llmtune.json so the run reloads anywhere.

    state_dict: weights gathered elsewhere (a ZeRO-3 model holds only its shard of each tensor)."""
    from peft import PeftModel

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    follow_umask(out)
    if isinstance(model, PeftModel):
        _name_base_portably(out, spec)
    tok.save_pretrained(out)
    base = spec.base or spec
    meta = {
        "kind": spec.kind, "template": spec.template, "head": head, "finetuning": recipe.model.finetuning,
        "stage": recipe.stage,
        "base": base.portable_ref() if recipe.model.finetuning != "full" else None,
    }
    if head == "classifier":
        meta["pooling"] = spec.pooling or "architecture"
    if spec.adapter and recipe.model.finetuning != "full":
        # The new adapter sits on base+earlier adapter merged; record the chain to rebuild it.
        meta["base"] = spec.adapter
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
