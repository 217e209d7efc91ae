"""`reward` (and each `reward.components[i]` of a mix): the keys its type needs, the model, function,
template and key it names exist, as far as can be known without loading a model."""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.config.checks.model import resolve
from llmtune.config.confine import active
from llmtune.errors import ConfigError
from llmtune.registry.models import ModelSpec, resolve_model

if TYPE_CHECKING:
    from llmtune.config.schema import RewardSection

REQUIRED = {"reward_model": "model", "classifier": "model", "rule": "function", "mix": "components"}


def check_reward(r: RewardSection, where: str, errors: list[str], pending: frozenset[str] = frozenset()) -> None:
    """Appends every problem of one reward section (recursing into a mix's components)."""
    key = REQUIRED.get(r.type)
    if key and not getattr(r, key):
        errors.append(f"{where}.{key}: required for reward type '{r.type}'")
    if len(r.score_range) != 2 or r.score_range[0] >= r.score_range[1]:
        errors.append(f"{where}.score_range: expected [min, max] with min < max")
    if r.type == "reward_model" and r.model:
        spec = resolve(r.model, f"{where}.model", errors, pending)
        if spec is not None and (problem := not_a_reward_model(spec, r.model)):
            errors.append(f"{where}.model: {problem}")
    elif r.type == "classifier" and r.model:
        _check_classifier(r, where, errors)
    elif r.type == "judge":
        _check_judge(r, where, errors, pending)
    elif r.type == "rule" and r.function:
        _check_rule(r, where, errors)
    for i, c in enumerate(r.components or []):
        check_reward(c, f"{where}.components[{i}]", errors, pending)


def not_a_reward_model(spec: ModelSpec, ref: str) -> str | None:
    """Why a trained model cannot serve as a reward model, or None. A run of a generating stage (sft,
    dpo, rs, ppo) saved a language-model head: loading it for scoring would bolt on an untrained score
    head and return numbers that mean nothing."""
    head = spec.extra.get("head")
    if head is None or head == "classifier":
        return None
    stage = spec.extra.get("stage")
    return (f"'{ref}' is a language model{f' (a {stage} run)' if stage else ''}, not a reward model; "
            "train one with `stage: rm`")


def _check_judge(r: RewardSection, where: str, errors: list[str], pending: frozenset[str]) -> None:
    if r.template is not None and "{response}" not in r.template:
        errors.append(f"{where}.template: must contain the {{response}} placeholder")
    if r.endpoint:
        if not r.judge_model:
            errors.append(f"{where}.judge_model: required with `endpoint` (the model name the server serves)")
        if r.api_key_env and not os.environ.get(r.api_key_env):
            errors.append(f"{where}.api_key_env: environment variable {r.api_key_env} is not set")
    elif not r.model:
        errors.append(f"{where}: a judge needs `model` (local LLM) or `endpoint` (OpenAI-compatible URL)")
    else:
        spec = resolve(r.model, f"{where}.model", errors, pending)
        if spec is not None and spec.kind not in (None, "causal", "seq2seq"):
            errors.append(f"{where}.model: a judge must be a generative model; '{r.model}' is {spec.kind}")


def _check_classifier(r: RewardSection, where: str, errors: list[str]) -> None:
    """A local classifier must be a model directory; its label count bounds label_index (read from
    its config.json, or from the hub cache for a hub id: unknown when neither is here)."""
    assert r.model is not None
    config = None
    if Path(r.model).expanduser().exists() or r.model.startswith((".", "/", "~")):
        try:
            spec = resolve_model(r.model)
        except ConfigError as exc:
            errors.append(f"{where}.model: cannot load classifier '{r.model}': {exc}")
            return
        local = Path(spec.path or r.model) / "config.json"
        config = local if local.is_file() else None  # a LoRA adapter: its labels are its base's
    else:
        config = _hub_cached_config(r.model)
    if config is not None:
        cfg = json.loads(config.read_text())
        labels = len(cfg.get("id2label") or {}) or int(cfg.get("num_labels", 2))
        if r.label_index >= labels:
            errors.append(f"{where}.label_index: {r.label_index} is out of range; '{r.model}' has {labels} labels "
                          f"{cfg.get('id2label', {})}")


def _hub_cached_config(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def _check_rule(r: RewardSection, where: str, errors: list[str]) -> None:
    assert r.function is not None
    try:
        fn = import_function(r.function, f"{where}.function")
    except ConfigError as exc:
        errors.append(str(exc))
        return
    try:  # partial: parameters neither given here nor defaulted are the dataset's columns (e.g. `answer`)
        inspect.signature(fn).bind_partial(None, None, **r.kwargs)
    except TypeError as exc:
        errors.append(f"{where}.kwargs: {r.function} does not accept {r.kwargs}: {exc}")


def import_function(path: str, where: str) -> Callable[..., Any]:
    """`package.module:function` → the callable; any failure is a ConfigError naming `where`."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: expected 'package.module:function', got '{path}'")
    policy = active()
    if policy is not None:  # the web UI's allow-list, checked before anything is imported
        policy.rule(path, where)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module '{module_name}': {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: '{path}' is not callable")
    return obj
