"""Hostile use on a shared machine: a real `llmtune webui` attacked through gradio_client and a real
`llmtune serve` through httpx.

The UI runs from a working directory of its own (holding a `runs/quickstart` it must not load) with
a secret file tree planted next to its workspace and a secret in its environment. Every attack of
issue 13 is a separate case and must be refused by the confinement (its own message, naming the
key), with neither secret nor any other file's contents in a response or in a log the UI shows;
at the end nothing outside the workspace has been written and the UI still serves. The server
answers every malformed request with a 4xx in OpenAI's error shape and keeps serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ROOT
from test_webui_api import AUTH, Server, app_error, start_server, wait_for

from webui.workspace import pid_alive

pytestmark = pytest.mark.slow  # a real web UI and a real server per module: the full suite

FILE_SECRET = f"file-secret-{uuid.uuid4().hex}"
ENV_SECRET = f"env-secret-{uuid.uuid4().hex}"
ENV_NAME = "LLMTUNE_TEST_SECRET_TOKEN"
ZEN = "Beautiful is better than ugly"  # what `import this` prints
RECIPE = "stage: sft\nmodel: {name: tiny-llama}\ndata: {name: demo}\ntraining: {max_steps: 1}\n"


def assert_clean(text: Any) -> None:
    """No secret and no other file's contents in TEXT."""
    text = str(text)
    for leaked in (FILE_SECRET, ENV_SECRET, "root:x:0:0", ZEN):
        assert leaked not in text, text


@dataclass
class World:
    root: Path
    ws: Path
    outside: Path
    cwd: Path
    server: Server

    def snapshot(self) -> set[tuple[str, int]]:
        """Every file and directory outside the workspace the attacks could reach, with its mtime."""
        return {(str(p), p.lstat().st_mtime_ns) for d in (self.outside, self.cwd) for p in [d, *d.rglob("*")]}


def plant(root: Path) -> tuple[Path, Path, Path]:
    """The secret tree outside the workspace, the UI's working directory, and hostile files inside
    the workspace (as a shell user of the machine could leave them)."""
    outside, cwd, ws = root / "outside", root / "cwd", root / "ws"
    model = outside / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "secret": FILE_SECRET}))
    (outside / "secret.yaml").write_text(RECIPE + f"description: {FILE_SECRET}\n")
    (outside / "secret.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": FILE_SECRET}, {"role": "assistant", "content": FILE_SECRET}]}) + "\n")
    (outside / "registry.json").write_text(json.dumps({"stolen": {"path": "secret.jsonl", "format": "canonical"}}))
    (outside / "ds.json").write_text(json.dumps({"train_batch_size": 1, "secret": FILE_SECRET}))
    (outside / "accelerate.yaml").write_text(f"secret: {FILE_SECRET}\n")
    (outside / "hostfile").write_text(f"{FILE_SECRET} slots=1\n")
    (cwd / "runs" / "quickstart").mkdir(parents=True)
    (cwd / "runs" / "quickstart" / "config.json").write_text(json.dumps({"secret": FILE_SECRET}))
    (cwd / "cwd-secret.yaml").write_text(RECIPE + f"description: {FILE_SECRET}\n")
    (cwd / "local-model").mkdir()
    (cwd / "local-model" / "config.json").write_text(json.dumps({"secret": FILE_SECRET}))
    recipes = ws / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "link.yaml").symlink_to(outside / "secret.yaml")
    (recipes / "chain-a.yaml").write_text("base: chain-b.yaml\n")
    (recipes / "chain-b.yaml").write_text(f"base: {outside / 'secret.yaml'}\n")
    (recipes / "inner-path.yaml").write_text(RECIPE.replace("{name: demo}", f"{{path: {outside / 'secret.jsonl'}}}"))
    (recipes / "env-base.yaml").write_text(RECIPE + f"description: ${{oc.env:{ENV_NAME}}}\n")
    (ws / "data-link").symlink_to(outside)
    (ws / "evil-registry.json").write_text(json.dumps(
        {"evil": {"path": str(outside / "secret.jsonl"), "format": "canonical"}}))
    return outside, cwd, ws


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("security")
    outside, cwd, ws = plant(root)
    env = {ENV_NAME: ENV_SECRET, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    server = start_server(ws, root / "webui.log", cwd=cwd, env=env)
    world = World(root, ws, outside, cwd, server)
    before = world.snapshot()
    yield world
    try:
        assert world.snapshot() == before, "something outside the workspace was written"
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)
        for launcher in ws.glob("runs/*/launcher.json"):
            pid = json.loads(launcher.read_text())["pid"]
            assert not pid_alive(pid), f"a run started by an attack is still running: {launcher}"


