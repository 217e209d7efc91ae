"""The semantic checks of a parsed recipe, one module per section, called in order by
`llmtune.config.schema.check`: what needs the registries, the file system or this machine
(unknown names, missing files, incompatible options). Each function appends `key.path: message`
strings to the error list it is given, so the user sees every problem at once.

Nothing here imports torch, and nothing imports the schema at run time (the schema imports these
modules; the section types are only needed for annotations).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def given(section: Any, key: str) -> bool:
    """Whether a section's key holds something other than its default (the recipe set it)."""
    f = next(f for f in dataclasses.fields(section) if f.name == key)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return getattr(section, key) != default
