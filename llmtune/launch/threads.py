"""CPU thread budgets for llmtune processes and models that share one machine.

Why: torch gives every process (and every thread that runs a model) as many threads as there are
cores. Two such on one small CPU — the web UI answering chat while a run it launched trains, a
server with several models, a server and its client — oversubscribe the cores and each runs many
times slower (the quickstart on a busy 2-core box: 101-178 s with default threads, 6.4 s with one).
So what llmtune starts side by side gets budgets that do not overlap, and `training.threads` sets a
run's own explicitly. Nothing here imports torch until a budget is applied.
"""

from __future__ import annotations

import os

ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configured() -> int | None:
    """The thread count the environment asks for (OMP_NUM_THREADS), if any."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def share(parts: int, total: int | None = None) -> int:
    """Threads for one of PARTS equal shares of TOTAL (default: the usable cores), at least one."""
    return max(1, (total or cores()) // max(1, parts))


def env(threads: int) -> dict[str, str]:
    """Environment that caps a child process's math libraries at THREADS threads."""
    return {key: str(threads) for key in ENV_KEYS}


def webui_split(total: int | None = None) -> tuple[int, int]:
    """(threads for the web UI's own models: chat and compare; threads for the runs it launches).
    The UI keeps a quarter of the cores (at least one), the runs share the rest."""
    total = total or cores()
    ui = max(1, total // 4)
    return ui, max(1, total - ui)


def apply(threads: int) -> None:
    """Use THREADS threads for tensor math in this thread (and threads started after it) and in
    child processes."""
    import torch

    torch.set_num_threads(threads)
    os.environ.update(env(threads))