@pytest.fixture(scope="module")
def client(world: World) -> Any:
    from gradio_client import Client

    return Client(world.server.url, auth=AUTH, verbose=False)


@pytest.fixture(scope="module")
def form(client: Any) -> list[Any]:
    return client.predict("shipped/sft-tiny.yaml", api_name="/load_recipe")[1:]


def refused(client: Any, endpoint: str, *args: Any) -> str:
    """The error an endpoint answers with; it must not leak anything."""
    message = app_error(lambda: client.predict(*args, api_name=endpoint))
    assert_clean(message)
    return message


def invalid(client: Any, text: str) -> str:
    """The live validation's message for TEXT, which must be an error and leak nothing."""
    shown = client.predict(text, api_name="/validate_recipe")
    assert shown.startswith("error: "), shown
    assert_clean(shown)
    return shown


# -- base: -----------------------------------------------------------------------------------------

BASES = {
    "relative": "../../outside/secret.yaml",
    "relative-to-workspace": "../outside/secret.yaml",
    "absolute": "{outside}/secret.yaml",
    "symlink": "link.yaml",
    "chain-of-two": "chain-a.yaml",
    "etc-passwd": "../../../../../../../../etc/passwd",
    "only-in-the-working-directory": "cwd-secret.yaml",
}


@pytest.mark.parametrize("ref", list(BASES.values()), ids=list(BASES))
def test_base_outside_the_workspace_is_refused(client: Any, form: list[Any], world: World, ref: str) -> None:
    text = f"base: {ref.format(outside=world.outside)}\ntraining: {{max_steps: 2}}\n"
    shown = invalid(client, text)
    assert "base: " in shown and "is not a recipe file inside the workspace" in shown
    assert "base: " in refused(client, "/apply_form", text, *form)
    assert "base: " in refused(client, "/save_recipe", "stolen", text)
    assert not (world.ws / "recipes" / "stolen.yaml").exists()


def test_bases_inside_the_workspace_and_shipped_still_work(client: Any, world: World) -> None:
    (world.ws / "recipes" / "good.yaml").write_text(RECIPE)
    for ref in ("good.yaml", "recipes/good.yaml", "sft-tiny.yaml"):
        assert client.predict(f"base: {ref}\n", api_name="/validate_recipe").startswith("ok: "), ref


# -- ${...} --------------------------------------------------------------------------------------

def resolver_cases() -> dict[str, str]:
    """Every resolver registered in OmegaConf (enumerated here, so a new one is tested too), plus
    nesting, an escape that only becomes an interpolation after the first resolution, a base file
    that interpolates, and a dynamic key."""
    from omegaconf.basecontainer import BaseContainer

    cases = {name: f"description: '${{{name}:{ENV_NAME}}}'\n" for name in sorted(BaseContainer._resolvers)}
    cases["nested"] = f"description: '${{oc.decode:${{oc.env:{ENV_NAME}}}}}'\n"
    cases["escaped"] = f"description: '\\${{oc.env:{ENV_NAME}}}'\n"
    cases["dynamic-key"] = f"description: '${{${{oc.env:{ENV_NAME}}}}}'\n"
    return cases


RESOLVERS = resolver_cases()


@pytest.mark.parametrize("line", list(RESOLVERS.values()), ids=list(RESOLVERS))
def test_resolvers_are_refused(client: Any, form: list[Any], line: str) -> None:
    text = RECIPE + line
    assert "is not allowed in a recipe from the web UI" in invalid(client, text)
    assert "is not allowed in a recipe from the web UI" in refused(client, "/apply_form", text, *form)


def test_resolver_in_a_base_is_refused(client: Any, form: list[Any]) -> None:
    assert "${oc.env:...} is not allowed" in invalid(client, "base: env-base.yaml\n")
    assert "${oc.env:...} is not allowed" in refused(client, "/apply_form", "base: env-base.yaml\n", *form)


