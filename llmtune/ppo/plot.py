"""The reward curve of a PPO run as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def reward_curve(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Plot reward_mean (and its running mean) and KL against the step; None when nothing logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "reward_mean" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    reward = [r["reward_mean"] for r in rows]
    window = max(1, len(reward) // 10)
    smooth = [sum(reward[max(0, i - window + 1):i + 1]) / len(reward[max(0, i - window + 1):i + 1])
              for i in range(len(reward))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, reward, color="tab:blue", alpha=0.35, label="reward (mean per step)")
    ax.plot(steps, smooth, color="tab:blue", label=f"reward (running mean, {window} steps)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("reward")
    if any("kl" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("kl", float("nan")) for r in rows], color="tab:red", alpha=0.6, label="KL to reference")
        ax2.set_ylabel("KL (sum over response tokens)")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper left")
    ax.set_title("PPO reward curve")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
