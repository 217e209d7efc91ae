"""Using trained models: the shared `Engine` (chat, streaming, scoring), the OpenAI-compatible
server (`api`), the terminal chat, side-by-side `compare` and `export`. Importing this package does
not import torch; models load in `Engine.load`."""

from llmtune.serve.engine import Completion, Engine, EngineBusy, RequestError, Settings, TextStream

__all__ = ["Completion", "Engine", "EngineBusy", "RequestError", "Settings", "TextStream"]
