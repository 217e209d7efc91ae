"""The rollouts a run generated, as one flat record per response: what the web UI's rollout browser
shows and labels, and what a script inspecting reward hacking reads.

    RUN/samples.jsonl             online RL (ppo): {"step", "prompt", "response", "reward", ...} per row
    RUN/rs/round-K/samples.jsonl  rejection sampling: {"index", "prompt", "responses": [...], "scores": [...]}

Rows are read tolerantly: every other field a stage writes (a response length, a KL, an eval or judge
score, `ended`) is kept as it is, so new fields show up without changes here. For rejection sampling a
list field as long as `responses` holds one value per response (`scores` becomes `reward`), and a
round's step is the optimizer step the round started from (its samples were drawn before it trained).
A line being written right now, or cut by a crash, is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PPO_FILE = "samples.jsonl"
RS_GLOB = "rs/round-*/samples.jsonl"


def rollout_files(run: str | Path) -> list[Path]:
    """The samples files of a run directory, in the order they were written."""
    root = Path(run)
    rounds = sorted(root.glob(RS_GLOB), key=lambda p: _round_number(p.parent))
    return [*([root / PPO_FILE] if (root / PPO_FILE).is_file() else []), *rounds]


def read_samples(run: str | Path) -> list[dict[str, Any]]:
    """Every response of every samples file of RUN, oldest first.

    Each record has `id` (stable: `s{step}-{i}` or `r{round}-p{index}-c{candidate}`), `source` (the
    file, relative to the run), `step`, `round` (rejection sampling) or None, `prompt` (messages),
    `response`, `reward` (None when the row has none) and the row's other fields."""
    root = Path(run)
    out: list[dict[str, Any]] = []
    for file in rollout_files(root):
        rel = str(file.relative_to(root))
        if file.parent.name.startswith("round-"):
            k = _round_number(file.parent)
            step = _round_start_step(root, k)
            for row in _rows(file):
                out.extend(_rs_records(row, rel, k, step))
        else:
            seen: dict[int, int] = {}
            for row in _rows(file):
                step = row.get("step")
                i = seen.get(step, 0)
                seen[step] = i + 1
                extra = {k: v for k, v in row.items() if k not in ("step", "prompt", "response", "reward")}
                out.append({"id": f"s{step}-{i}", "source": rel, "step": step, "round": None,
                            "prompt": row.get("prompt") or [], "response": str(row.get("response") or ""),
                            "reward": row.get("reward"), **extra})
    return out


def _rs_records(row: dict[str, Any], rel: str, k: int, step: int) -> list[dict[str, Any]]:
    responses = row.get("responses") or []
    n = len(responses)
    per = {key: v for key, v in row.items() if isinstance(v, list) and len(v) == n and key not in ("responses", "prompt")}
    shared = {key: v for key, v in row.items() if key not in per and key not in ("responses", "prompt", "index")}
    index = row.get("index")
    records = []
    for j, response in enumerate(responses):
        values = {("reward" if key == "scores" else key): v[j] for key, v in per.items()}
        records.append({"id": f"r{k}-p{index}-c{j}", "source": rel, "step": step, "round": k,
                        "prompt": row.get("prompt") or [], "response": str(response),
                        "reward": values.pop("reward", None), "index": index, "candidate": j, **shared, **values})
    return records


def _rows(file: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _round_number(path: Path) -> int:
    tail = path.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 0


def _round_start_step(root: Path, k: int) -> int:
    """The optimizer step round K started from: where round K-1 ended (rs/round-{K-1}/done.json)."""
    try:
        return int(json.loads((root / "rs" / f"round-{k - 1}" / "done.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
