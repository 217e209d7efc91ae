"""The Evaluate tab: thin calls into `llmtune compare` and `llmtune eval reward-accuracy`.

The UI only turns its fields into the arguments those commands take (prompts and judges confined to
the workspace) and their results into a table; generation, judging and scoring are theirs, so the UI
and the command line give the same numbers.
"""

from __future__ import annotations

import time
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
    extra = [str(ws.registry_file)] if ws.registry_file.exists() else []
    if source in list_entries(extra):
        return source, None, extra
    return "canonical", str(ws.confine(source, "data")), extra


def compare_models(ws: Workspace, refs: dict[str, str], prompts_source: str, judge: str | None, n: int,
                   max_new_tokens: int, temperature: float, seed: int) -> tuple[list[list[Any]], list[str], dict[str, Any]]:
    """Run `llmtune compare` (its Python function) into WORKSPACE/evaluations/compare-TIME/.

    Returns (table rows: prompt then one column per model (+ its score), headers, summary)."""
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
    names = list(result.models)
    headers = ["prompt"] + [h for m in names for h in ([m, f"{m} score"] if result.scores else [m])]
    table = []
    for i, prompt in enumerate(prompts):
        row: list[Any] = [prompt[-1]["content"]]
        for m in names:
            row.append(result.responses[m][i])
            if result.scores:
                row.append(round(result.scores[m][i], 4))
        table.append(row)
    summary = {"out": ws.relative(out), **result.to_summary()}
    return table, headers, summary


def reward_model_accuracy(ws: Workspace, model_ref: str, data_source_text: str, n: int) -> dict[str, Any]:
    """`llmtune eval reward-accuracy` of a reward model on preference data (e.g. the collected feedback)."""
    from llmtune.eval.reward_accuracy import preference_rows, reward_accuracy

    name, path, extra = data_source(ws, data_source_text)
    rows = preference_rows(name, path, n=n or None, registries=extra)
    return {"model": model_ref, "data": data_source_text, **reward_accuracy(model_ref, rows)}


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

