"""The web UI's API endpoints through gradio_client, against a real `llmtune webui` server on 127.0.0.1:
recipes (validation messages identical to `llmtune validate`, form edits that keep the user's text,
plan's size hints), detached runs (progress, curves, stop/resume, surviving the UI, runs trained from
a shell), side-by-side chat with votes and written answers into the feedback dataset, the rollout
browser and its labels, feedback snapshots and "train on this feedback", a reward model trained on
that feedback, compare (win matrix, empty answers, judges that fail) and reward accuracy, and path
confinement. The rough edges issue 18 listed each have a test here or in test_webui_browser.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
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
            "/vote", "/feedback_count", "/compare", "/reward_accuracy", "/recipe_hints", "/rollouts",
            "/suggest_pair", "/label_rollouts", "/write_rollout_answer", "/write_better_answer",
            "/train_on_feedback", "/export_feedback", "/compare_parent"} <= named


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
    # The curves: an SVG whose legend names every series, eval_loss (one point, at step 6) included.
    assert "data-series='loss,eval_loss'" in plot and "<svg" in plot and ">eval_loss<" in plot
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
    # "Write the better answer": preferred to each model's answer, marked as the user's.
    message, _, = chat.predict("Hello, I am an assistant.", api_name="/write_better_answer")
    written = [json.loads(line) for line in prefs.read_text().splitlines()[-2:]]
    assert "better than 2 model answer(s)" in message
    assert [w["models"] for w in written] == [{"chosen": "human", "rejected": m} for m in models]
    assert {w["chosen"][0]["content"] for w in written} == {"Hello, I am an assistant."}
    assert written[0]["rejected"] == [a[1]] and written[0]["source"] == "webui:written"

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

    registry_file = server.workspace / "feedback" / "data_registry.json"
    registry = json.loads(registry_file.read_text())
    assert registry["feedback"]["format"] == "canonical" and registry["feedback"]["path"] == "preferences.jsonl"
    assert not (server.workspace / "data_registry.json").exists()
    recipe = {"stage": "dpo", "model": {"name": "tiny-llama"},
              "data": {"name": "feedback", "registry": [str(registry_file)]}}
    assert chat.predict(yaml.safe_dump(recipe), api_name="/validate_recipe") == "ok: recipe (stage dpo, model tiny-llama)"
    from llmtune.data.load import load_rows

    loaded = load_rows("feedback", None, shape="preference", extra_registries=[str(registry_file)]).rows
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
    assert json.loads((tmp_path / "feedback" / "data_registry.json").read_text())["feedback"]["shapes"][0] == "preference"
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
    registry = str(server.workspace / "feedback" / "data_registry.json")
    rm = {"stage": "rm", "model": {"name": "tiny-llama", "finetuning": "full"},
          "data": {"name": "feedback", "registry": [registry], "max_length": 64},
          "training": {"max_steps": 2, "batch_size": 2, "logging_steps": 1}}
    client.predict("rm-feedback", yaml.safe_dump(rm), api_name="/launch_run")
    done = wait_status(client, "rm-feedback", ("completed", "failed", "dead"))
    assert done["status"] == "completed", client.predict("rm-feedback", api_name="/run_status")[2]

    shown, accuracy = client.predict("runs/rm-feedback", "feedback", 0, api_name="/reward_accuracy")
    assert accuracy["n"] == len(prefs.read_text().splitlines()) and 0 <= accuracy["accuracy"] <= 1
    assert f"on {accuracy['n']} pairs" in shown and accuracy["model"] == "runs/rm-feedback"

    table, text, matrix, chart, summary = client.predict(
        [f"runs/{quick_run}", "tiny-llama"], "demo", "runs/rm-feedback", 2, 8, 0, 0, api_name="/compare")
    names = [f"runs/{quick_run}", "tiny-llama"]
    assert table["headers"] == ["prompt", names[0], f"{names[0]} score", names[1], f"{names[1]} score"]
    assert len(table["data"]) == 2 and all(isinstance(r[2], float) for r in table["data"])
    assert set(summary["mean_scores"]) == set(names) and summary["matrix"][names[0]][names[1]]
    assert (server.workspace / summary["out"] / "compare.html").is_file()
    # For people: the matrix as a table and a chart, mean scores in words; no nulls, no absolute paths.
    assert matrix["headers"] == ["model (row) vs", *names] and matrix["data"][0][1] == "—"
    cell = summary["matrix"][names[0]][names[1]]
    assert matrix["data"][0][2] == f"{cell['win']} / {cell['tie']} / {cell['loss']}"
    assert {tuple(r[:2]) for r in chart["value"]["data"]} == {(m, o) for m in names for o in ("win", "tie", "loss")}
    assert "| model | mean score | empty answers |" in text and "null" not in text and str(server.workspace) not in text
    assert None not in summary.values() and str(server.workspace) not in json.dumps(summary)


# -- the rough edges of issue 18 -----------------------------------------------------------------

COMMENTED = """# a comment the form must keep
stage: sft
model:
  name: tiny-llama   # the model
  finetuning: full
