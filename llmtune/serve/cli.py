"""The `chat`, `serve`, `compare` and `export` commands. Heavy imports stay inside the commands."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

from llmtune.errors import ConfigError


def loopback(host: str) -> bool:
    """Whether HOST only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _settings(args: argparse.Namespace) -> Any:
    from llmtune.serve.engine import Settings

    if args.temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    return Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=getattr(args, "seed", None))


def _generation_flags(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"answer length limit (default {max_new_tokens})")


def cmd_chat(args: argparse.Namespace) -> int:
    from llmtune.serve.chat import interactive, piped
    from llmtune.serve.engine import Engine

    settings = _settings(args)
    engine = Engine.load(args.model)
    if not engine.generates:
        raise ConfigError(f"{args.model}: a reward model cannot chat; serve it and POST /v1/score instead")
    if sys.stdin.isatty():
        interactive(engine, settings, args.system)
    else:
        piped(engine, settings, args.system, args.history)
    engine.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from llmtune.launch.threads import apply, configured, share
    from llmtune.serve.api import Server, run
    from llmtune.serve.engine import Engine

    refs: list[tuple[str | None, str]] = [(None, m) for m in args.models]
    for item in args.name:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise ConfigError(f"--name {item}: expected NAME=MODEL")
        refs.append((name, ref))
    if not refs:
        raise ConfigError("serve: give at least one MODEL (or --name NAME=MODEL)")
    if args.port < 0 or args.port > 65535:
        raise ConfigError(f"--port: {args.port} is not a port number")
    if not args.max_body_mb > 0:
        raise ConfigError(f"--max-body-mb: must be > 0, got {args.max_body_mb}")
    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-queue", args.max_queue)):
        if value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
    if not loopback(args.host) and not args.api_key:
        print(f"llmtune serve: warning: listening on {args.host} without --api-key: anyone who reaches this "
              "port can use the models", file=sys.stderr, flush=True)
    # Every model gets its own share of the threads: models answering at once do not oversubscribe
    # the cores. (Threads started from here on, each model's worker among them, inherit it.)
    apply(share(len(refs), args.threads or configured()))
    engines = []
    for name, ref in refs:
        print(f"llmtune serve: loading {ref}", file=sys.stderr, flush=True)
        engines.append(Engine.load(ref, name=name, max_batch_size=args.max_batch_size, max_queue=args.max_queue))
    server = Server(engines, api_key=args.api_key, default_max_tokens=args.max_tokens,
                    max_body_bytes=int(args.max_body_mb * 2**20))
    run(server, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from llmtune.data.load import load_prompts
    from llmtune.serve.compare import compare

    if args.n < 1:
        raise ConfigError(f"-n: must be >= 1, got {args.n}")
    prompts = load_prompts(args.prompts, args.path, args.split, args.n)
    out = Path(args.out)
    result = compare(args.models, prompts, _settings(args), seed=args.seed, judge=args.judge,
                     lower_is_better=args.lower_is_better, margin=args.tie_margin, out=out,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps({"out": str(out), **result.to_summary()}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmtune.serve.export import export

    print(json.dumps(export(args.run_dir, args.out, merge=args.merge)))
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser("chat", help="chat with a model in the terminal (streaming)",
                       description="Chat with any run dir, registry name, hub id or model path. On a terminal: "
                       "multi-turn with /reset, /system TEXT, /help, /exit. From a pipe: one prompt per line, "
                       "one answer per line (newlines inside answers become spaces); turns are independent "
                       "unless --history.")
    c.add_argument("model")
    _generation_flags(c, temperature=0.7, max_new_tokens=256)
    c.add_argument("--seed", type=int, help="seed every answer (reproducible sampling)")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--history", action="store_true", help="piped input: keep the conversation across lines")
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server for one or more models",
                       description="Serve models at /v1/chat/completions and /v1/completions (streaming too), "
                       "/v1/models, /v1/score (reward models) and /health. Requests arriving together are "
                       "generated together (batched). Clients pick a model by its name: the registry "
                       "name or run directory name, or NAME from --name NAME=MODEL. List the MODELs before the options.")
    s.add_argument("models", nargs="*", metavar="MODEL")
    s.add_argument("--name", action="append", default=[], metavar="NAME=MODEL", help="serve MODEL as NAME")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free port; the address is printed)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of requests without one")
    s.add_argument("--max-body-mb", type=float, default=4.0,
                   help="refuse request bodies larger than this many MiB with 413 (default 4)")
    s.add_argument("--max-batch-size", type=int, default=32,
                   help="most answers generated together in one batch per model (default 32)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="most requests waiting per model; more are answered 429 (default 256)")
    s.add_argument("--threads", type=int,
                   help="CPU threads for generation, split evenly between the models (default: OMP_NUM_THREADS "
                   "if set, else every core); leave some for clients running on the same machine")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("compare", help="answer the same prompts with several models, side by side",
                       description="Writes compare.jsonl, compare.html and summary.md to --out; with --judge "
                       "also mean scores and the win/tie/loss matrix.")
    m.add_argument("--models", nargs="+", required=True, metavar="MODEL", help="models (or NAME=MODEL)")
    m.add_argument("--prompts", required=True, help="data registry name, or a format (canonical, hh, ...) with --path")
    m.add_argument("--path", help="local copy of the prompt data")
    m.add_argument("--split", default="train")
    m.add_argument("-n", type=int, default=20, help="number of prompts (default 20)")
    m.add_argument("--judge", help="reward source: rm run dir, YAML/JSON reward section, rule:module:function, "
                   "or classifier:PATH")
    m.add_argument("--lower-is-better", action="store_true", help="judge scores are costs (e.g. toxicity)")
    m.add_argument("--tie-margin", type=float, default=0.0, help="score differences up to this are ties")
    m.add_argument("--out", default="compare", help="output directory (default ./compare)")
    m.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i (default 0)")
    _generation_flags(m, temperature=0.7, max_new_tokens=128)
    m.set_defaults(func=cmd_compare)

    e = sub.add_parser("export", help="save a run as a standalone model (merged) or a portable adapter")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True)
    e.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base weights")
    e.set_defaults(func=cmd_export)
