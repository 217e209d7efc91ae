"""Raw dataset formats -> TRL conversational rows (`sft`, `preference`, `prompt`).

Each converter takes raw records and returns (rows, row errors): a bad row is reported with its
file:line and skipped, so one malformed line never sinks a 100k-row load. Rows whose natural shape
is richer can be derived down (preference -> sft/prompt, sft -> prompt), never up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from llmtune.data.raw import Record, Unreadable
from llmtune.errors import ConfigError, DataError, hint

Message = dict[str, str]
Converted = tuple[list[dict[str, Any]], list["RowError"]]
Converter = Callable[[Iterable[Record], "str | None", dict[str, Any]], Converted]

ROLES = ("system", "user", "assistant")
DERIVABLE = {"preference": ("preference", "sft", "prompt"), "sft": ("sft", "prompt"), "prompt": ("prompt",)}


@dataclass(frozen=True)
class RowError:
    """A raw row that was dropped: a real error, or (`filtered`) excluded on purpose by an option."""

    source: str
    line: int
    reason: str
    filtered: bool = False

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


class RowProblem(Exception):
    """Raised inside a row parser; becomes a RowError for that row."""


class Filtered(RowProblem):
    """The row is valid but an option (min_score_ratio, lang, ...) excludes it."""


def msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def shape_of(row: dict[str, Any]) -> str:
    """Which canonical shape a row has, judged by its keys."""
    if "messages" in row:
        return "sft"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "prompt" in row:
        return "prompt"
    raise RowProblem("no 'messages', 'prompt' or 'chosen'/'rejected' key")


def _with_source(row: dict[str, Any], source: Any) -> dict[str, Any]:
    if isinstance(source, str) and source:
        row["source"] = source
    return row


def to_shape(row: dict[str, Any], shape: str) -> dict[str, Any]:
    """Derive `shape` from a valid canonical row (prompt+chosen is the sft conversation); the row's
    extra columns (see `validate`) come along."""
    have = shape_of(row)
    if have == shape:
        return row
    if shape not in DERIVABLE[have]:
        raise RowProblem(f"a {have} row cannot become a {shape} row")
    if have == "preference":
        out = {"messages": row["prompt"] + row["chosen"]} if shape == "sft" else {"prompt": row["prompt"]}
    else:
        messages = row["messages"][:-1]
        if not messages or messages[-1]["role"] != "user":
            raise RowProblem("sft conversation has no user turn before its last assistant turn")
        out = {"prompt": messages}
    return _with_source({**out, **extra_columns(row)}, row.get("source"))


CANONICAL_KEYS = ("messages", "prompt", "chosen", "rejected", "source")


def extra_columns(row: dict[str, Any]) -> dict[str, Any]:
    """A canonical row's other columns (a gold `answer`, a `level`): kept with the row so that reward
    functions receive them as keyword arguments, as TRL passes dataset columns to its reward functions."""
    return {k: v for k, v in row.items() if k not in CANONICAL_KEYS}


def _messages(value: Any, what: str) -> list[Message]:
    """Validate a message list: non-empty, known roles, string contents."""
    if not isinstance(value, list) or not value:
        raise RowProblem(f"'{what}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RowProblem(f"'{what}'[{i}] must be {{'role': system|user|assistant, 'content': str}}")
        out.append(msg(m["role"], m["content"]))
    return out


def validate(row: dict[str, Any]) -> dict[str, Any]:
    """Check a canonical row and return a clean copy: its messages normalised, its other columns as
    they are (`extra_columns`)."""
    shape = shape_of(row)
    if shape == "sft":
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise RowProblem("'messages' must end with an assistant turn")
        out: dict[str, Any] = {"messages": messages}
    else:
        prompt = _messages(row.get("prompt"), "prompt")
        if prompt[-1]["role"] != "user":
            raise RowProblem("'prompt' must end with a user turn")
        out = {"prompt": prompt}
        if shape == "preference":
            for key in ("chosen", "rejected"):
                reply = _messages(row.get(key), key)
                if reply[0]["role"] != "assistant" or reply[-1]["role"] != "assistant":
                    raise RowProblem(f"'{key}' must start and end with an assistant turn")
                out[key] = reply
    return _with_source({**out, **extra_columns(row)}, row.get("source"))


def _string(row: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise RowProblem(f"'{key}' must be a {'' if allow_empty else 'non-empty '}string")
    return value


def _good_rows(
    records: Iterable[Record], errors: list[RowError]
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Pass parsed rows through; unreadable lines become row errors."""
    for source, line, row in records:
        if isinstance(row, Unreadable):
            errors.append(RowError(source, line, row.reason))
        else:
            yield source, line, row


