"""Build `llama-1b-random`: a TinyLlama-shaped (1.1B parameter) Llama with random weights and the
tiny shipped tokenizer, as an ordinary local model directory for scale-out benchmarks.

    python benchmarks/llama_1b_random.py OUT_DIR                # config + tokenizer + random bf16 weights
    python benchmarks/llama_1b_random.py OUT_DIR --config-only  # config + tokenizer: enough for `llmtune plan`

Random weights make throughput and memory figures meaningful without any download; the loss is
not. The embedding keeps TinyLlama's 32000 rows (only the tokenizer's first ids are ever used) so
the memory figures match a real 1.1B model.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from llmtune.registry.tiny import TOKENIZER_DIR

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "dtype": "bfloat16",
}


def special_ids() -> dict[str, int]:
    """pad/bos/eos ids of the shipped tokenizer (the model must agree with it)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    return {f"{k}_token_id": tok.token_to_id(t) for k, t in (("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>"))}


def build(out: Path, config_only: bool, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, **special_ids()}
    for f in TOKENIZER_DIR.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    if config_only:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()):,} parameters")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--config-only", action="store_true", help="write config.json + tokenizer, no weights")
    p.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is faster)")
    args = p.parse_args()
    build(args.out, args.config_only, args.device)


if __name__ == "__main__":
    main()
