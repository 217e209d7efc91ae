"""Confinement: the one rule that keeps recipes from the web UI inside its workspace directory.

`llmtune webui` activates it for its own process and, through the environment variable
`LLMTUNE_CONFINE`, for every `llmtune train` it launches, so a run enforces exactly what the UI's
validation did. While it is active, every outside reference a recipe can make is resolved by one
`Confinement` method, at the place where it is resolved:

  - recipe files (`base:` chains, every link): inside the workspace or the shipped recipes/;
  - paths (schema fields marked `ref="path"` or `ref="data"`: data.path, data.registry and the paths
    inside such registry files, DeepSpeed/accelerate configs, hostfile, output_dir): relative to the
    workspace root, never the working directory; symlinks resolved; inside the workspace (data may
    also be `package:` files shipped with llmtune);
  - models (`ref="model"`: model.name, reward.model, ppo/rl.value_model_path, the UI's model fields): a
    model registry name, or a directory inside the workspace; no `..`, no hub ids, no fall-through
    to the working directory;
  - rule rewards (`ref="rule"`): functions of allow-listed modules only, checked before any import;
  - the environment: `ref="env"` keys (a judge's api_key_env) and every `${resolver:...}` (oc.env,
    oc.decode, ...) are refused; only references to other recipe keys are resolved, checked before
    and after the first resolution (an escaped `\\${oc.env:X}` becomes one);
  - pipelines (`stages:`) are refused: they resolve stage files and `${run:NAME}` on their own.

Without it (the command line) recipes resolve as the shell user expects: relative to the working
directory, with OmegaConf's resolvers such as `${oc.env:VAR}` available.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.errors import ConfigError, hint, problems

ENV_VAR = "LLMTUNE_CONFINE"  # the workspace root
RULES_ENV_VAR = "LLMTUNE_CONFINE_RULES"  # comma-separated modules rule rewards may come from
RULE_MODULES = ("llmtune.rewards.rules",)


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass(frozen=True)
class Confinement:
    """A workspace root plus the modules rule rewards may be imported from."""

    root: Path
    rule_modules: tuple[str, ...] = RULE_MODULES

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def activate(self) -> None:
        """Confine this process and every process it starts from now on."""
        os.environ.update(self.env())

    def env(self) -> dict[str, str]:
        """The environment that confines a child process (`llmtune train` launched by the UI)."""
        return {ENV_VAR: str(self.root), RULES_ENV_VAR: ",".join(self.rule_modules)}

    def contains(self, path: str | Path) -> bool:
        return _within(Path(path).expanduser().resolve(), self.root)

    # -- the rules -------------------------------------------------------------------------------
    def path(self, value: str | Path, key: str) -> Path:
        """VALUE relative to the workspace (or absolute), symlinks resolved; refused outside it."""
        text = str(value).strip()
        if not text:
            raise ConfigError(f"{key}: empty path")
        p = Path(text).expanduser()
        resolved = (p if p.is_absolute() else self.root / p).resolve()
        if not _within(resolved, self.root):
            raise ConfigError(f"{key}: '{text}' is outside the workspace {self.root}; the web UI only reads and "
                              "writes files inside it")
        return resolved

    def data(self, value: str, key: str) -> Path:
        """A data file: `package:` data shipped with llmtune, else a path inside the workspace."""
        from llmtune.data.registry import PACKAGE_DIR, PACKAGE_PREFIX

        if not value.startswith(PACKAGE_PREFIX):
            return self.path(value, key)
        resolved = (PACKAGE_DIR / value[len(PACKAGE_PREFIX):]).resolve()
        if not _within(resolved, PACKAGE_DIR):
            raise ConfigError(f"{key}: '{value}' leaves the data shipped with llmtune")
        return resolved

    def model(self, value: str, key: str) -> str:
        """A model registry name as is, else the absolute path of a model directory in the workspace."""
        from llmtune.registry.models import registry_models

        text = str(value).strip()
        models = registry_models()
        if text in models:
            return text
        if ".." in Path(text).parts:
            raise ConfigError(f"{key}: '{text}' contains '..'; from the web UI a model is a registry name "
                              f"(`llmtune models`) or a directory inside the workspace {self.root}")
        path = self.path(text, key)
        if path.is_dir():
            return str(path)
        if "/" not in text:  # a name: most likely a typo of a registry name
            raise ConfigError(f"{key}: unknown model '{text}'{hint(text, models)} (the web UI loads registry "
                              "models and model directories inside the workspace only)")
        raise ConfigError(f"{key}: no model '{text}' in the workspace {self.root}; the web UI loads registry "
                          "models and model directories inside the workspace only (no hub ids)")

    def recipe_file(self, ref: str, relative_to: Path | None, shipped: Path) -> Path:
        """A recipe next to the one naming it, in the workspace, or shipped; nothing else is read."""
        p = Path(ref)
        places = [p] if p.is_absolute() else [*([relative_to / p] if relative_to else []), self.root / p, shipped / p]
        for place in places:
            resolved = place.resolve()
            if (_within(resolved, self.root) or _within(resolved, shipped.resolve())) and resolved.is_file():
                return resolved
        raise ConfigError(f"'{ref}' is not a recipe file inside the workspace {self.root} or the shipped "
                          "recipes/ (the web UI reads no other files)")

    def rule(self, function: str, key: str) -> None:
        """Refuse, before anything is imported, a rule reward from a module off the allow-list."""
        module = function.partition(":")[0].strip()
        if module not in self.rule_modules:
            raise ConfigError(f"{key}: module '{module}' is not allowed from the web UI; rule rewards come from "
                              f"{', '.join(self.rule_modules)} (`llmtune webui --rule-module MODULE` adds one)")

    def interpolations(self, data: Any, source: str) -> None:
        """Refuse every `${resolver:...}` in the strings of a plain recipe container."""
        for key, text in _strings(data, ""):
            if "${" not in text:
                continue
            bad = sorted(_resolver_names(text))
            if bad:
                raise ConfigError(f"{source}: {key}: ${{{bad[0]}:...}} is not allowed in a recipe from the web UI; "
                                  "only references to other recipe keys (e.g. ${training.max_steps}) are resolved")

    # -- a whole recipe --------------------------------------------------------------------------
    def resolve_refs(self, recipe: Any, source: str) -> None:
        """Resolve every schema field marked `ref` in place (paths become absolute, inside the
        workspace), or raise one ConfigError listing each key that reaches outside."""
        errors: list[str] = []
        self._fields(recipe, "", errors)
        self._registry_paths(recipe.data.registry, errors)
        if errors:
            raise ConfigError(problems(source, errors))

    def _registry_paths(self, extra_files: list[str], errors: list[str]) -> None:
        """The data paths inside registry files in the workspace (the feedback registry, a user's own)
        follow the data rule too: a registry entry must not be a way out."""
        from llmtune.data.registry import read_registry, user_files

        for file in user_files(extra_files):
            if not (file.is_file() and self.contains(file)):
                continue
            try:
                entries = read_registry(file)
            except ConfigError as exc:
                errors.append(f"data.registry: {exc}")
                continue
            for name, entry in entries.items():
                if entry.path:
                    try:
                        self.data(entry.path, f"data.registry: {file.name}: entry '{name}': path")
                    except ConfigError as exc:
                        errors.append(str(exc))

    def _fields(self, obj: Any, prefix: str, errors: list[str]) -> None:
        for f in dataclasses.fields(obj):
            value, key, kind = getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name, f.metadata.get("ref")
            items = value if isinstance(value, list) else [value]
            if value is None or not items:
                continue
            if dataclasses.is_dataclass(items[0]):
                for i, item in enumerate(items):
                    self._fields(item, f"{key}[{i}]" if isinstance(value, list) else key, errors)
                continue
            if kind is None:
                continue
            try:
                out = [self._ref(kind, item, f"{key}[{i}]" if isinstance(value, list) else key)
                       for i, item in enumerate(items)]
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            setattr(obj, f.name, out if isinstance(value, list) else out[0])

    def _ref(self, kind: str, value: Any, key: str) -> Any:
        if kind == "path":
            return str(self.path(value, key))
        if kind == "data":
            return str(self.data(value, key))
        if kind == "model":
            return self.model(value, key)
        if kind == "rule":
            self.rule(value, key)
            return value
        if kind == "env":
            raise ConfigError(f"{key}: recipes from the web UI cannot name environment variables")
        raise ValueError(f"unknown ref kind {kind!r} on {key}")


def active() -> Confinement | None:
    """The confinement of this process (`LLMTUNE_CONFINE`), or None outside the web UI."""
    root = os.environ.get(ENV_VAR)
    return _policy(root, os.environ.get(RULES_ENV_VAR, "")) if root else None


@functools.lru_cache(maxsize=8)
def _policy(root: str, rules: str) -> Confinement:
    return Confinement(Path(root), tuple(m for m in rules.split(",") if m) or RULE_MODULES)


def _strings(data: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """(key path, value) of every string inside nested dicts and lists."""
    if isinstance(data, str):
        yield prefix or "(recipe)", data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from _strings(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _strings(v, f"{prefix}[{i}]")


def _resolver_names(text: str) -> set[str]:
    """Resolvers an OmegaConf string would call (its own grammar, so nesting and escapes count
    exactly as OmegaConf counts them). Text that does not parse resolves nothing: OmegaConf fails on it."""
    from omegaconf.errors import GrammarParseError
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
    from omegaconf.grammar_parser import parse

    try:
        stack = [parse(text)]
    except GrammarParseError:
        return set()
    names = set()
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            names.add(node.resolverName().getText())
        stack.extend(getattr(node, "children", None) or [])
    return names
