"""The ``convlens`` command: thin commands over the Python API.

Each command lives in its own module and registers itself on :data:`app`.
A :class:`~convlens.ConvlensError` is printed on one line and exits with status 2.

Importing this package loads typer and the command declarations only: each
command imports torch and the rest of convlens when it runs, so ``--help``,
``--version`` and a mistyped option answer at once.
"""

from __future__ import annotations

import sys
import warnings
from typing import Annotated, Any

import typer

from .. import __version__
from ..errors import ConvlensError, ConvlensWarning
from .common import Command, Group, wait_passively


class _App(typer.Typer):
    """A typer app whose commands default to :class:`~convlens.cli.common.Command` (help without type clutter)."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any):
        return super().command(*args, cls=cls or Command, **kwargs)


app = _App(
    name="convlens",
    help="See what a convolutional network has learned and why it decides what it decides.",
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"convlens {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """See what a convolutional network has learned and why it decides what it decides."""


# Commands register themselves on app when their module is imported.
from . import atlas  # noqa: E402,F401
from . import evaluate  # noqa: E402,F401
from . import explain  # noqa: E402,F401
from . import inside  # noqa: E402,F401
from . import inspect  # noqa: E402,F401
from . import report  # noqa: E402,F401
from . import serve  # noqa: E402,F401
from . import train  # noqa: E402,F401


def _one_line_warnings(show):
    """``warnings.showwarning`` that prints a :class:`ConvlensWarning` as ``convlens: warning: ...``, one line."""
    def showwarning(message, category, *args, **kwargs):
        if issubclass(category, ConvlensWarning):
            print(f"convlens: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)
    return showwarning


def main(argv: list[str] | None = None) -> None:
    """Run the ``convlens`` command line (``argv`` defaults to ``sys.argv[1:]``)."""
    wait_passively()  # before any command imports torch: OpenMP reads it once, at start
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            app(args=argv, standalone_mode=True)
    except ConvlensError as err:
        print(f"convlens: error: {err}", file=sys.stderr)
        sys.exit(2)
