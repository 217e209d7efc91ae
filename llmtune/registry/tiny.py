"""Built-in tiny models: real transformers architectures with random weights, built locally.

They let the smoke recipes, the tests and CI run every stage offline in seconds: no hub
download, identical weights on every machine (fixed seed). tiny-llama uses the small shipped
byte-level BPE tokenizer (`llmtune/registry/tokenizer/`); tiny-gptj and tiny-t5 use tokenizers
derived from it with their families' conventions (`conventions.py`), so the code paths GPT-J and
Flan-T5 take are the ones the twins take. `materialize(name)` writes a normal `save_pretrained`
directory once, so the rest of llmtune treats it like any other local checkpoint (Auto* classes
load it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from llmtune.registry import conventions
from llmtune.registry.conventions import BUILDERS, GPTJ_EMBEDDINGS, TOKENIZER_DIR
from llmtune.registry.store import install, models_root

MARKER_FILE = "llmtune_tiny.json"
SEED = 0

# `config` holds the architecture shape; vocab size and special ids come from the tokenizer.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "task": "causal-lm",
        "description": "Llama: hidden 64, 2 layers, 4 heads (2 kv), MLP 128",
        "tokenizer": "shipped",
        "config": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": False,
        },
    },
    "tiny-gptj": {
        "architecture": "GPTJForCausalLM",
        "model_type": "gptj",
        "task": "causal-lm",
        "description": "GPT-J: n_embd 64, 2 layers, 4 heads, rotary_dim 8; GPT-J's tokenizer conventions",
        "tokenizer": "gpt2",
        "config": {
            "vocab_size": GPTJ_EMBEDDINGS,  # more embedding rows than tokens, as GPT-J has
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "rotary_dim": 8,
            "n_positions": 1024,
            "tie_word_embeddings": False,
        },
    },
    "tiny-t5": {
        "architecture": "T5ForConditionalGeneration",
        "model_type": "t5",
        "task": "seq2seq",
        "description": "T5 (Flan-style gated-gelu): d_model 64, d_ff 128, 2+2 layers, 4 heads; T5's tokenizer "
                       "conventions",
        "tokenizer": "t5",
        "config": {
            "d_model": 64,
            "d_ff": 128,
            "d_kv": 16,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            # Flan-T5 style (no decoder-output rescaling). transformers 5 still ties T5's
            # lm_head to the shared embedding whatever this says; 4.x keeps it separate.
            "tie_word_embeddings": False,
        },
    },
}


def is_tiny(name: str) -> bool:
    """True for the built-in tiny model names (which need no download)."""
    return name in TINY_MODELS


def default_root() -> Path:
    """Where materialized tiny models live: the model store (`$LLMTUNE_HOME/models`)."""
    return models_root()


def _fingerprint(name: str) -> str:
    """Hash of the spec, the shipped tokenizer and the code that builds the model and its tokenizer, so
    a change triggers a rebuild."""
    h = hashlib.sha256(json.dumps(TINY_MODELS[name], sort_keys=True).encode())
    h.update(str(SEED).encode())
    for code in (Path(__file__), Path(conventions.__file__)):
        h.update(code.read_bytes())
    for f in sorted(TOKENIZER_DIR.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _tokenizer(name: str) -> tuple[Any, dict[str, str]]:
    """(tokenizers.Tokenizer, special tokens) of a tiny model: the shipped one, or a family's conventions."""
    from tokenizers import Tokenizer

    family = TINY_MODELS[name]["tokenizer"]
    if family == "shipped":
        return Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json")), \
            {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return BUILDERS[family]()


def shape_config(name: str) -> dict[str, Any]:
    """model_type, the architecture's shape and the vocabulary size (embedding rows), without torch."""
    spec = TINY_MODELS[name]
    return {"model_type": spec["model_type"], "vocab_size": _tokenizer(name)[0].get_vocab_size(), **spec["config"]}


def build_config(name: str) -> Any:
    """The transformers config object for a tiny model (random-init shape + its tokenizer's ids)."""
    from transformers import AutoConfig

    spec = TINY_MODELS[name]
    tok, specials = _tokenizer(name)
    ids = {k: tok.token_to_id(specials[f"{k}_token"]) if f"{k}_token" in specials else None
           for k in ("pad", "bos", "eos")}
    kwargs: dict[str, Any] = shape_config(name)
    kwargs.pop("model_type")
    kwargs.update(pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                  architectures=[spec["architecture"]])
    if spec["task"] == "seq2seq":
        kwargs["decoder_start_token_id"] = ids["pad"]
    return AutoConfig.for_model(spec["model_type"], **kwargs)


def _build(name: str, dest: Path) -> None:
    """Create the model with a fixed seed and save model + tokenizer into `dest`."""
    import torch
    import transformers

    spec = TINY_MODELS[name]
    config = build_config(name)
    model_cls = getattr(transformers, spec["architecture"])
    torch.manual_seed(SEED)
    model = model_cls(config).to(torch.float32)
    if spec["task"] == "seq2seq":
        # T5's output layer is its input embedding (tied, not rescaled Flan-style), initialised N(0, 1):
        # logits with a std near 8 would make the random twin sample one token forever. Pretrained
        # embeddings are far smaller; d_model**-0.5 gives logits of std ~1, so sampling varies.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, config.d_model ** -0.5)
    model.save_pretrained(str(dest))
    if spec["tokenizer"] == "shipped":
        for f in TOKENIZER_DIR.iterdir():
            if f.is_file():
                shutil.copyfile(f, dest / f.name)
        return
    tok, specials = _tokenizer(name)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **specials).save_pretrained(dest)


def materialize(name: str, root: Path | None = None) -> Path:
    """Build tiny model `name` under `root / name` once and return that directory.

    Later calls only check the marker (no torch import); see `store.install` for the atomic build."""
    if name not in TINY_MODELS:
        from llmtune.errors import ConfigError, hint

        raise ConfigError(f"unknown tiny model '{name}'{hint(name, TINY_MODELS)}")
    root = Path(root).expanduser() if root is not None else default_root()
    marker = {"llmtune_tiny": name, "fingerprint": _fingerprint(name),
              "architecture": TINY_MODELS[name]["architecture"]}
    return install(root / name, MARKER_FILE, marker, lambda tmp: _build(name, tmp))
