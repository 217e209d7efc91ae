"""A one-logit reward head on the mean of an encoder's token states (`rm.pooling: mean`).

Why ours: transformers' `*ForSequenceClassification` heads for BERT-style encoders read the [CLS]
state through the pre-training pooler. Sentence encoders such as all-MiniLM-L6-v2 were trained by
sentence-transformers to *mean* their token states, so a reward head on that mean starts from the
representation the model actually learned (on HH pairs it beat the [CLS] head in four paired runs,
by 2.7 points of held-out pairwise accuracy on average, at the same cost). transformers has no
such head for BERT-family models (only ModernBERT's own `classifier_pooling`), and
sentence-transformers' models do not plug into `Trainer`/PEFT as sequence classifiers.

The class wraps whatever `AutoModel` the encoder's config names, so it serves any encoder
architecture; weights save and reload with `save_pretrained`/`from_pretrained` (keys `backbone.*`,
`classifier.*`). llmtune records `"pooling": "mean"` in the saved llmtune.json, which is how its
loaders know to come back through this class.

Plain transformers must not load it as anything else: with the encoder's own `model_type` in
config.json, `AutoModelForSequenceClassification` would build a [CLS] classifier, ignore every
`backbone.*` weight and score with random ones, silently. So a saved model has its own model_type
(`MeanPooledConfig`) and carries this file with an `auto_map` (transformers' custom-code mechanism):
`AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)` loads exactly
this model, and without trust_remote_code transformers refuses loudly. This file therefore imports
only torch and transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING


class MeanPooledConfig(PretrainedConfig):
    """The encoder's config, every key kept at the top level (hidden_size, pad_token_id, ...), under a
    model_type of its own; `encoder_model_type` names the encoder architecture."""

    model_type = "llmtune-mean-pooled"

    def __init__(self, encoder_model_type: str = "bert", **kwargs: Any):
        self.encoder_model_type = encoder_model_type
        super().__init__(**kwargs)

    @classmethod
    def wrap(cls, encoder: PretrainedConfig) -> MeanPooledConfig:
        if isinstance(encoder, cls):
            return encoder
        keys = {k: v for k, v in encoder.to_dict().items() if k not in _NOT_ENCODER_KEYS}
        return cls(encoder_model_type=encoder.model_type, **keys)

    def encoder(self) -> PretrainedConfig:
        keys = {k: v for k, v in self.to_dict().items() if k not in _NOT_ENCODER_KEYS}
        return AutoConfig.for_model(self.encoder_model_type, **keys)


_NOT_ENCODER_KEYS = {"model_type", "encoder_model_type", "auto_map", "architectures", "transformers_version"}


class MeanPooledClassifier(PreTrainedModel):
    """Encoder → attention-masked mean of the last hidden states → dropout → linear (num_labels)."""

    config_class = MeanPooledConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True

    def __init__(self, config: PretrainedConfig):
        config = MeanPooledConfig.wrap(config)
        super().__init__(config)
        encoder = config.encoder()
        # The encoder's own pre-training pooler ([CLS] dense + tanh) is not used: leave it out, or
        # DDP would see parameters that never get a gradient.
        arch = MODEL_MAPPING[type(encoder)]
        extra = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(arch.__init__).parameters \
            else {}
        self.backbone = AutoModel.from_config(encoder, **extra)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(dropout if dropout is not None else getattr(config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @classmethod
    def load(cls, ref: str, **kwargs: Any) -> MeanPooledClassifier:
        """From a saved MeanPooledClassifier (also one saved before it had a model_type of its own), or
        from a plain encoder checkpoint (new head)."""
        num_labels = kwargs.pop("num_labels", 1)
        pad_token_id = kwargs.pop("pad_token_id", None)
        config = MeanPooledConfig.wrap(AutoConfig.from_pretrained(ref, num_labels=num_labels))
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        return cls.from_pretrained(ref, config=config, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        kwargs.pop("return_dict", None)
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if attention_mask is None:
            pooled = states.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        # Regression loss for one output, as transformers' classifiers do with num_labels=1
        # (reward training computes its own pairwise loss and passes no labels).
        loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


# llmtune itself reads its saved reward models without trust_remote_code; save_pretrained writes the
# auto_map and copies this file, so plain transformers can too (with trust_remote_code=True).
AutoConfig.register(MeanPooledConfig.model_type, MeanPooledConfig, exist_ok=True)
MeanPooledConfig.register_for_auto_class()
MeanPooledClassifier.register_for_auto_class("AutoModelForSequenceClassification")
