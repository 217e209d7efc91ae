"""`llmtune chat MODEL`: a terminal chat with streamed answers and multi-turn history.

On a terminal: one conversation; `/reset` clears it, `/system TEXT` sets the system prompt (and
resets), `/help`, `/exit`. From a pipe (stdin not a TTY): each non-blank input line is one user
prompt and gets exactly one output line (each run of whitespace inside an answer, newlines
included, becomes one space, so answers and prompts stay aligned line by line); `/exit` stops. Pipe turns are independent unless `--history` is given; the
`/reset` and `/system` commands work there too and print nothing. Histories longer than the
model's context are trimmed from the left, so the latest turns are always seen.
"""

from __future__ import annotations

import sys
from typing import TextIO

from llmtune.data.templates import Message
from llmtune.serve.engine import Engine, Settings

HELP = "commands: /reset (new conversation), /system TEXT (set system prompt), /help, /exit"


class Conversation:
    """Messages so far plus the system prompt, with the slash commands both modes share."""

    def __init__(self, system: str | None):
        self.system = system
        self.turns: list[Message] = []

    def messages(self, user: str) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": user}]

    def command(self, line: str) -> str | None:
        """Apply a slash command; the text to show, or None when the line is not a command."""
        word, _, arg = line.partition(" ")
        if word == "/reset":
            self.turns = []
            return "(conversation reset)"
        if word == "/system":
            self.system = arg.strip() or None
            self.turns = []
            return f"(system prompt {'set' if self.system else 'cleared'}; conversation reset)"
        if word in ("/help", "/?"):
            return HELP
        return None


def interactive(engine: Engine, settings: Settings, system: str | None, out: TextIO = sys.stdout) -> None:
    """The terminal REPL: streamed answers, history until /reset."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    conv = Conversation(system)
    out.write(f"chatting with {engine.name} ({engine.kind}, template {engine.template.name}). {HELP}\n")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            out.write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        shown = conv.command(line)
        if shown is not None:
            out.write(shown + "\n")
            continue
        messages = conv.messages(line)
        out.write(f"{engine.name}> ")
        out.flush()
        stream = engine.stream(messages, settings)
        answer = ""
        try:
            for piece in stream:
                answer += piece
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stream.close()
            out.write(" [interrupted]")
        out.write("\n")
        conv.turns = [*messages[1 if conv.system else 0:], {"role": "assistant", "content": answer}]


def piped(engine: Engine, settings: Settings, system: str | None, history: bool, inp: TextIO = sys.stdin,
          out: TextIO = sys.stdout) -> int:
    """One answer line per prompt line; returns the number of answers written."""
    conv = Conversation(system)
    answered = 0
    for raw in inp:
        line = raw.strip()
        if line in ("/exit", "/quit"):
            break
        if not line or conv.command(line) is not None:
            continue
        messages = conv.messages(line)
        answer = engine.chat(messages, settings)
        out.write(" ".join(answer.split()) + "\n")
        out.flush()
        answered += 1
        if history:
            conv.turns = [*messages[1 if conv.system else 0:], {"role": "assistant", "content": answer}]
    return answered
