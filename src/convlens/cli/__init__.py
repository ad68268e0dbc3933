"""The ``convlens`` command: thin commands over the Python API.

Each command lives in its own module and registers itself on :data:`app`.
A :class:`~convlens.ConvlensError`, a usage mistake (unknown option, a value
that is not a number) and a full or read-only disk are each printed on one line
and exit with status 2. SIGINT and SIGTERM end a command on one line too, with
status 130 and 143: the signal becomes :class:`Interrupted`, so every staged
write removes its temporary files on the way out (:mod:`convlens.fileio`).

Importing this package loads typer and the command declarations only: each
command imports torch and the rest of convlens when it runs, so ``--help``,
``--version`` and a mistyped option answer at once.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import warnings
from typing import Annotated, Any

import typer
import typer.main

from .. import __version__
from ..errors import ConvlensError, ConvlensWarning
from ..fileio import DISK_ERRORS, HELD_SIGNALS, disk_error
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
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """See what a convolutional network has learned and why it decides what it decides."""


# Commands register themselves on app when their module is imported.
from . import (  # noqa: E402
    atlas,  # noqa: F401
    concepts,  # noqa: F401
    evaluate,  # noqa: F401
    explain,  # noqa: F401
    factorize,  # noqa: F401
    inside,  # noqa: F401
    inspect,  # noqa: F401
    report,  # noqa: F401
    serve,  # noqa: F401
    train,  # noqa: F401
)


def _one_line_warnings(show):
    """``warnings.showwarning`` that prints a :class:`ConvlensWarning` as ``convlens: warning: ...``, one line."""

    def showwarning(message, category, *args, **kwargs):
        if issubclass(category, ConvlensWarning):
            print(f"convlens: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    return showwarning


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: a ``BaseException``, so no ``except Exception`` swallows it and cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    for held in HELD_SIGNALS:  # a second Ctrl-C must not cut the clean-up of the first short
        signal.signal(held, signal.SIG_IGN)
    raise Interrupted(signum)


def _usage_line(err: typer.TyperException) -> str:
    """A click usage mistake on one line, with where to look: ``No such option: --x (see convlens report --help)``."""
    message = " ".join(err.format_message().split())
    context = getattr(err, "ctx", None)
    return f"{message} (see {context.command_path} --help)" if context is not None else message


@functools.cache
def _command() -> Any:
    """The click command typer builds from :data:`app`, built once: building it takes ~50 ms, parsing 0.3 ms."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """Run the ``convlens`` command line (``argv`` defaults to ``sys.argv[1:]``); always ends in ``SystemExit``."""
    wait_passively()  # before any command imports torch: OpenMP reads it once, at start
    own_signals = threading.current_thread() is threading.main_thread()
    previous = {held: signal.signal(held, _interrupt) for held in HELD_SIGNALS} if own_signals else {}
    code = 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            result = _command().main(args=argv, prog_name="convlens", standalone_mode=False)
        code = result if isinstance(result, int) else 0  # typer.Exit and --version give their code
    except ConvlensError as err:
        print(f"convlens: error: {err}", file=sys.stderr)
        code = 2
    except typer.TyperException as err:  # usage mistakes: click's several lines (usage, hint, error) as one
        if type(err).__name__ == "NoArgsIsHelpError":  # plain `convlens`: the help, as before
            err.show()  # type: ignore[attr-defined]  # a click error (typer exports no type for it); all have show()
        else:
            print(f"convlens: error: {_usage_line(err)}", file=sys.stderr)
        code = err.exit_code
    except typer.Abort:  # end of input at a prompt
        print("convlens: aborted", file=sys.stderr)
        code = 1
    except Interrupted as err:
        name = signal.Signals(err.signum).name
        print(f"convlens: interrupted ({name}); nothing half-written was left", file=sys.stderr)
        code = 128 + err.signum
    except OSError as err:  # a disk error a staged write did not name (e.g. while creating a folder)
        if err.errno not in DISK_ERRORS:
            raise
        print(f"convlens: error: {disk_error(err, err.filename or 'the output')}", file=sys.stderr)
        code = 2
    finally:
        for held, handler in previous.items():
            signal.signal(held, handler)
    sys.exit(code)
