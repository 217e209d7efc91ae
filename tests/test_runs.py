"""A run is never lost or corrupted (issue 14): one writer per run directory, foreign directories left
alone, interrupts that survive a dead `| tee`, honest resumes, clear errors for bad files. Every test
drives real `llmtune` processes on the tiny SFT recipe."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow  # real `llmtune train` processes, signals and locks: the full suite

RECIPE = str(ROOT / "recipes" / "sft-tiny.yaml")
FAST = ["data.max_length=64", "data.num_samples=120"]


def popen(*args: str, **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmtune.cli", "train", RECIPE, *args], cwd=ROOT,
                            text=True, **kw)  # type: ignore[call-overload]


def rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def loss_steps(run: Path) -> list[int]:
    return [r["step"] for r in rows(run) if "loss" in r]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for_rows(run: Path, proc: subprocess.Popen, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, f"exited early ({proc.returncode})"
        time.sleep(0.1)
    raise AssertionError(f"no {n} logged steps in {timeout}s")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("llmtune: error:")]


# -- 1. one writer per run directory ---------------------------------------------------------------
def test_two_trainers_started_together_exactly_one_runs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*FAST, "training.max_steps=150", "training.logging_steps=5", "training.save_steps=50",
            "--output-dir", str(run)]
    procs = [popen(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    refusal = error_lines(outs[loser][1])
    assert len(refusal) == 1 and "in use by another llmtune run" in refusal[0], outs[loser][1]
    assert f"pid {procs[winner].pid} " in refusal[0]  # the holder is named
    assert "Traceback" not in outs[loser][1]
    # The directory holds one run: one increasing curve, one start in the log, the winner's summary.
    assert loss_steps(run) == [1, *range(5, 151, 5)]
    assert (run / "train.log").read_text().count("run directory:") == 1
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed"] == 0
    assert not (run / ".llmtune.lock").exists()  # released (and removed) by the winner


HOLD = textwrap.dedent("""
    import sys, time
    from llmtune.runs.lock import RunLock
    with RunLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def hold_lock(run: Path) -> subprocess.Popen:
    """Another real process holding the run's lock (as a running `llmtune train` does)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One finished tiny run, shared by the tests that only read it (or copy it)."""
    run = tmp_path_factory.mktemp("completed") / "run"
    proc = run_cli("train", RECIPE, *FAST, "training.max_steps=6", "training.logging_steps=2",
                   "training.save_steps=4", "--output-dir", str(run), check=True)
    return run, proc


