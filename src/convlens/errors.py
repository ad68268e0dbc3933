"""The one error type a user sees.

`ConvlensError` carries a message a user can act on. The CLI prints it on one
line and exits with status 2. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class ConvlensError(ValueError):
    """A mistake in what the user asked for, with a message saying what to do."""


class ConvlensWarning(UserWarning):
    """Something the user should know that did not stop the work (the CLI prints it on one line)."""


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


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, or its type name when the message is empty.

    Library errors often carry a multi-line message (a traceback of a scripted
    model, a list of missing keys); a one-line user error quotes only its first
    line. Keras wraps the message in an "Exception encountered when calling"
    header and ANSI bold, both dropped; the TorchScript interpreter wraps a scripted
    model's own error in its traceback, whose last line (``RuntimeError: ...``) is
    what is quoted. Some errors have no message at all, hence the type name.
    """
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Exception encountered when calling")]
    if lines and lines[0].startswith(TORCHSCRIPT_FAILED):  # the model's own error ends the interpreter's traceback
        return lines[-1].removeprefix("builtins.")
    return lines[0] if lines else type(err).__name__


#: how the TorchScript interpreter starts the message of an error raised while a scripted model runs
TORCHSCRIPT_FAILED = "The following operation failed in the TorchScript interpreter"
