"""Progress of long jobs: what the library reports, and how a command shows it.

The library reports progress through plain callbacks and never prints:

* counted work (images scanned, (image, method) pairs scored, optimisation
  steps) calls ``progress(done, total)``, typed :data:`Progress`;
* a job made of named steps of unequal length (the report's sections) sends a
  :class:`Step` per step and per sub-step. :class:`Steps` does the counting:
  the number of steps is announced up front, and a step announces how many
  sub-steps it has (:meth:`Steps.expect`) before the first one, so a caller
  always knows the totals.

:class:`ProgressDisplay` is the display the CLI puts on either kind of callback:

* stderr is a terminal: a tqdm bar with the total and the current step's name;
* otherwise (a log file, a pipe, CI): one plain line per step,
  ``[3/9] heatmaps: gradcam (2/4)``, flushed at once and without carriage
  returns, so a log of a long run reads as a list and shows where it stands.

Example::

    with ProgressDisplay("report", unit="section") as shown:
        build_report(model, out="r.html", progress=shown.step)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["Progress", "ProgressDisplay", "Step", "Steps"]

#: The callback counted work reports through: ``progress(done, total)``.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Step:
    """Where a job of named steps stands.

    ``index`` of ``total`` is the current step, called ``name``. ``part == 0``
    says the step begins; ``part == k`` says its k-th sub-step (of ``parts``,
    0 when the step did not announce a count) is reached, ``detail`` naming it.
    ``str(step)`` is the one-line form, e.g. ``[3/9] heatmaps: gradcam (2/4)``.
    """

    index: int
    total: int
    name: str
    part: int = 0
    parts: int = 0
    detail: str = ""

    @property
    def label(self) -> str:
        """The step without its position: ``heatmaps: gradcam (2/4)``."""
        if not self.part:
            return self.name
        counted = f" ({self.part}/{self.parts})" if self.parts else f" ({self.part})"
        return f"{self.name}: {self.detail}{counted}" if self.detail else f"{self.name}{counted}"

    def __str__(self) -> str:
        return f"[{self.index}/{self.total}] {self.label}"


class Steps:
    """Counts the steps and sub-steps of a job and sends a :class:`Step` for each to ``callback``.

    With no callback it only counts, so library code can report unconditionally.
    """

    def __init__(self, total: int = 0, callback: Callable[[Step], None] | None = None):
        self.total = total
        self.callback = callback
        self.index = self.part = self.parts = 0
        self.name = ""

    def begin(self, name: str) -> None:
        """The next step, ``name``, begins."""
        self.index += 1
        self.name, self.part, self.parts = name, 0, 0
        self._send(Step(self.index, self.total, name))

    def expect(self, parts: int) -> None:
        """The current step will report ``parts`` sub-steps."""
        self.parts = parts

    def advance(self, detail: str = "") -> None:
        """The current step reaches its next sub-step, ``detail``."""
        self.part += 1
        self._send(Step(self.index, self.total, self.name, self.part, self.parts, detail))

    def skip(self, count: int) -> None:
        """``count`` announced sub-steps will not run (a method that turned out not to apply): they are
        counted without a report of their own, so the next sub-step, and the last, still match the total."""
        self.part += count

    def _send(self, step: Step) -> None:
        if self.callback is not None:
            self.callback(step)


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream counts as not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class ProgressDisplay:
    """Shows a job's progress on ``stream`` (default: the current ``sys.stderr``).

    On a terminal it is a tqdm bar with the total and the current step's name.
    Elsewhere each step is one flushed line, ``[k/n] desc: name``; ``lines``
    caps the lines of counted work at about that many (each ``1/lines`` of the
    total, and the last), for fine-grained counts such as optimisation steps.

    The bar opens at the first report, so an input error found before any work
    prints on its own, with no bar around it. Feed it through :meth:`begin`
    (a step starts), :meth:`update` or the object itself as a
    ``progress(done, total)`` callback (work finished), or :meth:`step`
    (a :class:`Step` of a :class:`Steps` job).
    """

    def __init__(
        self,
        desc: str = "",
        total: int | None = None,
        *,
        unit: str = "step",
        stream: TextIO | None = None,
        lines: int | None = None,
    ):
        self.desc, self.total, self.unit, self.lines = desc, total, unit, lines
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = is_terminal(self.stream)
        self.count = 0  # steps begun or work finished so far
        self._bar: Any = None  # a tqdm bar once drawn (tqdm ships no types)
        self._last_done = self._last_bucket = 0  # of the last plain line of counted work

    # -- what the job reports ---------------------------------------------------------------------

    def begin(self, name: str = "", index: int | None = None) -> None:
        """The next step (or step ``index``, counted from 1, when a resumed job skips some), ``name``, begins.

        The bar counts the steps before it as done.
        """
        self.count = self.count + 1 if index is None else index
        if self.terminal:
            self._draw(self.count - 1, self.total, name)
        else:
            self._line(self.count, self.total, name)

    def update(self, done: int, total: int | None = None, name: str = "") -> None:
        """``done`` of ``total`` units of work are finished."""
        if done < self._last_done:  # counting starts again (another folder, the next pass)
            self._last_done = self._last_bucket = 0
        self.count = done
        if total is not None:
            self.total = total
        if self.terminal:
            self._draw(done, self.total, name)
        elif self._due(done):
            self._line(done, self.total, name)

    def __call__(self, done: int, total: int) -> None:
        """The ``progress(done, total)`` callback the library's counted work calls."""
        self.update(done, total)

    def step(self, step: Step) -> None:
        """A :class:`Step` of a job that reports named steps and sub-steps."""
        self.count = step.index
        if self.terminal:
            self._draw(step.index - 1, step.total, step.label)
        else:
            self._write(str(step))

    def note(self, name: str) -> None:
        """A new name for the current step, on the bar only (a log keeps to one line per step)."""
        if self._bar is not None:
            self._bar.set_postfix_str(name)

    def write(self, line: str, file: TextIO | None = None) -> None:
        """Print ``line`` (to stdout by default) without breaking the bar."""
        file = file if file is not None else sys.stdout
        if self._bar is not None:
            self._bar.write(line, file=file)
        else:
            print(line, file=file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- how it is shown ------------------------------------------------------------------------------

    def _draw(self, done: int, total: int | None, name: str) -> None:
        if self._bar is None:
            from tqdm import tqdm  # only when a bar is drawn

            self._bar = tqdm(
                total=total, desc=self.desc or None, unit=self.unit, file=self.stream, leave=False, dynamic_ncols=True
            )
        bar = self._bar
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        bar.set_postfix_str(name, refresh=False)
        bar.refresh()

    def _due(self, done: int) -> bool:
        """Whether counted work at ``done`` gets a plain line: every new count, or each 1/lines of the total."""
        if done == self._last_done:
            return False
        bucket = min(done, self.total) * self.lines // self.total if self.lines and self.total else done
        due = bucket > self._last_bucket or (self.total is not None and done >= self.total)
        if due:
            self._last_done, self._last_bucket = done, bucket
        return due

    def _line(self, k: int, total: int | None, name: str) -> None:
        position = f"[{k}/{total}]" if total is not None else f"[{k}]"
        text = ": ".join(part for part in (self.desc, name) if part)
        self._write(f"{position} {text}".rstrip())

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
