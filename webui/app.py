"""The Gradio app: Recipes, Runs, Chat & compare (with feedback) and Evaluate tabs.

Every button is also a named API endpoint (`api_name`), so anything done by clicking can be scripted
with `gradio_client` (see webui/README.md). The UI keeps no state of its own besides loaded models
and each browser tab's chat: recipes, runs and votes live in the workspace on disk, which is why
several tabs, a reload or a restart all see the same thing.
"""

from __future__ import annotations

import functools
import html
import string
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from llmtune.config.schema import STAGES, DataSection, ModelSection, TrainingSection
from llmtune.errors import LLMTuneError
from webui.chat import ModelPool
from webui.evaluate import compare_models, confine_judge, reward_model_accuracy
from webui.feedback import parse_ranking, vote_rows
from webui.workspace import RUN_COLUMNS, Workspace

MAX_SLOTS = 4
LETTERS = string.ascii_uppercase[:MAX_SLOTS]
PLOT_KEYS = ("loss", "eval_loss")
PLOT_WORDS = ("reward", "kl")  # PPO/DPO curves: rewards/chosen, objective/kl, ...
FORM_KEYS = ("stage", "model.name", "data.name", "model.finetuning", "training.learning_rate", "training.epochs",
             "training.max_steps", "training.batch_size", "data.max_length", "model.lora.r",
             "distributed.strategy")


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors (bad recipe, path outside the workspace, ...) become a Gradio error message (a
    toast in the browser, an exception with the same text in gradio_client) instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LLMTuneError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapper


def guarded_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """`guarded` for generator handlers (streamed chat)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from fn(*args, **kwargs)
        except LLMTuneError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapper


def _get(data: dict[str, Any], dotted: str, default: Any) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def form_defaults() -> dict[str, Any]:
    """What each form key means when a recipe leaves it out: the schema's defaults."""
    t, m, d = TrainingSection(), ModelSection(name=""), DataSection()
    return {"stage": "sft", "model.name": None, "data.name": None, "model.finetuning": m.finetuning,
            "training.learning_rate": t.learning_rate, "training.epochs": t.epochs,
            "training.max_steps": t.max_steps, "training.batch_size": t.batch_size,
            "data.max_length": d.max_length, "model.lora.r": m.lora.r, "distributed.strategy": "none"}


def form_values(data: dict[str, Any]) -> list[Any]:
    """The form fields' values for a recipe dict; missing keys show the schema's defaults."""
    defaults = form_defaults()
    values = [_get(data, key, defaults[key]) for key in FORM_KEYS]
    values[-1] = values[-1] == "deepspeed"
    return values


def apply_form(ws: Workspace, text: str, *values: Any) -> str:
    """The recipe text with the form's values written into it. Other keys are kept, and a key the
    recipe leaves out is only added when the form moves it away from its default (tidy YAML)."""
    data = ws.recipe_dict(text) if text.strip() else {}
    defaults = form_defaults()
    for key, value in zip(FORM_KEYS, values):
        if key == "distributed.strategy":
            current = _get(data, key, "none")
            value = "deepspeed" if value else ("none" if current == "deepspeed" else current)
        elif value in (None, ""):
            continue
        elif key in ("training.max_steps", "training.batch_size", "data.max_length", "model.lora.r"):
            value = int(value)
        elif key in ("training.learning_rate", "training.epochs"):
            value = float(value)
        missing = _get(data, key, None) is None
        if missing and value == defaults[key]:
            continue
        if key == "data.name" and _get(data, key, None) != value:
            data.setdefault("data", {}).pop("path", None)
            data["data"].pop("datasets", None)
        _set(data, key, value)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def validation_text(ws: Workspace, text: str) -> str:
    """What `llmtune validate` prints for this recipe: `ok: ...` or `error: ...`."""
    try:
        recipe = ws.validate(text)
    except LLMTuneError as exc:
        return f"error: {exc}"
    return f"ok: recipe (stage {recipe.stage}, model {recipe.model.name})"


