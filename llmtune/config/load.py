"""Recipe loading: YAML via OmegaConf, `base:` inheritance, `${...}` interpolation, key=value overrides.

Returns a validated `Recipe`; all checks live in `schema.py`. No torch import here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmtune.config.schema import Recipe, check, parse
from llmtune.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def find_recipe(ref: str, relative_to: Path | None = None) -> Path:
    """A base recipe is looked up next to the child, then in the shipped recipes/ directory."""
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
        raise ConfigError(f"{source}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # YAMLError carries line/column in its message
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
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
        merged = OmegaConf.merge(merged, read_config(find_base(str(ref)), chain))
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
    try:
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {str(exc).splitlines()[0]}") from None
    assert isinstance(data, dict)
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
    data = load_dict(path, overrides)
    recipe = parse(data, source=str(path))
    return check(recipe, source=str(path)) if semantic else recipe


def recipe_from_dict(data: dict[str, Any], source: str = "recipe", semantic: bool = True) -> Recipe:
    """Validate an in-memory recipe (web UI, pipelines)."""
    recipe = parse(data, source=source)
    return check(recipe, source=source) if semantic else recipe


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written to every run directory)."""
    return OmegaConf.to_yaml(OmegaConf.create(recipe.to_dict()))
