"""`llmtune plan RECIPE [KEY=VALUE ...]`: what a run will do and cost, before any model loads.

Registered through `llmtune.cli.COMMAND_MODULES`. The recipe is validated before torch is imported
(`plan` counts parameters on the meta device, which needs torch but no weights).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_plan(args: argparse.Namespace) -> int:
    from llmtune.config.load import load_dict
    from llmtune.config.pipeline import is_pipeline, load_pipeline
    from llmtune.config.schema import check, parse
    from llmtune.launch.plan import make_plan, plan_pipeline, render, render_pipeline

    if is_pipeline(args.recipe):
        result = plan_pipeline(load_pipeline(args.recipe, args.overrides), gpu_memory_gb=args.gpu_memory)
        print(json.dumps(result, indent=2) if args.json else render_pipeline(result))
        return 0
    # No device checks: a ZeRO-3 or QLoRA run can be planned from a machine without its GPUs.
    recipe = check(parse(load_dict(args.recipe, args.overrides), args.recipe), args.recipe, device_checks=False)
    result = make_plan(recipe, gpu_memory_gb=args.gpu_memory)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="estimate steps, tokens and GPU memory of a recipe (loads no model)",
        description="Print what `llmtune train` would do with this recipe: stage, datasets and row counts, "
                    "token budget, optimizer steps and an estimate of GPU memory per device for the chosen "
                    "fine-tuning method, precision and ZeRO stage. KEY=VALUE pairs override recipe keys.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="plan for GPUs with this much memory (default: what nvidia-smi reports, if any)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)
