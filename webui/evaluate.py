"""The Evaluate tab: thin calls into `llmtune compare` and `llmtune eval reward-accuracy`.

The UI only turns its fields into the arguments those commands take (prompts and judges confined to
the workspace) and their results into a table; generation, judging and scoring are theirs, so the UI
and the command line give the same numbers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llmtune.errors import ConfigError
from webui.workspace import Workspace


def data_source(ws: Workspace, source: str) -> tuple[str | None, str | None, list[str]]:
    """(registry name, local path, extra registries) for a dataset named in the UI: a name of the data
    registry (the workspace's `feedback` included) or a file inside the workspace."""
    from llmtune.data.registry import list_entries

    source = (source or "").strip()
    if not source:
        raise ConfigError("data: give a dataset name (e.g. demo, feedback) or a file in the workspace")
    extra = ws.registries()
    if source in list_entries(extra):
        return source, None, extra
    return "canonical", str(ws.confine(source, "data")), extra


EMPTY = "(empty answer)"


def compare_models(ws: Workspace, refs: dict[str, str], prompts_source: str, judge: str | None, n: int,
                   max_new_tokens: int, temperature: float, seed: int) -> tuple[list[list[Any]], list[str], dict[str, Any]]:
    """Run `llmtune compare` (its Python function) into WORKSPACE/evaluations/compare-TIME/.

    Returns (table rows: the whole prompt conversation, then one column per model (+ its score),
    headers, summary). An empty answer shows as EMPTY, never as a blank cell."""
    from llmtune.data.load import load_prompts
    from llmtune.serve.compare import compare
    from llmtune.serve.engine import Settings

    if len(refs) < 2:
        raise ConfigError("compare: choose at least two models")
    if n < 1:
        raise ConfigError(f"compare: the number of prompts must be at least 1, got {n}")
    dataset, path, extra = data_source(ws, prompts_source)
    prompts = load_prompts("canonical" if path else dataset, path, "train", n, extra)
    out = ws.root / "evaluations" / time.strftime("compare-%Y%m%d-%H%M%S")
    settings = Settings(max_new_tokens=max_new_tokens, temperature=temperature)
    models = [f"{name}={ref}" for name, ref in refs.items()]
    result = compare(models, prompts, settings, seed=seed, judge=judge, out=out, log=lambda _msg: None)
    headers, table = answer_table(result)
    summary = {k: v for k, v in result.to_summary().items() if v is not None}
    summary["models"] = {name: _shown(ws, ref) for name, ref in result.models.items()}  # no absolute paths
    if judge:
        summary["judge"] = _shown(ws, judge)
    summary["out"] = ws.relative(out)
    return table, headers, summary


def answer_table(result: Any) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of a comparison: the whole prompt conversation, then each model's answer (EMPTY
    when it said nothing, never a blank cell) and its judge score."""
    names = list(result.models)
    headers = ["prompt"] + [h for m in names for h in ([m, f"{m} score"] if result.scores else [m])]
    table = []
    for i, prompt in enumerate(result.prompts):
        row: list[Any] = [conversation(prompt)]
        for m in names:
            row.append(result.responses[m][i] if result.responses[m][i].strip() else EMPTY)
            if result.scores:
                row.append(round(result.scores[m][i], 4))
        table.append(row)
    return headers, table


def _shown(ws: Workspace, ref: str) -> str:
    """A model reference as the UI names it: `runs/NAME` for a directory in the workspace."""
    return ws.relative(Path(ref)) if Path(ref).is_absolute() and ws.policy.contains(ref) else ref


def matrix_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The win/tie/loss matrix as a table: one row per model, `wins / ties / losses` against each column."""
    matrix = summary.get("matrix") or {}
    names = list(summary.get("models") or matrix)
    if not matrix:
        return ["model"], []
    rows = [[a, *("—" if a == b else "{win} / {tie} / {loss}".format(**matrix[a][b]) for b in names)] for a in names]
    return ["model (row) vs", *names], rows


def win_rates(summary: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(model, outcome, share of prompts) of each model against all the others together: the chart."""
    matrix = summary.get("matrix") or {}
    out = []
    for a, row in matrix.items():
        total = {k: sum(cell[k] for cell in row.values()) for k in ("win", "tie", "loss")}
        n = sum(total.values()) or 1
        out += [(a, outcome, round(total[outcome] / n, 4)) for outcome in ("win", "tie", "loss")]
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    """What a comparison found, for people: mean scores, empty answers and their warning, where the files are."""
    lines = [f"**{summary.get('prompts', 0)} prompts**, seed {summary.get('seed', 0)}; files in "
             f"`{summary.get('out', '')}` (compare.html, compare.jsonl, summary.md)."]
    means = summary.get("mean_scores")
    if means:
        better = "lower" if summary.get("lower_is_better") else "higher"
        lines += ["", f"Judge `{summary.get('judge')}` ({better} is better):", "", "| model | mean score | empty answers |",
                  "|---|---|---|"]
        empty = summary.get("empty_answers") or {}
        lines += [f"| {m} | {v:.4f} | {empty.get(m, 0)} |" for m, v in means.items()]
    else:
        lines += ["", "No judge: answers only (choose a judge for scores and the win matrix)."]
        lines += [f"- {m}: {k} empty answer(s)" for m, k in (summary.get("empty_answers") or {}).items() if k]
    if summary.get("judge_prefers_empty"):
        lines += ["", "<span id='judge-warning'>⚠ **The judge scores empty answers better than non-empty ones**: a "
                  "model that says nothing wins here. Check the judge before trusting the matrix.</span>"]
    return "\n".join(lines)


def conversation(prompt: list[dict[str, Any]]) -> str:
    """Every turn of a prompt, `role: text` per line (multi-turn prompts keep their history)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def reward_model_accuracy(ws: Workspace, model_ref: str, data_source_text: str, n: int) -> dict[str, Any]:
    """`llmtune eval reward-accuracy` of a reward model on preference data (e.g. the collected feedback)."""
    from llmtune.eval.reward_accuracy import preference_rows, reward_accuracy

    name, path, extra = data_source(ws, data_source_text)
    rows = preference_rows(name, path, n=n or None, registries=extra)
    return {"model": _shown(ws, model_ref), "data": data_source_text, **reward_accuracy(model_ref, rows)}


def confine_judge(ws: Workspace, judge: str) -> str | None:
    """A judge is `rule:module:function` of an allow-listed module (refused before any import) or a
    reward model inside the workspace (an rm run)."""
    judge = (judge or "").strip()
    if not judge:
        return None
    if judge.startswith("rule:"):
        ws.policy.rule(judge[len("rule:"):], "judge")
        return judge
    return str(ws.confine(judge, "judge"))

