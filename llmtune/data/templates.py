"""Chat templates and tokenisation of canonical rows, with truncation that keeps the response.

Why our own instead of `tokenizer.apply_chat_template`: we need (1) exact per-token loss masks on
assistant turns for any template, (2) the same rendering for causal and seq2seq models, and (3)
truncation that trims the *history from the left* so the response survives (TRL truncates from the
right, which for preference pairs cuts exactly the part that differs). We still export a Jinja
version of each template (`to_jinja`) into saved tokenizers, so plain transformers renders the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llmtune.registry.models import templates

Message = dict[str, str]
IGNORE = -100


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    user: str
    assistant_prefix: str
    assistant: str
    assistant_suffix: str
    system_in_first_user: bool = False
    stop: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def get(cls, name: str) -> ChatTemplate:
        spec = dict(templates()[name])
        spec["stop"] = tuple(spec.get("stop") or ())
        return cls(name=name, **spec)

    # -- rendering ------------------------------------------------------------------------------
    def segments(self, messages: list[Message], bos: str = "", eos: str = "") -> list[tuple[str, bool]]:
        """(text, trainable) pieces; trainable pieces are assistant contents and their suffix."""
        out: list[tuple[str, bool]] = []
        system = ""
        first_user = True
        for msg in messages:
            role, content = msg["role"], msg["content"]
            if role == "system":
                system = self.system.format(content=content, bos=bos, eos=eos)
                if not self.system_in_first_user:
                    out.append((system, False))
                    system = ""
            elif role == "user":
                text = self.user.format(content=content, bos=bos, eos=eos)
                if system and first_user:
                    # Llama 2 puts <<SYS>> inside the first [INST] block, after "[INST] ".
                    marker = self.user.split("{content}")[0].format(bos=bos, eos=eos)
                    text = marker + system + text[len(marker):]
                    system = ""
                first_user = False
                out.append((text, False))
            elif role == "assistant":
                out.append((self.assistant_prefix.format(bos=bos, eos=eos), False))
                out.append((self.assistant.format(content=content, bos=bos, eos=eos)
                            + self.assistant_suffix.format(bos=bos, eos=eos), True))
            else:
                raise ValueError(f"unknown role {role!r}")
        return [(t, trainable) for t, trainable in out if t]

    def render_prompt(self, messages: list[Message], bos: str = "", eos: str = "") -> str:
        """The generation prompt: the conversation so far plus the assistant prefix."""
        text = "".join(t for t, _ in self.segments(messages, bos, eos))
        return text + self.assistant_prefix.format(bos=bos, eos=eos)

    def to_jinja(self) -> str:
        """The same template in Jinja, saved into tokenizers so plain transformers renders it too."""

        def lit(s: str) -> str:
            return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")

        def fmt(template: str, content: str) -> str:
            parts = template.replace("{bos}", "\x00bos\x00").replace("{eos}", "\x00eos\x00").split("{content}")
            pieces = []
            for i, part in enumerate(parts):
                for j, chunk in enumerate(part.split("\x00")):
                    if chunk in ("bos", "eos") and j % 2 == 1:
                        pieces.append(f"{chunk}_token")
                    elif chunk:
                        pieces.append(f"'{lit(chunk)}'")
                if i < len(parts) - 1:
                    pieces.append(content)
            return "{{ " + (" + ".join(pieces) or "''") + " }}"

        return (
            "{% set ns = namespace(sys='', first=true) %}"
            "{% for m in messages %}"
            "{% if m['role'] == 'system' %}"
            + (f"{{% set ns.sys = {fmt(self.system, 'm.content')[3:-3]} %}}" if self.system_in_first_user
               else fmt(self.system, "m.content"))
            + "{% elif m['role'] == 'user' %}"
            + (self._jinja_user_with_system(fmt) if self.system_in_first_user else fmt(self.user, "m.content"))
            + "{% set ns.first = false %}"
            "{% elif m['role'] == 'assistant' %}"
            + fmt(self.assistant_prefix, "''") + fmt(self.assistant, "m.content") + fmt(self.assistant_suffix, "''")
            + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + fmt(self.assistant_prefix, "''") + "{% endif %}"
        )

    def _jinja_user_with_system(self, fmt: Any) -> str:
        head, _, tail = self.user.partition("{content}")
        return ("{% if ns.first and ns.sys %}" + fmt(head + "{content}" + tail, "ns.sys + m.content")
                + "{% else %}" + fmt(self.user, "m.content") + "{% endif %}")


# -- tokenisation -------------------------------------------------------------------------------

def _special(tok: Any) -> tuple[str, str]:
    return tok.bos_token or "", tok.eos_token or ""


def _special_split(tok: Any) -> re.Pattern[str] | None:
    specials = sorted({t for t in tok.all_special_tokens if t}, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None


def encode_pieces(tok: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids of the concatenated text pieces, and per token whether it came from a trainable piece.

    Why not one tokenizer call per piece: SentencePiece tokenizers mark a word start with "▁" at the
    start of each call, so a reply tokenised alone differs from the same reply inside the conversation.
    Why not one call for the whole text: tokenizers disagree on whether text right after a special
    token gets that mark (Llama 2's: "<s>[INST]" must be "<s>", "▁[INST]", as in Meta's reference,
    which encodes each turn separately between BOS and EOS). So: one call per stretch of text between
    special tokens, special tokens as their ids, and each token's piece from its character offsets.
    The tokenizer's own special tokens are never added (no doubled BOS). Quiet about texts over the
    model's length: every caller trims (from the left of the history) afterwards."""
    text = "".join(t for t, _ in pieces)
    trainable = [flag for t, flag in pieces for _ in t]
    ids: list[int] = []
    flags: list[bool] = []
    pattern = _special_split(tok)
    start = 0
    for chunk in pattern.split(text) if pattern else [text]:
        if not chunk:
            continue
        if pattern and pattern.fullmatch(chunk):
            ids.append(tok.convert_tokens_to_ids(chunk))
            flags.append(trainable[start])
        else:
            enc = tok(chunk, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids += enc["input_ids"]
            flags += [trainable[start + min(a, len(chunk) - 1)] for a, _ in enc["offset_mapping"]]
        start += len(chunk)
    return ids, flags


def token_ids(tok: Any, text: str) -> list[int]:
    """Token ids of a text, no special tokens added (see `encode_pieces`)."""
    return encode_pieces(tok, [(text, False)])[0] if text else []


def appends_eos(tok: Any) -> bool:
    """Whether the tokenizer ends every encoding with EOS itself, as T5's does."""
    eos = tok.eos_token_id
    return eos is not None and tok("a")["input_ids"][-1:] == [eos] != tok("a", add_special_tokens=False)[
        "input_ids"][-1:]


def encoder_ids(tok: Any, text: str) -> list[int]:
    """An encoder-decoder's encoder input: the text's tokens plus the EOS its tokenizer appends (Flan-T5
    was trained on inputs ending in </s>)."""
    return token_ids(tok, text) + ([tok.eos_token_id] if appends_eos(tok) else [])


def fit(prompt: list[int], response: list[int], max_length: int, bos_id: int | None = None,
        min_prompt: int | None = None) -> tuple[list[int], list[int]]:
    """Trim the prompt from the left (keeping a leading BOS) so prompt+response fits max_length.

    The response is only cut (from the right) when it alone would leave less than `min_prompt`
    prompt tokens (default a quarter of max_length), so the final answer survives truncation.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    min_prompt = max_length // 4 if min_prompt is None else min_prompt
    keep_prompt = max(min(len(prompt), min_prompt), max_length - len(response))
    response = response[: max_length - keep_prompt]
    if keep_prompt < len(prompt):
        keep_bos = bos_id is not None and prompt and prompt[0] == bos_id and keep_prompt > 1
        tail = prompt[len(prompt) - keep_prompt + (1 if keep_bos else 0):]
        prompt = ([bos_id] if keep_bos else []) + tail
    return prompt, response


def fit_pair(prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
             bos_id: int | None) -> tuple[list[int], list[list[int]]]:
    """Trim the prompt from the left to max_prompt_length (keeping a leading BOS), then cut each
    response from the right so prompt + response fits max_length. Both responses share the prompt,
    so the part that differs (the responses) is what survives."""
    prompt = fit(prompt, [], max_prompt_length, bos_id, min_prompt=max_prompt_length)[0]
    room = max_length - len(prompt)
    return prompt, [r[:room] for r in responses]


def reply_text(template: ChatTemplate, reply: list[Message], bos: str, eos: str) -> str:
    """A reply (usually one assistant message) rendered as the continuation of the generation
    prompt, ending at EOS: the prompt already holds the assistant prefix, and nothing after EOS is
    ever generated (the `plain` template's separator after EOS would otherwise be trained on)."""
    text = "".join(t for t, _ in template.segments(reply, bos, eos))
    prefix = template.assistant_prefix.format(bos=bos, eos=eos)
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    if eos and eos in text:
        text = text[: text.rindex(eos) + len(eos)]
    return text


def encode_sft_causal(tok: Any, template: ChatTemplate, messages: list[Message], max_length: int) -> dict[str, list[int]]:
    """input_ids + labels (assistant tokens only) for a causal LM; history trimmed from the left."""
    bos, eos = _special(tok)
    ids, trainable = encode_pieces(tok, template.segments(messages, bos, eos))
    labels = [i if t else IGNORE for i, t in zip(ids, trainable)]
    last_prompt_end = max(i for i, label in enumerate([IGNORE] + labels) if label == IGNORE)
    # Split at the start of the final assistant turn; fit() keeps the final response.
    prompt_ids, resp_ids = ids[:last_prompt_end], ids[last_prompt_end:]
    prompt_labels, resp_labels = labels[:last_prompt_end], labels[last_prompt_end:]
    new_prompt, new_resp = fit(prompt_ids, resp_ids, max_length, tok.bos_token_id)
    cut = len(prompt_ids) - len(new_prompt)
    if new_prompt and new_prompt[0] == tok.bos_token_id and cut and prompt_ids[0] == tok.bos_token_id:
        prompt_labels = [IGNORE] + prompt_labels[cut + 1:]
    else:
        prompt_labels = prompt_labels[cut:]
    return {"input_ids": new_prompt + new_resp, "labels": prompt_labels + resp_labels[: len(new_resp)]}


def encode_prompt_response(tok: Any, template: ChatTemplate, prompt: list[Message], response: str,
                           max_length: int, kind: str) -> dict[str, list[int]]:
    """A (prompt, response) pair tokenised for training: causal → one sequence with labels on the
    response; seq2seq → encoder input_ids and decoder labels. History trimmed from the left."""
    bos, eos = _special(tok)
    if kind == "seq2seq":
        src = encoder_ids(tok, template.render_prompt(prompt, bos, eos))
        tgt = token_ids(tok, response) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        tgt = tgt[: max(1, max_length // 2)] if len(tgt) > max_length // 2 and len(src) > max_length // 2 else tgt
        src = src[-max_length:] if len(src) > max_length else src
        return {"input_ids": src, "labels": tgt[:max_length]}
    reply = template.assistant.format(content=response, bos=bos, eos=eos) + template.assistant_suffix.format(
        bos=bos, eos=eos)
    ids, trainable = encode_pieces(tok, [(template.render_prompt(prompt, bos, eos), False), (reply, True)])
    split = trainable.index(True) if True in trainable else len(ids)
    p, r = fit(ids[:split], ids[split:], max_length, tok.bos_token_id)
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r, "prompt_length": len(p)}


def encode_sft_seq2seq(tok: Any, template: ChatTemplate, messages: list[Message], max_length: int) -> dict[str, list[int]]:
    """Seq2seq SFT: the history (all but the last assistant turn) goes to the encoder."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an SFT conversation must end with an assistant turn")
    return encode_prompt_response(tok, template, messages[:-1], messages[-1]["content"], max_length, "seq2seq")


def encode_prompt(tok: Any, template: ChatTemplate, prompt: list[Message], max_length: int,
                  kind: str = "causal") -> list[int]:
    """Generation prompt ids (for seq2seq: the encoder input), trimmed from the left to max_length
    (keeping BOS)."""
    bos, eos = _special(tok)
    text = template.render_prompt(prompt, bos, eos)
    ids = encoder_ids(tok, text) if kind == "seq2seq" else token_ids(tok, text)
    return fit(ids, [], max_length, tok.bos_token_id, min_prompt=max_length)[0]


def install_chat_template(tok: Any, template: ChatTemplate) -> None:
    """Give the tokenizer our template as a Jinja chat_template (saved with it)."""
    tok.chat_template = template.to_jinja()
