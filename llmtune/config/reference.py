"""The recipe key reference in Markdown, generated from the schema (README embeds it; a test keeps
them in sync)."""

from __future__ import annotations

from llmtune.config.schema import Recipe, iter_keys

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def markdown() -> str:
    lines = [BEGIN, "| key | type | default | meaning |", "|---|---|---|---|"]
    for path, tp, default, doc in iter_keys(Recipe):
        shown = "" if default is None else f"`{default}`" if default != "required" else "**required**"
        lines.append(f"| `{path}` | {tp.replace('|', '/')} | {shown} | {doc.replace('|', '/')} |")
    lines.append(END)
    return "\n".join(lines)
