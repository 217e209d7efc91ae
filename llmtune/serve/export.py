"""`llmtune export RUN_DIR --out DIR [--merge]`: a trained model in a form plain transformers loads.

--merge folds the LoRA adapter (and any chain of earlier adapters) into the base weights and saves a
standalone model: safetensors, tokenizer with our chat template as its Jinja `chat_template`, and
llmtune.json. Without --merge the adapter itself is copied with the tokenizer and a README that
shows how to put it back on its base with peft. Full fine-tunes are already standalone either way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llmtune.errors import ConfigError
from llmtune.registry.models import META_FILE, ModelSpec, resolve_model
from llmtune.runs.rundir import follow_umask

AUTO = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
        "classifier": "AutoModelForSequenceClassification"}


def _model_dir(run_dir: str) -> Path:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(f"export: no such run directory: {run_dir}")
    if (path / "run.json").exists():
        if not (path / "model").is_dir():
            raise ConfigError(f"export: {path} has no model/ yet (the run did not finish; resume it first)")
        return path / "model"
    return path


def _head(spec: ModelSpec) -> str:
    return spec.extra.get("head") or ("classifier" if spec.kind == "encoder" else spec.kind or "causal")


def _loader(head: str, pooling: str | None) -> tuple[str, str, str]:
    """(import line, class, load method) that rebuilds this kind of model's base outside llmtune."""
    if head == "classifier" and pooling == "mean":  # our mean-pooled reward head (modeling/pooling.py)
        return "from llmtune.modeling.pooling import MeanPooledClassifier", "MeanPooledClassifier", "load"
    return f"from transformers import {AUTO[head]}", AUTO[head], "from_pretrained"


def export(run_dir: str, out: str | Path, merge: bool = False) -> dict[str, Any]:
    """Write the export; returns a summary (what was written and how to load it)."""
    src = _model_dir(run_dir)
    spec = resolve_model(str(src))
    out = Path(out).expanduser()
    if out.resolve() == src.resolve():
        raise ConfigError("export: --out must differ from the run's model directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export: --out {out} exists and is not empty")
    head = _head(spec)
    if merge or spec.adapter is None:
        return _export_merged(spec, head, out)
    return _export_adapter(spec, src, head, out)


def _export_merged(spec: ModelSpec, head: str, out: Path) -> dict[str, Any]:
    from llmtune.modeling.load import load_for_inference

    model, tok, spec = load_for_inference(str(spec.path), head=head)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to("cpu")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    follow_umask(out)
    tok.save_pretrained(out)
    meta = {"kind": spec.kind, "template": spec.template, "head": head, "finetuning": "merged",
            "exported_from": spec.path, "base": None}
    # What a reward model needs to score as it trained: its head's pooling and its input length.
    meta.update({k: spec.extra[k] for k in ("pooling", "max_length") if k in spec.extra})
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(_readme_merged(head, spec.pooling, out))
    return {"out": str(out), "merged": spec.adapter is not None, "head": head,
            "files": sorted(p.name for p in out.iterdir())}


def _export_adapter(spec: ModelSpec, src: Path, head: str, out: Path) -> dict[str, Any]:
    assert spec.base is not None
    shutil.copytree(src, out, dirs_exist_ok=True)
    base = spec.base.hub_ref()  # portable: never a path into this machine's model store
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    chained = spec.base.adapter is not None
    (out / "README.md").write_text(_readme_adapter(head, spec.pooling, base, out, chained))
    return {"out": str(out), "merged": False, "head": head, "base": base, "chained": chained,
            "files": sorted(p.name for p in out.iterdir())}


def _readme_merged(head: str, pooling: str | None, out: Path) -> str:
    # A mean-pooled reward model carries its modelling code (pooling.py, auto_map): plain transformers
    # loads it with trust_remote_code=True and refuses it without.
    remote = head == "classifier" and pooling == "mean"
    how = "plain transformers (its mean-pooled reward head ships as pooling.py: trust_remote_code=True)" if remote \
        else "plain transformers"
    return f"""# Exported llmtune model

A standalone model (LoRA adapters, if any, merged into the weights). Load it with {how}:

```python
from transformers import AutoTokenizer, {AUTO[head]}

tok = AutoTokenizer.from_pretrained("{out}")
model = {AUTO[head]}.from_pretrained("{out}"{", trust_remote_code=True" if remote else ""})
```

The tokenizer carries the chat template the model was trained with, so
`tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` renders prompts exactly
like llmtune did. `llmtune chat {out}` and `llmtune serve {out}` work on this directory too.
"""


def _readme_adapter(head: str, pooling: str | None, base: str, out: Path, chained: bool) -> str:
    imp, cls, load = _loader(head, pooling)
    chain_note = ("\nThis adapter was trained on top of an earlier adapter; its base above is that earlier "
                  "run. Load it with llmtune (`llmtune chat` / `llmtune serve`), or export with `--merge` for "
                  "a standalone model.\n") if chained else ""
    return f"""# Exported llmtune LoRA adapter

A LoRA adapter for the base model `{base}`, plus the tokenizer (with the training chat template).
Load it with transformers + peft:

```python
from peft import PeftModel
from transformers import AutoTokenizer
{imp}

tok = AutoTokenizer.from_pretrained("{out}")
base = {cls}.{load}("{base}"{", num_labels=1" if head == "classifier" else ""})
model = PeftModel.from_pretrained(base, "{out}")
model = model.merge_and_unload()  # optional: fold the adapter into the weights
```

`{base}` is a hub id, an llmtune registry name or a file, so this directory works on any machine; for a
registry name, `llmtune models fetch {base}` prints the local directory to load instead.
{chain_note}
Or get a merged standalone model directly: `llmtune export RUN_DIR --out DIR --merge`.
"""
