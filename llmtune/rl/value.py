"""The critic of algorithm ppo: a value head on the policy's own trunk (shared, no extra model), or a
separate value model (a trunk initialised from the reward model or `value_model_path`, plus a value
head). Critic-free algorithms (grpo, rloo, reinforce_pp) never build one.

`ActorCritic` bundles policy and critic into one `nn.Module` so accelerate/DDP prepares, wraps
and synchronises both with a single `prepare` call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ValueHead(nn.Module):
    """One linear layer from a hidden state to a scalar value (zero-initialised: V starts at 0,
    so the first advantages are just the rewards and not noise from a random projection)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def hidden_size(config: Any) -> int:
    """Width of the last hidden state for the architectures we train (Llama, GPT-J, T5, BERT...)."""
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the hidden size in {type(config).__name__}")


class ActorCritic(nn.Module):
    """Policy plus critic. `forward` takes the policy's keyword inputs and returns (logits, values per
    position), from one pass when the critic shares the trunk."""

    def __init__(self, policy: nn.Module, kind: str, value_model: nn.Module | None = None,
                 score_head: nn.Linear | None = None):
        super().__init__()
        self.policy = policy
        self.kind = kind
        self.value_model = value_model
        trunk_config = (value_model or policy).config
        self.value_head = ValueHead(hidden_size(trunk_config))
        if score_head is not None:
            # Start the critic from the reward model's own scorer: V(s) ~ the RM's score of the prefix.
            with torch.no_grad():
                self.value_head.summary.weight.copy_(score_head.weight)
                if score_head.bias is not None:
                    self.value_head.summary.bias.copy_(score_head.bias)
        dtype = next(policy.parameters()).dtype
        if dtype in (torch.float16, torch.bfloat16):
            # The head stays float32 for stable regression targets; hidden states are upcast.
            self.value_head.float()

    def forward(self, **batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(**batch, output_hidden_states=True)
        if self.value_model is None:
            hidden = out.decoder_hidden_states[-1] if self.kind == "seq2seq" else out.hidden_states[-1]
        else:
            hidden = self.value_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      position_ids=batch.get("position_ids")).last_hidden_state
        return out.logits, self.value_head(hidden)


def load_value_model(ref: str, recipe: Any, policy_vocab: int) -> tuple[nn.Module, nn.Module | None]:
    """The separate critic: (trunk, the reward model's score head or None) loaded from `ref` — an rm
    run (LoRA runs are merged in memory), a causal LM, or a path. The trunk gets LoRA when the policy
    uses LoRA, so the critic stays as cheap to train as the actor."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from llmtune.errors import ConfigError
    from llmtune.modeling.load import load_for_inference, resolve_kind
    from llmtune.registry.models import resolve_model

    kind = resolve_kind(resolve_model(ref))
    if kind != "causal":
        raise ConfigError(f"{recipe.stage}.value_model_path: the separate value model '{ref}' is a {kind} model; it "
                          "must be a decoder (causal) model sharing the policy's tokenizer, or use "
                          f"{recipe.stage}.value_model: shared")
    model, _, spec = load_for_inference(ref, head="classifier", dtype=recipe.model.dtype)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    vocab = model.get_input_embeddings().weight.shape[0]
    if vocab != policy_vocab:
        raise ConfigError(f"{recipe.stage}.value_model_path: '{ref}' has a vocabulary of {vocab} tokens but the policy has "
                          f"{policy_vocab}; the value model must share the policy's tokenizer")
    # Only a trained reward model's score head is worth keeping; a fresh one is random noise.
    trained = spec.extra.get("head") == "classifier"
    score = getattr(model, "score", None) if trained else None
    trunk = model.base_model.train().requires_grad_(True)
    if recipe.model.finetuning in ("lora", "qlora"):
        lora = recipe.model.lora
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=lora.target_modules or spec.lora_targets or "all-linear")
        trunk = get_peft_model(trunk, cfg)
    return trunk, score if isinstance(score, nn.Linear) and score.out_features == 1 else None
