"""The Rollouts tab: what an online-RL or rejection-sampling run generated, as a table to filter,
sort and label, and its reward / judge score / length / KL curves on one page (reward hacking shows
as reward rising while length or KL runs away).

Samples come from `llmtune.runs.samples.read_samples` (the run directory's samples files, read
tolerantly: any field a stage adds shows up as a column); curves from metrics.jsonl plus per-step
means of the samples. Labels become rows of the workspace's feedback dataset.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from typing import Any

from llmtune.errors import ConfigError
from webui.evaluate import conversation
from webui.feedback import preference_row

BASE_COLUMNS = ["id", "step", "prompt", "response", "reward", "chars"]
HIDDEN = {"id", "source", "step", "prompt", "response", "reward", "index", "candidate"}
CHARTS = {"reward": ("reward", "score", "judge"), "length": ("length",), "kl": ("kl",)}
CHARTS_TITLES = (("reward", "Reward and judge / eval scores"), ("length", "Response length"),
                 ("kl", "KL to the reference"))
SORTS = ["oldest first", "reward: high to low", "reward: low to high", "length: long to short", "step: newest first"]


def extra_columns(samples: list[dict[str, Any]]) -> list[str]:
    """Scalar fields beyond the base ones (length, kl, eval or judge scores, ended, ...), in a stable order."""
    found: dict[str, None] = {}
    for s in samples:
        for k, v in s.items():
            if k not in HIDDEN and v is not None and isinstance(v, (int, float, str, bool)):
                found.setdefault(k, None)
    return list(found)


def table(samples: list[dict[str, Any]], text: str = "", step: str = "all", sort: str = SORTS[0]
          ) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the samples matching TEXT (in prompt or response) and STEP, sorted."""
    extra = extra_columns(samples)
    needle = (text or "").strip().lower()
    chosen = [s for s in samples
              if (not needle or needle in conversation(s["prompt"]).lower() or needle in s["response"].lower())
              and (step in ("all", "", None) or str(s.get("step")) == str(step))]
    key = {
        SORTS[1]: (lambda s: -_num(s.get("reward"))),
        SORTS[2]: (lambda s: _num(s.get("reward"))),
        SORTS[3]: (lambda s: -_num(s.get("length", len(s["response"])))),
        SORTS[4]: (lambda s: -_num(s.get("step"))),
    }.get(sort)
    if key is not None:
        chosen = sorted(chosen, key=key)
    rows = [[s["id"], s.get("step"), conversation(s["prompt"]), s["response"] or "(empty)",
             _round(s.get("reward")), len(s["response"]), *(_round(s.get(k)) for k in extra)] for s in chosen]
    return BASE_COLUMNS + extra, rows


def steps(samples: list[dict[str, Any]]) -> list[str]:
    return ["all", *dict.fromkeys(str(s.get("step")) for s in samples)]


