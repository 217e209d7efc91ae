"""Model registry lookup: registry names, run directories, local model directories, GGUF files and
hub ids.

The registry itself is data (`models.yaml`). Resolution never imports torch and never builds or
downloads a model: tiny models are materialised, GGUF files converted and offline sources fetched
only when `ModelSpec.location()` is called by the loader (or by `llmtune models fetch`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmtune.errors import ConfigError, hint
from llmtune.registry.store import META_FILE

log = logging.getLogger("llmtune.registry")

REGISTRY_FILE = Path(__file__).with_name("models.yaml")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ENCODER_TYPES = {"bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta", "mpnet",
                 "albert", "modernbert", "llmtune-mean-pooled"}
# Written next to every model llmtune saves, so run outputs reload with their kind and template.


@dataclass
class ModelSpec:
    """What llmtune needs to know about a model before loading it."""

    name: str
    kind: str | None  # causal | seq2seq | encoder; None: decided from the config at load time
    template: str
    lora_targets: list[str] | str = "all-linear"
    context_length: int | None = None
    dtype: str = "float32"
    hub_id: str | None = None
    path: str | None = None  # local directory (or the run's model/ directory)
    tiny: bool = False
    adapter: str | None = None  # a LoRA adapter directory on top of `base`
    base: ModelSpec | None = None
    params: float | None = None
    description: str = ""
    pooling: str | None = None  # reward heads: "mean" (modeling/pooling.py) or None (the architecture's own)
    gguf: str | None = None  # a GGUF file: converted into the model store on first use
    offline: dict[str, Any] | None = None  # the registry's offline source (fetch.WheelSource)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Saved runs record "architecture" for the default head; in a spec that is None.
        self.pooling = "mean" if self.pooling == "mean" else None

    def location(self) -> str:
        """A path or hub id that `from_pretrained` accepts (builds a tiny model on first use)."""
        if self.tiny:
            from llmtune.registry.tiny import materialize

            return str(materialize(self.name))
        if self.gguf:
            from llmtune.registry.gguf import convert

            return str(convert(Path(self.gguf)))
        if self.offline:
            from llmtune.registry.fetch import WheelSource

            return str(WheelSource.from_entry(self.offline).obtain(self.name))
        return self.path or self.hub_id or self.name

    def portable_ref(self) -> str:
        """How a saved run names this model so the run moves between machines: the registry name or
        hub id, the GGUF file, else the absolute local path (never a path inside the model store)."""
        if self.name in registry_models() or (self.hub_id and not self.path):
            return self.name
        if self.gguf:
            return self.gguf
        return str(Path(self.location()).resolve())

    def hub_ref(self) -> str:
        """What plain transformers / peft should load on another machine: the hub id when there is one."""
        return self.hub_id or self.portable_ref()


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, Any]:
    with REGISTRY_FILE.open() as fh:
        return yaml.safe_load(fh)


def registry_models() -> dict[str, dict[str, Any]]:
    return dict(_registry()["models"])


def templates() -> dict[str, dict[str, Any]]:
    return dict(_registry()["templates"])


def _package_dir(rel: str) -> str | None:
    pkg, _, sub = rel.partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def _from_entry(name: str, entry: dict[str, Any]) -> ModelSpec:
    path = None
    if entry.get("local_package"):
        path = _package_dir(entry["local_package"])
    return ModelSpec(
        name=name, kind=entry["kind"], template=entry["template"], lora_targets=entry.get("lora_targets", "all-linear"),
        context_length=entry.get("context_length"), dtype=entry.get("dtype", "float32"), hub_id=entry.get("hub_id"),
        path=path, tiny=bool(entry.get("tiny")), params=entry.get("params"), description=entry.get("description", ""),
        pooling=entry.get("pooling"), offline=entry.get("offline"),
        extra={"config": entry["config"]} if entry.get("config") else {},
    )


def offline_status(entry: dict[str, Any]) -> tuple[str, str]:
    """(available offline: yes | fetch | no, where the weights come from) for a registry entry,
    without loading or downloading anything."""
    if entry.get("tiny"):
        return "yes", "built locally"
    if entry.get("offline"):
        from llmtune.registry.fetch import WheelSource

        source = WheelSource.from_entry(entry["offline"])
        return ("yes" if source.ready() else "fetch"), source.describe()
    if entry.get("local_package"):
        found = _package_dir(entry["local_package"])
        package = entry["local_package"].split("/")[0]
        return ("yes", f"package {package}") if found and Path(found).is_dir() else ("no", f"pip package {package}")
    hub = entry.get("hub_id")
    if hub and _hub_cached(hub):
        return "yes", f"hub cache {hub}"
    return "no", f"hub {hub}" if hub else "-"


def _hub_cached(hub_id: str) -> bool:
    """Whether this hub model's config is in the local Hugging Face cache (nothing downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def detect_kind(config: dict[str, Any], where: str = "the model") -> str:
    """Architecture kind from a transformers config.json; an architecture it cannot place is an
    error, not a guess (a wrong kind would train the wrong head)."""
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    if config.get("model_type") in ENCODER_TYPES:
        return "encoder"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "causal"  # a decoder with a score head (an rm run on a causal LM)
    raise ConfigError(f"{where}: cannot tell whether model_type '{config.get('model_type')}' (architectures "
                      f"{archs}) is a causal LM, a seq2seq model or an encoder; write {{\"kind\": \"causal\"}} (or "
                      f"seq2seq, encoder) into {META_FILE} next to its config.json")


