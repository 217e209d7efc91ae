"""Loaded models for the chat tab, shared by every browser tab of one UI process.

Models are `llmtune.serve.engine.Engine`s (the same object `llmtune chat` and `llmtune serve` use), so
answers here match the command line exactly. Loading is slow and memory-bound, so engines are cached
by reference and the least recently used one is closed when more than `capacity` are loaded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

Message = dict[str, str]


class ModelPool:
    """Engines keyed by model reference (registry name or absolute run path), LRU-evicted."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._engines: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: str, name: str) -> Any:
        """The engine for REF, loading it on first use (one load at a time: they compete for memory)."""
        from llmtune.serve.engine import Engine

        with self._lock:
            engine = self._engines.get(ref)
            if engine is None:
                engine = Engine.load(ref, name=name)
                self._engines[ref] = engine
                while len(self._engines) > self.capacity:
                    _, old = self._engines.popitem(last=False)
                    old.close()
            self._engines.move_to_end(ref)
            return engine

    def stream(self, ref: str, name: str, messages: list[Message], max_new_tokens: int, temperature: float,
               top_p: float, seed: int | None) -> Iterator[str]:
        """Text deltas of one answer to MESSAGES."""
        from llmtune.serve.engine import Settings

        engine = self.get(ref, name)
        settings = Settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        yield from engine.stream(messages, settings)
