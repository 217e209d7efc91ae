"""The web UI's API endpoints through gradio_client, against a real `llmtune webui` server on 127.0.0.1:
recipes (validation messages identical to `llmtune validate`), detached runs (progress, curves,
stop/resume, surviving the UI), side-by-side chat with votes into the feedback dataset, a reward
model trained on that feedback, compare and reward accuracy, and path confinement."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, run_cli

from webui.workspace import Workspace, pid_alive

pytestmark = pytest.mark.slow  # real servers and end-to-end runs: the full suite, not `-m "not slow"`

AUTH = ("tester", "s3cret:pass")


@dataclass
class Server:
    url: str
    workspace: Path
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workspace: Path, log: Path, auth: tuple[str, str] | None = AUTH, cwd: Path = ROOT,
                 env: dict[str, str] | None = None) -> Server:
    """`llmtune webui` as a real subprocess (in CWD, with ENV added); returns once it answers HTTP."""
    import urllib.request

    port = free_port()
    args = [sys.executable, "-m", "llmtune.cli", "webui", "--workspace", str(workspace), "--port", str(port)]
    if auth:
        args += ["--auth", ":".join(auth)]
    fh = log.open("w")
    proc = subprocess.Popen(args, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"webui exited early:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return Server(url, workspace, proc, log)
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"webui did not answer within 180 s:\n{log.read_text()}")


def stop_runs(workspace: Path) -> None:
    """End the training process groups this test module launched (they are detached on purpose)."""
    for launcher in workspace.glob("runs/*/launcher.json"):
        pgid = json.loads(launcher.read_text())["pgid"]
        if pid_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("webui")
    srv = start_server(root / "ws", root / "server.log")
    yield srv
    srv.proc.terminate()
    srv.proc.wait(timeout=30)
    stop_runs(srv.workspace)


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    from gradio_client import Client

    return Client(server.url, auth=AUTH, verbose=False)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_status(client: Any, name: str) -> dict[str, Any]:
    return client.predict(name, api_name="/run_status")[3]


def wait_status(client: Any, name: str, statuses: tuple[str, ...], timeout: float = 300) -> dict[str, Any]:
    return wait_for(lambda: (d := run_status(client, name)) and d.get("status") in statuses and d,
                    timeout, f"run {name} to reach {statuses}")


def quickstart(client: Any, **training: Any) -> str:
    """The shipped quickstart recipe with training keys changed through the form endpoint."""
    text, *form = client.predict("shipped/sft-tiny.yaml", api_name="/load_recipe")
    form[6] = training.pop("max_steps", form[6])
    form[7] = training.pop("batch_size", form[7])
    text = client.predict(text, *form, api_name="/apply_form")
    data = yaml.safe_load(text)
    data["training"].update(training)
    return yaml.safe_dump(data, sort_keys=False)


def app_error(fn: Callable[[], Any]) -> str:
    """The message of the error an endpoint answered with."""
    with pytest.raises(Exception) as info:
        fn()
    return str(info.value)


@pytest.fixture(scope="module")
def quick_run(client: Any) -> str:
    """One finished quickstart run launched through the API (shared by several tests)."""
    text = quickstart(client, max_steps=6, logging_steps=2, batch_size=4)
    client.predict("quick", text, api_name="/launch_run")
    wait_status(client, "quick", ("completed", "failed", "dead"))
    return "quick"


# -- server basics -------------------------------------------------------------------------------

def test_binds_to_loopback_and_requires_the_login(server: Server) -> None:
    from gradio_client import Client

    assert f"Running on local URL:  {server.url.rstrip('/')}" in server.log.read_text()
    message = app_error(lambda: Client(server.url, verbose=False).predict(api_name="/list_recipes"))
    assert "login" in message.lower() or "auth" in message.lower() or "401" in message
    named = {e for e in Client(server.url, auth=AUTH, verbose=False).view_api(print_info=False,
                                                                              return_format="dict")["named_endpoints"]}
    assert {"/load_recipe", "/apply_form", "/validate_recipe", "/save_recipe", "/list_recipes", "/launch_run",
            "/run_status", "/stop_run", "/resume_run", "/list_runs", "/list_models", "/chat", "/new_chat",
            "/vote", "/feedback_count", "/compare", "/reward_accuracy"} <= named


def test_webui_help_defaults() -> None:
    proc = run_cli("webui", "--help", check=True)
    assert "127.0.0.1" in proc.stdout and "--share" in proc.stdout and "USER:PASSWORD" in proc.stdout
    bad = run_cli("webui", "--auth", "nopassword", "--workspace", "/tmp/unused-llmtune-ws")
    assert bad.returncode == 2 and "--auth: expected USER:PASSWORD" in bad.stderr


# -- recipes -------------------------------------------------------------------------------------

def test_load_form_and_validate(client: Any) -> None:
    assert "shipped/sft-tiny.yaml" in client.predict(api_name="/list_recipes")
    text, stage, model, data, finetuning, lr, epochs, max_steps, *_ = client.predict(
        "shipped/sft-tiny.yaml", api_name="/load_recipe")
    assert (stage, model, data, finetuning, lr, max_steps) == ("sft", "tiny-llama", "demo", "full", 0.003, -1)
    assert client.predict(text, api_name="/validate_recipe") == "ok: recipe (stage sft, model tiny-llama)"
    form = ["dpo", "tiny-t5", "demo", "lora", 0.001, 2, 7, 2, 64, 8, False]
    edited = yaml.safe_load(client.predict(text, *form, api_name="/apply_form"))
    assert edited["stage"] == "dpo" and edited["model"] == {"name": "tiny-t5", "finetuning": "lora", "lora": {"r": 8}}
    assert edited["training"]["max_steps"] == 7 and edited["training"]["learning_rate"] == 0.001
    assert edited["data"]["max_length"] == 64 and "distributed" not in edited
    form[-1] = True  # DeepSpeed needs CUDA: the live validation says so, in the CLI's words
    ds = client.predict(text, *form, api_name="/apply_form")
    assert yaml.safe_load(ds)["distributed"]["strategy"] == "deepspeed"
    assert "distributed.strategy: deepspeed needs CUDA GPUs" in client.predict(ds, api_name="/validate_recipe")


def test_bad_recipe_gets_the_validate_message(client: Any, tmp_path: Path) -> None:
    bad = "stage: sft\nmodel: {name: tiny-lama}\ndata: {name: demo}\ntraining: {learnin_rate: 1, batch_size: 0}\n"
    shown = client.predict(bad, api_name="/validate_recipe")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    cli = run_cli("validate", str(path))
    assert cli.returncode == 2
    assert shown.startswith("error: recipe: ") and "did you mean 'training.learning_rate'" in shown
    assert "training.batch_size: 0 must be >= 1" in shown
    assert shown.replace("error: recipe: ", "", 1).strip() == cli.stderr.strip().replace(f"error: {path}: ", "", 1)
    typo = client.predict(bad.replace("learnin_rate: 1, batch_size: 0", "max_steps: 1"), api_name="/validate_recipe")
    assert typo.startswith("error: recipe: model.name: ") and "did you mean 'tiny-llama'" in typo
    assert app_error(lambda: client.predict("x", bad, api_name="/launch_run")).startswith("x: ")
    assert "not valid YAML" in client.predict("stage: [sft", api_name="/validate_recipe")


def test_save_recipe_into_the_workspace(client: Any, server: Server) -> None:
    text = client.predict("shipped/sft-tiny.yaml", api_name="/load_recipe")[0]
    message, _ = client.predict("my-quick", text, api_name="/save_recipe")
    saved = server.workspace / "recipes" / "my-quick.yaml"
    assert message == "saved recipes/my-quick.yaml" and saved.read_text() == text.rstrip("\n") + "\n"
    assert "recipes/my-quick.yaml" in client.predict(api_name="/list_recipes")
    assert client.predict("recipes/my-quick.yaml", api_name="/load_recipe")[0].rstrip() == text.rstrip()
    assert "already exists" in app_error(lambda: client.predict("my-quick", text, api_name="/save_recipe"))
    assert "not a valid name" in app_error(lambda: client.predict("../evil", text, api_name="/save_recipe"))
    invalid = text.replace("tiny-llama", "tiny-lama")
    assert "unknown model" in app_error(lambda: client.predict("broken", invalid, api_name="/save_recipe"))
    assert not (server.workspace / "recipes" / "broken.yaml").exists()
    # A saved recipe may inherit from a shipped one with `base:`.
    child = "base: sft-tiny.yaml\ntraining: {max_steps: 3}\n"
    assert client.predict(child, api_name="/validate_recipe") == "ok: recipe (stage sft, model tiny-llama)"


def test_paths_outside_the_workspace_are_refused(client: Any, server: Server) -> None:
    link = server.workspace / "recipes" / "link.yaml"
    link.symlink_to("/etc/passwd")
    for ref in ("/etc/passwd", "../../../etc/passwd", "recipes/../../outside.yaml", "recipes/link.yaml"):
        message = app_error(lambda ref=ref: client.predict(ref, api_name="/load_recipe"))
        assert "is outside the workspace" in message, (ref, message)
    assert "outside the workspace" in app_error(lambda: client.predict(
        ["/etc/passwd"], "hi", 8, 0, 1, 0, api_name="/chat"))
    assert "outside the workspace" in app_error(lambda: client.predict(
        ["tiny-llama", "tiny-gptj"], "/etc/passwd", None, 2, 8, 0, 0, api_name="/compare"))
    assert "outside the workspace" in app_error(lambda: client.predict(
        ["tiny-llama", "tiny-gptj"], "demo", "../../etc", 2, 8, 0, 0, api_name="/compare"))
    assert "not a valid name" in app_error(lambda: client.predict("../../etc", api_name="/stop_run"))


# -- runs ----------------------------------------------------------------------------------------

def test_launch_shows_progress_curves_and_the_runs_list(client: Any, server: Server, quick_run: str) -> None:
    progress, plot, log, details = client.predict(quick_run, api_name="/run_status")
    assert details["status"] == "completed", log
    assert 'data-status="completed"' in progress and 'data-step="6" data-total="6"' in progress
    points = {(step, metric) for step, _value, metric in plot["data"]}
    assert {(1, "loss"), (2, "loss"), (4, "loss"), (6, "loss")} <= points and (6, "eval_loss") in points
    assert "done: model saved" in log and details["run_json"]["summary"]["global_step"] == 6
    run = server.workspace / "runs" / quick_run
    assert (run / "model" / "llmtune.json").exists() and (run / "launch.yaml").exists()
    assert (run / "console.log").read_text().startswith(f"$ llmtune train {run}/launch.yaml --output-dir {run}")
    rows = {r[0]: r for r in client.predict(api_name="/list_runs")}
    assert rows[quick_run][1:5] == ["completed", "sft", "tiny-llama", "6/6"]
    again = quickstart(client, max_steps=1)
    assert "already exists" in app_error(lambda: client.predict(quick_run, again, api_name="/launch_run"))
    assert "not running" in app_error(lambda: client.predict(quick_run, api_name="/stop_run"))


LONG = 300  # steps of the run that is stopped and resumed


def test_run_outlives_its_ui_then_stops_and_resumes(client: Any, server: Server, tmp_path: Path) -> None:
    """Launched from a second UI that is then killed: the run goes on, the first UI (reading only the
    disk) shows it, stops it with a checkpoint, and resumes it to completion."""
    from gradio_client import Client

    other = start_server(server.workspace, tmp_path / "other.log")
    try:
        # Long enough that it cannot finish before the stop arrives, even on a quiet machine.
        text = quickstart(Client(other.url, auth=AUTH, verbose=False), max_steps=LONG, logging_steps=1, batch_size=2)
        Client(other.url, auth=AUTH, verbose=False).predict("long", text, api_name="/launch_run")
    finally:
        other.proc.kill()
        other.proc.wait(timeout=30)
    launcher = json.loads((server.workspace / "runs" / "long" / "launcher.json").read_text())
    assert pid_alive(launcher["pid"])
    wait_for(lambda: (run_status(client, "long").get("step") or 0) >= 2, 240, "step 2 of the long run")
    assert "long" in [r[0] for r in client.predict(api_name="/list_runs")]
    assert "SIGTERM" in client.predict("long", api_name="/stop_run")
    stopped = wait_status(client, "long", ("interrupted", "completed", "failed", "dead"), 120)
    assert stopped["status"] == "interrupted", stopped
    step = stopped["run_json"]["summary"]["global_step"]
    assert 2 <= step < LONG and (server.workspace / "runs" / "long" / "checkpoints" / f"checkpoint-{step}").is_dir()
    assert "resuming" in client.predict("long", api_name="/resume_run")
    done = wait_status(client, "long", ("completed", "interrupted", "failed", "dead"), 300)
    assert done["status"] == "completed" and done["run_json"]["resumed"] == 1
    assert done["run_json"]["summary"]["global_step"] == LONG
    steps = [json.loads(line)["step"] for line in (server.workspace / "runs" / "long" / "metrics.jsonl").open()]
    assert steps == sorted(steps) and steps[-1] == LONG


# -- chat and feedback ---------------------------------------------------------------------------

def answers(outputs: tuple[Any, ...]) -> list[list[dict[str, Any]]]:
    """Chatbot values from a /chat result (message, status, A, B, C, D) as role/text pairs."""
    out = []
    for box in outputs[2:]:
        value = box.get("value", box) if isinstance(box, dict) else box
        out.append([{"role": m["role"], "content": "".join(p.get("text", "") for p in m["content"])
                     if isinstance(m["content"], list) else m["content"]} for m in value or []])
    return out


def test_side_by_side_chat_streams_and_votes_land_in_the_preference_file(
        client: Any, server: Server, quick_run: str) -> None:
    from gradio_client import Client

    chat = Client(server.url, auth=AUTH, verbose=False)  # its own session: its own conversation
    models = [f"runs/{quick_run}", "tiny-llama"]
    job = chat.submit(models, "Hello! Who are you?", 12, 0, 1, 0, api_name="/chat")
    final = job.result()
    assert len(job.outputs()) >= 3  # streamed: status and partial answers before the final one
    assert final[1] == "all 2 answers are in"
    a, b = answers(final)[:2]
    assert [m["role"] for m in a] == [m["role"] for m in b] == ["user", "assistant"]
    assert a[0]["content"] == "Hello! Who are you?"
    assert "1 preference(s), 0 tie(s)" in chat.predict("B", api_name="/vote")[0]
    prefs = server.workspace / "feedback" / "preferences.jsonl"
    row = json.loads(prefs.read_text().splitlines()[-1])
    assert row["models"] == {"chosen": "tiny-llama", "rejected": f"runs/{quick_run}"} and row["tie"] is False
    assert row["prompt"] == [{"role": "user", "content": "Hello! Who are you?"}]
    assert row["chosen"] == [b[1]] and row["rejected"] == [a[1]] and row["timestamp"]
    assert "already has a vote" in app_error(lambda: chat.predict("A", api_name="/vote"))

    second = chat.predict(models, "Tell me more.", 12, 0, 1, 0, api_name="/chat")
    assert [len(h) for h in answers(second)[:2]] == [4, 4]
    message, counter = chat.predict("tie", api_name="/vote")
    assert "0 preference(s), 1 tie(s)" in message and "+1 ties" in counter
    tie = json.loads((server.workspace / "feedback" / "ties.jsonl").read_text().splitlines()[-1])
    assert tie["tie"] is True and [m["role"] for m in tie["prompt"]] == ["user", "assistant", "user"]

    chat.predict(api_name="/new_chat")
    three = [*models, "tiny-gptj"]
    chat.predict(three, "Name a colour.", 8, 0, 1, 0, api_name="/chat")
    assert "exactly once" in app_error(lambda: chat.predict("A>B", api_name="/vote"))
    assert "2 preference(s), 1 tie(s)" in chat.predict("C>A=B", api_name="/vote")[0]
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert [r["models"]["chosen"] for r in rows[-2:]] == ["tiny-gptj", "tiny-gptj"]
    assert chat.predict(api_name="/feedback_count") == [len(rows), 2]

    registry = json.loads((server.workspace / "data_registry.json").read_text())
    assert registry["feedback"]["format"] == "canonical" and registry["feedback"]["path"] == "feedback/preferences.jsonl"
    recipe = {"stage": "dpo", "model": {"name": "tiny-llama"},
              "data": {"name": "feedback", "registry": [str(server.workspace / "data_registry.json")]}}
    assert chat.predict(yaml.safe_dump(recipe), api_name="/validate_recipe") == "ok: recipe (stage dpo, model tiny-llama)"
    from llmtune.data.load import load_rows

    loaded = load_rows("feedback", None, shape="preference",
                       extra_registries=[str(server.workspace / "data_registry.json")]).rows
    assert len(loaded) == len(rows) and loaded[0]["prompt"][0]["role"] == "user"


def _vote_worker(root: str, worker: int, n: int) -> None:
    ws = Workspace(root)
    for i in range(n):
        row = {"prompt": [{"role": "user", "content": f"w{worker} q{i} " + "x" * 2000}],
               "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}],
               "models": {"chosen": "m1", "rejected": "m2"}, "tie": False, "timestamp": "t", "source": "webui"}
        ws.record_votes([row], [])


def test_votes_from_many_tabs_at_once_do_not_corrupt_the_files(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_vote_worker, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lines = (tmp_path / "feedback" / "preferences.jsonl").read_text().splitlines()
    assert len(lines) == 100 and len({json.loads(line)["prompt"][0]["content"] for line in lines}) == 100
    assert json.loads((tmp_path / "data_registry.json").read_text())["feedback"]["shapes"][0] == "preference"
    assert Workspace(tmp_path).feedback_counts() == (100, 0)


# -- evaluate ------------------------------------------------------------------------------------

def test_reward_model_on_feedback_then_compare_and_accuracy(client: Any, server: Server, quick_run: str) -> None:
    """The loop the UI exists for: votes → `feedback` dataset → rm run → judge a comparison."""
    prefs = server.workspace / "feedback" / "preferences.jsonl"
    if not prefs.exists():  # running this test alone: collect two votes first
        chat = client
        for msg in ("Hi!", "Why?"):
            chat.predict([f"runs/{quick_run}", "tiny-llama"], msg, 8, 0, 1, 0, api_name="/chat")
            chat.predict("A", api_name="/vote")
    registry = str(server.workspace / "data_registry.json")
    rm = {"stage": "rm", "model": {"name": "tiny-llama", "finetuning": "full"},
          "data": {"name": "feedback", "registry": [registry], "max_length": 64},
          "training": {"max_steps": 2, "batch_size": 2, "logging_steps": 1}}
    client.predict("rm-feedback", yaml.safe_dump(rm), api_name="/launch_run")
    done = wait_status(client, "rm-feedback", ("completed", "failed", "dead"))
    assert done["status"] == "completed", client.predict("rm-feedback", api_name="/run_status")[2]

    accuracy = client.predict("runs/rm-feedback", "feedback", 0, api_name="/reward_accuracy")
    assert accuracy["n"] == len(prefs.read_text().splitlines()) and 0 <= accuracy["accuracy"] <= 1

    table, summary = client.predict([f"runs/{quick_run}", "tiny-llama"], "demo", "runs/rm-feedback", 2, 8, 0, 0,
                                    api_name="/compare")
    names = [f"runs/{quick_run}", "tiny-llama"]
    assert table["headers"] == ["prompt", names[0], f"{names[0]} score", names[1], f"{names[1]} score"]
    assert len(table["data"]) == 2 and all(isinstance(r[2], float) for r in table["data"])
    assert set(summary["mean_scores"]) == set(names) and summary["matrix"][names[0]][names[1]]
    assert (server.workspace / summary["out"] / "compare.html").is_file()