def test_references_inside_the_recipe_still_resolve(client: Any, form: list[Any]) -> None:
    text = RECIPE.replace("{max_steps: 1}", "{max_steps: 3, save_steps: '${training.max_steps}'}")
    assert client.predict(text, api_name="/validate_recipe").startswith("ok: ")
    # A form edit keeps the reference as the user wrote it (the web UI edits the text, it never re-dumps
    # the resolved recipe), and it still resolves.
    values = [*form[:6], 5, *form[7:]]  # the form's max_steps, which save_steps refers to
    edited = client.predict(text, *values, api_name="/apply_form")
    training = yaml.safe_load(edited)["training"]
    assert training["max_steps"] == 5 and training["save_steps"] == "${training.max_steps}"
    assert client.predict(edited, api_name="/validate_recipe").startswith("ok: ")


# -- path-valued keys ------------------------------------------------------------------------------

PATHS = {  # case: (the recipe's sections, the key the refusal must name)
    "data.path": ("data: {{path: {outside}/secret.jsonl}}", "data.path"),
    "data.path-relative": ("data: {{path: ../outside/secret.jsonl}}", "data.path"),
    "data.path-symlink": ("data: {{path: data-link/secret.jsonl}}", "data.path"),
    "data.path-package": ("data: {{path: 'package:../../outside/secret.jsonl'}}", "data.path"),
    "data.datasets.path": ("data: {{datasets: [{{path: {outside}/secret.jsonl}}]}}", "data.datasets[0].path"),
    "data.registry": ("data: {{name: stolen, registry: [{outside}/registry.json]}}", "data.registry[0]"),
    "registry-entry-path": ("data: {{name: evil, registry: [evil-registry.json]}}", "entry 'evil': path"),
    "output_dir": ("output_dir: {outside}/run", "output_dir"),
    "model.name": ("model: {{name: {outside}/model}}", "model.name"),
    "reward.model": ("stage: rs\nreward: {{type: reward_model, model: {outside}/model}}", "reward.model"),
    "reward.components.model": ("stage: rs\nreward: {{type: mix, components: [{{type: classifier, "
                                "model: {outside}/model}}]}}", "reward.components[0].model"),
    "ppo.value_model_path": ("stage: ppo\nreward: {{type: rule, function: 'llmtune.rewards.rules:target_length'}}\n"
                             "ppo: {{value_model: separate, value_model_path: {outside}/model}}", "ppo.value_model_path"),
    "distributed.deepspeed_config": ("distributed: {{strategy: deepspeed, deepspeed_config: {outside}/ds.json}}",
                                     "distributed.deepspeed_config"),
    "distributed.accelerate_config": ("distributed: {{strategy: ddp, accelerate_config: {outside}/accelerate.yaml}}",
                                      "distributed.accelerate_config"),
    "distributed.hostfile": ("distributed: {{strategy: deepspeed, num_nodes: 2, main_process_ip: 10.0.0.1, "
                             "hostfile: {outside}/hostfile}}", "distributed.hostfile"),
    "through-a-base": ("base: inner-path.yaml", "data.path"),
}


def recipe_with(sections: str, outside: Path) -> str:
    """RECIPE with SECTIONS (formatted with OUTSIDE) replacing its own."""
    data = yaml.safe_load(RECIPE)
    data.update(yaml.safe_load(sections.format(outside=outside)))
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("case", list(PATHS))
def test_path_keys_outside_the_workspace_are_refused(client: Any, world: World, case: str) -> None:
    sections, key = PATHS[case]
    text = recipe_with(sections, world.outside)
    for message in (invalid(client, text), refused(client, "/launch_run", f"attack-{case}", text)):
        assert f"{key}: " in message, message
        assert "outside the workspace" in message or "leaves the data shipped with llmtune" in message, message
    assert not (world.ws / "runs" / f"attack-{case}").exists()


# -- models ----------------------------------------------------------------------------------------

MODELS = {
    "missing-in-workspace": ("runs/quickstart", "no model 'runs/quickstart' in the workspace"),
    "name-only-in-working-directory": ("local-model", "unknown model 'local-model'"),
    "dot-dot-inside": ("llmtune/../runs/quickstart", "contains '..'"),
    "dot-dot-outside": ("runs/../../outside/model", "contains '..'"),
    "absolute-outside": ("{outside}/model", "is outside the workspace"),
    "hub-id": ("openai-community/gpt2", "no model 'openai-community/gpt2' in the workspace"),
}


