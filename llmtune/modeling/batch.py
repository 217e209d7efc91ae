"""Token-id lists as one padded tensor: the padding helper every batch goes through (collators,
generation prompts, reward scoring), on torch's own `pad_sequence`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn.utils.rnn import pad_sequence


def pad_ids(seqs: Sequence[Sequence[int] | torch.Tensor], value: float,
            side: Literal["left", "right"] = "right") -> torch.Tensor:
    """(len(seqs), longest) tensor; lists become int64, tensors keep their dtype."""
    rows = [s if isinstance(s, torch.Tensor) else torch.tensor(list(s), dtype=torch.long) for s in seqs]
    return pad_sequence(rows, batch_first=True, padding_value=value, padding_side=side)


def pad_batch(seqs: Sequence[Sequence[int]], pad_token_id: int,
              side: Literal["left", "right"] = "right") -> dict[str, torch.Tensor]:
    """input_ids padded with the pad token, and the attention_mask marking the real tokens."""
    return {"input_ids": pad_ids(seqs, pad_token_id, side), "attention_mask": pad_ids([[1] * len(s) for s in seqs], 0, side)}