def _check_shape(fmt: str, native: str, shape: str | None) -> None:
    """Fail the whole load early when the format can never give the asked shape."""
    if shape is not None and shape not in DERIVABLE[native]:
        raise DataError(
            f"format '{fmt}' gives {native} rows, which cannot become '{shape}' rows; "
            f"it can give: {', '.join(DERIVABLE[native])}"
        )


def _convert_rows(
    records: Iterable[Record],
    shape: str | None,
    options: dict[str, Any],
    parse: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
) -> Converted:
    """Run a one-row-in, one-row-out parser over the records, collecting per-row errors."""
    rows: list[dict[str, Any]] = []
    errors: list[RowError] = []
    for source, line, raw in _good_rows(records, errors):
        try:
            row = validate(parse(raw, options))
            rows.append(row if shape is None else to_shape(row, shape))
        except RowProblem as e:
            errors.append(RowError(source, line, str(e), filtered=isinstance(e, Filtered)))
    return rows, errors


# --- Anthropic HH ------------------------------------------------------------------------------

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant: "
_HH_TAG = {"user": HUMAN, "assistant": ASSISTANT}
# A transcript may end in "\n\nAssistant:" with no space: an empty final reply (kept, not dropped).
_HH_SPLIT = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)}|{re.escape(ASSISTANT.rstrip())}\\Z)")


def parse_hh(text: str) -> list[Message]:
    """Split an HH transcript into turns. A tag repeated without the other in between (a reply
    that itself contains '\\n\\nAssistant: ') stays inside that turn, so render_hh inverts this
    (except that an empty final reply renders with the tag's usual trailing space)."""
    parts = _HH_SPLIT.split(text)
    if parts[0] or len(parts) < 3 or parts[1] != HUMAN:
        raise RowProblem("transcript must start with '\\n\\nHuman: '")
    turns: list[Message] = []
    for tag, content in zip(parts[1::2], parts[2::2]):
        role = "user" if tag == HUMAN else "assistant"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += tag + content
        else:
            turns.append(msg(role, content))
    return turns


def render_hh(messages: list[Message]) -> str:
    """Messages back to the HH transcript format (the inverse of parse_hh)."""
    try:
        return "".join(_HH_TAG[m["role"]] + m["content"] for m in messages)
    except KeyError as e:
        raise ValueError(f"HH transcripts have no {e} role") from None


