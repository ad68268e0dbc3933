"""``convlens layers`` and ``convlens predict``: look at a model and what it says."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import typer

from . import app
from .common import TOP_MAX, ImagesArg, ModelArg, ModelOptions, grouped


def _preprocessing_line(model) -> str | None:
    """``preprocessing: MODE (why)`` for models that record a choice (Keras), else ``None``.

    A Keras model's scaling is read from its first layers or guessed, and a wrong
    guess gives plausible-looking but wrong predictions, so the choice is always shown.
    """
    mode = model.info.get("preprocessing")
    if mode is None:
        return None
    reason = model.info.get("preprocessing_reason")
    return f"preprocessing: {mode}" + (f" ({reason})" if reason else "")


@app.command()
@grouped
def layers(model: ModelArg, opts: ModelOptions = ModelOptions(without=("labels",), weights="none")) -> None:
    """Print every layer: name, type, output shape, parameters; '*' marks explanation targets.

    Example: convlens layers resnet18 --input-size 160
    """
    from rich.console import Console
    from rich.table import Table

    from ..models import summarize

    loaded = opts.open(model)
    summary = summarize(loaded)
    table = Table(title=f"{loaded.name}  (input {summary.input_size[0]}x{summary.input_size[1]})")
    columns: tuple[tuple[str, Literal["left", "right", "center"]], ...] = (
        ("layer", "left"),
        ("type", "left"),
        ("output shape", "left"),
        ("params", "right"),
        ("target", "center"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify)
    auto = summary.auto_layer if summary.spatial_layers else None
    for row in summary.rows:
        shape = (
            "-"
            if row.output_shape is None
            else "(" + ", ".join("N" if d == -1 else str(d) for d in row.output_shape) + ")"
        )
        mark = "auto" if row.name == auto else ("*" if row.spatial else "")
        table.add_row("  " * row.depth + row.name, row.type, shape, f"{row.params:,}", mark)
    console = Console(width=120)
    console.print(table)
    console.print(
        f"Total params: {summary.total_params:,}   Trainable: {summary.trainable_params:,}   "
        f"Non-trainable: {summary.total_params - summary.trainable_params:,}"
    )
    line = _preprocessing_line(loaded)
    if line:
        typer.echo(line)


@app.command()
@grouped
def predict(
    model: ModelArg,
    images: ImagesArg,
    top: Annotated[
        int, typer.Option("--top", "-k", min=1, max=TOP_MAX, help="How many classes to show per image.")
    ] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Print the top classes and their probabilities for each image.

    A segmentation model gives the classes that win the most pixels and their shares; a detector its
    first detections (class, score, box in the input's pixels); a detector that found nothing says so.

    Example: convlens predict resnet50 cat.jpg dog.png --top 3 --json
    """
    from rich.console import Console
    from rich.table import Table

    from ..images import load_images

    pictures = load_images(images)  # reads (and checks) every image before the model loads
    loaded = opts.open(model)
    results = loaded.predict(pictures, top_k=top)
    line = _preprocessing_line(loaded)
    if line:
        typer.echo(line, err=as_json)  # stdout stays pure JSON with --json
    if as_json:
        payload = [
            {"image": str(path), "predictions": [p.__dict__ for p in preds]} for path, preds in zip(images, results)
        ]
        typer.echo(json.dumps(payload, indent=2))
        return
    console = Console(width=120)
    kind = type(next((p for preds in results for p in preds), None)).__name__
    if kind in ("PixelShare", "Detection"):
        for path, preds in zip(images, results):
            console.print(_task_table(str(path), preds, kind))
        return
    for path, preds in zip(images, results):
        table = Table(title=str(path))
        table.add_column("rank", justify="right")
        table.add_column("class")
        table.add_column("index", justify="right")
        table.add_column("probability", justify="right")
        for rank, p in enumerate(preds, 1):
            table.add_row(str(rank), p.label, str(p.index), f"{p.probability:.4f}")
        console.print(table)


def _task_table(title: str, rows: list, kind: str):
    """A segmenter's pixel shares or a detector's detections as a table."""
    from rich.table import Table

    if not rows:
        return Table(title=f"{title}: the detector found nothing (no box scored above its threshold)")
    table = Table(title=title)
    columns = (
        ("rank", "class", "index", "pixel share")
        if kind == "PixelShare"
        else ("box", "class", "index", "score", "x0, y0, x1, y1")
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "class" else "right")
    for rank, row in enumerate(rows):
        if kind == "PixelShare":
            table.add_row(str(rank + 1), row.label, str(row.index), f"{row.share:.4f}")
        else:
            box = ", ".join(f"{v:g}" for v in row.box)
            table.add_row(str(rank), row.label, str(row.index), f"{row.score:.4f}", box)
    return table
