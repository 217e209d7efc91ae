"""GGUF files as base models.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, via the `gguf` package) by
dequantising every tensor into a normal float model, which takes tens of seconds and cannot be saved
as is (the model keeps a GGUF quantizer marker, and `save_pretrained` refuses). So a GGUF file is
converted once into a plain safetensors directory in the model store, keyed by the file's SHA-256;
everything downstream (LoRA, full fine-tuning, chat, export) sees an ordinary Hugging Face directory.

`describe` reads only the metadata (no torch), so validating a recipe stays fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.errors import ConfigError
from llmtune.registry.store import META_FILE, install, is_complete, models_root

log = logging.getLogger("llmtune.models")

MARKER_FILE = "llmtune_gguf.json"
SEQ2SEQ_ARCHITECTURES = {"t5"}


@dataclass(frozen=True)
class GgufInfo:
    """What the registry needs from a GGUF file's metadata."""

    architecture: str
    kind: str  # causal | seq2seq
    template: str  # our closest chat template, judged from the file's own
    context_length: int | None
    name: str


def _reader(path: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable GGUF file ({exc})") from None


def guess_template(chat_template: str | None) -> str:
    """Our template that renders like the file's Jinja chat template (plain when unknown)."""
    text = chat_template or ""
    if "<|im_start|>" in text:
        return "chatml"
    if "[INST]" in text:
        return "llama2"
    return "plain"


@functools.lru_cache(maxsize=16)
def _describe(path: str, size: int, mtime: int) -> GgufInfo:
    fields = _reader(Path(path)).fields

    def value(key: str) -> Any:
        f = fields.get(key)
        return f.contents() if f is not None else None

    arch = str(value("general.architecture") or "")
    ctx = value(f"{arch}.context_length")
    return GgufInfo(architecture=arch, kind="seq2seq" if arch in SEQ2SEQ_ARCHITECTURES else "causal",
                    template=guess_template(value("tokenizer.chat_template")),
                    context_length=int(ctx) if ctx else None, name=str(value("general.name") or Path(path).stem))


def describe(path: Path) -> GgufInfo:
    """Architecture, kind, chat template and context length from the metadata (cached per file version)."""
    st = path.stat()
    return _describe(str(path.resolve()), st.st_size, st.st_mtime_ns)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def converted_dir(sha256: str) -> Path:
    """Where the conversion of the GGUF file with this hash lives in the model store."""
    return models_root() / f"gguf-{sha256[:16]}"


def is_converted(sha256: str) -> bool:
    return is_complete(converted_dir(sha256), MARKER_FILE, {"sha256": sha256})


def convert(path: Path, sha256: str | None = None, source: str | None = None) -> Path:
    """The safetensors directory of a GGUF file, converting it on first use.

    sha256: the file's hash when the caller knows it already. source: what to record as the file's
    origin (default the file path)."""
    sha256 = sha256 or file_sha256(path)
    dest = converted_dir(sha256)
    if is_converted(sha256):
        return dest
    info = describe(path)
    print(f"llmtune: converting {path.name} ({path.stat().st_size / 2**20:.0f} MB, {info.architecture}) into "
          f"safetensors under {dest} (once)", file=sys.stderr, flush=True)
    marker = {"sha256": sha256, "source": source or str(path), "architecture": info.architecture}
    return install(dest, MARKER_FILE, marker, lambda tmp: _convert(path, tmp, info))


def _convert(path: Path, dest: Path, info: GgufInfo) -> None:
    """Dequantise through transformers, then save a clean copy of the weights.

    The GGUF-loaded model refuses `save_pretrained` (its quantizer marker); a model rebuilt from the
    config without that marker, holding the very same tensors, saves normally."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer


    folder, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    auto = AutoModelForSeq2SeqLM if info.kind == "seq2seq" else AutoModelForCausalLM
    loaded = auto.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = loaded.state_dict()
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        clean = auto.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(state, strict=False, assign=True)
    clean.tie_weights()
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"{path}: converted weights do not match the architecture "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    del loaded
    clean.save_pretrained(dest, safe_serialization=True)
    if info.context_length:
        tok.model_max_length = info.context_length
    tok.save_pretrained(dest)
    meta = {"kind": info.kind, "template": info.template, "source": {"gguf": name}}
    (dest / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
