"""Multi-process runs: `llmtune train` re-launches itself through `accelerate launch`.

The user types the same command on one GPU or many; when the recipe asks for more than one process
(or for DeepSpeed, even on one GPU) and we are not already inside a launched worker (no
RANK/LOCAL_RANK), the CLI hands the run to
`python -m accelerate.commands.launch ... -m llmtune.cli train ...`. accelerate then starts the
workers with torchrun (DDP, and DeepSpeed on one node) or DeepSpeed's own multi-node launcher
(`deepspeed --hostfile`, via pdsh, when `distributed.hostfile` is set).

The parent resolves the run directory first and passes it as --output-dir, so every worker (and a
default timestamped directory) agrees on where the run goes. It also checks the directory and holds
the run's lock (runs/lock.py) until the workers are done; LLMTUNE_LOCKED_RUN tells them so, and they
neither lock nor check again. On CPU the workers run DDP over gloo.

Signals: the launcher forwards one SIGINT/SIGTERM to each worker, which saves a checkpoint and stops
(torchrun gives them SHUTDOWN_TIMEOUT_S before SIGKILL). The parent ignores Ctrl-C itself and
forwards SIGTERM, so it never exits before its workers; it exits 130 / 143 like a one-process run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmtune.config.checks.device import cuda_present
from llmtune.config.schema import Recipe
from llmtune.modeling.precision import accelerate_name, resolve
from llmtune.runs.lock import PARENT_HOLDS
from llmtune.runs.rundir import STATUS_DONE, STATUS_INTERRUPTED, RunDir, exit_code

LAUNCH_ENV = ("LOCAL_RANK", "RANK")
SHUTDOWN_TIMEOUT_S = 600


def inside_launcher() -> bool:
    """True in a worker started by torchrun/accelerate/deepspeed (they set RANK and LOCAL_RANK)."""
    return any(k in os.environ for k in LAUNCH_ENV)


def needs_relaunch(recipe: Recipe) -> bool:
    """More than one process (or DeepSpeed, whose engine wants a launcher's rank/world environment
    even for one GPU) asked for, and this is the user's process, not a worker."""
    wants = recipe.distributed.world_size > 1 or recipe.distributed.strategy == "deepspeed"
    return wants and not inside_launcher()


def _mixed_precision(recipe: Recipe, cuda: bool) -> str | None:
    """accelerate's --mixed_precision; None ("auto" on a GPU) leaves it to the Trainer's bf16/fp16
    flags, which are resolved on the GPU itself and take precedence anyway."""
    p = recipe.training.precision
    return None if cuda and p == "auto" else accelerate_name(resolve(p, cuda))


def launch_command(recipe: Recipe, train_args: list[str], run_dir: Path, cuda: bool | None = None) -> list[str]:
    """The `accelerate launch` command line that runs `llmtune <train_args>` in every worker.

    For DeepSpeed the config is written into the run directory first (the launcher needs its path).
    `cuda` defaults to whether an NVIDIA GPU is visible.
    """
    d = recipe.distributed
    cuda = cuda_present() if cuda is None else cuda
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if d.accelerate_config:
        cmd += ["--config_file", str(Path(d.accelerate_config).expanduser())]
    cmd += ["--num_processes", str(recipe.distributed.world_size), "--num_machines", str(d.num_nodes),
            "--machine_rank", str(d.machine_rank), "--main_process_port", str(d.main_process_port),
            "--dynamo_backend", "no"]
    if d.main_process_ip:
        cmd += ["--main_process_ip", d.main_process_ip]
    precision = _mixed_precision(recipe, cuda)
    if precision:
        cmd += ["--mixed_precision", precision]
    if d.strategy == "deepspeed":
        from llmtune.launch.deepspeed import deepspeed_config_for

        cmd += ["--use_deepspeed", "--deepspeed_config_file", deepspeed_config_for(recipe, RunDir(run_dir))]
        if d.num_nodes > 1:
            if d.hostfile:
                cmd += ["--deepspeed_hostfile", str(Path(d.hostfile).expanduser()),
                        "--deepspeed_multinode_launcher", "pdsh"]
            else:  # run the same command on every node, like torchrun
                cmd += ["--deepspeed_multinode_launcher", "standard"]
    elif not d.accelerate_config:
        cmd += ["--multi_gpu"]  # torchrun-style DDP workers; on CPU too (see launch_env)
    return [*cmd, "-m", "llmtune.cli", *train_args]


def launch_env(cuda: bool | None = None) -> dict[str, str]:
    """Worker environment. Without a GPU accelerate must be told to run MULTI_CPU (gloo) DDP."""
    env = dict(os.environ)
    cuda = cuda_present() if cuda is None else cuda
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", "1")  # N workers sharing the cores: no oversubscription
    # On Ctrl-C torchrun forwards the signal and waits this long before SIGKILL: time for every
    # worker to write its interrupt checkpoint (torchrun's default of 30 s is short for big models).
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    return env


def train_args(recipe_path: str, overrides: list[str], run_dir: Path, resume: bool) -> list[str]:
    """The `llmtune train ...` arguments each worker gets (the run directory made explicit)."""
    return ["train", recipe_path, *overrides, "--output-dir", str(run_dir), *(["--resume"] if resume else [])]


def relaunch(recipe: Recipe, recipe_path: str, overrides: list[str], run_dir: Path, resume: bool) -> int:
    """Run the recipe in `distributed.world_size` workers and wait; exit code like a single-process run
    (0 completed, 130 / 143 interrupted by SIGINT / SIGTERM, else the launcher's failure code)."""
    cmd = launch_command(recipe, train_args(recipe_path, overrides, run_dir, resume), run_dir)
    print(f"[llmtune] launching {recipe.distributed.world_size} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env={**launch_env(), PARENT_HOLDS: str(run_dir.resolve())})

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    # Ctrl-C reaches the launcher from the terminal already (same process group): don't die on it.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    info = RunDir(run_dir).info()
    if info.get("status") == STATUS_DONE and rc == 0:
        return 0
    if info.get("status") == STATUS_INTERRUPTED:
        return exit_code(STATUS_INTERRUPTED, info.get("signal"))
    return rc or 1
