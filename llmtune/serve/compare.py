"""`llmtune compare`: the same prompts through several models, side by side, optionally judged.

Every model answers every prompt with the same settings, and prompt i is always sampled with seed
`seed + i`, so an answer does not depend on which other prompts or models were in the run. With a
judge (any reward source) each answer gets a score; the win/tie/loss matrix counts, for every pair
of models, the prompts where one model's answer scored higher. A toxicity classifier as judge with
`lower_is_better` gives the "toxicity before vs after" comparison.

Outputs in the output directory: compare.jsonl (one row per prompt), compare.html (one
self-contained page, every text escaped) and summary.md.
"""

from __future__ import annotations

import gc
import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmtune.config.schema import RewardSection
from llmtune.data.templates import Message
from llmtune.errors import ConfigError
from llmtune.rewards.source import parse_source
from llmtune.serve.engine import Engine, Settings, default_name


def parse_judge(source: str) -> RewardSection:
    """--judge SOURCE → a reward section (the same forms as `eval policy --reward`)."""
    return parse_source(source, "--judge")


@dataclass
class MatrixCell:
    win: int = 0
    tie: int = 0
    loss: int = 0


@dataclass
class Comparison:
    """Everything compare produced; `to_summary()` is what the CLI prints."""

    models: dict[str, str]  # name → reference
    prompts: list[list[Message]]
    responses: dict[str, list[str]]
    settings: Settings
    seed: int
    scores: dict[str, list[float]] | None = None
    judge: str | None = None
    lower_is_better: bool = False
    matrix: dict[str, dict[str, MatrixCell]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def mean_scores(self) -> dict[str, float]:
        return {m: sum(s) / len(s) for m, s in (self.scores or {}).items()}

    def empty_answers(self) -> dict[str, int]:
        """Answers per model that are empty (or whitespace only): a model that says nothing."""
        return {m: sum(not r.strip() for r in texts) for m, texts in self.responses.items()}

    def judge_prefers_empty(self) -> bool:
        """Whether the judge scores empty answers better, on average, than non-empty ones: a judge
        that does would make a silent model win the matrix, which says more about the judge."""
        if self.scores is None:
            return False
        empty, full = [], []
        for m, texts in self.responses.items():
            for text, score in zip(texts, self.scores[m]):
                (full if text.strip() else empty).append(score)
        if not empty or not full:
            return False
        gap = sum(empty) / len(empty) - sum(full) / len(full)
        return gap < 0 if self.lower_is_better else gap > 0

    def to_summary(self) -> dict[str, Any]:
        return {"models": self.models, "prompts": len(self.prompts), "seed": self.seed, "judge": self.judge,
                "lower_is_better": self.lower_is_better, "mean_scores": self.mean_scores() or None,
                "matrix": {a: {b: asdict(c) for b, c in row.items()} for a, row in self.matrix.items()} or None,
                "empty_answers": self.empty_answers(), "judge_prefers_empty": self.judge_prefers_empty(),
                "generation_seconds": self.seconds}


def unique_names(refs: list[str]) -> dict[str, str]:
    """name → reference; `NAME=REF` names a model explicitly, clashing default names get a suffix."""
    out: dict[str, str] = {}
    for ref in refs:
        name, sep, target = ref.partition("=")
        if not sep:
            name, target = default_name(ref), ref
        base, i = name, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out[name] = target
    return out


def answer_all(engine: Engine, prompts: list[list[Message]], settings: Settings, seed: int) -> list[str]:
    """One answer per prompt, generated in batches; prompt i uses seed + i so answers are
    independent of the prompt set and of the batching."""
    from dataclasses import replace

    results = engine.complete_many([(p, replace(settings, n=1, seed=seed + i)) for i, p in enumerate(prompts)])
    return [r.choices[0].text for r in results]


def win_matrix(scores: dict[str, list[float]], lower_is_better: bool, margin: float = 0.0
               ) -> dict[str, dict[str, MatrixCell]]:
    """matrix[a][b]: prompts where a's answer beat / tied / lost to b's (|difference| <= margin ties)."""
    sign = -1.0 if lower_is_better else 1.0
    matrix: dict[str, dict[str, MatrixCell]] = {}
    for a, sa in scores.items():
        matrix[a] = {}
        for b, sb in scores.items():
            if a == b:
                continue
            cell = MatrixCell()
            for x, y in zip(sa, sb):
                d = sign * (x - y)
                if abs(d) <= margin:
                    cell.tie += 1
                elif d > 0:
                    cell.win += 1
                else:
                    cell.loss += 1
            matrix[a][b] = cell
    return matrix


def compare(models: list[str], prompts: list[list[Message]], settings: Settings, seed: int = 0,
            judge: str | None = None, lower_is_better: bool = False, margin: float = 0.0,
            out: Path | None = None, log: Any = print) -> Comparison:
    """Generate with each model in turn (one in memory at a time), score with the judge, write files."""
    if len(models) < 2:
        raise ConfigError("--models: give at least two models to compare")
    section = parse_judge(judge) if judge else None  # fail on a bad judge before generating
    names = unique_names(models)
    responses: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for name, ref in names.items():
        engine = Engine.load(ref, name=name)
        if not engine.generates:
            raise ConfigError(f"--models: '{ref}' is a reward model; it cannot answer prompts (use it as --judge)")
        start = time.perf_counter()
        responses[name] = answer_all(engine, prompts, settings, seed)
        seconds[name] = round(time.perf_counter() - start, 3)
        log(f"{name}: {len(prompts)} answers in {seconds[name]:.1f}s")
        engine.close()
        del engine
        _free_memory()
    result = Comparison(models=names, prompts=prompts, responses=responses, settings=settings, seed=seed,
                        judge=judge, lower_is_better=lower_is_better, seconds=seconds)
    if section is not None:
        from llmtune.rewards import build_reward

        scorer = build_reward(section, where="--judge")
        result.scores = {name: [float(s) for s in scorer.score(prompts, texts)] for name, texts in responses.items()}
        result.matrix = win_matrix(result.scores, lower_is_better, margin)
    if out is not None:
        write_outputs(result, out)
    return result


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- outputs ----------------------------------------------------------------------------------------

def write_outputs(result: Comparison, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.jsonl").open("w") as fh:
        for i, prompt in enumerate(result.prompts):
            row: dict[str, Any] = {"index": i, "prompt": prompt,
                                   "responses": {m: r[i] for m, r in result.responses.items()}}
            if result.scores is not None:
                row["scores"] = {m: s[i] for m, s in result.scores.items()}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "compare.html").write_text(render_html(result))
    (out / "summary.md").write_text(render_markdown(result))


def _conversation_text(prompt: list[Message]) -> str:
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _settings_line(result: Comparison) -> str:
    s = result.settings
    return (f"temperature {s.temperature}, top_p {s.top_p}, max_new_tokens {s.max_new_tokens}, "
            f"seed {result.seed} (+ prompt index)")


def render_markdown(result: Comparison) -> str:
    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    lines = ["# llmtune compare", "", f"{len(result.prompts)} prompts; {_settings_line(result)}.", "",
             "| model | reference | mean answer length (chars) | generation time (s) |", "|---|---|---|---|"]
    for name, ref in result.models.items():
        texts = result.responses[name]
        lines.append(f"| {cell(name)} | {cell(ref)} | {sum(map(len, texts)) / len(texts):.1f} | "
                     f"{result.seconds.get(name, 0):.1f} |")
    if result.scores is not None:
        better = "lower" if result.lower_is_better else "higher"
        lines += ["", f"## Judge: {cell(result.judge or '')} ({better} is better)", "",
                  "| model | mean score |", "|---|---|"]
        lines += [f"| {cell(m)} | {v:.4f} |" for m, v in result.mean_scores().items()]
        if result.judge_prefers_empty():
            lines += ["", "**Warning:** the judge scores empty answers better than non-empty ones; a model that "
                      "says nothing wins this comparison."]
        names = list(result.models)
        lines += ["", "Win / tie / loss of the row model against the column model:", "",
                  "| | " + " | ".join(map(cell, names)) + " |", "|---" * (len(names) + 1) + "|"]
        for a in names:
            cells = ["—" if a == b else "{0.win} / {0.tie} / {0.loss}".format(result.matrix[a][b]) for b in names]
            lines.append(f"| {cell(a)} | " + " | ".join(cells) + " |")
    lines += ["", "## First answers", ""]
    for i, prompt in enumerate(result.prompts[:5]):
        lines += [f"### Prompt {i}", "", "> " + _conversation_text(prompt).replace("\n", "\n> "), ""]
        for name in result.models:
            score = f" (score {result.scores[name][i]:.4f})" if result.scores is not None else ""
            lines += [f"- **{cell(name)}**{score}: {cell(result.responses[name][i]) or '*(empty)*'}"]
        lines.append("")
    lines.append("All answers: compare.jsonl and compare.html.")
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.4em .6em;vertical-align:top;text-align:left}
th{background:#f3f3f3}.t{white-space:pre-wrap;max-width:40em}.s{color:#555;font-size:.85em}.best{background:#eaf7ea}"""


def render_html(result: Comparison) -> str:
    """One page with no external assets; every model-written or user text goes through html.escape."""
    e = html.escape
    names = list(result.models)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>llmtune compare</title>",
             f"<style>{_CSS}</style></head><body><h1>llmtune compare</h1>",
             f"<p>{len(result.prompts)} prompts; {e(_settings_line(result))}.</p>",
             "<table><tr><th>model</th><th>reference</th></tr>"]
    parts += [f"<tr><td>{e(n)}</td><td>{e(r)}</td></tr>" for n, r in result.models.items()]
    parts.append("</table>")
    if result.scores is not None:
        better = "lower" if result.lower_is_better else "higher"
        parts.append(f"<h2>Judge: {e(result.judge or '')} ({better} is better)</h2><table><tr><th>model</th>"
                     "<th>mean score</th></tr>")
        parts += [f"<tr><td>{e(m)}</td><td>{v:.4f}</td></tr>" for m, v in result.mean_scores().items()]
        parts.append("</table><p>Win / tie / loss of the row model against the column model:</p><table><tr><th></th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for a in names:
            cells = "".join("<td>—</td>" if a == b else "<td>{0.win} / {0.tie} / {0.loss}</td>".format(
                result.matrix[a][b]) for b in names)
            parts.append(f"<tr><th>{e(a)}</th>{cells}</tr>")
        parts.append("</table>")
    parts.append("<h2>Answers</h2><table><tr><th>#</th><th>prompt</th>"
                 + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
    for i, prompt in enumerate(result.prompts):
        row = [f"<td>{i}</td><td class='t'>{e(_conversation_text(prompt))}</td>"]
        best = None
        if result.scores is not None:
            pick = min if result.lower_is_better else max
            best = pick(names, key=lambda n: result.scores[n][i])  # type: ignore[index]
        for n in names:
            score = f"<div class='s'>score {result.scores[n][i]:.4f}</div>" if result.scores is not None else ""
            cls = " best" if n == best else ""
            row.append(f"<td class='t{cls}'>{e(result.responses[n][i])}{score}</td>")
        parts.append("<tr>" + "".join(row) + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"
