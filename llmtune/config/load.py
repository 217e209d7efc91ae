"""Recipe loading: YAML via OmegaConf, `base:` inheritance, `${...}` interpolation, key=value overrides.

Returns a validated `Recipe`; all checks live in `schema.py`. No torch import here. Under the web
UI's confinement (`confine.active()`) base lookup, interpolation and every path-valued key follow
its rules; on the command line `${oc.env:VAR}` and paths relative to the working directory work.
Error messages name the file, line and key, never what a file contains.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmtune.config.confine import active
from llmtune.config.schema import Recipe, check, parse
from llmtune.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def find_recipe(ref: str, relative_to: Path | None = None) -> Path:
    """A base recipe is looked up next to the child, then in the shipped recipes/ directory
    (confined: next to the child, in the workspace, then shipped; never the working directory)."""
    policy = active()
    if policy is not None:
        return policy.recipe_file(ref, relative_to, RECIPES_DIR)
    candidates = [Path(ref).expanduser()]
    if relative_to is not None and not Path(ref).is_absolute():
        candidates.insert(0, relative_to / ref)
    candidates.append(RECIPES_DIR / ref)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"recipe file not found: {ref}")


def _mapping(parse: Callable[[], Any], source: str | Path) -> DictConfig:
    try:
        cfg = parse()
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {str(exc).splitlines()[0]}") from None
    except yaml.MarkedYAMLError as exc:  # the problem and where, without yaml's snippet of the text
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{source}: not valid YAML: {exc.problem or exc.context}{where}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid YAML ({type(exc).__name__})") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections")
    return cfg


def _with_bases(cfg: DictConfig, find_base: Callable[[str], Path], chain: tuple[Path, ...]) -> DictConfig:
    """`base:` (one reference or a list) merged under the recipe, left to right."""
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    merged = OmegaConf.create()
    for ref in [base] if isinstance(base, str) else list(base):
        try:
            path = find_base(str(ref))
        except ConfigError as exc:
            raise ConfigError(f"base: {exc}") from None
        merged = OmegaConf.merge(merged, read_config(path, chain))
    return OmegaConf.merge(merged, cfg)


def read_config(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """One recipe file with its bases merged in (not yet interpolated or validated)."""
    if path in chain:
        raise ConfigError("recipe inheritance loops: " + " -> ".join(p.name for p in (*chain, path)))
    cfg = _mapping(lambda: OmegaConf.load(path), path)
    return _with_bases(cfg, lambda ref: find_recipe(ref, path.parent), (*chain, path))


def _to_dict(cfg: DictConfig, source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. training.learning_rate=1e-5")
    policy = active()
    try:
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        if policy is not None:
            policy.interpolations(OmegaConf.to_container(cfg, resolve=False), str(source))
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {str(exc).splitlines()[0]}") from None
    assert isinstance(data, dict)
    if policy is not None:  # `\${oc.env:X}` is `${oc.env:X}` now, and a run would resolve it
        policy.interpolations(data, str(source))
    return data


def load_dict(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The merged, interpolated recipe as a plain dict (before schema validation)."""
    path = find_recipe(str(path))
    return _to_dict(read_config(path), path, overrides)


def load_text(text: str, source: str, find_base: Callable[[str], Path]) -> dict[str, Any]:
    """A recipe given as YAML text (the web UI's editor) as a merged, interpolated dict; `base:`
    references are resolved by `find_base`."""
    cfg = _mapping(lambda: OmegaConf.create(text) if text.strip() else None, source)
    return _to_dict(_with_bases(cfg, find_base, ()), source)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, semantic: bool = True) -> Recipe:
    """Load, merge and validate a recipe. Raises ConfigError with every problem found."""
    return recipe_from_dict(load_dict(path, overrides), source=str(path), semantic=semantic)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe", semantic: bool = True) -> Recipe:
    """Validate an in-memory recipe (web UI, pipelines); confined, its outside references first."""
    recipe = parse(data, source=source)
    policy = active()
    if policy is not None:
        policy.resolve_refs(recipe, source)
    return check(recipe, source=source) if semantic else recipe


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written to every run directory)."""
    return OmegaConf.to_yaml(OmegaConf.create(recipe.to_dict()))