data: {name: demo, max_length: 64}
training:
  epochs: 4
  learning_rate: 3.0e-3   # as the user wrote it
  batch_size: 8
"""


def test_form_edits_keep_the_users_text_and_a_cleared_field_removes_its_key(client: Any) -> None:
    form = ["sft", "tiny-llama", "demo", "full", 0.003, 4, -1, 8, 64, 16, False]
    edited = client.predict(COMMENTED, *[*form[:6], 12, *form[7:]], api_name="/apply_form")
    # (the code editor's value comes back without its final newline)
    assert edited.rstrip("\n") == COMMENTED.replace("  batch_size: 8\n", "  batch_size: 8\n  max_steps: 12\n").rstrip("\n")
    # Clearing batch_size removes the key: the recipe falls back to the schema default (4), as the form shows.
    cleared = client.predict(COMMENTED, *[*form[:7], None, *form[8:]], api_name="/apply_form")
    assert "batch_size" not in cleared and "# as the user wrote it" in cleared and "3.0e-3" in cleared
    assert client.predict(cleared, api_name="/validate_recipe") == "ok: recipe (stage sft, model tiny-llama)"
    # A changed value is written where the key is; untouched numbers keep their spelling.
    lr = client.predict(COMMENTED, *[*form[:4], 0.001, *form[5:]], api_name="/apply_form")
    assert re.search(r"\n  learning_rate: 0.001 +# as the user wrote it\n", lr) and "  epochs: 4\n" in lr
    five = client.predict(COMMENTED, *[*form[:5], 5.0, *form[6:]], api_name="/apply_form")
    assert "  epochs: 5\n" in five  # a whole number typed into a float field stays as typed, not 5.0
    assert client.predict(COMMENTED, *form, api_name="/apply_form").rstrip("\n") == COMMENTED.rstrip("\n")


def test_recipe_list_hints_cpu_or_gpu_and_shipped_quickstarts_run_from_the_ui(client: Any) -> None:
    hints = client.predict(api_name="/recipe_hints")
    assert hints["shipped/sft-tiny.yaml"].startswith("tiny-llama, ") and hints["shipped/sft-tiny.yaml"].endswith(
        "CPU quickstart")
    assert "needs a GPU" in hints["shipped/sft-gptj-hh.yaml"] and "6.1B params" in hints["shipped/sft-gptj-hh.yaml"]
    assert "pipeline" in hints["shipped/ppo-quickstart.yaml"]
    # dpo-quickstart's pairs ship with llmtune (package data): it validates under the UI's confinement.
    assert hints["shipped/dpo-quickstart.yaml"].endswith("CPU quickstart")
    text = client.predict("shipped/dpo-quickstart.yaml", api_name="/load_recipe")[0]
    assert client.predict(text, api_name="/validate_recipe") == "ok: recipe (stage dpo, model tiny-llama)"


def test_stopping_a_run_that_is_still_starting_leaves_it_resumable(client: Any, server: Server) -> None:
    text = quickstart(client, max_steps=2, batch_size=2)
    client.predict("early-stop", text, api_name="/launch_run")
    assert run_status(client, "early-stop")["status"] == "starting"
    assert "SIGTERM" in client.predict("early-stop", api_name="/stop_run")
    stopped = wait_status(client, "early-stop", ("stopped", "interrupted", "failed", "dead", "completed"), 120)
    assert stopped["status"] in ("stopped", "interrupted"), stopped
    row = {r[0]: r for r in client.predict(api_name="/list_runs")}["early-stop"]
    assert row[1] == stopped["status"] and row[7] == ""  # no error, least of all the command line
    assert "resuming" in client.predict("early-stop", api_name="/resume_run")
    done = wait_status(client, "early-stop", ("completed", "failed", "dead"), 300)
    assert done["status"] == "completed", client.predict("early-stop", api_name="/run_status")[2]


def test_a_run_trained_from_a_shell_shows_its_log_and_its_steps(client: Any, server: Server) -> None:
    run = server.workspace / "runs" / "from-shell"
    run_cli("train", "recipes/sft-tiny.yaml", "--output-dir", str(run), "training.max_steps=3",
            "training.logging_steps=1", check=True)
    _, _, log, details = client.predict("from-shell", api_name="/run_status")
    assert details["status"] == "completed" and (details["step"], details["max_steps"]) == (3, 3)
    assert "done: model saved" in log  # train.log, as the run has no console.log
    assert {r[0]: r for r in client.predict(api_name="/list_runs")}["from-shell"][4] == "3/3"


def test_compare_shows_whole_conversations_marks_empty_answers_and_names_a_failing_judge(
        client: Any, server: Server, quick_run: str) -> None:
    prompts = server.workspace / "multi-turn.jsonl"
    turns = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
             {"role": "user", "content": "Another one?"}]
    prompts.write_text(json.dumps({"prompt": turns}) + "\n")
    models = [f"runs/{quick_run}", "tiny-llama"]
    table, *_ = client.predict(models, "multi-turn.jsonl", None, 1, 4, 0, 0, api_name="/compare")
    assert table["data"][0][0] == "user: Name a fruit.\nassistant: Apple.\nuser: Another one?"
    # A judge that raises while scoring gets its own message, not gradio's "upstream app has raised an
    # exception": here a rule whose kwargs only fail when it runs.
    (server.workspace / "judge.yaml").write_text(
        "reward: {type: rule, function: 'llmtune.rewards.rules:target_length', kwargs: {unit: bytes}}\n")
    message = app_error(lambda: client.predict(models, "demo", "judge.yaml", 1, 4, 0, 0, api_name="/compare"))
    assert ("reward function llmtune.rewards.rules:target_length failed: ValueError: unit must be 'chars' or "
            "'words', got 'bytes'") in message


def test_empty_answers_are_marked_and_a_judge_preferring_them_is_flagged() -> None:
    from llmtune.serve.compare import Comparison, win_matrix
    from llmtune.serve.engine import Settings
    from webui.evaluate import EMPTY, answer_table, summary_markdown

    scores = {"silent": [0.9, 0.8], "talker": [0.1, 0.2]}
    prompts = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    result = Comparison(models={"silent": "a", "talker": "b"}, prompts=prompts, settings=Settings(), seed=0,
                        responses={"silent": ["", " "], "talker": ["hi", "hello"]}, scores=scores, judge="rule:x")
    result.matrix = win_matrix(scores, False)
    assert answer_table(result)[1][0] == ["user: q1", EMPTY, 0.9, "hi", 0.1]
    summary = result.to_summary()
    assert summary["empty_answers"] == {"silent": 2, "talker": 0} and summary["judge_prefers_empty"] is True
    assert "judge scores empty answers better" in summary_markdown(summary)


def test_score_accuracy_refuses_a_model_that_is_not_a_reward_model(client: Any, server: Server, quick_run: str) -> None:
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}]}
    (server.workspace / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    message = app_error(lambda: client.predict(f"runs/{quick_run}", "pairs.jsonl", 0, api_name="/reward_accuracy"))
    assert "is a language model (a sft run), not a reward model; train one with `stage: rm`" in message


def test_repository_root_as_workspace_lists_recipes_once_and_never_writes_the_package_registry() -> None:
    """The repository root as the workspace: recipes/ there is the shipped directory, and the root's
    data_registry.json is llmtune's own (tracked) file."""
    package = ROOT / "data_registry.json"
    before = package.read_bytes()
    created = [p for p in (ROOT / "feedback", ROOT / ".llmtune") if not p.exists()]
    try:
        ws = Workspace(ROOT)
        refs = ws.list_recipes()
        assert len(refs) == len(set(refs)) and not [r for r in refs if r.startswith("recipes/")]
        row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
               "rejected": [{"role": "assistant", "content": "b"}], "models": {"chosen": "m", "rejected": "n"},
               "tie": False, "timestamp": "t", "source": "webui"}
        ws.record_votes([row], [])
        assert package.read_bytes() == before
        assert ws.registry_file != package and json.loads(ws.registry_file.read_text())["feedback"]
        assert not list((ROOT / "recipes").glob("*.lock")) and not list(ROOT.glob("*.lock"))
    finally:
        package.write_bytes(before)
        import shutil

        for path in created:
            shutil.rmtree(path, ignore_errors=True)


