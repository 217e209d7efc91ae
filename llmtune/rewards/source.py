"""The command-line syntax for naming a reward source (`llmtune compare --judge`, `llmtune eval
policy --reward`): one parser, so both commands accept exactly the same forms."""

from __future__ import annotations

from pathlib import Path

from llmtune.config.checks.reward import check_reward
from llmtune.config.schema import RewardSection
from llmtune.errors import ConfigError

SOURCE_FORMS = ("a reward-model run dir or model directory, a YAML/JSON file with a reward section, "
                "rule:module:function, or classifier:PATH_OR_HUB_ID")


def parse_source(source: str, flag: str = "--reward") -> RewardSection:
    """SOURCE → a reward section validated by the recipe schema's reward checks (see SOURCE_FORMS)."""
    section = _section(source, flag)
    errors: list[str] = []
    check_reward(section, flag, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    return section


def _section(source: str, flag: str) -> RewardSection:
    from llmtune.config.schema import parse
    from llmtune.registry.models import resolve_model

    if source.startswith("rule:"):
        return RewardSection(type="rule", function=source[len("rule:"):])
    if source.startswith("classifier:"):
        return RewardSection(type="classifier", model=source[len("classifier:"):])
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in (".yaml", ".yml", ".json"):
            raise ConfigError(f"{flag} {source}: expected a .yaml/.yml/.json file with a reward section")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{flag} {source}: not valid YAML/JSON: {exc}") from None
        if isinstance(data, dict) and "reward" in data:
            data = data["reward"]
        if not isinstance(data, dict):
            raise ConfigError(f"{flag} {source}: expected a mapping (a reward section, or a recipe with `reward:`)")
        # The schema validates sections inside a recipe; a stub recipe carries this one.
        stub = {"stage": "rs", "model": {"name": "judge"}, "data": {"name": "judge"}, "reward": data}
        reward = parse(stub, source=str(path)).reward
        assert reward is not None
        return reward
    if path.is_dir():
        spec = resolve_model(str(path))
        kind = "reward_model" if spec.extra.get("head") == "classifier" else "classifier"
        return RewardSection(type=kind, model=str(path))
    raise ConfigError(f"{flag} {source}: no such file or directory; give {SOURCE_FORMS}")
