"""The `llmtune` command. Start-up stays light: torch and friends are imported only inside the
commands that train or load models, so `--help`, `validate` and the listings answer instantly.

Command groups owned by other packages (serve, eval, webui, launch) register themselves through a
`register(subparsers)` function in the modules listed in COMMAND_MODULES; those modules must not
import torch at module level either.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from llmtune import __version__
from llmtune.errors import LLMTuneError

COMMAND_MODULES: list[str] = []


def cmd_train(args: argparse.Namespace) -> int:
    from llmtune.config.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from llmtune.train import resolve_run_dir, train

    run_dir = resolve_run_dir(recipe, args.output_dir, args.resume)
    summary = train(recipe, run_dir, resume=args.resume)
    print(json.dumps(summary, default=str))
    return 0 if summary["status"] == "completed" else 130


def cmd_validate(args: argparse.Namespace) -> int:
    from llmtune.config.load import load_recipe

    failed = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path, args.overrides)
        except LLMTuneError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(f"ok: {path} (stage {recipe.stage}, model {recipe.model.name})")
    return 2 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from llmtune.registry.models import registry_models

    models = registry_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(f"{'name':18} {'kind':8} {'template':8} {'hub id':34} description")
    for name, m in models.items():
        hub = m.get("hub_id") or ("(built offline)" if m.get("tiny") else "")
        print(f"{name:18} {m['kind']:8} {m['template']:8} {hub:34} {m.get('description', '')}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from llmtune.data.registry import list_entries

    entries = list_entries(args.registry)
    if args.json:
        print(json.dumps({k: vars(v) for k, v in entries.items()}, indent=2, default=str))
        return 0
    print(f"{'name':10} {'format':10} {'source':38} {'shapes':26} description")
    for name, e in entries.items():
        source = e.hub_id or e.path or ""
        print(f"{name:10} {e.format:10} {source:38} {','.join(e.shapes):26} {e.description}")
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    import logging

    from llmtune.data.load import preview

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    rows = preview(args.name, args.path, args.n, shape=args.shape, split=args.split,
                   extra_registries=args.registry)
    out = sys.stdout
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from llmtune.config.reference import markdown

    print(markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmtune", description="Config-driven fine-tuning and alignment of language "
                                "models: sft, rm, dpo, rs (best-of-n) and ppo from one YAML recipe.")
    p.add_argument("--version", action="version", version=f"llmtune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="run a recipe", description="Run a recipe. KEY=VALUE pairs override "
                       "recipe keys, e.g. training.learning_rate=1e-5 model.name=tiny-t5.")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.add_argument("--output-dir", help="run directory (default: recipe output_dir or runs/<stage>-<model>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in the output directory from its "
                   "last checkpoint")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("validate", help="check recipes without loading any model")
    v.add_argument("recipes", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("models", help="list the model registry")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("datasets", help="list the data registry")
    d.add_argument("--json", action="store_true")
    d.add_argument("--registry", action="append", default=[], help="extra registry JSON file")
    d.set_defaults(func=cmd_datasets)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    pv = dsub.add_parser("preview", help="print canonical rows as JSON lines on stdout")
    pv.add_argument("name", help="data registry name (or 'canonical' / 'columns' with --path)")
    pv.add_argument("--path", help="local copy of the dataset")
    pv.add_argument("-n", type=int, default=5, help="rows to print (0: all)")
    pv.add_argument("--shape", choices=["sft", "preference", "prompt"])
    pv.add_argument("--split", default="train")
    pv.add_argument("--registry", action="append", default=[], help="extra registry JSON file")
    pv.set_defaults(func=cmd_data_preview)

    r = sub.add_parser("reference", help="print the reference of every recipe key (Markdown)")
    r.set_defaults(func=cmd_reference)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> Any:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LLMTuneError as exc:
        print(f"llmtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("llmtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
