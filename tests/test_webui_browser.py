"""The web UI in a real browser (Debian's chromium driven by playwright-core, tests/browser/webui.js):
pick the tiny SFT recipe (the quickstart, shown on open, is a real model: minutes on a CPU), launch it
with max_steps lowered in the form, wait for completion with the loss plot
drawn, compare two models side by side, vote, and find the vote in the preference file. A screenshot
of every tab lands in $LLMTUNE_ARTIFACTS (default artifacts/screenshots/).

The test prepares its own node packages (`npm ci` of the pinned playwright-core in tests/browser, once;
node_modules/ is the cache). Chromium is a system package: where none is found the test is skipped
with a one-line reason, unless LLMTUNE_REQUIRE_BROWSER=1 (set by .ci/run, which installs it), where
that is a failure: CI always runs this test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from test_webui_api import start_server, stop_runs

pytestmark = pytest.mark.slow  # real servers and end-to-end runs: the full suite, not `-m "not slow"`

BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian/Ubuntu) or set CHROMIUM=/path/to/chrome"


def _unavailable(reason: str) -> None:
    """Skip on a developer's machine that lacks a system dependency; fail where CI demands the test."""
    if os.environ.get("LLMTUNE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser test required (LLMTUNE_REQUIRE_BROWSER=1) but {reason}", pytrace=False)
    pytest.skip(reason)


def find_chromium() -> str | None:
    """$CHROMIUM when set, else the first Chromium/Chrome on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"] if Path(os.environ["CHROMIUM"]).is_file() else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser() -> dict[str, str]:
    """node, a Chromium binary, and tests/browser/node_modules (installed here on first use)."""
    chromium = find_chromium()
    if chromium is None:
        _unavailable(f"no Chromium found for the web UI browser test: {INSTALL_HINT}")
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _unavailable("node/npm not found for the web UI browser test: install Node.js 20+ (apt-get install -y nodejs npm)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        proc = subprocess.run([npm, "ci", "--prefix", str(BROWSER_DIR), "--no-audit", "--no-fund"],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            _unavailable(f"`npm ci --prefix tests/browser` failed (is the npm registry reachable?): {last}")
    return {"node": node, "chromium": chromium}


def artifacts_dir() -> Path:
    return Path(os.environ.get("LLMTUNE_ARTIFACTS") or ROOT / "artifacts") / "screenshots"


def test_browser_launch_watch_compare_and_vote(browser: dict[str, str], tmp_path: Path) -> None:
    shots = artifacts_dir()
    for old in shots.glob("*.png"):
        old.unlink()
    server = start_server(tmp_path / "ws", tmp_path / "server.log", auth=None)
    try:
        proc = subprocess.run([browser["node"], str(BROWSER_DIR / "webui.js"), server.url, str(shots), "browser-run"],
                              capture_output=True, text=True, timeout=540,
                              env={**os.environ, "CHROMIUM": browser["chromium"]})
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
