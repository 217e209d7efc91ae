"""The web UI in a real browser (Debian's chromium driven by playwright-core, tests/browser/webui.js):
pick the tiny SFT recipe (the quickstart, shown on open, is a real model: minutes on a CPU), launch it
with max_steps lowered in the form, wait for completion with the loss plot
drawn, compare two models side by side, vote, and find the vote in the preference file. A screenshot
of every tab lands in $LLMTUNE_ARTIFACTS (default artifacts/screenshots/).

Needs: `apt-get install -y chromium nodejs npm` and `npm ci --prefix tests/browser`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from conftest import ROOT
from test_webui_api import start_server, stop_runs

BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def artifacts_dir() -> Path:
    return Path(os.environ.get("LLMTUNE_ARTIFACTS") or ROOT / "artifacts") / "screenshots"


def test_browser_launch_watch_compare_and_vote(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is missing: apt-get install -y nodejs npm"
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    assert (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), "run: npm ci --prefix tests/browser"
    shots = artifacts_dir()
    for old in shots.glob("*.png"):
        old.unlink()
    server = start_server(tmp_path / "ws", tmp_path / "server.log", auth=None)
    try:
        proc = subprocess.run([node, str(BROWSER_DIR / "webui.js"), server.url, str(shots), "browser-run"],
                              capture_output=True, text=True, timeout=540, env={**os.environ, "CHROMIUM": CHROMIUM})
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)
        stop_runs(server.workspace)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- server log ---\n{server.log.read_text()[-3000:]}"
    assert "[browser] done" in proc.stdout

    run = server.workspace / "runs" / "browser-run"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["summary"]["global_step"] == 10
    rows = [json.loads(line) for line in (server.workspace / "feedback" / "preferences.jsonl").open()]
    assert len(rows) == 1
    assert rows[0]["models"] == {"chosen": "runs/browser-run", "rejected": "tiny-llama"}
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hello! Can you tell me a story?"}]
    assert rows[0]["chosen"][0]["role"] == rows[0]["rejected"][0]["role"] == "assistant"
    for tab in ("recipes", "runs", "chat", "feedback", "evaluate"):
        png = shots / f"{tab}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
