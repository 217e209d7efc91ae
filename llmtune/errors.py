"""User-facing errors: the CLI prints their message (no traceback) and exits with `exit_code`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LLMTuneError(Exception):
    """An error caused by the user's input (recipe, data, paths), reported as one clear message."""

    exit_code = 2


class ConfigError(LLMTuneError):
    """A recipe is invalid: unknown key, wrong type or range, unknown name, missing file."""


class DataError(LLMTuneError):
    """A dataset cannot be read or converted (most rows fail, unreadable file, wrong shape)."""


def near(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Closest valid names for a did-you-mean hint."""
    choices = list(choices)
    found = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not found:
        low = word.lower()
        found = [c for c in choices if low in c.lower() or c.lower() in low][:n]
    return found


def hint(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or a list of valid names when nothing is close."""
    choices = sorted(choices)
    found = near(word, choices)
    if found:
        return "; did you mean " + " or ".join(f"'{c}'" for c in found) + "?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"; valid: {shown}"


def problems(source: str, errors: list[str]) -> str:
    """One message for every problem found in SOURCE: inline when there is one, a list otherwise."""
    if len(errors) == 1:
        return f"{source}: {errors[0]}"
    return f"{source}: {len(errors)} problems\n" + "\n".join(f"  - {e}" for e in errors)