@pytest.mark.parametrize("name,expected", list(MODELS.values()), ids=list(MODELS))
def test_model_names_are_confined(client: Any, world: World, name: str, expected: str) -> None:
    name = name.format(outside=world.outside)
    assert expected in refused(client, "/chat", [name], "hi", 8, 0, 1, 0)
    assert expected in refused(client, "/compare", [name, "tiny-llama"], "demo", None, 2, 8, 0, 0)
    assert expected in refused(client, "/reward_accuracy", name, "demo", 2)
    assert expected in invalid(client, RECIPE.replace("tiny-llama", json.dumps(name)))


# -- rule rewards ----------------------------------------------------------------------------------

RULES = ["this:s", "os:system", "subprocess:run", "llmtune.cli:main"]


@pytest.mark.parametrize("function", RULES)
def test_rule_rewards_from_other_modules_are_refused_before_import(client: Any, world: World, function: str) -> None:
    module = function.split(":")[0]
    message = refused(client, "/compare", ["tiny-llama", "tiny-gptj"], "demo", f"rule:{function}", 2, 8, 0, 0)
    assert f"module '{module}' is not allowed from the web UI" in message
    text = RECIPE.replace("stage: sft", "stage: rs") + f"reward: {{type: rule, function: '{function}'}}\n"
    assert f"module '{module}' is not allowed" in invalid(client, text)
    assert f"module '{module}' is not allowed" in refused(client, "/launch_run", "attack-rule", text)
    assert ZEN not in world.server.log.read_text()


# -- what a run enforces by itself -----------------------------------------------------------------

PLANTED = {  # case: (the recipe's sections, what the run's refusal says)
    "data-path": ("data: {{path: {outside}/secret.jsonl}}", "data.path: "),
    "env": ("description: '${{oc.env:" + ENV_NAME + "}}'", "${oc.env:...} is not allowed"),
    "rule": ("stage: rs\nreward: {{type: rule, function: 'this:s'}}", "module 'this' is not allowed"),
    "pipeline": ("stages: {{sft: {{description: '${{oc.env:" + ENV_NAME + "}}'}}}}", "pipelines (stages:) run with"),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_a_run_refuses_what_the_ui_refuses(client: Any, world: World, case: str) -> None:
    """An interrupted run whose recipe.yaml was planted (as by a shell user), resumed from the UI: the
    `llmtune train` child is confined too and stops with the same refusal, leaking nothing."""
    sections, expected = PLANTED[case]
    run = world.ws / "runs" / f"planted-{case}"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe_with(sections, world.outside))
    (run / "run.json").write_text(json.dumps({"status": "interrupted"}))
    assert "resuming" in client.predict(run.name, api_name="/resume_run")
    launcher = json.loads((run / "launcher.json").read_text())
    wait_for(lambda: not pid_alive(launcher["pid"]), 120, f"the {run.name} run to exit")
    _progress, _plot, log, details = client.predict(run.name, api_name="/run_status")
    assert expected in log, (details, log)
    assert_clean(log)
    assert_clean(details)
    assert_clean((run / "console.log").read_text())
    assert not (run / "model").exists()


# -- the UI process itself -------------------------------------------------------------------------

def test_no_analytics_and_no_file_route_outside(world: World, client: Any) -> None:
    assert client.config["analytics_enabled"] is False
    with httpx.Client(base_url=world.server.url, timeout=30) as http:
        assert http.post("login", data={"username": AUTH[0], "password": AUTH[1]}).status_code == 200
        for path in (world.outside / "secret.yaml", world.cwd / "cwd-secret.yaml"):
            got = http.get(f"gradio_api/file={path}")
            assert got.status_code >= 400
            assert_clean(got.text)


def test_ui_survives_and_its_logs_are_clean(world: World, client: Any) -> None:
    """Runs last in this module: the UI still serves and nothing it shows holds a secret."""
    assert "shipped/sft-tiny.yaml" in client.predict(api_name="/list_recipes")
    for row in client.predict(api_name="/list_runs"):
        assert_clean(row)
        assert_clean(client.predict(row[0], api_name="/run_status"))
    assert world.server.proc.poll() is None
    log = world.server.log.read_text()
    assert_clean(log)
    assert "gradio.live" not in log and "public URL" not in log  # --share stays off unless asked
    for log in world.ws.glob("runs/*/console.log"):
        assert_clean(log.read_text())


