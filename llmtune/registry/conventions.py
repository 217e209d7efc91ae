"""Tokenizers with GPT-J's and Flan-T5's conventions for the tiny twins, derived from the shipped one.

A twin is only useful if the code paths a real model takes are the ones it takes, and tokenizer
conventions decide many of them: whether there is a pad token, whether BOS and EOS are one token,
whether the tokenizer appends EOS itself, where SentencePiece marks word starts, whether the model
has embedding rows the tokenizer never produces. The vocabularies are small stand-ins (the real ones
are not shipped); the conventions are the families' own:

- GPT-J (GPT-2's byte-level BPE): 50,257 entries, `<|endoftext|>` is the last one and serves as BOS,
  EOS and UNK, no pad token; the model has 50,400 embedding rows (`GPTJ_EMBEDDINGS`).
- Flan-T5 (SentencePiece unigram): `<pad>` = 0 (also the decoder start), `</s>` = 1 appended by the
  tokenizer itself, `<unk>` = 2, no BOS; "▁" marks word starts; whitespace runs (newlines too) split.

Built in memory (no torch, milliseconds), so nothing large ships with the package.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKENIZER_DIR = Path(__file__).with_name("tokenizer")
ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB = 50257
GPTJ_EMBEDDINGS = 50400


def _shipped() -> tuple[list[str], list[tuple[str, str]], set[str]]:
    """(ordinary tokens by id, merges, special tokens) of the shipped byte-level BPE."""
    data = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    specials = {t["content"] for t in data["added_tokens"]}
    tokens = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    return tokens, merges, specials


def _letters(n: int) -> str:
    """0 → 'aaa', 1 → 'aab', ...: placeholder words."""
    out = ""
    for _ in range(3):
        n, r = divmod(n, 26)
        out = chr(97 + r) + out
    return ("" if n == 0 else _letters(n - 1)) + out


def gpt2_style() -> tuple[Any, dict[str, str]]:
    """GPT-2/GPT-J conventions: the shipped BPE's tokens and merges, padded with placeholder words (real
    byte-level tokens no merge produces) to 50,256 entries, then `<|endoftext|>` (id 50,256)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, merges, _ = _shipped()
    have = set(tokens)
    n = 0
    while len(tokens) < GPT2_VOCAB - 1:
        word = "Ġ" + _letters(n)
        n += 1
        if word not in have:
            tokens.append(word)
            have.add(word)
    tokens.append(ENDOFTEXT)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}


def _byte_decoder() -> dict[str, int]:
    """The byte-level alphabet's character → byte map (GPT-2's bytes_to_unicode, inverted)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def t5_style() -> tuple[Any, dict[str, str]]:
    """Flan-T5 conventions: a unigram model over the shipped BPE's tokens as SentencePiece pieces ("▁"
    for a leading space), single characters as the fallback, `<pad>`/`</s>`/`<unk>` = 0/1/2, and a
    post-processor that appends `</s>`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tokens, _, _ = _shipped()
    to_byte = _byte_decoder()
    pieces: dict[str, float] = {}
    chars: dict[str, float] = {}
    for i, token in enumerate(tokens):
        try:
            text = bytes(to_byte[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        body = text[1:] if text.startswith(" ") else text
        if not body or any(c.isspace() or not c.isprintable() for c in body):
            continue
        piece = ("▁" if text.startswith(" ") else "") + body
        if len(piece) == 1:
            chars[piece] = -12.0
        else:
            pieces.setdefault(piece, -10.0 - 0.001 * i)  # equal-ish scores: fewest pieces wins
    chars["▁"] = -12.0
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces.items(),
             *((c, s) for c, s in chars.items() if c not in pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return tok, {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


BUILDERS: dict[str, Callable[[], tuple[Any, dict[str, str]]]] = {"gpt2": gpt2_style, "t5": t5_style}