def test_second_writer_is_refused_naming_the_holder_and_changes_nothing(
        completed: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(completed[0], run)
    holder = hold_lock(run)
    try:
        before = snapshot(run)
        for extra in ([], ["--resume"], ["training.max_steps=8", "--resume"]):
            proc = run_cli("train", RECIPE, *FAST, "training.max_steps=6", "training.logging_steps=2",
                           "training.save_steps=4", *extra, "--output-dir", str(run))
            assert proc.returncode == 2, proc.stderr
            assert len(error_lines(proc.stderr)) == 1 and f"pid {holder.pid} " in proc.stderr
            assert snapshot(run) == before  # byte-identical, lock file included
    finally:
        holder.kill()
        holder.wait()


def test_web_ui_refuses_to_launch_or_resume_a_held_run(tmp_path: Path) -> None:
    from llmtune.config.load import dump, load_recipe
    from llmtune.errors import ConfigError
    from llmtune.runs.lock import holder as lock_holder
    from llmtune.runs.rundir import STATUS_INTERRUPTED, RunDir
    from webui.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    run = RunDir(ws.runs_dir / "busy")
    run.start(dump(load_recipe(RECIPE, [])), 42, "sft", False)
    run.finish(STATUS_INTERRUPTED)  # what the UI would offer to resume
    held = hold_lock(run.path)
    try:
        assert lock_holder(run.path)["pid"] == held.pid
        with pytest.raises(ConfigError, match=f"in use by another llmtune process \\(pid {held.pid} "):
            ws.resume("busy")
        with pytest.raises(ConfigError, match=f"pid {held.pid} "):
            ws.launch("busy", Path(RECIPE).read_text())
        assert not (run.path / "launcher.json").exists() and not (run.path / "console.log").exists()
    finally:
        held.kill()
        held.wait()
    assert lock_holder(run.path) is None  # the kernel dropped the dead holder's lock


# -- 2. a directory that is not a run ---------------------------------------------------------------
def test_a_directory_that_is_not_a_run_is_refused_untouched_unless_forced(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "model").mkdir(parents=True)
    (d / "metrics.jsonl").write_text("x\n")
    (d / "model" / "model.safetensors").write_text("y\n")
    before = snapshot(d)
    args = [*FAST, "training.max_steps=2", "--output-dir", str(d)]
    for extra in ([], ["--resume"]):
        proc = run_cli("train", RECIPE, *args, *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(error_lines(proc.stderr)) == 1
        assert snapshot(d) == before and sorted(p.name for p in d.iterdir()) == ["metrics.jsonl", "model"]
    assert "not an llmtune run" in run_cli("train", RECIPE, *args).stderr

    run_cli("train", RECIPE, *args, "--force", check=True)
    assert loss_steps(d) == [1, 2]
    aside = [p for p in d.glob("metrics.*.jsonl")]
    assert len(aside) == 1 and aside[0].read_text() == "x\n"  # the old file is kept, not deleted


# -- 3 + 7. Ctrl-C with a dead stdout pipe; SIGTERM exits 143 --------------------------------------
def test_sigint_after_the_stdout_pipe_died_still_saves_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*FAST, "training.max_steps=2000", "training.logging_steps=1", "training.save_steps=100000"]
    proc = popen(*args, "--output-dir", str(run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # `llmtune train ... 2>&1 | tee log`
        seen.append(line)
        if line.startswith("step 5/"):
            break
    assert seen and seen[-1].startswith("step 5/"), "".join(seen)
    proc.stdout.close()  # tee dies with the Ctrl-C ...
    proc.send_signal(signal.SIGINT)  # ... and the trainer gets it too
    assert proc.wait(timeout=300) == 130
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["signal"] == "SIGINT", info
    saved = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").exists()
    stopped = int(saved[0].name.split("-")[1])
    assert 5 <= stopped < 2000

    resumed = run_cli("train", RECIPE, *args[:-3], f"training.max_steps={stopped + 3}", "training.logging_steps=1",
                      "training.save_steps=100000", "--output-dir", str(run), "--resume", check=True)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["global_step"] == stopped + 3
    assert "resuming from" in resumed.stderr and f"checkpoint-{stopped}" in resumed.stderr
    assert loss_steps(run) == list(range(1, stopped + 4))


def test_sigterm_exits_143_and_resume_summarises_the_whole_run(tmp_path: Path) -> None:
    """train_loss over every step and num_tokens counted from step 1, as if never interrupted."""
    args = [*FAST, "training.max_steps=120", "training.logging_steps=1", "training.save_steps=100000"]
    straight = tmp_path / "straight"
    ref = json.loads(run_cli("train", RECIPE, *args, "--output-dir", str(straight), check=True)
                     .stdout.strip().splitlines()[-1])
    per_step = [r["loss"] for r in rows(straight) if "loss" in r]
    assert len(per_step) == 120 and ref["train_loss"] == pytest.approx(sum(per_step) / 120, rel=1e-6)

    run = tmp_path / "run"
    proc = popen(*args, "--output-dir", str(run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_rows(run, proc, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["signal"] == "SIGTERM"
    stopped = info["summary"]["global_step"]
    assert stopped < 120

    out = json.loads(run_cli("train", RECIPE, *args, "--output-dir", str(run), "--resume", check=True)
                     .stdout.strip().splitlines()[-1])
    assert out["global_step"] == 120
    assert out["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
    assert out["num_tokens"] == ref["num_tokens"]
    tokens = [r["num_tokens"] for r in rows(run) if "num_tokens" in r and "loss" in r]
    assert tokens == [r["num_tokens"] for r in rows(straight) if "num_tokens" in r and "loss" in r]


# -- 4. --resume on a completed run ------------------------------------------------------------------
def test_resume_of_a_completed_run_rewrites_nothing(completed: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, _ = completed
    before = snapshot(run)
    proc = run_cli("train", RECIPE, *FAST, "training.max_steps=6", "training.logging_steps=2",
                   "training.save_steps=4", "--output-dir", str(run), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "already completed" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["train_loss"] == json.loads((run / "run.json").read_text())["summary"]["train_loss"]
    assert snapshot(run) == before  # run.json, metrics.jsonl, train.log, the model: byte-identical


# -- 5. resume with no checkpoint --------------------------------------------------------------------
def test_sigkill_before_the_first_checkpoint_then_resume_gives_one_curve(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*FAST, "training.max_steps=2000", "training.logging_steps=1", "training.save_steps=100000"]
    proc = popen(*args, "--output-dir", str(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_rows(run, proc, 4)
    proc.kill()
    proc.wait()
    killed = loss_steps(run)
    assert len(killed) >= 4 and not list((run / "checkpoints").glob("checkpoint-*"))
    assert (run / ".llmtune.lock").exists()  # left behind by the dead holder: stale, and not in the way

    resumed = run_cli("train", RECIPE, *args[:-3], "training.max_steps=6", "training.logging_steps=1",
                      "training.save_steps=100000", "--output-dir", str(run), "--resume", check=True)
    assert "starting again from step 0" in resumed.stderr
    assert loss_steps(run) == [1, 2, 3, 4, 5, 6]
    aside = list(run.glob("metrics.*.jsonl"))
    assert len(aside) == 1 and [r["step"] for r in rows(run, aside[0].name) if "loss" in r] == killed
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed"] == 1


# -- 6. files that cannot be read --------------------------------------------------------------------
def bad_files(root: Path) -> dict[str, Path]:
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    files = {
        "binary": root / "model.jsonl",
        "not gzip": root / "data.jsonl.gz",
        "bad parquet": root / "data.parquet",
        "binary json": root / "data.json",
        "unreadable": root / "unreadable.jsonl",
        "binary after good rows": root / "late.jsonl",
    }
    blob = bytes(range(256)) * 64
    files["binary"].write_bytes(blob)
    files["not gzip"].write_text(good)
    files["bad parquet"].write_bytes(b"PAR1" + blob)
    files["binary json"].write_bytes(blob)
    files["unreadable"].symlink_to("/proc/self/mem")  # opens, then every read fails (EIO), even for root
    files["binary after good rows"].write_bytes(good.encode() * 400 + blob)
    return files


@pytest.mark.parametrize("kind", ["binary", "not gzip", "bad parquet", "binary json", "unreadable",
                                  "binary after good rows"])
def test_a_file_that_cannot_be_read_is_one_line_and_exit_2(tmp_path: Path, kind: str) -> None:
    path = bad_files(tmp_path)[kind]
    proc = run_cli("data", "preview", "canonical", "--path", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and str(path) in errors[0], proc.stderr
    if kind == "binary after good rows":
        assert "not UTF-8 text after line " in errors[0]  # the rows read before it are named


@pytest.mark.parametrize("kind", ["binary", "not gzip"])
def test_training_on_a_bad_file_fails_cleanly(tmp_path: Path, kind: str) -> None:
    path = bad_files(tmp_path)[kind]
    run = tmp_path / "run"
    proc = run_cli("train", RECIPE, f"data.path={path}", "training.max_steps=2", "--output-dir", str(run))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and str(path) in errors[0]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and str(path) in info["error"]


def test_unusable_output_dirs_are_one_line_and_exit_2(tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("keep me\n")
    cases = {
        str(a_file): "exists and is not a directory",
        str(a_file / "run"): "cannot write to",  # ENOTDIR
        "/sys/llmtune-test-run": "cannot write to",  # sysfs refuses even root (EPERM; EROFS/EACCES alike)
    }
    for out, message in cases.items():
        proc = run_cli("train", RECIPE, "training.max_steps=2", "--output-dir", out)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errors = error_lines(proc.stderr)
        assert len(errors) == 1 and message in errors[0] and out.split("/run")[0] in errors[0], proc.stderr
    assert a_file.read_text() == "keep me\n"


def test_a_model_path_typo_is_a_clean_error_not_a_hub_lookup(tmp_path: Path) -> None:
    (tmp_path / "runs" / "sft-good").mkdir(parents=True)
    for name in ("runs/typo", "runs/sft-god"):
        proc = run_cli("validate", RECIPE, f"model.name={name}", cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"no such model directory: {name}" in proc.stderr
    assert "did you mean 'sft-good'" in proc.stderr


# -- 7. smaller things -------------------------------------------------------------------------------
def test_saved_files_are_readable_like_the_rest_and_the_console_is_clean(
        completed: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, proc = completed
    mask = os.umask(0o022)
    os.umask(mask)
    weights = [run / "model" / "model.safetensors", *(run / "checkpoints").glob("checkpoint-*/model.safetensors")]
    assert len(weights) == 3  # the model, checkpoint-4, checkpoint-6
    for path in weights:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    assert not (run / "checkpoints" / "README.md").exists()  # no model card of a hub model "None"
    assert "FutureWarning" not in proc.stderr and "gradient_checkpointing" not in proc.stderr
    assert "it/s]" not in proc.stderr and "examples/s]" not in proc.stderr  # no library progress bars
    info = json.loads((run / "run.json").read_text())
    import hashlib

    assert info["recipe_sha256"] == hashlib.sha256((run / "recipe.yaml").read_bytes()).hexdigest()
    assert {"python", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "llmtune"} <= \
        info["versions"].keys()
    assert "signal" in info and info["signal"] is None


def test_data_preview_of_raw_formats_with_path(tmp_path: Path) -> None:
    canonical = tmp_path / "rows.jsonl.gz"
    with gzip.open(canonical, "wt") as fh:
        fh.write('{"prompt": [{"role": "user", "content": "hi"}]}\n')
    proc = run_cli("data", "preview", "canonical", "--path", str(canonical), check=True)
    assert json.loads(proc.stdout) == {"prompt": [{"role": "user", "content": "hi"}]}

    table = tmp_path / "qa.csv"
    table.write_text("question,answer\nWhat is 2+2?,4\n")
    proc = run_cli("data", "preview", "columns", "--path", str(table), "--column", "prompt=question",
                   "--column", "response=answer", check=True)
    assert json.loads(proc.stdout)["messages"][1] == {"role": "assistant", "content": "4"}
    missing = run_cli("data", "preview", "columns", "--path", str(table))
    assert missing.returncode == 2 and "--column ROLE=COLUMN" in missing.stderr