def _from_directory(name: str, path: Path, template: str | None) -> ModelSpec:
    if (path / "run.json").exists() and (path / "model").is_dir():
        return _from_directory(name, path / "model", template)
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
    if (path / "adapter_config.json").exists():
        adapter_cfg = json.loads((path / "adapter_config.json").read_text())
        base_ref = meta.get("base") or adapter_cfg.get("base_model_name_or_path")
        if not base_ref:
            raise ConfigError(f"{path}: LoRA adapter without a base model reference")
        base = resolve_model(base_ref, template=template)
        return ModelSpec(name=name, kind=meta.get("kind") or base.kind, template=template or meta.get("template")
                         or base.template, lora_targets=base.lora_targets, context_length=base.context_length,
                         dtype=base.dtype, path=str(path), adapter=str(path), base=base, pooling=meta.get("pooling"),
                         extra=meta)
    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: not a model directory (no config.json or adapter_config.json)")
    config = json.loads((path / "config.json").read_text())
    kind = meta.get("kind") or detect_kind(config, str(path))
    chosen = template or meta.get("template")
    if chosen is None:
        chosen = "flan" if kind == "seq2seq" else "hh" if kind == "encoder" else "plain"
        log.info("model %s records no chat template: using '%s' for a %s model (set model.template to choose)",
                 path, chosen, kind)
    return ModelSpec(name=name, kind=kind, template=chosen,
                     context_length=config.get("max_position_embeddings") or config.get("n_positions"),
                     path=str(path), pooling=meta.get("pooling"), extra=meta)


def looks_local(name: str) -> bool:
    """Whether a missing `owner/name` reference means a local directory rather than a hub id: it
    starts like a path, or its first part is a directory here or `runs` (where llmtune writes runs),
    so `runs/sft-gptj-hh` before that run exists is a missing directory, not a hub model."""
    first = name.split("/", 1)[0]
    return name.startswith((".", "/", "~")) or first == "runs" or Path(first).expanduser().is_dir()


def _from_gguf(path: Path, template: str | None) -> ModelSpec:
    from llmtune.registry.gguf import describe

    info = describe(path)
    return ModelSpec(name=str(path), kind=info.kind, template=template or info.template,
                     context_length=info.context_length, gguf=str(path), description=info.name)


def resolve_model(name: str, template: str | None = None, gguf_file: str | None = None) -> ModelSpec:
    """Registry name → spec; else a GGUF file (or a directory plus `gguf_file`); else a local directory
    (run dir, adapter, model); else a hub id."""
    if template is not None and template not in templates():
        raise ConfigError(f"unknown chat template '{template}'" + hint(template, templates()))
    if gguf_file:
        name = str(Path(name).expanduser() / gguf_file)
    models = registry_models()
    if name in models:
        spec = _from_entry(name, models[name])
        if template:
            spec.template = template
        return spec
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ConfigError(f"no such GGUF file: {name}")
        return _from_gguf(path.resolve(), template)
    if path.is_dir():
        return _from_directory(name, path.resolve(), template)
    if HUB_ID.match(name) and path.parent.is_dir():
        # `runs/typo` next to a local runs/ directory is a mistyped path, not the hub model of a user
        # named "runs": say so here instead of failing later on the network (or, offline, the cache).
        entries = [p.name for p in path.parent.iterdir() if p.is_dir()]
        raise ConfigError(f"no such model directory: {name} (the directory {path.parent}/ exists here but holds "
                          f"no '{path.name}'){hint(path.name, entries) if entries else ''}")
    if HUB_ID.match(name) and not looks_local(name):
        for reg_name, entry in models.items():  # a hub id the registry knows keeps its template
            if entry.get("hub_id") == name:
                spec = _from_entry(reg_name, entry)
                if spec.offline:  # the hub's own weights, not the registry's offline stand-in for them
                    spec.name, spec.offline = name, None
                spec.template = template or spec.template
                return spec
        if template is None:
            log.info("hub model %s is not in the registry: using chat template 'plain' (set model.template to "
                     "choose)", name)
        return ModelSpec(name=name, kind=None, template=template or "plain", hub_id=name)
    if name.startswith((".", "/", "~")) or "/" in name:
        raise ConfigError(f"no such model directory: {name}")
    raise ConfigError(f"unknown model '{name}'" + hint(name, models))