def test_saving_a_recipe_leaves_no_lock_file_beside_it(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.save_recipe("mine", "stage: sft\nmodel: {name: tiny-llama}\ndata: {name: demo}\n")
    assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == ["mine.yaml"]


# -- the loop: rollouts → labels → snapshot → retrain → compare with the parent --------------------

RS_TINY = (ROOT / "recipes" / "rs-quickstart.yaml").read_text().replace("iterations: 3", "iterations: 1").replace(
    "num_samples: 32", "num_samples: 6").replace("epochs: 3", "epochs: 1")


def test_rollouts_labels_snapshot_retrain_and_compare_with_the_parent(client: Any, server: Server) -> None:
    client.predict("rs-loop", RS_TINY, api_name="/launch_run")
    done = wait_status(client, "rs-loop", ("completed", "failed", "dead"))
    assert done["status"] == "completed", client.predict("rs-loop", api_name="/run_status")[2]

    table, _, count, reward_chart, length_chart, kl_chart = client.predict(
        "rs-loop", "", "all", "reward: high to low", api_name="/rollouts")
    assert count == "24 of 24 samples"  # 6 prompts x best-of-4
    assert table["headers"][:6] == ["id", "step", "prompt", "response", "reward", "chars"] and "round" in table["headers"]
    rewards = [r[4] for r in table["data"]]
    assert rewards == sorted(rewards, reverse=True)
    assert "reward_mean" in reward_chart and "samples: reward" in reward_chart and "samples: chars" in length_chart
    assert "nothing logged yet" in kl_chart  # rejection sampling has no KL
    filtered = client.predict("rs-loop", table["data"][0][2].split("\n")[-1][6:], "all", "oldest first",
                              api_name="/rollouts")[0]
    assert 4 <= len(filtered["data"]) < 24

    a, b = client.predict("rs-loop", api_name="/suggest_pair")
    assert a.split("-c")[0] == b.split("-c")[0]  # two answers to one prompt
    assert client.predict("rs-loop", a, b, "A", api_name="/label_rollouts")[0] == f"labelled {a} better than {b}"
    assert frozenset(client.predict("rs-loop", api_name="/suggest_pair")) != frozenset((a, b))  # not again
    c, d = client.predict("rs-loop", api_name="/suggest_pair")
    client.predict("rs-loop", c, d, "B", api_name="/label_rollouts")
    other_prompt = next(r[0] for r in table["data"] if r[0].split("-c")[0] != a.split("-c")[0])
    assert "different prompts" in app_error(lambda: client.predict("rs-loop", a, other_prompt, "A",
                                                                   api_name="/label_rollouts"))
    rows = [json.loads(line) for line in (server.workspace / "feedback" / "preferences.jsonl").open()]
    labelled = [r for r in rows if r["source"] == "webui:rollouts"]
    assert [r["samples"] for r in labelled[-2:]] == [{"chosen": a, "rejected": b}, {"chosen": d, "rejected": c}]
    assert labelled[-1]["models"] == {"chosen": "runs/rs-loop", "rejected": "runs/rs-loop"}

    text, stage, model, *_rest = client.predict("dpo", "runs/rs-loop", api_name="/train_on_feedback")
    snapshot = json.loads(next((server.workspace / "feedback" / "snapshots").glob("*.json")).read_text())
    assert (stage, model) == ("dpo", "runs/rs-loop") and f"path: {snapshot['file']}" in text
    assert snapshot["count"] == len(rows) and snapshot["sha256"] in [
        __import__("hashlib").sha256((server.workspace / snapshot["file"]).read_bytes()).hexdigest()]
    text = text.replace("  epochs: 3\n", "  max_steps: 2\n")
    assert client.predict(text, api_name="/validate_recipe").startswith("ok: recipe (stage dpo")
    client.predict("dpo-loop", text, api_name="/launch_run")
    done = wait_status(client, "dpo-loop", ("completed", "failed", "dead"))
    assert done["status"] == "completed", client.predict("dpo-loop", api_name="/run_status")[2]
    recorded = done["run_json"]["data"][0]
    assert (recorded["sha256"], recorded["rows"]) == (snapshot["sha256"], snapshot["count"])
    assert done["feedback_snapshot"]["name"] == snapshot["name"] and done["parent"] == "runs/rs-loop"

    eval_models, chat_models, judge, message = client.predict("dpo-loop", api_name="/compare_parent")
    assert eval_models["value"] == chat_models["value"] == ["runs/dpo-loop", "runs/rs-loop"]
    assert judge["value"] == "runs/rs-loop/recipe.yaml" and "its parent runs/rs-loop" in message
    _, text, matrix, _, summary = client.predict(eval_models["value"], "demo", judge["value"], 2, 8, 0, 0,
                                                 api_name="/compare")
    assert summary["judge"] == "runs/rs-loop/recipe.yaml" and len(matrix["data"]) == 2

    path, note = client.predict(api_name="/export_feedback")
    exported = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(exported) == len(rows) and all(set(r) == {"prompt", "chosen", "rejected"} for r in exported)


def test_streamed_chat_answers_are_the_models_text_with_multibyte_characters_intact(client: Any, server: Server) -> None:
    """What Chat shows and what a vote saves is exactly the model's answer as `llmtune chat` decodes it in
    one piece (`Engine.chat`): the stream never splits a multi-byte character into U+FFFD. (tiny-llama is random-init:
    with this seed it emits byte-level tokens, some forming multi-byte characters and some invalid bytes,
    which the tokenizer itself decodes to U+FFFD; those must match, nothing more.)"""
    from gradio_client import Client

    chat = Client(server.url, auth=AUTH, verbose=False)
    outputs = chat.predict(["tiny-llama", "tiny-llama"], "Hello! Can you tell me a story?", 48, 1.0, 1.0, 24,
                           api_name="/chat")
    shown = answers(outputs)[0][1]["content"]
    from llmtune.serve.engine import Engine, Settings

    whole = Engine.load("tiny-llama").chat([{"role": "user", "content": "Hello! Can you tell me a story?"}],
                                           Settings(max_new_tokens=48, temperature=1.0, top_p=1.0, seed=24))
    assert shown == whole and shown
    chat.predict("A", api_name="/vote")
    saved = json.loads((server.workspace / "feedback" / "preferences.jsonl").read_text().splitlines()[-1])
    assert saved["chosen"][0]["content"] == shown


def test_rollout_samples_are_read_tolerantly_and_new_fields_become_columns(tmp_path: Path) -> None:
    """PPO rows as written today plus fields another online-RL loop may add (length, kl, eval_reward), a
    line being written, and rejection-sampling rounds: one record per response, every field kept."""
    from llmtune.runs.samples import read_samples
    from webui.rollouts import curves, table

    prompt = [{"role": "user", "content": "Hi"}]
    rows = [{"step": 1, "prompt": prompt, "response": "a", "reward": 0.5, "ended": True},
            {"step": 5, "prompt": prompt, "response": "bb", "reward": 0.7, "ended": False, "length": 3, "kl": 0.02,
             "eval_reward": 0.1}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "prom')
    for k in (1, 2):
        (tmp_path / "rs" / f"round-{k}").mkdir(parents=True)
        (tmp_path / "rs" / f"round-{k}" / "samples.jsonl").write_text(json.dumps(
            {"index": 0, "prompt": prompt, "responses": ["x", "yy"], "scores": [0.1, 0.9]}) + "\n")
    (tmp_path / "rs" / "round-1" / "done.json").write_text(json.dumps({"round": 1, "global_step": 4}))
    samples = read_samples(tmp_path)
    assert [s["id"] for s in samples] == ["s1-0", "s5-0", "r1-p0-c0", "r1-p0-c1", "r2-p0-c0", "r2-p0-c1"]
    assert samples[1]["kl"] == 0.02 and samples[1]["eval_reward"] == 0.1 and samples[0]["ended"] is True
    assert [(s["step"], s["reward"]) for s in samples[2:]] == [(0, 0.1), (0, 0.9), (4, 0.1), (4, 0.9)]
    headers, shown = table(samples, sort="reward: high to low")
    assert headers == ["id", "step", "prompt", "response", "reward", "chars", "ended", "length", "kl",
                       "eval_reward", "round"]
    assert [r[0] for r in shown][:2] == ["r1-p0-c1", "r2-p0-c1"] and shown[-1][3] == "x"
    charts = curves([{"step": 5, "reward_mean": 0.7, "kl": 0.02, "kl_coef": 0.05, "response_length": 3.0}], samples)
    assert {name for _, _, name in charts["reward"]} == {"reward_mean", "samples: reward", "samples: eval_reward"}
    assert {name for _, _, name in charts["kl"]} == {"kl", "samples: kl"}
    assert {name for _, _, name in charts["length"]} == {"response_length", "samples: chars", "samples: length"}
