"""The `llmtune eval` command group. Each evaluation is one subcommand: an `add_*` function that
declares its arguments and handler, listed in SUBCOMMANDS. Nothing heavy is imported until a
command runs, so `llmtune --help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any


def cmd_reward_accuracy(args: argparse.Namespace) -> int:
    from llmtune.errors import ConfigError
    from llmtune.eval.reward_accuracy import default_split, preference_rows, reward_accuracy
    from llmtune.registry.models import resolve_model

    if not args.data and not args.path:
        raise ConfigError("--data: give a dataset name (see `llmtune datasets`) or a local --path")
    try:
        resolve_model(args.model)  # a bad --model fails before any data is read
    except ConfigError as exc:
        raise ConfigError(f"--model: {exc}") from None
    # Libraries may print while loading; stdout carries only the result JSON.
    with contextlib.redirect_stdout(sys.stderr):
        split = args.split or default_split(args.data, args.path, args.registry)
        rows = preference_rows(args.data, args.path, split, args.n or None, args.subset, args.registry,
                               args.eval_fraction, args.seed)
        result = reward_accuracy(args.model, rows, batch_size=args.batch_size, max_length=args.max_length)
    print(json.dumps({"model": args.model, "data": args.data or args.path, "split": split, **result}))
    return 0


def add_reward_accuracy(sub: Any) -> None:
    p = sub.add_parser("reward-accuracy", help="pairwise accuracy of a reward model on preference data",
                       description="Score chosen and rejected responses with a reward model (an rm run "
                       "directory or model path) and print one JSON object: accuracy, n, mean_margin and "
                       "accuracy by source.")
    p.add_argument("--model", required=True, help="rm run directory, its model/ directory, or a model path")
    p.add_argument("--data", help="data registry name (`llmtune datasets`), or a raw format with --path")
    p.add_argument("--path", help="local copy of the dataset (file or directory)")
    p.add_argument("--split", help="split to evaluate (default: test where the data has one, train for a "
                   "single local file)")
    p.add_argument("--subset", help="dataset subset (e.g. harmless-base for hh)")
    p.add_argument("-n", type=int, default=0, help="use only the first N pairs (0: all)")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="score only the pairs a recipe with this "
                   "data.eval_fraction holds out (with --seed = its training.seed): a run's own eval set")
    p.add_argument("--seed", type=int, default=42, help="training.seed of the recipe, with --eval-fraction")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, help="max tokens per input (default: the length the model "
                   "was trained with)")
    p.add_argument("--registry", action="append", default=[], help="extra data registry JSON file")
    p.set_defaults(func=cmd_reward_accuracy)


def cmd_policy(args: argparse.Namespace) -> int:
    from llmtune.config.schema import GenerationSection
    from llmtune.data.load import load_prompts
    from llmtune.errors import ConfigError
    from llmtune.eval.policy import compare, reward_section
    from llmtune.rewards import build_reward

    if args.n < 1:
        raise ConfigError("-n: must be at least 1")
    gen = GenerationSection(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            do_sample=not args.greedy)
    with contextlib.redirect_stdout(sys.stderr):
        section = reward_section(args.reward)
        reward = build_reward(section, "--reward")
        prompts = load_prompts(args.prompts, args.path, args.split, args.n, args.registry)
        result = compare(args.model, args.baseline, prompts, reward, gen, seed=args.seed,
                         batch_size=args.batch_size)
    print(json.dumps({"prompts": args.prompts or args.path, "split": args.split, "reward": args.reward, **result}))
    return 0


def add_policy(sub: Any) -> None:
    p = sub.add_parser(
        "policy", help="compare a tuned policy with a baseline: mean reward, win/tie/loss, KL",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate for held-out prompts with the model and the baseline (same seed and sampling "
        "settings), score both with a reward source and print one JSON object: reward_model_mean, "
        "reward_baseline_mean, wins/ties/losses of the model, and kl_model_baseline (mean over the model's "
        "samples of sum log p_model - log p_baseline).\n\n"
        "--reward SOURCE is one of:\n"
        "  rule:package.module:function   a rule reward, e.g. rule:llmtune.rewards.rules:target_length\n"
        "  FILE.yaml | FILE.json          a reward section (top-level `reward:` or the section itself)\n"
        "  RUN_DIR | MODEL_DIR            a reward model: an rm run directory or classifier model path")
    p.add_argument("--model", required=True, help="the tuned policy: run directory, registry name or path")
    p.add_argument("--baseline", required=True, help="the policy to compare with (e.g. the SFT run)")
    p.add_argument("--prompts", help="data registry name (`llmtune datasets`), or a raw format with --path")
    p.add_argument("--path", help="local copy of the prompt dataset (file or directory)")
    p.add_argument("--split", default="test", help="split to take prompts from (default: test)")
    p.add_argument("-n", type=int, default=64, help="number of prompts (default: 64)")
    p.add_argument("--reward", required=True, metavar="SOURCE", help="reward source (see above)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for both models)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--registry", action="append", default=[], help="extra data registry JSON file")
    p.set_defaults(func=cmd_policy)


SUBCOMMANDS: list[Callable[[Any], None]] = [add_reward_accuracy, add_policy]


def register(subparsers: Any) -> None:
    """Add `llmtune eval <subcommand>` to the main parser."""
    p = subparsers.add_parser("eval", help="evaluate models (reward accuracy, ...)")
    sub = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
