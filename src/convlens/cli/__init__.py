"""The ``convlens`` command: thin commands over the Python API.

Each command lives in its own module and registers itself on :data:`app`.
A :class:`~convlens.ConvlensError` is printed on one line and exits with status 2.
"""

from __future__ import annotations

import sys

import typer

from ..errors import ConvlensError

app = typer.Typer(
    name="convlens",
    help="See what a convolutional network has learned and why it decides what it decides.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Commands register themselves on app when their module is imported.
from . import atlas  # noqa: E402,F401
from . import evaluate  # noqa: E402,F401
from . import explain  # noqa: E402,F401
from . import inside  # noqa: E402,F401
from . import inspect  # noqa: E402,F401
from . import report  # noqa: E402,F401
from . import train  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except ConvlensError as err:
        print(f"convlens: error: {err}", file=sys.stderr)
        sys.exit(2)
