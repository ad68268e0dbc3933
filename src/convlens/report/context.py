"""What every section of the report is given and gives back, and the small helpers they share.

A section is a function ``(Context) -> Section | None``: the :class:`Context` holds the model,
its summary, the report's images and options and the progress of the job; the :class:`Section`
is its HTML fragment with a title and a note. :mod:`.sections` lists the sections in page order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from markupsafe import Markup
from PIL import Image, ImageOps

from ..models import Model, Summary
from ..progress import Steps
from .html import data_uri


@dataclass
class ReportImage:
    """An input picture: its name, the RGB image, its ground-truth mask and its true class when known.

    ``label`` is what the picture shows ("circle", "cat"); when the model has no
    class of that name (see :func:`outside_classes`), the report says so next to it.
    """

    name: str
    image: Image.Image
    mask: np.ndarray | None = None
    label: str | None = None


def words(text: str) -> set[str]:
    """The lower-case words of ``text`` ("Tiger cat" -> {"tiger", "cat"}), to compare labels with class names."""
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def outside_classes(model: Model, item: ReportImage) -> bool:
    """Whether ``item`` shows something none of the model's classes is: its ``label`` names no class.

    A class counts when it contains every word of the label ("cat" is inside
    ImageNet's "tiger cat"), so only a true outsider is called one. Unknown when
    the image has no label or the model no class names: then False.
    """
    if item.label is None or not model.labels:
        return False
    wanted = words(item.label)
    return not any(wanted <= words(name) for name in model.labels)


@dataclass
class Context:
    model: Model
    summary: Summary
    images: list[ReportImage]
    options: dict = field(default_factory=dict)
    progress: Steps = field(default_factory=Steps)  # build_report begins each section on it

    def expect(self, count: int) -> None:
        """The current section will report ``count`` sub-steps (said before the first, so callers know the total)."""
        self.progress.expect(count)

    def step(self, message: str) -> None:
        """The current section reaches its next sub-step, ``message``."""
        self.progress.advance(message)

    def skip(self, count: int) -> None:
        """``count`` of the announced sub-steps will not run."""
        self.progress.skip(count)

    @cached_property
    def layers(self) -> list[str]:
        """The conv and pooling layers up to the last spatial one (one small dry pass, made once)."""
        from ..inside.activations import default_layers

        return default_layers(self.model)


@dataclass
class Section:
    id: str
    title: str
    html: Markup
    note: str = ""


def figure(image: Image.Image, caption: str) -> dict:
    """A picture for the ``figures`` macro: the image embedded as a data URI, and its caption."""
    return {"uri": data_uri(image), "caption": caption}


def join_names(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def thumbnail(image: Image.Image, size: int = 160) -> Image.Image:
    """``image`` resized to fit a ``size`` square, aspect ratio kept."""
    return ImageOps.contain(image, (size, size), Image.Resampling.BILINEAR)


def left_out(skipped: dict[str, str], why: str = "as they do not apply to this model") -> str:
    """`` Left out, <why>: name: reason; ...`` for a section's note (empty when nothing was)."""
    if not skipped:
        return ""
    return f" Left out, {why}: " + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()) + "."


def explained(ctx: Context) -> str:
    """What the maps explain, in words: the image's top class, or the target the report was given."""
    target = ctx.options.get("targets")
    return "the image's top-1 class" if target is None else f"the target given, {target!r}"


def cell(image: Image.Image, caption: str) -> dict:
    """A :func:`figure` of a 150-pixel thumbnail: one panel of a heatmap row."""
    return figure(thumbnail(image, 150), caption)
