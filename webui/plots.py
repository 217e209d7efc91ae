"""Curves for the Runs and Rollouts tabs, drawn by matplotlib as inline SVG.

Why not Gradio's LinePlot: its frontend (Gradio 6.31) fixes the colour legend when the chart first
draws, so a series that appears later (eval_loss after the first evaluation, a KL once PPO logs
one) never shows on a live plot; and a series with one point (a single evaluation) has no line to
draw. Here every refresh draws the whole figure, each point has a marker, the legend's labels are
SVG text, and before the first point there is a sentence instead of an empty box.
"""

from __future__ import annotations

import functools
import io
from collections import defaultdict

Point = tuple[float, float, str]  # (step, value, series)


def chart(points: list[Point], title: str, elem_id: str, empty: str = "nothing logged yet") -> str:
    """An HTML block holding the chart of POINTS (one line per series), or EMPTY as text."""
    if not points:
        return f"<div id='{elem_id}' class='llmtune-chart' data-series=''><i>{title}: {empty}</i></div>"
    series = list(dict.fromkeys(s for _, _, s in points))
    svg = _svg(tuple(points), title)
    return f"<div id='{elem_id}' class='llmtune-chart' data-series='{','.join(series)}'>{svg}</div>"


@functools.lru_cache(maxsize=64)
def _svg(points: tuple[Point, ...], title: str) -> str:
    """The figure as SVG text; cached, because the Runs tab redraws every 2 s and most ticks bring no
    new point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for step, value, name in points:
        lines[name].append((step, value))
    with plt.rc_context({"svg.fonttype": "none", "font.size": 9}):  # labels stay text, readable and searchable
        fig, ax = plt.subplots(figsize=(9, 2.8), dpi=100)
        for name, xy in lines.items():
            xy.sort()
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", markersize=3, linewidth=1.5, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
        out = io.StringIO()
        fig.savefig(out, format="svg")
        plt.close(fig)
    text = out.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML
