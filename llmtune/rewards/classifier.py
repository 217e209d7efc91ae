"""`type: classifier` — any sequence-classification model as a reward (RLAIF-style toxicity etc.).

    reward: {type: classifier, model: facebook/roberta-hate-speech-dynabench-r4-target,
             label_index: 0, transform: log_softmax}     # log P(not hate)

By default the classifier reads the response alone (`input: response`): a toxicity, hate-speech or
sentiment classifier judges what the policy said, and the user's prompt would only leak its own
toxicity into the reward. `input: prompt_response` feeds (conversation, response) as a text pair,
for classifiers trained on pairs (NLI, relevance). Scoring is batched, without gradients, on CUDA
when present; `transform` is applied over the label logits before `label_index` is taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmtune.config.schema import RewardSection
from llmtune.errors import ConfigError
from llmtune.rewards.base import Message, check_pairs, prompt_text

TRANSFORMS = {
    "none": lambda x: x,
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "log_softmax": lambda x: torch.log_softmax(x, dim=-1),
}


def classifier_location(ref: str) -> str:
    """A model path or hub id; an llmtune run directory stands for its `model/`."""
    path = Path(ref).expanduser()
    if (path / "run.json").exists() and (path / "model").is_dir():
        return str(path / "model")
    return str(path) if path.is_dir() else ref


class ClassifierReward:
    """logits → transform → [:, label_index], one float per response."""

    def __init__(self, section: RewardSection, where: str = "reward"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from llmtune.modeling.load import device, torch_dtype

        ref = classifier_location(section.model or "")
        try:
            self.tok = AutoTokenizer.from_pretrained(ref)
            self.model = AutoModelForSequenceClassification.from_pretrained(ref, dtype=torch_dtype("auto"))
        except (OSError, ValueError) as exc:  # ValueError: an invalid hub id
            raise ConfigError(f"{where}.model: cannot load classifier '{section.model}': "
                              f"{str(exc).splitlines()[0]}") from None
        num_labels = self.model.config.num_labels
        # The schema checks this whenever the config is on disk; a hub model is only known once loaded.
        if section.label_index >= num_labels:
            raise ConfigError(f"{where}.label_index: {section.label_index} is out of range; '{section.model}' "
                              f"has {num_labels} labels {self.model.config.id2label}")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.pairs = section.input == "prompt_response"
        if self.pairs:
            self.tok.truncation_side = "left"  # keep the end of the conversation and the response
        self.label_index = section.label_index
        self.transform = TRANSFORMS[section.transform]
        self.batch_size = section.batch_size
        self.max_length = section.max_length
        self.model.to(device()).eval()

    def _encode(self, prompts: list[list[Message]], responses: list[str]) -> dict[str, Any]:
        if self.pairs:
            return self.tok([prompt_text(p) for p in prompts], responses, truncation="longest_first",
                            max_length=self.max_length, padding=True, return_tensors="pt")
        return self.tok(responses, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")

    @torch.no_grad()
    def score(self, prompts: list[list[Message]], responses: list[str], **columns: list[Any]) -> list[float]:
        check_pairs(prompts, responses)
        dev = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            end = start + self.batch_size
            batch = {k: v.to(dev) for k, v in self._encode(prompts[start:end], responses[start:end]).items()}
            logits = self.model(**batch).logits.float()
            out += self.transform(logits)[:, self.label_index].tolist()
        return out
