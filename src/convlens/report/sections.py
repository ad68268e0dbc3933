"""The report's sections: each turns API results into an HTML fragment with embedded pictures.

A section is a function ``(context) -> Section``; :data:`SECTIONS` lists them in page order,
so a new section is one function and one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jinja2
import numpy as np
from markupsafe import Markup
from PIL import Image

from ..models import Model, Summary
from .html import data_uri

_env = jinja2.Environment(loader=jinja2.PackageLoader("convlens.report", "templates"),
                          autoescape=jinja2.select_autoescape(["html", "j2"]))
_parts = _env.get_template("parts.html.j2").module


@dataclass
class ReportImage:
    """An input picture: its name, the RGB image, and its ground-truth mask when known."""

    name: str
    image: Image.Image
    mask: np.ndarray | None = None


@dataclass
class Context:
    model: Model
    summary: Summary
    images: list[ReportImage]
    options: dict = field(default_factory=dict)
    progress: object = None  # callable(str) or None

    def step(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


@dataclass
class Section:
    id: str
    title: str
    html: Markup
    note: str = ""


def figure(image: Image.Image, caption: str) -> dict:
    return {"uri": data_uri(image), "caption": caption}


def summary_section(ctx: Context) -> Section:
    rows = []
    for row in ctx.summary.rows:
        shape = "-" if row.output_shape is None else "(" + ", ".join(
            "N" if d == -1 else str(d) for d in row.output_shape) + ")"
        target = "auto" if row.spatial and row.name == ctx.summary.auto_layer else ("yes" if row.spatial else "")
        rows.append(("\u2003" * row.depth + row.name, row.type, shape, f"{row.params:,}", target))
    html = _parts.table(["layer", "type", "output shape", "params", "explanation target"], rows,
                        numeric=(3,), scroll=True)
    note = (f"{ctx.summary.total_params:,} parameters ({ctx.summary.trainable_params:,} trainable). "
            f"Explanation targets are layers with a spatial output; 'auto' picks {ctx.summary.auto_layer}.")
    return Section("model", "Model", Markup(html), note)


def predictions_section(ctx: Context) -> Section:
    predictions = ctx.model.predict([item.image for item in ctx.images], top_k=3)
    items, rows = [], []
    for item, preds in zip(ctx.images, predictions):
        items.append(figure(_thumbnail(item.image), item.name))
        rows.append((item.name, *[f"{p.label} ({p.probability:.1%})" for p in preds]))
    k = max(len(p) for p in predictions)
    html = _parts.figures(items) + _parts.table(["image", *[f"top {i + 1}" for i in range(k)]], rows)
    return Section("predictions", "Predictions", Markup(html))


def _thumbnail(image: Image.Image, size: int = 160) -> Image.Image:
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


SECTIONS = [summary_section, predictions_section]
