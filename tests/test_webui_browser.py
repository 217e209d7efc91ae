"""The web UI in a real browser (Debian's chromium driven by playwright-core, tests/browser/*.js):

- webui.js: the recipe form (and issue 18's rough edges: a mistyped name, YAML text kept by form edits,
  a cleared field, ok/error validation), launch, the live curves picking up eval_loss mid-run, two
  models side by side with a vote (no ranking box for two), compare; screenshots `basic-*.png`.
- loop.js: the preference flywheel: a short rejection-sampling run → its rollouts → two labelled pairs →
  "Train on this feedback" → the DPO run → "Compare with its parent" → the win matrix; a screenshot of
  every tab (`recipes.png`, `runs.png`, `rollouts.png`, `chat.png`, `feedback.png`, `evaluate.png`).

Screenshots land in $LLMTUNE_ARTIFACTS/screenshots (default artifacts/screenshots/). The test prepares its
own node packages (`npm ci` of the pinned playwright-core in tests/browser, once; node_modules/ is the
cache). Chromium is a system package: where none is found the test is skipped with a one-line reason,
unless LLMTUNE_REQUIRE_BROWSER=1 (set by .ci/run, which installs it), where that is a failure: CI always
runs this test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
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


def run_script(browser: dict[str, str], script: str, workspace: Path, log: Path, *args: str) -> tuple[str, Path]:
    """Serve WORKSPACE, drive it with tests/browser/SCRIPT, stop everything; (stdout, workspace)."""
    server = start_server(workspace, log, auth=None)
    try:
        proc = subprocess.run([browser["node"], str(BROWSER_DIR / script), server.url, *args],
                              capture_output=True, text=True, timeout=900,
                              env={**os.environ, "CHROMIUM": browser["chromium"]})
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)
        stop_runs(server.workspace)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- server log ---\n{log.read_text()[-3000:]}"
    assert "[browser] done" in proc.stdout
    return proc.stdout, server.workspace


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


SFT_EVAL = (ROOT / "recipes" / "sft-tiny.yaml").read_text().replace(
    "  logging_steps: 5\n", "  logging_steps: 2\n  eval_steps: 150\n").replace(
    "  learning_rate: 3.0e-3\n", "  learning_rate: 3.0e-3   # as typed\n") + "# written by the browser test\n"


def test_browser_launch_watch_compare_and_vote(browser: dict[str, str], tmp_path: Path) -> None:
    """Recipe form → launch → live curves → chat side by side → vote → compare, with the rough edges
    of issue 18 checked on the way (see tests/browser/webui.js)."""
    shots = artifacts_dir()
    for old in shots.glob("basic-*.png"):  # basic-failure.png of an earlier failure included
        old.unlink()
    (tmp_path / "ws" / "recipes").mkdir(parents=True)
    (tmp_path / "ws" / "recipes" / "sft-eval.yaml").write_text(SFT_EVAL)
    _, workspace = run_script(browser, "webui.js", tmp_path / "ws", tmp_path / "server.log", str(shots), "browser-run")

    run = workspace / "runs" / "browser-run"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["summary"]["global_step"] == 160
    launched = yaml.safe_load((run / "launch.yaml").read_text())["training"]
    assert launched["max_steps"] == 160 and "batch_size" not in launched  # cleared in the form: the default, 4
    assert yaml.safe_load((run / "recipe.yaml").read_text())["training"]["batch_size"] == 4
    evals = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "eval_loss" in r]
    assert evals[0] == 150  # eval_loss arrived long after the live plot first drew the loss
    rows = [json.loads(line) for line in (workspace / "feedback" / "preferences.jsonl").open()]
    assert len(rows) == 1
    assert rows[0]["models"] == {"chosen": "runs/browser-run", "rejected": "tiny-llama"}
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hello! Can you tell me a story?"}]
    assert rows[0]["chosen"][0]["role"] == rows[0]["rejected"][0]["role"] == "assistant"
    for tab in ("recipes", "runs", "chat", "evaluate"):
        assert is_png(shots / f"basic-{tab}.png"), tab


def test_browser_preference_flywheel(browser: dict[str, str], tmp_path: Path) -> None:
    """Issue 18's loop on tiny models: RS run → its rollouts → two labelled pairs → "Train on this
    feedback" → the DPO run → "Compare with its parent" → the win matrix; a screenshot of every tab."""
    shots = artifacts_dir()
    tabs = ("recipes", "runs", "rollouts", "chat", "feedback", "evaluate")
    for name in (*tabs, "failure"):
        (shots / f"{name}.png").unlink(missing_ok=True)
    rs_tiny = (ROOT / "recipes" / "rs-quickstart.yaml").read_text().replace("iterations: 3", "iterations: 2").replace(
        "num_samples: 32", "num_samples: 6").replace("epochs: 3", "epochs: 1")
    (tmp_path / "ws" / "recipes").mkdir(parents=True)
    (tmp_path / "ws" / "recipes" / "rs-tiny.yaml").write_text(rs_tiny)
    _, workspace = run_script(browser, "loop.js", tmp_path / "ws", tmp_path / "server.log", str(shots))

    labels = [json.loads(line) for line in (workspace / "feedback" / "preferences.jsonl").open()]
    assert [r["source"] for r in labels] == ["webui:rollouts"] * 2
    assert labels[0]["samples"] == {"chosen": "r1-p0-c0", "rejected": "r1-p0-c1"}
    snapshot = json.loads(next((workspace / "feedback" / "snapshots").glob("*.json")).read_text())
    dpo = next(p for p in (workspace / "runs").iterdir() if p.name.startswith("dpo-rs-run-"))
    info = json.loads((dpo / "run.json").read_text())
    assert info["status"] == "completed" and info["stage"] == "dpo"
    assert [(d["sha256"], d["rows"]) for d in info["data"]] == [(snapshot["sha256"], 2)]
    compare = [json.loads(line) for line in next((workspace / "evaluations").glob("*/compare.jsonl")).open()]
    assert len(compare) == 3 and set(compare[0]["scores"]) == {f"runs/{dpo.name}", "runs/rs-run"}
    assert list((workspace / "feedback" / "export").glob("preferences-trl-*.jsonl"))
    for tab in tabs:
        assert is_png(shots / f"{tab}.png"), tab