def curves(metrics: list[dict[str, Any]], samples: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, str]]]:
    """Points (step, value, series) for the reward, length and kl charts: every metrics.jsonl key
    naming one of them, and the per-step means of the samples (`samples: reward`, `samples: chars`, ...)."""
    out: dict[str, list[tuple[int, float, str]]] = {name: [] for name in CHARTS}
    for row in metrics:
        for k, v in row.items():
            if k == "step" or not _is_number(v):
                continue
            chart = _chart(k)
            if chart:
                out[chart].append((row["step"], float(v), k))
    by_step: dict[tuple[Any, str], list[float]] = defaultdict(list)
    for s in samples:
        if s.get("step") is None:
            continue
        by_step[(s["step"], "chars")].append(len(s["response"]))
        for k, v in s.items():
            if k not in ("step", "round", "index", "candidate") and _is_number(v):
                by_step[(s["step"], k)].append(float(v))
    for (step, k), values in sorted(by_step.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        chart = "length" if k == "chars" else _chart(k)
        if chart:
            out[chart].append((step, sum(values) / len(values), f"samples: {k}"))
    return out


def pair(samples: list[dict[str, Any]], a: str, b: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The samples A and B, which must be two different answers to the same prompt."""
    by_id = {s["id"]: s for s in samples}
    a, b = (a or "").strip(), (b or "").strip()
    for key, value in (("A", a), ("B", b)):
        if value not in by_id:
            raise ConfigError(f"label: {key}: no sample '{value}' in this run (click a row, or type its id)")
    if a == b:
        raise ConfigError("label: A and B are the same sample; pick two answers to one prompt")
    if by_id[a]["prompt"] != by_id[b]["prompt"]:
        raise ConfigError(f"label: {a} and {b} answer different prompts; a preference compares answers to one prompt")
    return by_id[a], by_id[b]


def label_rows(run: str, first: dict[str, Any], second: dict[str, Any], choice: str
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(preference rows, tie rows) for a label on two samples: `A`, `B` or `tie`."""
    choice = (choice or "").strip().lower()
    if choice not in ("a", "b", "tie"):
        raise ConfigError(f"label: {choice!r} must be A, B or tie")
    better, worse = (second, first) if choice == "b" else (first, second)
    row = preference_row(better["prompt"], better["response"], worse["response"], (run, run), tie=choice == "tie",
                         source="webui:rollouts", samples={"chosen": better["id"], "rejected": worse["id"]})
    return ([], [row]) if choice == "tie" else ([row], [])


def written_row(run: str, sample: dict[str, Any], text: str) -> dict[str, Any]:
    """The user's own answer to a sample's prompt, preferred to the sample's response."""
    text = (text or "").strip()
    if not text:
        raise ConfigError("better answer: write the answer first")
    return preference_row(sample["prompt"], text, sample["response"], ("human", run), source="webui:written",
                          samples={"rejected": sample["id"]})


def suggest(samples: list[dict[str, Any]], labelled: set[frozenset[str]]) -> tuple[str, str]:
    """An unlabelled pair worth a look: the prompt whose answers' rewards differ most, best vs worst."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        groups[json.dumps(s["prompt"], sort_keys=True)].append(s)
    best: tuple[float, str, str] | None = None
    for group in groups.values():
        ranked = sorted(group, key=lambda s: _num(s.get("reward")))
        for lo in ranked:
            for hi in reversed(ranked):
                if lo is hi or lo["response"] == hi["response"] or frozenset((lo["id"], hi["id"])) in labelled:
                    continue
                spread = _num(hi.get("reward")) - _num(lo.get("reward"))
                if best is None or spread > best[0]:
                    best = (spread, hi["id"], lo["id"])
                break
    if best is None:
        raise ConfigError("label: no unlabelled pair of different answers to one prompt left in this run")
    return best[1], best[2]


def preview(samples: list[dict[str, Any]], a: str, b: str) -> str:
    """HTML: the prompt and the answers A and B side by side, as the labeller should read them."""
    by_id = {s["id"]: s for s in samples}
    cells = []
    for slot, sid in (("A", a), ("B", b)):
        s = by_id.get((sid or "").strip())
        if s is None:
            cells.append(f"<div class='pick'><b>{slot}</b>: click a row or type a sample id</div>")
            continue
        cells.append(f"<div class='pick' data-slot='{slot}' data-id='{html.escape(s['id'])}'><b>{slot}</b> "
                     f"<code>{html.escape(s['id'])}</code> reward {_round(s.get('reward'))}<pre>"
                     f"{html.escape(s['response']) or '<i>(empty)</i>'}</pre></div>")
    first = by_id.get((a or "").strip()) or by_id.get((b or "").strip())
    prompt = f"<pre>{html.escape(conversation(first['prompt']))}</pre>" if first else ""
    return f"<div id='rollout-pair'>{prompt}<div style='display:flex;gap:1em'>{''.join(cells)}</div></div>"


def _chart(key: str) -> str | None:
    low = key.lower()
    if "kl_coef" in low:
        return None  # a controller's setting, not a measurement
    return next((name for name, words in CHARTS.items() if any(w in low for w in words)), None)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any) -> float:
    return float(v) if _is_number(v) else float("-inf")


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v
