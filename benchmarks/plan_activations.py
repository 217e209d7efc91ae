"""`llmtune plan`'s activation estimate against the measured peak on the tiny models.

    python benchmarks/plan_activations.py        # one JSON line per case, then the largest error

Each case is stage sft, full fine-tuning, fp32 on the CPU (what `plan` assumes without a GPU): one
forward and backward pass over a batch of max_length tokens (encoder and decoder both max_length
for T5). Measured: the peak of memory allocated during the pass (torch's profiler reports the CPU
allocator's running total with every allocation) minus the parameters' gradients, which `plan`
counts on their own line. Estimated: `plan`'s `activations` line for the same recipe.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from llmtune.config.load import recipe_from_dict
from llmtune.launch.plan import memory_estimate, model_config, model_shape
from llmtune.modeling.load import load_for_training

CASES = [(model, batch, length) for model in ("tiny-llama", "tiny-gptj", "tiny-t5")
         for batch, length in ((8, 128), (4, 256), (2, 512))]


def peak_bytes(model: Any, batch: dict[str, torch.Tensor]) -> int:
    """Peak allocated bytes above the level before one training forward + backward."""
    model.train()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**batch).loss.backward()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        fields = event.extra_fields
        if hasattr(fields, "total_allocated"):
            allocations.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
    allocations.sort()
    before = allocations[0][1] - allocations[0][2]
    return max(total for _, total, _ in allocations) - before


def measure(name: str, batch: int, length: int) -> dict[str, Any]:
    recipe = recipe_from_dict({"stage": "sft", "model": {"name": name, "finetuning": "full"},
                               "data": {"name": "demo", "max_length": length},
                               "training": {"batch_size": batch}})
    model, _, spec = load_for_training(recipe)
    torch.manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size - 1, (batch, length))
    grads = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    measured = peak_bytes(model, {"input_ids": ids, "labels": ids}) - grads
    estimate = memory_estimate(recipe, model_shape(model_config(spec)[0], recipe, spec), spec, on_gpu=False)
    estimated = estimate["bytes"]["activations"]
    return {"model": name, "batch": batch, "max_length": length, "measured_bytes": measured,
            "estimated_bytes": estimated, "error": round((estimated - measured) / measured, 4)}


def main() -> None:
    rows = [measure(*case) for case in CASES]
    for row in rows:
        print(json.dumps(row))
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"largest error: {worst['error']:+.1%} ({worst['model']}, batch {worst['batch']}, "
          f"max_length {worst['max_length']})", file=sys.stderr)


if __name__ == "__main__":
    main()