def _hh_row(row: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Shared history = prompt; the diverging last assistant turns = chosen / rejected."""
    a = parse_hh(_string(row, "chosen", allow_empty=True))
    b = parse_hh(_string(row, "rejected", allow_empty=True))
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k and a[k - 1]["role"] != "user":  # identical transcripts: the prompt ends at the last user turn
        k -= 1
    if len(a) - k != 1 or len(b) - k != 1 or a[k]["role"] != "assistant" or b[k]["role"] != "assistant":
        raise RowProblem("chosen and rejected must differ only in their last assistant turn")
    return _with_source({"prompt": a[:k], "chosen": a[k:], "rejected": b[k:]}, row.get("source"))


def convert_hh(records: Iterable[Record], shape: str | None, options: dict[str, Any]) -> Converted:
    """Anthropic/hh-rlhf `{"chosen": transcript, "rejected": transcript}` rows."""
    _check_shape("hh", "preference", shape)
    return _convert_rows(records, shape, options, _hh_row)


# --- Stanford SHP ------------------------------------------------------------------------------


def _shp_row(row: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """labels == 1 means comment A got more votes (preferred); domain is kept as the source."""
    try:
        label = int(row.get("labels"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        label = -1
    if label not in (0, 1):
        raise RowProblem(f"'labels' must be 0 or 1, got {row.get('labels')!r}")
    history, ref_a, ref_b = _string(row, "history"), _string(row, "human_ref_A"), _string(row, "human_ref_B")
    minimum = options.get("min_score_ratio")
    if minimum is not None:
        try:
            ratio = float(row.get("score_ratio"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise RowProblem(f"'score_ratio' must be a number, got {row.get('score_ratio')!r}") from None
        if ratio < float(minimum):
            raise Filtered(f"score_ratio {ratio:g} < min_score_ratio {minimum}")
    chosen, rejected = (ref_a, ref_b) if label == 1 else (ref_b, ref_a)
    out = {"prompt": [msg("user", history)], "chosen": [msg("assistant", chosen)]}
    out["rejected"] = [msg("assistant", rejected)]
    return _with_source(out, row.get("domain"))


def convert_shp(records: Iterable[Record], shape: str | None, options: dict[str, Any]) -> Converted:
    """stanfordnlp/SHP comment pairs; `min_score_ratio` drops weak preferences (counted as filtered)."""
    _check_shape("shp", "preference", shape)
    return _convert_rows(records, shape, options, _shp_row)


# --- Dolly -------------------------------------------------------------------------------------


def _dolly_row(row: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Instruction (+ blank line + context when given) -> response; category kept as the source."""
    user = _string(row, "instruction")
    context = row.get("context") or ""
    if not isinstance(context, str):
        raise RowProblem("'context' must be a string")
    if context.strip():
        user += "\n\n" + context
    messages = [msg("user", user), msg("assistant", _string(row, "response"))]
    return _with_source({"messages": messages}, row.get("category"))


def convert_dolly(records: Iterable[Record], shape: str | None, options: dict[str, Any]) -> Converted:
    """databricks-dolly-15k instruction rows."""
    _check_shape("dolly", "sft", shape)
    return _convert_rows(records, shape, options, _dolly_row)


# --- OpenAssistant oasst1 ----------------------------------------------------------------------


@dataclass
class _Node:
    source: str
    line: int
    row: dict[str, Any]
    order: int

    @property
    def rank_key(self) -> tuple[bool, float, int]:
        """Best first: rank 0, 1, ...; unranked replies after ranked ones; ties by file order."""
        rank = self.row.get("rank")
        return (rank is None, float(rank or 0), self.order)


def _oasst_nodes(
    records: Iterable[Record], options: dict[str, Any], errors: list[RowError]
) -> tuple[dict[str, _Node], dict[str, list[str]], list[str]]:
    """Index valid messages; report bad, deleted, filtered and orphaned ones. Returns
    (nodes reachable from a root, children per message id, root ids in file order)."""
    lang = options.get("lang")
    nodes: dict[str, _Node] = {}
    skipped: set[str] = set()
    for source, line, row in _good_rows(records, errors):
        mid = row.get("message_id")
        if not isinstance(mid, str) or row.get("role") not in ("prompter", "assistant"):
            errors.append(RowError(source, line, "needs a string 'message_id' and role prompter|assistant"))
        elif not isinstance(row.get("text"), str):
            errors.append(RowError(source, line, "'text' must be a string"))
        elif row.get("deleted") or row.get("synthetic"):
            errors.append(RowError(source, line, "deleted message" if row.get("deleted") else "synthetic message",
                                   filtered=True))
            skipped.add(mid)
        elif lang and row.get("lang") != lang:
            errors.append(RowError(source, line, f"lang {row.get('lang')!r} != {lang!r}", filtered=True))
            skipped.add(mid)
        else:
            nodes[mid] = _Node(source, line, row, len(nodes))
    children: dict[str, list[str]] = {mid: [] for mid in nodes}
    roots: list[str] = []
    reachable: dict[str, _Node] = {}
    for mid, node in nodes.items():
        parent = node.row.get("parent_id")
        if parent is None:
            if node.row["role"] == "prompter":
                unfit = _unexported_tree(node.row)
                if unfit:
                    errors.append(RowError(node.source, node.line, unfit, filtered=True))
                    skipped.add(mid)
                else:
                    roots.append(mid)
            else:
                errors.append(RowError(node.source, node.line, "conversation root is not a prompter message"))
                skipped.add(mid)
        elif parent in nodes:
            children[parent].append(mid)
    stack = list(reversed(roots))
    while stack:
        mid = stack.pop()
        reachable[mid] = nodes[mid]
        stack.extend(children[mid])
    for mid, node in nodes.items():
        if mid in reachable or mid in skipped:
            continue
        top = node
        while top.row["parent_id"] in nodes:
            top = nodes[top.row["parent_id"]]
        missing = top.row["parent_id"] or top.row["message_id"]
        if missing in skipped:
            errors.append(RowError(node.source, node.line, f"ancestor {missing} was dropped", filtered=True))
        else:
            errors.append(RowError(node.source, node.line, f"orphan: parent {missing} not found"))
    return reachable, children, roots


def _unexported_tree(root: dict[str, Any]) -> str | None:
    """Why a conversation tree is left out, as OpenAssistant's own loader (`load_oasst_export`) leaves it
    out: only trees whose state is ready_for_export, and only prompts that passed review. Rows without
    these fields (hand-made files) are kept."""
    state = root.get("tree_state", "ready_for_export")
    if state != "ready_for_export":
        return f"tree_state {state!r} is not ready_for_export"
    if "review_result" in root and not root["review_result"]:
        return f"prompt review_result is {root['review_result']!r}"
    return None


def convert_oasst(records: Iterable[Record], shape: str | None, options: dict[str, Any]) -> Converted:
    """OpenAssistant/oasst1 message trees.

    sft: one conversation per root-to-leaf path, taking the best-ranked assistant reply at each
    prompter message and every prompter follow-up at each assistant message.
    preference: one pair per prompter message with >= 2 ranked replies, best rank vs worst rank
    (one pair, not all pairs, so big branches are not over-weighted).
    prompt: the conversation up to every prompter message.
    As OpenAssistant's own loader does: only trees in state ready_for_export whose prompt passed review,
    and no deleted or synthetic messages (nor anything below them), counted as filtered. Option `lang`
    keeps only messages in that language.
    """
    shape = shape or "sft"
    errors: list[RowError] = []
    nodes, children, roots = _oasst_nodes(records, options, errors)
    rows: list[dict[str, Any]] = []

    def path_to(mid: str) -> list[Message]:
        chain = []
        node: _Node | None = nodes[mid]
        while node is not None:
            chain.append(msg("user" if node.row["role"] == "prompter" else "assistant", node.row["text"]))
            node = nodes.get(node.row.get("parent_id"))
        return chain[::-1]

    def kids(mid: str, role: str) -> list[_Node]:
        return [nodes[k] for k in children[mid] if k in nodes and nodes[k].row["role"] == role]

    def sft_walk(mid: str, lang: Any) -> bool:
        """Emit conversations below `mid`; True when at least one was emitted."""
        if nodes[mid].row["role"] == "prompter":
            replies = kids(mid, "assistant")
            return bool(replies) and sft_walk(min(replies, key=lambda n: n.rank_key).row["message_id"], lang)
        emitted = False
        for follow_up in kids(mid, "prompter"):
            emitted = sft_walk(follow_up.row["message_id"], lang) or emitted
        if not emitted:
            rows.append(_with_source({"messages": path_to(mid)}, lang))
        return True

    for root in roots:
        lang = nodes[root].row.get("lang")
        if shape == "sft":
            sft_walk(root, lang)
            continue
        stack = [root]
        while stack:
            mid = stack.pop()
            stack.extend(reversed(children[mid]))
            if nodes[mid].row["role"] != "prompter":
                continue
            if shape == "prompt":
                rows.append(_with_source({"prompt": path_to(mid)}, lang))
                continue
            ranked = sorted(
                (n for n in kids(mid, "assistant") if n.row.get("rank") is not None), key=lambda n: n.rank_key
            )
            if len(ranked) >= 2 and ranked[0].row["rank"] != ranked[-1].row["rank"]:
                pair = {"prompt": path_to(mid), "chosen": [msg("assistant", ranked[0].row["text"])]}
                pair["rejected"] = [msg("assistant", ranked[-1].row["text"])]
                rows.append(_with_source(pair, lang))
    return rows, errors


# --- already canonical, and generic tables -----------------------------------------------------


def _canonical_row(row: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    for column, wanted in (options.get("where") or {}).items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if row.get(column) not in allowed:
            raise Filtered(f"{column} {row.get(column)!r} is not in {allowed}")
    return row


def convert_canonical(records: Iterable[Record], shape: str | None, options: dict[str, Any]) -> Converted:
    """Rows already in a canonical shape (detected per row); `shape=None` keeps each row's own."""
    return _convert_rows(records, shape, options, _canonical_row)


COLUMN_KEYS = ("prompt", "response", "chosen", "rejected", "system")


def column_shape(columns: Any) -> str:
    """The shape a column mapping describes; a bad mapping is a recipe error."""
    if not isinstance(columns, dict) or not columns:
        raise ConfigError(
            "format 'columns' needs option 'columns', e.g. {prompt: question, response: answer}"
        )
    for key, col in columns.items():
        if key not in COLUMN_KEYS:
            raise ConfigError(f"unknown column role '{key}'" + hint(key, COLUMN_KEYS))
        if not isinstance(col, str):
            raise ConfigError(f"column for '{key}' must be a column name (string)")
    if "prompt" not in columns:
        raise ConfigError("column mapping needs a 'prompt' column")
    if "chosen" in columns or "rejected" in columns:
        if not {"chosen", "rejected"} <= columns.keys():
            raise ConfigError("a preference column mapping needs both 'chosen' and 'rejected'")
        return "preference"
    return "sft" if "response" in columns else "prompt"


def _cell(row: dict[str, Any], column: str, role: str) -> list[Message]:
    """A plain string is one message; a JSON list of messages is taken as is."""
    if column not in row:
        raise RowProblem(f"missing column '{column}'")
    value = row[column]
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(f"column '{column}' is empty")
        return [msg(role, value)]
    return _messages(value, column)


def _columns_row(row: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    cols = options["columns"]
    prompt = _cell(row, cols["prompt"], "user")
    system = row.get(cols["system"]) if "system" in cols else None
    if isinstance(system, str) and system.strip():
        prompt = [msg("system", system), *prompt]
    if "chosen" in cols:
        out = {"prompt": prompt, "chosen": _cell(row, cols["chosen"], "assistant")}
        out["rejected"] = _cell(row, cols["rejected"], "assistant")
    elif "response" in cols:
        out = {"messages": prompt + _cell(row, cols["response"], "assistant")}
    else:
        out = {"prompt": prompt}
    return _with_source(out, row.get("source"))


def convert_columns(records: Iterable[Record], shape: str | None, options: dict[str, Any]) -> Converted:
    """Any table (CSV, JSONL, parquet) with a user mapping of roles to column names."""
    _check_shape("columns", column_shape(options.get("columns")), shape)
    return _convert_rows(records, shape, options, _columns_row)


@dataclass(frozen=True)
class Option:
    """An option a converter accepts under a recipe's `data.options` (checked by the recipe schema)."""

    types: tuple[type, ...]
    doc: str


@dataclass(frozen=True)
class Format:
    """A raw format as the recipe schema and the loader see it: the converter, the shape its rows
    naturally have (None: decided per row for canonical, by the column mapping for columns), and the
    options it declares; anything else under `data.options` is a typo."""

    convert: Converter
    shape: str | None
    options: dict[str, Option]


CONVERTERS: dict[str, Format] = {
    "hh": Format(convert_hh, "preference", {}),
    "shp": Format(convert_shp, "preference", {
        "min_score_ratio": Option((int, float), "drop pairs whose score_ratio (votes of the preferred comment / "
                                  "the other) is below this; dropped rows are counted as filtered"),
    }),
    "dolly": Format(convert_dolly, "sft", {}),
    "oasst": Format(convert_oasst, "sft", {
        "lang": Option((str,), "keep only messages in this language code (e.g. en); the rest are filtered"),
    }),
    "canonical": Format(convert_canonical, None, {
        "where": Option((dict,), "keep only rows whose columns hold these values, e.g. {level: [1, 2]} of the "
                        "arithmetic set; the others are counted as filtered"),
    }),
    "columns": Format(convert_columns, None, {
        "columns": Option((dict,), "role -> column name mapping (data.columns sets it)"),
    }),
}


def natural_shape(fmt: str, options: dict[str, Any]) -> str | None:
    """The shape a format gives without derivation (a column mapping decides for `columns`)."""
    return column_shape(options.get("columns")) if fmt == "columns" else CONVERTERS[fmt].shape
