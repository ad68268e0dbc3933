"""The one error type a user sees.

`ConvlensError` carries a message a user can act on. The CLI prints it on one
line and exits with status 2. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConvlensError(ValueError):
    """A mistake in what the user asked for, with a message saying what to do."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``"; did you mean 'a', 'b'?"`` for the closest choices, or ``""``."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered in c.lower()][:n]
    if not close:
        return ""
    return "; did you mean " + ", ".join(repr(c) for c in close) + "?"
