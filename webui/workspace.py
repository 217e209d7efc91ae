"""The web UI's workspace: one directory holding saved recipes, runs and collected feedback.

    WORKSPACE/recipes/*.yaml            recipes saved from the UI
    WORKSPACE/runs/NAME/                run directories (`llmtune train ... --output-dir` of each launch)
    WORKSPACE/runs/NAME/launch.yaml     the recipe exactly as submitted (bases merged)
    WORKSPACE/runs/NAME/console.log     stdout+stderr of the detached `llmtune train` process
    WORKSPACE/runs/NAME/launcher.json   pid / process group / command of the launch
    WORKSPACE/feedback/preferences.jsonl  votes, rankings, rollout labels and written answers (canonical pairs)
    WORKSPACE/feedback/ties.jsonl         tied votes (kept apart so rm/dpo never train on them)
    WORKSPACE/feedback/data_registry.json the workspace's data registry with the `feedback` entry
    WORKSPACE/feedback/snapshots/NAME.jsonl  frozen copies a retraining uses (NAME.json: count, hash, time)
    WORKSPACE/feedback/export/*.jsonl     TRL-format exports (prompt / chosen / rejected only)
    WORKSPACE/.llmtune/locks/             the UI's own lock files (never beside a recipe or dataset)

Every path the UI accepts, and every path, model, base recipe, rule reward and `${...}` inside the
recipes it validates and launches, goes through the workspace's `Confinement` (llmtune/config/
confine.py), so a browser (or API client) can never read or write outside this directory. The
served app activates it for its process; launched runs get it through their environment. Nothing here imports gradio or torch: it is plain file logic,
shared by the app and testable on its own. State lives on disk only, so a reload, a second browser
tab or a restarted UI sees the same runs and votes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from llmtune.config.confine import RULE_MODULES, Confinement
from llmtune.config.load import RECIPES_DIR, load_text, recipe_from_dict
from llmtune.config.schema import Recipe
from llmtune.errors import ConfigError
from llmtune.launch import threads
from llmtune.runs.lock import describe
from llmtune.runs.lock import holder as lock_holder
from llmtune.runs.rundir import STATUS_DONE, STATUS_FAILED, STATUS_RUNNING, RunDir
from llmtune.runs.samples import read_samples

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
SHIPPED = "shipped/"  # prefix naming a recipe of the repository's recipes/ directory
FEEDBACK_ENTRY = "feedback"
STEP_LINE = re.compile(r"^step (\d+)/(\d+) ", re.MULTILINE)
STATUS_STOPPED = "stopped"  # stopped by the UI before `llmtune train` had written anything: resumable


def check_name(name: str, what: str) -> str:
    """Run and recipe names become directory/file names: keep them to one safe path component."""
    name = (name or "").strip()
    if not NAME.match(name):
        raise ConfigError(f"{what}: {name!r} is not a valid name (letters, digits, '.', '_', '-'; "
                          "no slashes; at most 80 characters)")
    return name


def _atomic_write(path: Path, text: str) -> None:
    """Readers (other tabs, the polling timer) must never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl.flock) on the file PATH, shared by every UI process and tab."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pid_alive(pid: int | None) -> bool:
    """Whether PID is a live (non-zombie) llmtune process; run.json can outlive a killed process."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (not Linux): trust kill(0)
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and b"llmtune" in cmdline


@dataclass
class RunRow:
    """One line of the runs list, read from disk (run.json, launcher.json, metrics.jsonl)."""

    name: str
    status: str
    stage: str
    model: str
    step: int | None
    max_steps: int | None
    loss: float | None
    started: str
    error: str

    def as_list(self) -> list[Any]:
        step = "" if self.step is None else f"{self.step}/{self.max_steps or '?'}"
        loss = "" if self.loss is None else round(self.loss, 4)
        return [self.name, self.status, self.stage, self.model, step, loss, self.started, self.error]


RUN_COLUMNS = ["run", "status", "stage", "model", "step", "loss", "started", "error"]


class Workspace:
    """All file-system operations of the UI, confined to one root directory."""

    def __init__(self, root: str | Path, rule_modules: tuple[str, ...] = ()):
        self.root = Path(root).expanduser().resolve()
        self.policy = Confinement(self.root, (*RULE_MODULES, *rule_modules))
        for sub in ("recipes", "runs", "feedback"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """The UI's lock NAME, kept in WORKSPACE/.llmtune/locks/ (never beside a recipe or dataset)."""
        return locked(self.root / ".llmtune" / "locks" / f"{name}.lock")

    # -- paths ------------------------------------------------------------------------------------
    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def preferences_file(self) -> Path:
        return self.root / "feedback" / "preferences.jsonl"

    @property
    def ties_file(self) -> Path:
        return self.root / "feedback" / "ties.jsonl"

    @property
    def registry_file(self) -> Path:
        """The workspace's data registry: in feedback/, beside the data it names, so it can never be
        llmtune's own data_registry.json (a workspace at the repository root)."""
        return self.root / "feedback" / "data_registry.json"

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "feedback" / "snapshots"

    def registries(self) -> list[str]:
        """The extra registry files a dataset named in the UI is looked up in."""
        return [str(self.registry_file)] if self.registry_file.exists() else []

    def confine(self, path: str | Path, what: str = "path") -> Path:
        """PATH (relative to the workspace, or absolute) resolved with symlinks; refused when it
        lands outside the workspace."""
        return self.policy.path(path, what)

    def relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.root))

    # -- recipes ----------------------------------------------------------------------------------
    def list_recipes(self) -> list[str]:
        """Shipped recipes as `shipped/NAME.yaml`, then saved ones as `recipes/NAME.yaml` (a workspace
        whose recipes/ is the shipped directory, such as the repository root, lists each once)."""
        shipped = sorted(SHIPPED + p.name for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
        if RECIPES_DIR.is_dir() and self.recipes_dir.resolve() == RECIPES_DIR.resolve():
            return shipped
        saved = sorted(f"recipes/{p.name}" for p in self.recipes_dir.glob("*.yaml"))
        return shipped + saved

    def recipe_path(self, ref: str) -> Path:
        """A `shipped/NAME.yaml` reference or a workspace path."""
        if ref.startswith(SHIPPED):
            name = check_name(ref[len(SHIPPED):], "recipe")
            path = RECIPES_DIR / name
        else:
            path = self.confine(ref, "recipe")
        if not path.is_file():
            raise ConfigError(f"recipe: no such file: {ref}")
        return path

    def read_recipe(self, ref: str) -> str:
        return self.recipe_path(ref).read_text()

    def recipe_dict(self, text: str, source: str = "recipe") -> dict[str, Any]:
        """YAML text → merged recipe dict. `base:` references are looked up in the workspace's
        recipes/, the workspace, then the shipped recipes/ (like `llmtune train` next to a file)."""
        return load_text(text, source, lambda ref: self.policy.recipe_file(ref, self.recipes_dir, RECIPES_DIR))

    def validate(self, text: str, source: str = "recipe") -> Recipe:
        """The same checks as `llmtune validate` (schema parse + semantic check); ConfigError on failure."""
        return recipe_from_dict(self.recipe_dict(text, source), source=source)

    def save_recipe(self, name: str, text: str) -> Path:
        """Validate, then write WORKSPACE/recipes/NAME.yaml (never over an existing recipe)."""
        name = check_name(name, "recipe name")
        if not name.endswith((".yaml", ".yml")):
            name += ".yaml"
        self.validate(text, source=name)
        path = self.recipes_dir / name
        with self.lock("recipes"):
            if path.exists():
                raise ConfigError(f"recipe name: recipes/{name} already exists; choose another name")
            _atomic_write(path, text if text.endswith("\n") else text + "\n")
        return path

    # -- runs -------------------------------------------------------------------------------------
    def run_path(self, name: str) -> Path:
        return self.confine(self.runs_dir / check_name(name, "run"), "run")

    def launch(self, name: str, text: str) -> Path:
        """Start `llmtune train` for the recipe TEXT as a detached process in WORKSPACE/runs/NAME."""
        name = check_name(name, "run name")
        self.validate(text, source=name)
        merged = self.recipe_dict(text, name)
        path = self.runs_dir / name
        _refuse_if_held(path, name)
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            raise ConfigError(f"run name: runs/{name} already exists; choose another name or resume it") from None
        recipe_file = path / "launch.yaml"
        recipe_file.write_text(yaml.safe_dump(merged, sort_keys=False))
        # --force: the directory is the one made just above, holding only the UI's own files
        # (launch.yaml, console.log, launcher.json), which `llmtune train` would not take for a run.
        self._spawn(path, ["train", str(recipe_file), "--output-dir", str(path), "--force"])
        return path

    def resume(self, name: str) -> Path:
        """`llmtune train RUN/recipe.yaml --output-dir RUN --resume` for a stopped or failed run; a run
        stopped before `llmtune train` wrote anything starts again from the UI's launch.yaml."""
        path = self.run_path(name)
        row = self.run_row(path)
        if row.status in (STATUS_RUNNING, "starting"):
            raise ConfigError(f"run {name}: still {row.status}; stop it before resuming")
        if row.status == STATUS_DONE:
            raise ConfigError(f"run {name}: already completed")
        _refuse_if_held(path, name, settle_s=5.0)  # a just-stopped run is still exiting
        recipe_file = path / "recipe.yaml"
        if recipe_file.is_file() and RunDir(path).info():
            self._spawn(path, ["train", str(recipe_file), "--output-dir", str(path), "--resume"])
        elif (path / "launch.yaml").is_file():
            # Nothing but the UI's own files here: --force, exactly as the launch that was stopped.
            self._spawn(path, ["train", str(path / "launch.yaml"), "--output-dir", str(path), "--force"])
        else:
            raise ConfigError(f"run {name}: has neither recipe.yaml nor launch.yaml; launch it again instead")
        return path

    def _spawn(self, path: Path, args: list[str]) -> None:
        """Detached (own session and process group): closing the browser or the UI does not stop it."""
        cmd = [sys.executable, "-m", "llmtune.cli", *args]
        with (path / "console.log").open("a") as log:
            log.write(f"$ llmtune {' '.join(args)}\n")
            log.flush()
            # Confined like the UI: the run resolves the recipe's paths against the workspace and
            # refuses what the UI's validation refused, whatever the launch.yaml on disk says.
            # Its CPU threads: the runs' share of the cores (not the UI's), split with the runs still going.
            running = sum(p.poll() is None for p in _CHILDREN.values())
            budget = threads.env(threads.share(running + 1, threads.webui_split()[1]))
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **budget, **self.policy.env(), "PYTHONUNBUFFERED": "1"})
        _atomic_write(path / "launcher.json", json.dumps(
            {"pid": proc.pid, "pgid": proc.pid, "command": cmd, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "launched": time.time(), "stopped": None},
            indent=2) + "\n")
        _CHILDREN[proc.pid] = proc

    def stop(self, name: str) -> str:
        """SIGTERM to the run's process group: the run saves a checkpoint and marks itself interrupted."""
        path = self.run_path(name)
        launcher = _read_json(path / "launcher.json")
        pgid = launcher.get("pgid")
        status = self.run_row(path).status
        if status not in (STATUS_RUNNING, "starting") or not pid_alive(pgid):
            raise ConfigError(f"run {name}: not running (status {status})")
        # Recorded first: a process still starting up dies of the SIGTERM without writing anything,
        # and the run must then read as stopped (resumable), not failed.
        _atomic_write(path / "launcher.json", json.dumps({**launcher, "stopped": time.time()}, indent=2) + "\n")
        os.killpg(pgid, signal.SIGTERM)
        return f"sent SIGTERM to run {name} (process group {pgid}); it saves a checkpoint and stops"

    def run_row(self, path: Path) -> RunRow:
        """Status from run.json, corrected by process liveness (a killed run never writes 'failed')."""
        _reap()
        info = RunDir(path).info()
        launcher = _read_json(path / "launcher.json")
        alive = pid_alive(launcher.get("pid"))
        status = info.get("status") or ("starting" if alive else STATUS_FAILED)
        if alive and status != STATUS_RUNNING and launcher.get("launched", 0) >= _epoch(info.get("ended")):
            status = "starting"  # resumed: the new process has not rewritten run.json yet
        error = info.get("error") or ""
        if status == STATUS_RUNNING and not pid_alive(info.get("pid")) and not alive:
            status, error = "dead", "the training process is gone without finishing (killed?)"
        if launcher.get("stopped") and not alive and (not info or status == "dead"):
            status, error = STATUS_STOPPED, ""  # stopped from the UI before the run could checkpoint
        elif not info and not alive:
            error = _last_error_line(path / "console.log")
        recipe = _read_yaml(path / "recipe.yaml") or _read_yaml(path / "launch.yaml")
        step, max_steps = self.progress(path, recipe)
        if status == STATUS_DONE and step is not None and max_steps is None:
            max_steps = step
        losses = [r["loss"] for r in RunDir(path).metrics() if isinstance(r.get("loss"), (int, float))]
        summary = info.get("summary") or {}
        loss = summary.get("train_loss") if status == "completed" and summary.get("train_loss") is not None \
            else (losses[-1] if losses else None)
        model = str((recipe.get("model") or {}).get("name", ""))
        if Path(model).is_absolute() and self.policy.contains(model):
            model = self.relative(Path(model))  # runs/NAME, as every other field of the UI names it
        return RunRow(name=path.name, status=status, stage=str(recipe.get("stage", "")), model=model,
                      step=step, max_steps=max_steps,
                      loss=loss, started=str(info.get("started") or launcher.get("started") or ""), error=error)

    def list_runs(self) -> list[RunRow]:
        """Every run directory in the workspace, newest first."""
        dirs = [p for p in self.runs_dir.iterdir() if p.is_dir()]
        dirs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [self.run_row(p) for p in dirs]

    def progress(self, path: Path, recipe: dict[str, Any]) -> tuple[int | None, int | None]:
        """(current step, total steps) from the `step N/M` lines `llmtune train` printed into the UI's
        console.log; for a run trained elsewhere (a shell), the last step of metrics.jsonl (or the final
        step of run.json) out of the recipe's training.max_steps when it sets one."""
        found = STEP_LINE.findall(_tail(path / "console.log", 64_000))
        if found:
            step, total = found[-1]
            return int(step), int(total)
        rows = RunDir(path).metrics()
        final = (RunDir(path).info().get("summary") or {}).get("global_step")
        step = final if isinstance(final, int) else (rows[-1]["step"] if rows else None)
        max_steps = (recipe.get("training") or {}).get("max_steps")
        return step, (max_steps if isinstance(max_steps, int) and max_steps > 0 and step is not None else None)

    def log_tail(self, name: str, lines: int = 12) -> str:
        """The last LINES lines of the run's console: console.log of a UI launch, else the train.log
        `llmtune train` writes (a run started from a shell); tqdm bars left out (noise once redrawn)."""
        path = self.run_path(name)
        console = path / "console.log"
        text = _tail(console if console.is_file() else path / "train.log", 64_000)
        kept = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln
                and "?it/s" not in ln and "examples/s]" not in ln]
        return "\n".join(kept[-lines:])

    def metrics(self, name: str) -> list[dict[str, Any]]:
        return RunDir(self.run_path(name)).metrics()

    def rollouts(self, name: str) -> list[dict[str, Any]]:
        """Every response the run generated (online RL or rejection sampling), one record each."""
        return read_samples(self.run_path(name))

    def parent_of(self, name: str) -> str | None:
        """The model run NAME started from, as the chat and compare fields name it (`runs/NAME` or a
        registry name), or None when it is not something the UI can load."""
        path = self.run_path(name)
        recipe = _read_yaml(path / "recipe.yaml") or _read_yaml(path / "launch.yaml")
        model = str((recipe.get("model") or {}).get("name") or "")
        if not model:
            return None
        candidate = Path(model)
        if candidate.is_absolute():
            candidate = candidate.resolve()
            run = next((p for p in (candidate, *candidate.parents) if p.parent == self.runs_dir), None)
            return f"runs/{run.name}" if run is not None and (run / "model").is_dir() else None
        from llmtune.registry.models import registry_models

        return model if model in registry_models() else None

    def lineage_judge(self, name: str) -> str | None:
        """The reward a run's lineage was trained for (RS or PPO upstream of a DPO on their labels), as
        a judge compare accepts: `runs/NAME/recipe.yaml` (its `reward:` section); None without one."""
        current: str | None = name
        for _ in range(8):  # a lineage is short; a loop of hand-edited recipes must not hang the UI
            if current is None:
                return None
            if _read_yaml(self.run_path(current) / "recipe.yaml").get("reward"):
                return f"runs/{current}/recipe.yaml"
            parent = self.parent_of(current)
            current = parent[len("runs/"):] if parent and parent.startswith("runs/") else None
        return None

    def judge_files(self) -> list[str]:
        """The recipe.yaml of every run that trained against a reward: usable as a compare judge."""
        return sorted(f"runs/{p.parent.name}/recipe.yaml" for p in self.runs_dir.glob("*/recipe.yaml")
                      if _read_yaml(p).get("reward"))

    def labelled_pairs(self, run: str) -> set[frozenset[str]]:
        """Pairs of rollout samples of RUN (`runs/NAME`) already labelled (preferences and ties)."""
        found = set()
        for file in (self.preferences_file, self.ties_file):
            for line in (file.read_text().splitlines() if file.exists() else []):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                ids = row.get("samples") or {}
                if row.get("models", {}).get("rejected") == run and len(ids) == 2:
                    found.add(frozenset(ids.values()))
        return found

    def trained_models(self) -> list[str]:
        """Runs with a final model, as `runs/NAME` (what `load_for_inference` accepts as a path)."""
        return sorted(f"runs/{p.parent.name}" for p in self.runs_dir.glob("*/model") if p.is_dir())

    # -- feedback ---------------------------------------------------------------------------------
    def record_votes(self, rows: list[dict[str, Any]], ties: list[dict[str, Any]]) -> int:
        """Append preference rows (and tie rows) under a file lock, register the `feedback` dataset,
        and return the number of preferences collected so far."""
        with self.lock("feedback"):
            for file, batch in ((self.preferences_file, rows), (self.ties_file, ties)):
                if batch:
                    with file.open("a") as fh:
                        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch))
                        fh.flush()
                        os.fsync(fh.fileno())
            self._register_feedback()
            return _count_lines(self.preferences_file)

    def snapshot_feedback(self) -> dict[str, Any]:
        """Freeze the preference pairs collected so far into feedback/snapshots/NAME.jsonl (NAME.json:
        name, count, ties, sha256, created) for a retraining to learn from: the run records the file's
        hash in its run.json, so a model can be traced to exactly these labels. The same content
        gives the same snapshot back."""
        with self.lock("feedback"):
            data = self.preferences_file.read_bytes() if self.preferences_file.exists() else b""
            count = sum(1 for line in data.splitlines() if line.strip())
            if not count:
                raise ConfigError("feedback: no preference pairs yet; vote on answers or label rollouts first")
            digest = hashlib.sha256(data).hexdigest()
            for known in self.snapshots():
                if known.get("sha256") == digest:
                    return known
            name = f"feedback-{time.strftime('%Y%m%d-%H%M%S')}-{digest[:8]}"
            self.snapshots_dir.mkdir(parents=True, exist_ok=True)
            manifest = {"name": name, "file": f"feedback/snapshots/{name}.jsonl",
                        "count": count, "ties": _count_lines(self.ties_file), "sha256": digest,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": self.relative(self.preferences_file)}
            (self.snapshots_dir / f"{name}.jsonl").write_bytes(data)
            _atomic_write(self.snapshots_dir / f"{name}.json", json.dumps(manifest, indent=2) + "\n")
            return manifest

    def snapshots(self) -> list[dict[str, Any]]:
        """The feedback snapshots, oldest first."""
        found = [_read_json(p) for p in sorted(self.snapshots_dir.glob("*.json"))]
        return [m for m in found if m.get("name")]

    def snapshot_of(self, name: str) -> dict[str, Any] | None:
        """The feedback snapshot run NAME trained on (matched by the sha256 its run.json records)."""
        recorded = {d.get("sha256") for d in RunDir(self.run_path(name)).info().get("data") or []}
        return next((m for m in self.snapshots() if m.get("sha256") in recorded), None)

    def export_feedback(self) -> Path:
        """The preference pairs as TRL's conversational preference JSONL (prompt, chosen, rejected;
        no ties, no bookkeeping fields) in feedback/export/, for training anywhere."""
        rows = []
        with self.lock("feedback"):
            if self.preferences_file.exists():
                for line in self.preferences_file.read_text().splitlines():
                    if line.strip():
                        row = json.loads(line)
                        rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
        if not rows:
            raise ConfigError("feedback: no preference pairs to export yet")
        out = self.root / "feedback" / "export" / f"preferences-trl-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return out

    def feedback_counts(self) -> tuple[int, int]:
        """(preferences, ties) collected so far."""
        return _count_lines(self.preferences_file), _count_lines(self.ties_file)

    def _register_feedback(self) -> None:
        """Add or refresh the `feedback` entry of the workspace's registry, keeping other entries."""
        with self.lock("registry"):
            data = _read_json(self.registry_file)
            data[FEEDBACK_ENTRY] = {
                "path": self.preferences_file.name,  # relative to the registry file beside it
                "format": "canonical",
                "shapes": ["preference", "prompt", "sft"],
                "description": "Side-by-side votes collected in the llmtune web UI (chosen vs rejected).",
                "license": "unknown",
            }
            _atomic_write(self.registry_file, json.dumps(data, indent=2) + "\n")


def _refuse_if_held(path: Path, name: str, settle_s: float = 0.0) -> None:
    """A run another process writes (a CLI `llmtune train`, another UI) holds its lock: never start a
    second writer in it (the child would refuse too; this says so in the UI, naming the holder).
    `settle_s`: how long a run whose run.json is already final may take to exit and drop its lock."""
    deadline = time.monotonic() + settle_s
    while (held := lock_holder(path)) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    if held is not None:
        raise ConfigError(f"run {name}: in use by another llmtune process ({describe(held)}); wait for it or "
                          "stop it first")


# Popen handles of runs this UI process started, so finished children are reaped (no zombies that
# would look alive to kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _epoch(stamp: str | None) -> float:
    """run.json's `%Y-%m-%dT%H:%M:%S%z` time as seconds since the epoch (0 when absent)."""
    if not stamp:
        return 0.0
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return 0.0


def _tail(path: Path, size: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - size))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_error_line(path: Path) -> str:
    """The line of console.log that best says why a run ended without a run.json (the UI's own
    `$ llmtune ...` command lines are not an error)."""
    lines = [ln for ln in _tail(path, 16_000).splitlines() if ln.strip() and not ln.startswith("$ llmtune ")]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[-1][:300]


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0

