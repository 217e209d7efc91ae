"""The reward curve of an online-RL run as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _smooth(values: list[float]) -> tuple[list[float], int]:
    window = max(1, len(values) // 10)
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))], window


def reward_curve(rows: list[dict[str, Any]], out: Path, title: str = "reward curve") -> Path | None:
    """Reward (and its running mean), the eval_reward scored on the same samples, held-out reward and
    KL against the step; response length below, where reward hacking by length shows. None when
    nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_rows = [r for r in rows if "reward_mean" in r]
    if not steps_rows:
        return None
    steps = [r["step"] for r in steps_rows]
    reward = [r["reward_mean"] for r in steps_rows]
    smooth, window = _smooth(reward)
    fig, (ax, ax_len) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True, height_ratios=(2, 1))
    ax.plot(steps, reward, color="tab:blue", alpha=0.35, label="reward (mean per step)")
    ax.plot(steps, smooth, color="tab:blue", label=f"reward (running mean, {window} steps)")
    judged = [r for r in steps_rows if "eval_reward_mean" in r]
    if judged:
        ax.plot([r["step"] for r in judged], _smooth([r["eval_reward_mean"] for r in judged])[0], color="tab:green",
                label="eval_reward on the same samples (running mean)")
    heldout = [r for r in rows if "heldout_reward_mean" in r]
    if heldout:
        ax.plot([r["step"] for r in heldout], [r["heldout_reward_mean"] for r in heldout], "o-", color="tab:purple",
                label="held-out reward (greedy)")
    ax.set_ylabel("reward")
    ax.legend(loc="upper left", fontsize=8)
    if any("kl" in r for r in steps_rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("kl", float("nan")) for r in steps_rows], color="tab:red", alpha=0.6,
                 label="KL to reference")
        ax2.set_ylabel("KL (sum over response tokens)")
        ax2.legend(loc="lower right", fontsize=8)
    ax_len.plot(steps, [r.get("response_length", float("nan")) for r in steps_rows], color="tab:gray")
    ax_len.set_ylabel("response tokens")
    ax_len.set_xlabel("step")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
