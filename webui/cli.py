"""`llmtune webui`: serve the web UI on a workspace directory (registered in llmtune/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llmtune.config.checks.device import missing_package
from llmtune.errors import ConfigError

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
    if missing := missing_package("gradio"):
        raise ConfigError(f"llmtune webui needs gradio; {missing}")
    auth = parse_auth(args.auth)
    root = Path(args.workspace).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    from webui.app import launch

    print(f"llmtune webui: workspace {root}", flush=True)
    launch(root, host=args.host, port=args.port, share=args.share, auth=auth)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("webui", help="serve the web UI (recipes, runs, chat & compare, feedback, evaluate)",
                              description="Serve the Gradio web UI. It only binds to 127.0.0.1 unless told "
                              "otherwise, and only reads and writes files inside the workspace.")
    p.add_argument("--workspace", default=DEFAULT_WORKSPACE,
                   help=f"directory for saved recipes, runs and feedback (default {DEFAULT_WORKSPACE})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login")
    p.set_defaults(func=cmd_webui)