def metrics_frame(rows: list[dict[str, Any]]) -> Any:
    """Long-format DataFrame (step, value, metric) of the curves worth plotting; None before any."""
    import pandas as pd

    points = [(r["step"], float(v), k) for r in rows for k, v in r.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)
              and (k in PLOT_KEYS or any(w in k for w in PLOT_WORDS))]
    if not points:
        return None  # an empty frame would freeze the plot's colour legend empty (Gradio 6.31 frontend)
    return pd.DataFrame(points, columns=["step", "value", "metric"])


def progress_html(row: Any) -> str:
    step, total = row.step or 0, row.max_steps
    bar = f'<progress value="{step}" max="{total}"></progress>' if total else "<progress></progress>"
    label = f"{step}/{total} steps" if total else f"step {step}"
    return (f'<div id="run-progress" data-status="{html.escape(row.status)}" data-step="{step}" '
            f'data-total="{total or ""}">{bar} <b>{html.escape(row.status)}</b> {label}</div>')


def default_run_name() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


class App:
    """Handlers bound to one workspace and one pool of loaded models."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.pool = ModelPool()

    # -- recipes ----------------------------------------------------------------------------------
    def load_recipe(self, ref: str) -> list[Any]:
        text = self.ws.read_recipe(ref)
        return [text, *form_values(self.ws.recipe_dict(text, ref))]

    def save_recipe(self, name: str, text: str) -> tuple[str, Any]:
        path = self.ws.save_recipe(name, text)
        ref = self.ws.relative(path)
        return f"saved {ref}", gr.Dropdown(choices=self.ws.list_recipes(), value=ref)

    def dataset_choices(self) -> list[str]:
        from llmtune.data.registry import list_entries

        extra = [str(self.ws.registry_file)] if self.ws.registry_file.exists() else []
        try:
            return sorted(list_entries(extra))
        except LLMTuneError:
            return sorted(list_entries())

    # -- runs -------------------------------------------------------------------------------------
    def runs_table(self) -> list[list[Any]]:
        return [r.as_list() for r in self.ws.list_runs()]

    def launch(self, name: str, text: str) -> tuple[str, Any, list[list[Any]], str]:
        path = self.ws.launch(name, text)
        names = [r.name for r in self.ws.list_runs()]
        return (f"launched run {path.name}: `llmtune train runs/{path.name}/launch.yaml --output-dir "
                f"runs/{path.name} --force` (detached; log in runs/{path.name}/console.log)",
                gr.Dropdown(choices=names, value=path.name), self.runs_table(), default_run_name())

    def run_status(self, name: str | None) -> tuple[str, Any, str, dict[str, Any]]:
        if not name:
            return "", None, "", {}
        path = self.ws.run_path(name)
        if not path.is_dir():
            return "", None, "", {"error": f"no run named {name}"}
        row = self.ws.run_row(path)
        from llmtune.runs.rundir import RunDir

        details = {**vars(row), "run_json": RunDir(path).info()}
        return progress_html(row), metrics_frame(self.ws.metrics(name)), self.ws.log_tail(name), details

    def tick(self, name: str | None) -> tuple[Any, ...]:
        """The timer's refresh; a bad run name shows in the details instead of a toast every 2 s."""
        names = [r.name for r in self.ws.list_runs()]
        try:
            status = self.run_status(name)
        except LLMTuneError as exc:
            status = ("", None, "", {"error": str(exc)})
        return (self.runs_table(), gr.Dropdown(choices=names), *status)

    def stop(self, name: str) -> str:
        return self.ws.stop(name)

    def resume(self, name: str) -> str:
        path = self.ws.resume(name)
        return f"resuming run {path.name} from its last checkpoint (`llmtune train ... --resume`)"

    # -- chat & feedback --------------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        from llmtune.registry.models import registry_models

        return self.ws.trained_models() + sorted(registry_models())

    def model_ref(self, choice: str) -> str:
        """A registry name as is; anything else is a model directory inside the workspace (runs/NAME),
        as an absolute path. Nothing falls through to the working directory or the hub."""
        return self.ws.policy.model(choice, "model")

    def chat(self, models: list[str], message: str, conv: dict[str, Any], max_new_tokens: int,
             temperature: float, top_p: float, seed: float | None) -> Iterator[tuple[Any, ...]]:
        models = list(models or [])
        if not 1 <= len(models) <= MAX_SLOTS:
            raise gr.Error(f"choose between 1 and {MAX_SLOTS} models to chat with", print_exception=False)
        if not (message or "").strip():
            raise gr.Error("type a message first", print_exception=False)
        refs = [self.model_ref(m) for m in models]
        if not conv or conv.get("models") != models:
            conv = {"models": models, "histories": [[] for _ in models]}
        # `complete` turns true only once every model has answered: a vote needs all the answers.
        conv = {**conv, "voted": False, "complete": False,
                "histories": [[*h, {"role": "user", "content": message}] for h in conv["histories"]]}
        base = [list(h) for h in conv["histories"]]
        for i, (ref, name) in enumerate(zip(refs, models)):
            answer = ""
            conv["histories"][i] = [*base[i], {"role": "assistant", "content": ""}]
            yield self._chat_outputs(conv, "", f"{LETTERS[i]} ({name}) is answering…")
            for delta in self.pool.stream(ref, name, base[i], int(max_new_tokens), float(temperature),
                                          float(top_p), None if seed in (None, "") else int(seed)):
                answer += delta
                conv["histories"][i][-1] = {"role": "assistant", "content": answer}
                yield self._chat_outputs(conv, "", f"{LETTERS[i]} ({name}) is answering…")
        conv["complete"] = True
        yield self._chat_outputs(conv, "", f"all {len(models)} answers are in")

    def _chat_outputs(self, conv: dict[str, Any], message: str, status: str) -> tuple[Any, ...]:
        boxes = []
        for i in range(MAX_SLOTS):
            if i < len(conv["models"]):
                boxes.append(gr.Chatbot(value=conv["histories"][i], label=f"{LETTERS[i]}: {conv['models'][i]}",
                                        visible=True))
            else:
                boxes.append(gr.Chatbot(value=[], visible=False))
        return (conv, message, status, *boxes)

    def new_chat(self) -> tuple[Any, ...]:
        return self._chat_outputs({"models": [], "histories": []}, "", "")

    def vote(self, ranking: str, conv: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        if not conv or not conv.get("histories") or not conv["histories"][0]:
            raise gr.Error("nothing to vote on: send a message to two or more models first", print_exception=False)
        if len(conv["models"]) < 2:
            raise gr.Error("voting needs answers from at least two models", print_exception=False)
        if not conv.get("complete"):
            raise gr.Error("wait until every model has answered before voting", print_exception=False)
        if conv.get("voted"):
            raise gr.Error("this turn already has a vote; send another message to vote again",
                           print_exception=False)
        groups = parse_ranking(ranking, len(conv["models"]))
        prefs, ties = vote_rows(conv["models"], conv["histories"], groups)
        self.ws.record_votes(prefs, ties)
        order = " > ".join("=".join(f"{LETTERS[i]} ({conv['models'][i]})" for i in g) for g in groups)
        return (f"recorded {order}: {len(prefs)} preference(s), {len(ties)} tie(s)", self.counter(),
                {**conv, "voted": True})

    def counter(self) -> str:
        prefs, ties = self.ws.feedback_counts()
        return (f"**{prefs}** preference pairs collected (+{ties} ties) in "
                f"`{self.ws.relative(self.ws.preferences_file)}`. Train on them with `data: {{name: feedback, "
                f"registry: [{self.ws.registry_file}]}}` in an rm or dpo recipe.")

    # -- evaluate ---------------------------------------------------------------------------------
    def compare(self, models: list[str], prompts: str, judge: str | None, n: float, max_new_tokens: float,
                temperature: float, seed: float) -> tuple[Any, dict[str, Any]]:
        refs = {m: self.model_ref(m) for m in models or []}
        table, headers, summary = compare_models(self.ws, refs, prompts, confine_judge(self.ws, judge or ""),
                                                 int(n), int(max_new_tokens), float(temperature), int(seed or 0))
        import pandas as pd

        return pd.DataFrame(table, columns=headers), summary

    def reward_accuracy(self, model: str, data: str, n: float) -> dict[str, Any]:
        if not model:
            raise gr.Error("choose a reward model (a run of stage rm)", print_exception=False)
        return reward_model_accuracy(self.ws, self.model_ref(model), data, int(n or 0))


def build(ws: Workspace) -> gr.Blocks:
    """The Blocks app for one workspace. It confines this process (and the runs it launches) to the
    workspace: recipes validated here may not reach outside it."""
    ws.policy.activate()
    app = App(ws)
    recipes = ws.list_recipes()
    first = "shipped/quickstart.yaml" if "shipped/quickstart.yaml" in recipes else (recipes or [None])[0]
    from llmtune.registry.models import registry_models

    with gr.Blocks(title="llmtune", analytics_enabled=False) as demo:
        gr.Markdown(f"## llmtune &nbsp;·&nbsp; workspace `{ws.root}`")
        with gr.Tabs():
            # ---------------------------------------------------------------- Recipes
            with gr.Tab("Recipes", id="recipes") as recipes_tab:
                with gr.Row():
                    recipe_pick = gr.Dropdown(choices=recipes, value=first, label="Recipe", scale=4,
                                              allow_custom_value=True, elem_id="recipe-pick")
                    load_btn = gr.Button("Load", scale=1, elem_id="load-recipe")
                with gr.Row():
                    with gr.Column(scale=2):
                        f_stage = gr.Dropdown(choices=list(STAGES), label="stage")
                        f_model = gr.Dropdown(choices=sorted(registry_models()), label="model.name",
                                              allow_custom_value=True)
                        f_data = gr.Dropdown(choices=app.dataset_choices(), label="data.name",
                                             allow_custom_value=True)
                        f_ft = gr.Radio(choices=["lora", "qlora", "full"], label="model.finetuning")
                        with gr.Row():
                            f_lr = gr.Number(label="training.learning_rate")
                            f_epochs = gr.Number(label="training.epochs")
                        with gr.Row():
                            f_steps = gr.Number(label="training.max_steps (-1: from epochs)", precision=0,
                                                elem_id="max-steps")
                            f_bs = gr.Number(label="training.batch_size", precision=0)
                        with gr.Row():
                            f_len = gr.Number(label="data.max_length", precision=0)
                            f_r = gr.Number(label="model.lora.r", precision=0)
                        f_ds = gr.Checkbox(label="DeepSpeed (distributed.strategy: deepspeed, CUDA only)")
                    with gr.Column(scale=3):
                        yaml_box = gr.Code(language="yaml", label="Recipe YAML (editable)", interactive=True,
                                           lines=22, elem_id="recipe-yaml")
                        validation = gr.Textbox(label="Validation (same as `llmtune validate`)", lines=3,
                                                interactive=False, elem_id="validation")
                with gr.Row():
                    save_name = gr.Textbox(label="Save as (name in the workspace's recipes/)", scale=3)
                    save_btn = gr.Button("Save recipe", scale=1)
                save_msg = gr.Markdown()
            form = [f_stage, f_model, f_data, f_ft, f_lr, f_epochs, f_steps, f_bs, f_len, f_r, f_ds]

            # ---------------------------------------------------------------- Runs
            with gr.Tab("Runs", id="runs"):
                with gr.Row():
                    run_name = gr.Textbox(value=default_run_name(), label="Run name (runs/NAME in the workspace)",
                                          scale=3, elem_id="run-name")
                    launch_btn = gr.Button("Launch the recipe of the Recipes tab", variant="primary", scale=2,
                                           elem_id="launch")
                launch_msg = gr.Markdown(elem_id="launch-msg")
                runs_df = gr.Dataframe(value=app.runs_table(), headers=RUN_COLUMNS, interactive=False,
                                       label="Runs (from disk: run.json + process liveness)", elem_id="runs-table")
                with gr.Row():
                    run_pick = gr.Dropdown(choices=[r.name for r in ws.list_runs()], value=None, label="Selected run", scale=3,
                                           allow_custom_value=True, elem_id="run-pick")
                    stop_btn = gr.Button("Stop (checkpoint)", scale=1, elem_id="stop-run")
                    resume_btn = gr.Button("Resume", scale=1, elem_id="resume-run")
                run_msg = gr.Markdown()
                progress = gr.HTML(elem_id="progress-box")
                plot = gr.LinePlot(x="step", y="value", color="metric", title="Training curves", height=300,
                                   elem_id="loss-plot")
                log_box = gr.Textbox(label="Log (console.log)", lines=14, max_lines=14, autoscroll=True,
                                     interactive=False, elem_id="run-log")
                with gr.Accordion("Run details (JSON)", open=False):
                    details = gr.JSON()
                timer = gr.Timer(2.0)

            # ---------------------------------------------------------------- Chat & compare
            with gr.Tab("Chat & compare", id="chat") as chat_tab:
                with gr.Row():
                    chat_models = gr.Dropdown(choices=app.model_choices(), multiselect=True, max_choices=MAX_SLOTS,
                                              allow_custom_value=True, scale=4, elem_id="chat-models",
                                              label="Models: trained runs (runs/NAME) or registry names; "
                                                    "2+ to compare side by side")
                    refresh_models = gr.Button("Refresh list", scale=1)
                with gr.Accordion("Generation settings", open=False):
                    with gr.Row():
                        g_tokens = gr.Slider(1, 512, value=48, step=1, label="max_new_tokens")
                        g_temp = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0: greedy)")
                        g_top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="top_p")
                        g_seed = gr.Number(value=None, precision=0, label="seed (empty: random)")
                with gr.Row():
                    bots = [gr.Chatbot(label=LETTERS[i], visible=i < 2, height=320, elem_id=f"answer-{LETTERS[i]}")
                            for i in range(MAX_SLOTS)]
                with gr.Row():
                    message = gr.Textbox(label="Message", placeholder="Ask all selected models…", scale=5,
                                         elem_id="chat-message")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    new = gr.Button("New conversation", scale=1)
                chat_status = gr.Markdown(elem_id="chat-status")
                gr.Markdown("**Which answer is better?** (for 3+ models type a ranking such as `B>A>C`, `=` for ties)")
                with gr.Row():
                    vote_a = gr.Button("A is better", elem_id="vote-a")
                    vote_tie = gr.Button("Tie", elem_id="vote-tie")
                    vote_b = gr.Button("B is better", elem_id="vote-b")
                    ranking = gr.Textbox(label="Ranking", placeholder="B>A>C", scale=2)
                    vote_rank = gr.Button("Submit ranking")
                vote_msg = gr.Markdown(elem_id="vote-msg")
                counter = gr.Markdown(app.counter(), elem_id="feedback-counter")
                conv = gr.State({"models": [], "histories": []})

            # ---------------------------------------------------------------- Evaluate
            with gr.Tab("Evaluate", id="evaluate") as eval_tab:
                gr.Markdown("**Compare** answers of several models to the same held-out prompts (`llmtune compare`), "
                            "optionally judged by a reward model; files go to the workspace's `evaluations/`.")
                with gr.Row():
                    e_models = gr.Dropdown(choices=app.model_choices(), multiselect=True, allow_custom_value=True,
                                           label="Models (2+)", scale=3, elem_id="eval-models")
                    e_judge = gr.Dropdown(choices=ws.trained_models(), value=None, allow_custom_value=True, scale=2,
                                          label="Judge: reward-model run (runs/NAME) or rule:module:function")
                with gr.Row():
                    e_prompts = gr.Textbox(value="demo", scale=3, label="Prompts: dataset name or a file in "
                                           "the workspace (canonical jsonl)")
                    e_n = gr.Number(value=8, precision=0, label="prompts", scale=1, elem_id="eval-n")
                    e_tokens = gr.Number(value=32, precision=0, label="max_new_tokens", scale=1)
                    e_temp = gr.Number(value=0, label="temperature (0: greedy)", scale=1)
                    e_seed = gr.Number(value=0, precision=0, label="seed", scale=1)
                e_btn = gr.Button("Compare", variant="primary", elem_id="compare")
                e_table = gr.Dataframe(headers=["prompt", "answers"], interactive=False, wrap=True,
                                       label="Answers (and judge scores)", elem_id="compare-table")
                e_summary = gr.JSON(label="Summary: mean scores, win/tie/loss matrix")
                gr.Markdown("**Reward-model accuracy** on preference pairs (`llmtune eval reward-accuracy`), e.g. "
                            "on the feedback collected in the Chat tab.")
                with gr.Row():
                    a_model = gr.Dropdown(choices=ws.trained_models(), value=None, allow_custom_value=True,
                                          label="Reward model (runs/NAME of stage rm)", scale=3)
                    a_data = gr.Textbox(value="feedback", label="Preference data: dataset name or workspace file",
                                        scale=3)
                    a_n = gr.Number(value=0, precision=0, label="pairs (0: all)", scale=1)
                a_btn = gr.Button("Score accuracy")
                a_result = gr.JSON(label="Accuracy")

        # ------------------------------------------------------------------ events
        load_out = [yaml_box, *form]
        load_btn.click(guarded(app.load_recipe), [recipe_pick], load_out, api_name="load_recipe")
        recipe_pick.input(guarded(app.load_recipe), [recipe_pick], load_out, api_visibility="private")
        demo.load(guarded(app.load_recipe), [recipe_pick], load_out, api_visibility="private")
        gr.on([f.input for f in form], guarded(functools.partial(apply_form, ws)), [yaml_box, *form], [yaml_box],
              api_name="apply_form")
        yaml_box.change(functools.partial(validation_text, ws), [yaml_box], [validation], api_name="validate_recipe")
        save_btn.click(guarded(app.save_recipe), [save_name, yaml_box], [save_msg, recipe_pick],
                       api_name="save_recipe")
        gr.api(ws.list_recipes, api_name="list_recipes")
        # Other tabs and processes add recipes and the `feedback` dataset: refresh the lists on entry.
        recipes_tab.select(lambda: (gr.Dropdown(choices=ws.list_recipes()), gr.Dropdown(choices=app.dataset_choices())),
                           None, [recipe_pick, f_data], api_visibility="private", show_progress="hidden")

        launch_btn.click(guarded(app.launch), [run_name, yaml_box], [launch_msg, run_pick, runs_df, run_name],
                         api_name="launch_run")
        status_out = [progress, plot, log_box, details]
        run_pick.change(guarded(app.run_status), [run_pick], status_out, api_name="run_status")
        timer.tick(app.tick, [run_pick], [runs_df, run_pick, *status_out], api_visibility="private",
                   show_progress="hidden")
        stop_btn.click(guarded(app.stop), [run_pick], [run_msg], api_name="stop_run")
        resume_btn.click(guarded(app.resume), [run_pick], [run_msg], api_name="resume_run")
        gr.api(app.runs_table, api_name="list_runs")

        def refresh() -> tuple[Any, ...]:
            choices, runs = app.model_choices(), ws.trained_models()
            return (gr.Dropdown(choices=choices), gr.Dropdown(choices=choices), gr.Dropdown(choices=runs),
                    gr.Dropdown(choices=runs))

        model_lists = [chat_models, e_models, e_judge, a_model]
        refresh_models.click(refresh, None, model_lists, api_name="list_models")
        gr.on([chat_tab.select, eval_tab.select], refresh, None, model_lists, api_visibility="private",
              show_progress="hidden")
        chat_out = [conv, message, chat_status, *bots]
        chat_in = [chat_models, message, conv, g_tokens, g_temp, g_top_p, g_seed]
        send.click(guarded_stream(app.chat), chat_in, chat_out, api_name="chat")
        message.submit(guarded_stream(app.chat), chat_in, chat_out, api_visibility="private")
        new.click(app.new_chat, None, chat_out, api_name="new_chat")
        vote_out = [vote_msg, counter, conv]
        vote_rank.click(guarded(app.vote), [ranking, conv], vote_out, api_name="vote")
        for btn, choice in ((vote_a, "A"), (vote_tie, "tie"), (vote_b, "B")):
            btn.click(guarded(functools.partial(app.vote, choice)), [conv], vote_out, api_visibility="private")
        gr.api(ws.feedback_counts, api_name="feedback_count")

        e_btn.click(guarded(app.compare), [e_models, e_prompts, e_judge, e_n, e_tokens, e_temp, e_seed],
                    [e_table, e_summary], api_name="compare")
        a_btn.click(guarded(app.reward_accuracy), [a_model, a_data, a_n], [a_result], api_name="reward_accuracy")
    return demo


def launch(workspace: str | Path, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           auth: tuple[str, str] | None = None, rule_modules: tuple[str, ...] = ()) -> None:
    """Serve the UI (blocking)."""
    demo = build(Workspace(workspace, rule_modules))
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, share=share, auth=auth, show_error=False,
                footer_links=["api", "gradio"])