# == llmtune serve =================================================================================

API_KEY = "serve-key"
HELLO = [{"role": "user", "content": "Hi"}]
SYSTEM_ONLY = [{"role": "system", "content": "You are terse."}]


@dataclass
class Served:
    url: str
    local: Path  # a model directory served by absolute path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from llmtune.registry.tiny import materialize

    local = materialize("tiny-llama")
    cwd = tmp_path_factory.mktemp("serve-cwd")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "serve", "tiny-llama", "--name", f"local={local}",
                             "--port", "0", "--api-key", API_KEY, "--max-tokens", "4"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield Served(line.split("listening on ")[1].split()[0].removesuffix("/v1"), local)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def still_serving(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    out = http.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": HELLO, "max_tokens": 2})
    assert out.status_code == 200, out.text


def openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_system_only_conversation_is_a_400(http: httpx.Client, stream: bool) -> None:
    out = http.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": SYSTEM_ONLY, "stream": stream})
    assert openai_error(out, 400, "invalid_value")["param"] == "messages"
    still_serving(http)


def deep_json(depth: int) -> bytes:
    return b'{"model": "tiny-llama", "messages": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_a_400(http: httpx.Client, depth: int) -> None:
    openai_error(http.post("/v1/chat/completions", content=deep_json(depth)), 400, "invalid_json")
    still_serving(http)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_10_mb_body_is_refused_at_once(http: httpx.Client, chunked: bool) -> None:
    body = b'{"model": "tiny-llama", "messages": "' + b"x" * (10 * 2**20) + b'"}'
    content: Any = (body[i:i + 2**16] for i in range(0, len(body), 2**16)) if chunked else body
    start = time.perf_counter()
    out = http.post("/v1/chat/completions", content=content)
    took = time.perf_counter() - start
    openai_error(out, 413, "request_too_large")
    assert took < 1.0, f"took {took:.2f} s"
    still_serving(http)


@pytest.mark.parametrize("header,status", [("bearer", 200), ("BEARER", 200), ("Bearer ", 200), ("Basic", 401),
                                           ("", 401)], ids=["lower", "upper", "extra-space", "basic", "none"])
def test_bearer_scheme_is_case_insensitive(served: Served, header: str, status: int) -> None:
    auth = f"{header} {API_KEY}" if header else ""
    out = httpx.get(served.url + "/v1/models", headers={"Authorization": auth} if auth else {}, timeout=30)
    assert out.status_code == status, out.text
    if status == 401:
        openai_error(out, 401, "invalid_api_key")


def test_no_absolute_paths_in_responses(http: httpx.Client, served: Served) -> None:
    models = http.get("/v1/models")
    assert models.status_code == 200
    by_id = {m["id"]: m for m in models.json()["data"]}
    assert by_id["local"]["llmtune"]["ref"] == served.local.name
    assert str(served.local) not in models.text and str(ROOT) not in models.text

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    assert not [s for s in strings(models.json()) if s.startswith("/")]
    for response in (http.get("/health"), http.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO}),
                     http.post("/v1/chat/completions", json={"model": "local", "messages": SYSTEM_ONLY})):
        assert str(served.local) not in response.text and str(ROOT) not in response.text


def test_a_failing_stream_sends_an_error_event_and_done() -> None:
    """The stream of a generation that fails on the engine (a system-only conversation renders no
    prompt for tiny-llama; the HTTP layer refuses it earlier) still ends with an error event and
    [DONE], in the server's own code path."""
    from llmtune.serve.api import Server
    from llmtune.serve.engine import Engine, Settings

    engine = Engine.load("tiny-llama")
    try:
        events = list(Server([engine]).stream(engine, SYSTEM_ONLY, Settings(max_new_tokens=2), include_usage=True))
    finally:
        engine.close()
    assert events[-1] == "data: [DONE]\n\n"
    errors = [json.loads(e[len("data: "):])["error"] for e in events[:-1] if '"error"' in e]
    assert len(errors) == 1 and errors[0]["code"] == "internal_error" and errors[0]["type"] == "server_error"
    assert "/" not in errors[0]["message"]
