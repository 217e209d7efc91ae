"""`llmtune webui`: serve the web UI on a workspace directory (registered in llmtune/cli.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from llmtune.config.checks.device import missing_package
from llmtune.errors import ConfigError
from llmtune.launch import threads
from llmtune.serve.cli import loopback

DEFAULT_WORKSPACE = "./llmtune-workspace"


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`user:password` → (user, password); the password may itself contain ':'."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth: expected USER:PASSWORD")
    return user, password


def cmd_webui(args: argparse.Namespace) -> int:
    for package in ("gradio", "ruamel.yaml"):
        if missing := missing_package(package):
            raise ConfigError(f"llmtune webui needs {package}; {missing}")
    auth = parse_auth(args.auth)
    root = Path(args.workspace).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    # No telemetry (read by gradio at import), and gradio's own files (uploads, cached outputs) in the
    # workspace rather than the system temp directory.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(root / ".gradio"))
    # The UI's own models (chat, compare) get a share of the cores that the runs it launches do not
    # use (llmtune/launch/threads.py); set before torch is imported, which reads it.
    for key, value in threads.env(threads.webui_split()[0]).items():
        os.environ.setdefault(key, value)
    from webui.app import launch

    print(f"llmtune webui: workspace {root}", flush=True)
    if not loopback(args.host) and auth is None:
        print(f"llmtune webui: warning: listening on {args.host} without --auth: anyone who reaches this port "
              "can train, chat with and read models in the workspace", file=sys.stderr, flush=True)
    launch(root, host=args.host, port=args.port, share=args.share, auth=auth, rule_modules=tuple(args.rule_module))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("webui", help="serve the web UI (recipes, runs, chat & compare, feedback, evaluate)",
                              description="Serve the Gradio web UI. It only binds to 127.0.0.1 unless told "
                              "otherwise, and recipes, models and files named in it stay inside the workspace "
                              "(see README: Security).")
    p.add_argument("--workspace", default=DEFAULT_WORKSPACE,
                   help=f"directory for saved recipes, runs and feedback (default {DEFAULT_WORKSPACE})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login")
    p.add_argument("--rule-module", action="append", default=[], metavar="MODULE",
                   help="also allow rule rewards (reward.function, rule: judges) from this importable module; "
                   "by default only llmtune.rewards.rules")
    p.set_defaults(func=cmd_webui)
