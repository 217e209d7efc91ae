"""The Gradio app: Recipes, Runs, Rollouts, Chat & compare, Feedback and Evaluate tabs.

Every action is also a named API endpoint (`api_name`), so anything done by clicking can be scripted
with `gradio_client` (see webui/README.md). The UI keeps no state of its own besides loaded models
and each browser tab's chat: recipes, runs and labels live in the workspace on disk, which is why
several tabs, a reload or a restart all see the same thing.

The loop it closes: a run's rollouts (or a side-by-side chat) → labels into the feedback dataset →
"Train on this feedback" (a dpo or rm recipe on a frozen snapshot of the labels) → launch → "Compare
with its parent" → the win/tie/loss matrix.

A failing action shows its message once (a toast) and marks only the message line next to the
button that started it (`show_progress_on`), never every output of the action.
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

from llmtune.config.schema import STAGES
from llmtune.errors import LLMTuneError
from webui import evaluate, plots, recipes, rollouts
from webui.chat import ModelPool
from webui.feedback import parse_ranking, retrain_recipe, vote_rows, written_rows
from webui.workspace import RUN_COLUMNS, SHIPPED, Workspace

MAX_SLOTS = 4
LETTERS = string.ascii_uppercase[:MAX_SLOTS]
PLOT_KEYS = ("loss", "eval_loss")
PLOT_WORDS = ("reward", "kl")  # PPO/DPO curves: rewards/chosen, objective/kl, ...


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


def validation_text(ws: Workspace, text: str) -> str:
    """What `llmtune validate` prints for this recipe: `ok: ...` or `error: ...`."""
    try:
        recipe = ws.validate(text)
    except LLMTuneError as exc:
        return f"error: {exc}"
    return f"ok: recipe (stage {recipe.stage}, model {recipe.model.name})"


def validation_html(text: str) -> str:
    """The validation message as a green ok or a red error box (data-state says which)."""
    state = "ok" if text.startswith("ok:") else "error"
    colour = ("#e8f6e8", "#1b6e1b") if state == "ok" else ("#fdecec", "#a31515")
    return (f"<div id='validation-result' data-state='{state}' style='background:{colour[0]};color:{colour[1]};"
            f"border:1px solid {colour[1]};border-radius:6px;padding:.5em .8em;white-space:pre-wrap;"
            f"font-family:monospace'>{html.escape(text)}</div>")


def metric_points(rows: list[dict[str, Any]]) -> list[tuple[Any, float, str]]:
    """(step, value, metric) of the curves worth plotting."""
    return [(r["step"], float(v), k) for r in rows for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and (k in PLOT_KEYS or any(w in k for w in PLOT_WORDS))]


def curves_html(rows: list[dict[str, Any]]) -> str:
    return plots.chart(metric_points(rows), "Training curves", "loss-chart",
                       "no metrics logged yet: the curves appear with the first logged step")


def progress_html(row: Any) -> str:
    step, total = row.step or 0, row.max_steps
    bar = f'<progress value="{step}" max="{total}"></progress>' if total else "<progress></progress>"
    label = f"{step}/{total} steps" if total else f"step {step}"
    return (f'<div id="run-progress" data-status="{html.escape(row.status)}" data-step="{step}" '
            f'data-total="{total or ""}">{bar} <b>{html.escape(row.status)}</b> {label}</div>')


def default_run_name(prefix: str = "run") -> str:
    return time.strftime(f"{prefix}-%Y%m%d-%H%M%S")


class App:
    """Handlers bound to one workspace and one pool of loaded models."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.pool = ModelPool()
        self.hints = recipes.RecipeHints()

    # -- recipes ----------------------------------------------------------------------------------
    def load_recipe(self, ref: str) -> list[Any]:
        text = self.ws.read_recipe(ref)
        return [text, *recipes.form_values(self.ws.recipe_dict(text, ref))]

    def apply_form(self, text: str, *values: Any) -> str:
        """The recipe text with the form's values written in (comments and number spellings kept)."""
        merged = self.ws.recipe_dict(text) if text.strip() else {}
        return recipes.edit_text(text, merged, list(values))

    def sync_form(self, text: str, *values: Any) -> list[Any]:
        """After an edit: a cleared field shows the value the recipe now has (its default or base)."""
        try:
            merged = self.ws.recipe_dict(text) if text.strip() else {}
        except LLMTuneError:
            return [gr.skip() for _ in values]
        shown = recipes.form_values(merged)
        return [new if old is None or old == "" else gr.skip() for old, new in zip(values, shown)]

    def recipe_choices(self) -> Any:
        """The recipe list labelled with plan's estimate (model size, memory, CPU or GPU)."""
        return gr.Dropdown(choices=[(self.recipe_label(ref), ref) for ref in self.ws.list_recipes()])

    def recipe_label(self, ref: str) -> str:
        try:
            hint = self.hints.hint(self.ws.recipe_path(ref))
        except (LLMTuneError, OSError):
            return ref
        return f"{ref}  ·  {hint['text']}"

    def recipe_hint(self, ref: str | None) -> str:
        if not ref:
            return ""
        try:
            hint = self.hints.hint(self.ws.recipe_path(ref))
        except (LLMTuneError, OSError):
            return ""
        return f"<span id='recipe-hint' data-where='{html.escape(hint['where'])}'>{html.escape(hint['text'])}</span>"

    def save_recipe(self, name: str, text: str) -> tuple[str, Any]:
        path = self.ws.save_recipe(name, text)
        ref = self.ws.relative(path)
        return f"saved {ref}", gr.Dropdown(choices=self.ws.list_recipes(), value=ref)

    def dataset_choices(self) -> list[str]:
        from llmtune.data.registry import list_entries

        try:
            return sorted(list_entries(self.ws.registries()))
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
            return "", "", "", {}
        path = self.ws.run_path(name)
        if not path.is_dir():
            return "", "", "", {"error": f"no run named {name}"}
        row = self.ws.run_row(path)
        from llmtune.runs.rundir import RunDir

        details = {**vars(row), "run_json": RunDir(path).info(), "parent": self.ws.parent_of(name),
                   "feedback_snapshot": self.ws.snapshot_of(name)}
        return progress_html(row), curves_html(self.ws.metrics(name)), self.ws.log_tail(name), details

    def tick(self, name: str | None) -> tuple[Any, ...]:
        """The timer's refresh; a bad run name shows in the details instead of a toast every 2 s."""
        names = [r.name for r in self.ws.list_runs()]
        try:
            status = self.run_status(name)
        except LLMTuneError as exc:
            status = ("", "", "", {"error": str(exc)})
        return (self.runs_table(), gr.Dropdown(choices=names), *status, self.lineage(name))

    def stop(self, name: str) -> str:
        return self.ws.stop(name)

    def resume(self, name: str) -> str:
        path = self.ws.resume(name)
        return f"resuming run {path.name} (`llmtune train ...`; see its log)"

    def lineage(self, name: str | None) -> str:
        """Where the selected run comes from: its parent model and the feedback snapshot it learned from."""
        if not name:
            return ""
        try:
            parent, snap = self.ws.parent_of(name), self.ws.snapshot_of(name)
        except LLMTuneError:
            return ""
        parts = [f"started from `{parent}`" if parent else ""]
        if snap:
            parts.append(f"trained on feedback snapshot `{snap['name']}` ({snap['count']} pairs, sha256 "
                         f"`{snap['sha256'][:12]}`, {snap['created']})")
        return "; ".join(p for p in parts if p)

    def compare_parent(self, name: str) -> tuple[Any, ...]:
        """Evaluate (and Chat) with the run and the model it started from selected; the judge is the
        reward its lineage was trained for, when there is one."""
        if not name:
            raise gr.Error("select a run first", print_exception=False)
        parent = self.ws.parent_of(name)
        if parent is None:
            raise gr.Error(f"run {name}: started from no model the UI can load (a registry model or runs/NAME)",
                           print_exception=False)
        child = f"runs/{name}"
        if child not in self.ws.trained_models():
            raise gr.Error(f"run {name}: has no final model yet; wait until it completes", print_exception=False)
        judge = self.ws.lineage_judge(name)
        choices = self.model_choices()
        return (gr.Tabs(selected="evaluate"), gr.Dropdown(choices=choices, value=[child, parent]),
                gr.Dropdown(choices=choices, value=[child, parent]),
                gr.Dropdown(choices=self.judge_choices(), value=judge),
                f"comparing {child} with its parent {parent}" + (f", judged by {judge}" if judge else ""))

    # -- rollouts ---------------------------------------------------------------------------------
    def rollout_runs(self) -> list[str]:
        return [r.name for r in self.ws.list_runs() if rollout_files_exist(self.ws.runs_dir / r.name)]

    def rollouts_view(self, name: str | None, text: str, step: str, sort: str) -> tuple[Any, ...]:
        samples = self.ws.rollouts(name) if name else []
        headers, rows = rollouts.table(samples, text, step, sort)
        import pandas as pd

        metrics = self.ws.metrics(name) if name else []
        charts = rollouts.curves(metrics, samples)
        return (pd.DataFrame(rows, columns=headers), gr.Dropdown(choices=rollouts.steps(samples)),
                f"{len(rows)} of {len(samples)} samples",
                *(plots.chart(charts[key], title, f"rollout-chart-{key}") for key, title in rollouts.CHARTS_TITLES))

    def pick_sample(self, a: str, b: str, evt: gr.SelectData) -> tuple[str, str]:
        """A click on a table row fills A, then B (a third click starts a new pair)."""
        row = evt.row_value or []
        sid = str(row[0]) if row else ""
        if not a or (a and b):
            return sid, ""
        return a, sid

    def label(self, name: str, a: str, b: str, choice: str) -> tuple[str, str]:
        first, second = rollouts.pair(self.ws.rollouts(self._run(name)), a, b)
        prefs, ties = rollouts.label_rows(f"runs/{name}", first, second, choice)
        self.ws.record_votes(prefs, ties)
        verdict = {"a": f"{first['id']} better than {second['id']}", "b": f"{second['id']} better than {first['id']}",
                   "tie": f"{first['id']} tied with {second['id']}"}[choice.strip().lower()]
        return f"labelled {verdict}", self.counter()

    def suggest(self, name: str) -> tuple[str, str]:
        return rollouts.suggest(self.ws.rollouts(self._run(name)), self.ws.labelled_pairs(f"runs/{name}"))

    def write_for_sample(self, name: str, a: str, text: str) -> tuple[str, str]:
        sample = next((s for s in self.ws.rollouts(self._run(name)) if s["id"] == (a or "").strip()), None)
        if sample is None:
            raise gr.Error("better answer: pick the sample A it improves on", print_exception=False)
        self.ws.record_votes([rollouts.written_row(f"runs/{name}", sample, text)], [])
        return f"saved your answer as better than {sample['id']}", self.counter()

    def _run(self, name: str) -> str:
        if not name:
            raise gr.Error("choose a run with rollouts first", print_exception=False)
        return name

    # -- chat & feedback --------------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        from llmtune.registry.models import registry_models

        return self.ws.trained_models() + sorted(registry_models())

    def judge_choices(self) -> list[str]:
        return self.ws.trained_models() + self.ws.judge_files()

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
        conv = {**conv, "voted": False, "written": False, "complete": False,
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

    def _last_turn(self, conv: dict[str, Any], what: str) -> None:
        if not conv or not conv.get("histories") or not conv["histories"][0]:
            raise gr.Error(f"nothing to {what}: send a message first", print_exception=False)
        if not conv.get("complete"):
            raise gr.Error(f"wait until every model has answered before you {what}", print_exception=False)

    def vote(self, ranking: str, conv: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        self._last_turn(conv, "vote")
        if len(conv["models"]) < 2:
            raise gr.Error("voting needs answers from at least two models", print_exception=False)
        if conv.get("voted"):
            raise gr.Error("this turn already has a vote; send another message to vote again",
                           print_exception=False)
        groups = parse_ranking(ranking, len(conv["models"]))
        prefs, ties = vote_rows(conv["models"], conv["histories"], groups)
        self.ws.record_votes(prefs, ties)
        order = " > ".join("=".join(f"{LETTERS[i]} ({conv['models'][i]})" for i in g) for g in groups)
        return (f"recorded {order}: {len(prefs)} preference(s), {len(ties)} tie(s)", self.counter(),
                {**conv, "voted": True})

    def write_better(self, text: str, conv: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """"Write the better answer": the user's own answer, preferred to every model's answer."""
        self._last_turn(conv, "write a better answer")
        if conv.get("written"):
            raise gr.Error("this turn already has your answer; send another message first", print_exception=False)
        rows = written_rows(conv["models"], conv["histories"], text)
        self.ws.record_votes(rows, [])
        return f"saved your answer as better than {len(rows)} model answer(s)", self.counter(), {**conv, "written": True}

    def counter(self) -> str:
        prefs, ties = self.ws.feedback_counts()
        return (f"**{prefs}** preference pairs collected "
                f"(+{ties} ties) in `{self.ws.relative(self.ws.preferences_file)}`. *Train on this feedback* "
                f"freezes them into a snapshot and opens a dpo or rm recipe on it; or name them yourself with "
                f"`data: {{name: feedback, registry: [{self.ws.registry_file}]}}`.")

    def train_on_feedback(self, stage: str, model: str) -> tuple[Any, ...]:
        """Snapshot the feedback and open a prefilled dpo / rm recipe on it in the Recipes tab."""
        snapshot = self.ws.snapshot_feedback()
        text = retrain_recipe(snapshot, stage or "dpo", (model or "").strip())
        values = recipes.form_values(self.ws.recipe_dict(text))
        parent = Path((model or "").strip()).name
        note = (f"snapshot {snapshot['name']} ({snapshot['count']} pairs) → a {stage} recipe from {model} in the "
                "Recipes tab: check it, then launch it in the Runs tab")
        return (gr.Tabs(selected="recipes"), text, *values, default_run_name(f"{stage or 'dpo'}-{parent}"), note,
                self.snapshots_table(), gr.Dropdown(value=None),
                f"<span id='recipe-hint' data-where='new'>new recipe from feedback snapshot {snapshot['name']} "
                "(not saved: <i>Save recipe</i> keeps it)</span>")

    def snapshots_table(self) -> list[list[Any]]:
        return [[m["name"], m["count"], m.get("ties", 0), m["sha256"][:16], m["created"]]
                for m in reversed(self.ws.snapshots())]

    def export_feedback(self) -> tuple[str, str]:
        path = self.ws.export_feedback()
        return str(path), f"exported to `{self.ws.relative(path)}` (TRL preference format: prompt, chosen, rejected)"

    # -- evaluate ---------------------------------------------------------------------------------
    def compare(self, models: list[str], prompts: str, judge: str | None, n: float, max_new_tokens: float,
                temperature: float, seed: float) -> tuple[Any, ...]:
        import pandas as pd

        refs = {m: self.model_ref(m) for m in models or []}
        table, headers, summary = evaluate.compare_models(
            self.ws, refs, prompts, evaluate.confine_judge(self.ws, judge or ""), int(n), int(max_new_tokens),
            float(temperature), int(seed or 0))
        m_headers, m_rows = evaluate.matrix_rows(summary)
        rates = evaluate.win_rates(summary)
        chart = pd.DataFrame(rates, columns=["model", "outcome", "share"]) if rates else None
        return (pd.DataFrame(table, columns=headers), evaluate.summary_markdown(summary),
                pd.DataFrame(m_rows, columns=m_headers), gr.BarPlot(value=chart, visible=chart is not None), summary)

    def reward_accuracy(self, model: str, data: str, n: float) -> tuple[str, dict[str, Any]]:
        if not model:
            raise gr.Error("choose a reward model (a run of stage rm)", print_exception=False)
        result = evaluate.reward_model_accuracy(self.ws, self.model_ref(model), data, int(n or 0))
        text = (f"**accuracy {result['accuracy']:.3f}** on {result['n']} pairs of `{result['data']}` "
                f"(mean margin {result['mean_margin']:.4f}) for `{result['model']}`")
        return text, result


def rollout_files_exist(path: Path) -> bool:
    from llmtune.runs.samples import rollout_files

    return bool(rollout_files(path))


def build(ws: Workspace) -> gr.Blocks:
    """The Blocks app for one workspace. It confines this process (and the runs it launches) to the
    workspace: recipes validated here may not reach outside it."""
    ws.policy.activate()
    app = App(ws)
    recipe_refs = ws.list_recipes()
    first = f"{SHIPPED}quickstart.yaml" if f"{SHIPPED}quickstart.yaml" in recipe_refs else (recipe_refs or [None])[0]
    from llmtune.registry.models import registry_models

    with gr.Blocks(title="llmtune", analytics_enabled=False) as demo:
        gr.Markdown(f"## llmtune &nbsp;·&nbsp; workspace `{ws.root}`")
        with gr.Tabs() as tabs:
            # ---------------------------------------------------------------- Recipes
            with gr.Tab("Recipes", id="recipes") as recipes_tab:
                with gr.Row():
                    recipe_pick = gr.Dropdown(choices=recipe_refs, value=first, scale=4, allow_custom_value=True,
                                              elem_id="recipe-pick",
                                              label="Recipe (with plan's estimate: model size, memory, CPU or GPU)")
                    load_btn = gr.Button("Load", scale=1, elem_id="load-recipe")
                recipe_hint = gr.HTML(elem_id="recipe-hint-box")
                recipe_msg = gr.Markdown(elem_id="recipe-msg")
                with gr.Row():
                    with gr.Column(scale=2):
                        f_stage = gr.Dropdown(choices=list(STAGES), label="stage")
                        f_model = gr.Dropdown(choices=sorted(registry_models()), label="model.name",
                                              allow_custom_value=True, elem_id="form-model")
                        f_data = gr.Dropdown(choices=app.dataset_choices(), label="data.name",
                                             allow_custom_value=True)
                        f_ft = gr.Radio(choices=["lora", "qlora", "full"], label="model.finetuning")
                        with gr.Row():
                            f_lr = gr.Number(label="training.learning_rate", elem_id="learning-rate")
                            f_epochs = gr.Number(label="training.epochs", elem_id="epochs")
                        with gr.Row():
                            f_steps = gr.Number(label="training.max_steps (-1: from epochs)", precision=0,
                                                elem_id="max-steps")
                            f_bs = gr.Number(label="training.batch_size", precision=0, elem_id="batch-size")
                        with gr.Row():
                            f_len = gr.Number(label="data.max_length", precision=0)
                            f_r = gr.Number(label="model.lora.r", precision=0)
                        f_ds = gr.Checkbox(label="DeepSpeed (distributed.strategy: deepspeed, CUDA only)")
                    with gr.Column(scale=3):
                        yaml_box = gr.Code(language="yaml", label="Recipe YAML (editable; form edits keep your text)",
                                           interactive=True, lines=22, elem_id="recipe-yaml")
                        validation = gr.HTML(label="Validation (same as `llmtune validate`)", elem_id="validation")
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
                    run_pick = gr.Dropdown(choices=[r.name for r in ws.list_runs()], value=None, label="Selected run",
                                           scale=3, allow_custom_value=True, elem_id="run-pick")
                    stop_btn = gr.Button("Stop (checkpoint)", scale=1, elem_id="stop-run")
                    resume_btn = gr.Button("Resume", scale=1, elem_id="resume-run")
                    rollouts_btn = gr.Button("Open its rollouts", scale=1, elem_id="open-rollouts")
                    parent_btn = gr.Button("Compare with its parent", scale=1, elem_id="compare-parent")
                run_msg = gr.Markdown(elem_id="run-msg")
                lineage = gr.Markdown(elem_id="run-lineage")
                progress = gr.HTML(elem_id="progress-box")
                plot = gr.HTML(elem_id="loss-plot")
                log_box = gr.Textbox(label="Log (console.log, or train.log of a run started from a shell)", lines=14,
                                     max_lines=14, autoscroll=True, interactive=False, elem_id="run-log")
                with gr.Accordion("Run details (JSON)", open=False):
                    details = gr.JSON()
                timer = gr.Timer(2.0)

            # ---------------------------------------------------------------- Rollouts
            with gr.Tab("Rollouts", id="rollouts") as rollouts_tab:
                gr.Markdown("What an online-RL (ppo) or rejection-sampling (rs) run generated. Click a row for **A**, "
                            "another answer to the same prompt for **B**, then label them; labels go to the feedback "
                            "dataset.")
                with gr.Row():
                    r_run = gr.Dropdown(choices=app.rollout_runs(), value=None, label="Run with rollouts", scale=3,
                                        allow_custom_value=True, elem_id="rollout-run")
                    r_text = gr.Textbox(label="Filter (text in prompt or answer)", scale=3, elem_id="rollout-filter")
                    r_step = gr.Dropdown(choices=["all"], value="all", label="step", scale=1, elem_id="rollout-step")
                    r_sort = gr.Dropdown(choices=rollouts.SORTS, value=rollouts.SORTS[0], label="sort", scale=2,
                                         elem_id="rollout-sort")
                r_count = gr.Markdown(elem_id="rollout-count")
                r_table = gr.Dataframe(interactive=False, wrap=True, max_height=420, elem_id="rollout-table", max_chars=70,
                                       label="Samples (id, step, prompt, answer, reward, chars, and any length, kl, "
                                             "eval or judge score the run logged)")
                with gr.Row():
                    r_a = gr.Textbox(label="A (sample id)", scale=1, elem_id="pick-a")
                    r_b = gr.Textbox(label="B (sample id)", scale=1, elem_id="pick-b")
                    r_suggest = gr.Button("Suggest a pair", scale=1, elem_id="suggest-pair")
                r_pair = gr.HTML(elem_id="rollout-pair-box")
                with gr.Row():
                    r_vote_a = gr.Button("A is better", elem_id="label-a")
                    r_vote_tie = gr.Button("Tie", elem_id="label-tie")
                    r_vote_b = gr.Button("B is better", elem_id="label-b")
                with gr.Row():
                    r_written = gr.Textbox(label="Write the better answer (preferred to A)", scale=4,
                                           elem_id="rollout-written")
                    r_written_btn = gr.Button("Save my answer", scale=1, elem_id="rollout-written-save")
                with gr.Row():
                    r_msg = gr.Markdown(elem_id="label-msg")
                    r_train = gr.Button("Train on this feedback →", variant="primary", elem_id="train-on-feedback")
                r_plots = [gr.HTML(elem_id=f"rollout-plot-{key}") for key, _ in rollouts.CHARTS_TITLES]

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
                gr.Markdown("**Which answer is better?**")
                with gr.Row(visible=True, elem_id="vote-two") as vote_two:
                    vote_a = gr.Button("A is better", elem_id="vote-a")
                    vote_tie = gr.Button("Tie", elem_id="vote-tie")
                    vote_b = gr.Button("B is better", elem_id="vote-b")
                with gr.Row(visible=False, elem_id="vote-ranking") as vote_many:
                    ranking = gr.Textbox(label="Ranking of 3+ answers (e.g. B>A>C; = for ties)", placeholder="B>A>C",
                                         scale=3, elem_id="ranking")
                    vote_rank = gr.Button("Submit ranking", elem_id="submit-ranking")
                with gr.Row():
                    written = gr.Textbox(label="Or write the better answer (preferred to every answer above)", scale=4,
                                         elem_id="chat-written")
                    written_btn = gr.Button("Save my answer", scale=1, elem_id="chat-written-save")
                vote_msg = gr.Markdown(elem_id="vote-msg")
                counter = gr.Markdown(app.counter(), elem_id="feedback-counter")
                conv = gr.State({"models": [], "histories": []})

            # ---------------------------------------------------------------- Feedback
            with gr.Tab("Feedback", id="feedback") as feedback_tab:
                fb_counter = gr.Markdown(app.counter(), elem_id="feedback-summary")
                gr.Markdown("**Train on this feedback**: freeze the pairs collected so far into a named snapshot "
                            "(count, hash, time; the new run records it in its run.json) and open a prefilled "
                            "recipe in the Recipes tab.")
                with gr.Row():
                    fb_stage = gr.Radio(choices=["dpo", "rm"], value="dpo", label="stage", scale=1, elem_id="fb-stage")
                    fb_model = gr.Dropdown(choices=app.model_choices(), value=None, allow_custom_value=True, scale=3,
                                           label="Start from (the model that was compared or labelled)",
                                           elem_id="fb-model")
                    fb_train = gr.Button("Train on this feedback →", variant="primary", scale=2,
                                         elem_id="fb-train")
                fb_msg = gr.Markdown(elem_id="fb-msg")
                fb_snapshots = gr.Dataframe(value=app.snapshots_table(), interactive=False, elem_id="fb-snapshots",
                                            headers=["snapshot", "pairs", "ties", "sha256", "created"],
                                            label="Snapshots (what each retraining learned from)")
                with gr.Row():
                    fb_export = gr.Button("Export as TRL JSONL", scale=1, elem_id="fb-export")
                    fb_file = gr.File(label="Export", scale=3, interactive=False, elem_id="fb-file")
                fb_export_msg = gr.Markdown(elem_id="fb-export-msg")

            # ---------------------------------------------------------------- Evaluate
            with gr.Tab("Evaluate", id="evaluate") as eval_tab:
                gr.Markdown("**Compare** answers of several models to the same held-out prompts (`llmtune compare`), "
                            "optionally judged by a reward model or a rule; files go to the workspace's `evaluations/`.")
                eval_msg = gr.Markdown(elem_id="eval-msg")
                with gr.Row():
                    e_models = gr.Dropdown(choices=app.model_choices(), multiselect=True, allow_custom_value=True,
                                           label="Models (2+)", scale=3, elem_id="eval-models")
                    e_judge = gr.Dropdown(choices=app.judge_choices(), value=None, allow_custom_value=True, scale=2,
                                          elem_id="eval-judge",
                                          label="Judge: reward-model run (runs/NAME), a run's recipe.yaml (its reward) "
                                                "or rule:module:function")
                with gr.Row():
                    e_prompts = gr.Textbox(value="demo", scale=3, label="Prompts: dataset name or a file in "
                                           "the workspace (canonical jsonl)")
                    e_n = gr.Number(value=8, precision=0, label="prompts", scale=1, elem_id="eval-n")
                    e_tokens = gr.Number(value=32, precision=0, label="max_new_tokens", scale=1)
                    e_temp = gr.Number(value=0, label="temperature (0: greedy)", scale=1)
                    e_seed = gr.Number(value=0, precision=0, label="seed", scale=1)
                e_btn = gr.Button("Compare", variant="primary", elem_id="compare")
                e_summary = gr.Markdown(elem_id="compare-summary")
                e_matrix = gr.Dataframe(interactive=False, label="Win / tie / loss (row model against column model)",
                                        elem_id="win-matrix")
                e_chart = gr.BarPlot(x="model", y="share", color="outcome", title="Share of prompts won / tied / lost",
                                     height=260, elem_id="win-chart", visible=False,
                                     color_map={"win": "#2ca02c", "tie": "#7f7f7f", "loss": "#d62728"})
                e_table = gr.Dataframe(headers=["prompt", "answers"], interactive=False, wrap=True,
                                       label="Answers (and judge scores)", elem_id="compare-table")
                with gr.Accordion("Comparison details (JSON)", open=False):
                    e_details = gr.JSON()
                gr.Markdown("**Reward-model accuracy** on preference pairs (`llmtune eval reward-accuracy`), e.g. "
                            "on the feedback collected here.")
                with gr.Row():
                    a_model = gr.Dropdown(choices=ws.trained_models(), value=None, allow_custom_value=True,
                                          label="Reward model (runs/NAME of stage rm)", scale=3, elem_id="acc-model")
                    a_data = gr.Textbox(value="feedback", label="Preference data: dataset name or workspace file",
                                        scale=3)
                    a_n = gr.Number(value=0, precision=0, label="pairs (0: all)", scale=1)
                a_btn = gr.Button("Score accuracy", elem_id="acc-run")
                a_result = gr.Markdown(elem_id="acc-result")
                with gr.Accordion("Accuracy details (JSON)", open=False):
                    a_details = gr.JSON()

        # ------------------------------------------------------------------ events
        load_out = [yaml_box, *form]
        load_btn.click(guarded(app.load_recipe), [recipe_pick], load_out, api_name="load_recipe",
                       show_progress_on=[recipe_msg]).then(app.recipe_hint, [recipe_pick], [recipe_hint],
                                                           show_progress="hidden")
        recipe_pick.select(guarded(app.load_recipe), [recipe_pick], load_out, api_visibility="private",
                           show_progress_on=[recipe_msg]).then(app.recipe_hint, [recipe_pick], [recipe_hint],
                                                               show_progress="hidden")
        demo.load(guarded(app.load_recipe), [recipe_pick], load_out, api_visibility="private",
                  show_progress_on=[recipe_msg]).then(
            app.recipe_choices, None, [recipe_pick], show_progress="hidden").then(
            app.recipe_hint, [recipe_pick], [recipe_hint], show_progress="hidden")
        gr.on([f.input for f in form], guarded(app.apply_form), [yaml_box, *form], [yaml_box], api_name="apply_form",
              show_progress_on=[recipe_msg]).then(app.sync_form, [yaml_box, *form], form, show_progress="hidden")
        yaml_box.change(lambda text: validation_html(validation_text(ws, text)), [yaml_box], [validation],
                        api_visibility="private", show_progress="hidden")

        def validate_recipe(text: str) -> str:
            """`llmtune validate` on recipe text: `ok: ...` or `error: ...`."""
            return validation_text(ws, text)

        gr.api(validate_recipe, api_name="validate_recipe")
        save_btn.click(guarded(app.save_recipe), [save_name, yaml_box], [save_msg, recipe_pick],
                       api_name="save_recipe", show_progress_on=[save_msg])

        def list_recipes() -> list[str]:
            """Recipe references: `shipped/NAME.yaml`, `recipes/NAME.yaml`."""
            return ws.list_recipes()

        gr.api(list_recipes, api_name="list_recipes")

        def recipe_hints() -> dict[str, str]:
            """plan's one-line estimate (model size, memory, CPU or GPU) per recipe reference."""
            return {ref: app.recipe_label(ref).partition("  ·  ")[2] for ref in ws.list_recipes()}

        gr.api(recipe_hints, api_name="recipe_hints")
        # Other tabs and processes add recipes and the `feedback` dataset: refresh the lists on entry.
        recipes_tab.select(lambda: (app.recipe_choices(), gr.Dropdown(choices=app.dataset_choices())),
                           None, [recipe_pick, f_data], api_visibility="private", show_progress="hidden")

        launch_btn.click(guarded(app.launch), [run_name, yaml_box], [launch_msg, run_pick, runs_df, run_name],
                         api_name="launch_run", show_progress_on=[launch_msg])
        status_out = [progress, plot, log_box, details]
        run_pick.change(guarded(app.run_status), [run_pick], status_out, api_name="run_status",
                        show_progress_on=[run_msg]).then(app.lineage, [run_pick], [lineage], show_progress="hidden")
        timer.tick(app.tick, [run_pick], [runs_df, run_pick, *status_out, lineage], api_visibility="private",
                   show_progress="hidden")
        stop_btn.click(guarded(app.stop), [run_pick], [run_msg], api_name="stop_run")
        resume_btn.click(guarded(app.resume), [run_pick], [run_msg], api_name="resume_run")

        def list_runs() -> list[list[Any]]:
            """Rows: run, status, stage, model, step, loss, started, error."""
            return app.runs_table()

        gr.api(list_runs, api_name="list_runs")

        def refresh() -> tuple[Any, ...]:
            choices, judges, runs = app.model_choices(), app.judge_choices(), ws.trained_models()
            return (gr.Dropdown(choices=choices), gr.Dropdown(choices=choices), gr.Dropdown(choices=judges),
                    gr.Dropdown(choices=runs), gr.Dropdown(choices=choices))

        model_lists = [chat_models, e_models, e_judge, a_model, fb_model]
        refresh_models.click(refresh, None, model_lists, api_name="list_models")
        gr.on([chat_tab.select, eval_tab.select, feedback_tab.select], refresh, None, model_lists,
              api_visibility="private", show_progress="hidden")
        parent_btn.click(guarded(app.compare_parent), [run_pick], [tabs, e_models, chat_models, e_judge, eval_msg],
                         api_name="compare_parent", show_progress_on=[run_msg])

        # rollouts
        r_view_in, r_view_out = [r_run, r_text, r_step, r_sort], [r_table, r_step, r_count, *r_plots]
        r_run.change(guarded(app.rollouts_view), r_view_in, r_view_out, api_name="rollouts",
                     show_progress_on=[r_count]).then(lambda: ("", ""), None, [r_a, r_b], show_progress="hidden")
        gr.on([r_text.submit, r_step.input, r_sort.input], guarded(app.rollouts_view), r_view_in, r_view_out,
              api_visibility="private", show_progress_on=[r_count])
        rollouts_tab.select(lambda: gr.Dropdown(choices=app.rollout_runs()), None, [r_run], api_visibility="private",
                            show_progress="hidden")
        rollouts_btn.click(lambda name: (gr.Tabs(selected="rollouts"), gr.Dropdown(choices=app.rollout_runs(), value=name)),
                           [run_pick], [tabs, r_run], api_visibility="private")
        r_table.select(app.pick_sample, [r_a, r_b], [r_a, r_b], api_visibility="private", show_progress="hidden")
        gr.on([r_a.change, r_b.change], lambda name, a, b: rollouts.preview(app.ws.rollouts(name) if name else [], a, b),
              [r_run, r_a, r_b], [r_pair], api_visibility="private", show_progress="hidden")
        r_suggest.click(guarded(app.suggest), [r_run], [r_a, r_b], api_name="suggest_pair", show_progress_on=[r_msg])
        label_out = [r_msg, counter]
        r_label = gr.Textbox(visible=False)  # the API's label argument: A, B or tie
        r_label.submit(guarded(app.label), [r_run, r_a, r_b, r_label], label_out, api_name="label_rollouts")
        for btn, choice in ((r_vote_a, "A"), (r_vote_tie, "tie"), (r_vote_b, "B")):
            btn.click(guarded(lambda name, a, b, c=choice: app.label(name, a, b, c)), [r_run, r_a, r_b], label_out,
                      api_visibility="private", show_progress_on=[r_msg])
        r_written_btn.click(guarded(app.write_for_sample), [r_run, r_a, r_written], label_out,
                            api_name="write_rollout_answer", show_progress_on=[r_msg])

        # chat & feedback
        chat_out = [conv, message, chat_status, *bots]
        chat_in = [chat_models, message, conv, g_tokens, g_temp, g_top_p, g_seed]
        send.click(guarded_stream(app.chat), chat_in, chat_out, api_name="chat", show_progress_on=[chat_status])
        message.submit(guarded_stream(app.chat), chat_in, chat_out, api_visibility="private",
                       show_progress_on=[chat_status])
        chat_models.change(lambda ms: (gr.Row(visible=len(ms or []) <= 2), gr.Row(visible=len(ms or []) > 2)),
                           [chat_models], [vote_two, vote_many], api_visibility="private", show_progress="hidden")
        new.click(app.new_chat, None, chat_out, api_name="new_chat")
        vote_out = [vote_msg, counter, conv]
        vote_rank.click(guarded(app.vote), [ranking, conv], vote_out, api_name="vote", show_progress_on=[vote_msg])
        for btn, choice in ((vote_a, "A"), (vote_tie, "tie"), (vote_b, "B")):
            btn.click(guarded(functools.partial(app.vote, choice)), [conv], vote_out, api_visibility="private",
                      show_progress_on=[vote_msg])
        written_btn.click(guarded(app.write_better), [written, conv], vote_out, api_name="write_better_answer",
                          show_progress_on=[vote_msg])
        counter.change(app.counter, None, [fb_counter], api_visibility="private", show_progress="hidden")

        def feedback_count() -> tuple[int, int]:
            """(preference pairs, ties) collected so far."""
            return ws.feedback_counts()

        gr.api(feedback_count, api_name="feedback_count")
        train_out = [tabs, yaml_box, *form, run_name, fb_msg, fb_snapshots, recipe_pick, recipe_hint]
        fb_train.click(guarded(app.train_on_feedback), [fb_stage, fb_model], train_out, api_name="train_on_feedback",
                       show_progress_on=[fb_msg])
        r_train.click(guarded(lambda name: app.train_on_feedback("dpo", f"runs/{app._run(name)}")), [r_run], train_out,
                      api_visibility="private", show_progress_on=[r_msg])
        feedback_tab.select(lambda: (app.counter(), app.snapshots_table()), None, [fb_counter, fb_snapshots],
                            api_visibility="private", show_progress="hidden")
        fb_export.click(guarded(app.export_feedback), None, [fb_file, fb_export_msg], api_name="export_feedback",
                        show_progress_on=[fb_export_msg])

        e_btn.click(guarded(app.compare), [e_models, e_prompts, e_judge, e_n, e_tokens, e_temp, e_seed],
                    [e_table, e_summary, e_matrix, e_chart, e_details], api_name="compare", show_progress_on=[e_summary])
        a_btn.click(guarded(app.reward_accuracy), [a_model, a_data, a_n], [a_result, a_details],
                    api_name="reward_accuracy", show_progress_on=[a_result])
    return demo


def launch(workspace: str | Path, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           auth: tuple[str, str] | None = None, rule_modules: tuple[str, ...] = ()) -> None:
    """Serve the UI (blocking)."""
    # transformers resolves its classes lazily, and two request threads doing that at once can see a
    # half-initialised module ("cannot import name 'AutoConfig'"): resolve them here, once, first.
    import transformers

    transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM  # noqa: B018
    ws = Workspace(workspace, rule_modules)
    demo = build(ws)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, share=share, auth=auth, show_error=False,
                footer_links=["api", "gradio"], allowed_paths=[str(ws.root / "feedback" / "export")])

