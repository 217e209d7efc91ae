"""Pipelines: one recipe file that chains stages (sft → rm → ppo), each stage its own run.

    output_dir: runs/rlhf            # stage runs go to runs/rlhf/<stage name>
    model: {name: tiny-llama}        # top-level sections are shared defaults for every stage
    training: {max_steps: 50}
    stages:                          # a list of stage names, or a mapping name → overrides
      sft: {recipe: quickstart.yaml}           # a whole recipe file as the stage (keys may override it)
      rm:  {stage: rm, data: {name: hh, path: data/hh}}
      ppo:
        stage: ppo
        model: {name: "${run:sft}"}                       # the sft stage's run directory
        reward: {type: reward_model, model: "${run:rm}"}

`${run:NAME}` resolves to the run directory of stage NAME, so each output feeds the next by
reference. Every stage is validated before the first one starts; stages already completed are
skipped and an interrupted stage resumes from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmtune.config.confine import active
from llmtune.config.load import find_recipe, read_config
from llmtune.config.schema import STAGES, Recipe, check, parse
from llmtune.errors import ConfigError, hint


@dataclass
class PipelineStage:
    name: str
    recipe: Recipe
    run_dir: Path


def is_pipeline(path: str | Path) -> bool:
    """Whether a recipe file (after inheritance) declares `stages:`."""
    return "stages" in read_config(find_recipe(str(path), None))


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                  output_dir: str | None = None) -> list[PipelineStage]:
    """Split a pipeline file into validated per-stage recipes with their run directories."""
    source = str(path)
    if active() is not None:  # its ${run:...} and stage files are resolved here, outside the confinement
        raise ConfigError(f"{source}: pipelines (stages:) run with `llmtune train` on the command line, not "
                          "from the web UI")
    cfg = read_config(find_recipe(source, None))
    try:
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override '{bad[0]}': expected KEY=VALUE")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        raw_stages = OmegaConf.to_container(cfg.stages, resolve=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {str(exc).splitlines()[0]}") from None
    root = Path(output_dir or cfg.get("output_dir") or f"runs/{Path(source).stem}")

    if isinstance(raw_stages, list):
        named = {str(s): {"stage": str(s)} for s in raw_stages}
        if len(named) != len(raw_stages):
            raise ConfigError(f"{source}: stages: a list of stage names must not repeat; use a mapping "
                              "of named stages instead")
    elif isinstance(raw_stages, dict):
        named = {str(k): dict(v or {}) for k, v in raw_stages.items()}
    else:
        raise ConfigError(f"{source}: stages: expected a list of stage names or a mapping of named stages")
    if not named:
        raise ConfigError(f"{source}: stages: empty")

    run_dirs = {name: root / name for name in named}

    def run_resolver(name: str) -> str:
        if name not in run_dirs:
            raise ConfigError(f"{source}: ${{run:{name}}}: no stage named '{name}'" + hint(name, run_dirs))
        return str(run_dirs[name])

    shared = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("stages", "output_dir")])
    out: list[PipelineStage] = []
    errors: list[str] = []
    pending: set[str] = set()
    OmegaConf.register_resolver("run", run_resolver, replace=True)
    try:
        for name, body in named.items():
            if "recipe" in body and "stage" not in body:
                body["stage"] = str(read_config(find_recipe(str(body["recipe"]), Path(source).resolve().parent)).get("stage"))
            if body.get("stage", name) not in STAGES:
                errors.append(f"stages.{name}.stage: '{body.get('stage', name)}' is not a stage"
                              + hint(str(body.get("stage", name)), STAGES))
                continue
            layers = [shared]
            if "recipe" in body:  # a stage may start from a whole recipe file, then override it
                layers.append(read_config(find_recipe(str(body.pop("recipe")), Path(source).resolve().parent)))
            body.setdefault("stage", name)
            merged = OmegaConf.merge(*layers, OmegaConf.create(body))
            try:
                data = OmegaConf.to_container(merged, resolve=True)
            except OmegaConfBaseException as exc:
                errors.append(f"stages.{name}: {str(exc).splitlines()[0]}")
                continue
            data["output_dir"] = str(run_dirs[name])
            try:
                recipe = check(parse(data, source=f"{source} [stage {name}]"), source=f"{source} [stage {name}]",
                               pending=frozenset(pending))
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            out.append(PipelineStage(name, recipe, run_dirs[name]))
            pending.add(str(run_dirs[name]))
    finally:
        OmegaConf.clear_resolver("run")
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def summary_lines(stages: list[PipelineStage]) -> list[str]:
    return [f"{i + 1}. {s.name}: stage {s.recipe.stage}, model {s.recipe.model.name} → {s.run_dir}"
            for i, s in enumerate(stages)]


def describe(stages: list[PipelineStage]) -> dict[str, Any]:
    return {s.name: {"stage": s.recipe.stage, "run_dir": str(s.run_dir)} for s in stages}
