"""``convlens explain``: heatmaps for images, written as overlays, raw arrays and a comparison figure."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NamedTuple

import typer

from ..errors import ConvlensError
from ..fileio import atomic_path, check_output_dir, distinct_stems, save_image, staged_folder, write_text
from . import app
from .common import (
    BATCH_MAX,
    CmapAliasOpt,
    ImagesArg,
    ModelArg,
    ModelOptions,
    comma_list,
    grouped,
    named_list,
    parse_task_target,
)

if TYPE_CHECKING:
    import numpy as np


#: --targets all draws one panel per class; beyond this many, a figure is no use to anyone.
MAX_CLASS_PANELS = 100


def _parse_target(text: str, count: int):
    """``top1`` -> None; ``all`` -> every class; ``3`` or ``tabby`` -> one target; ``a,b,...`` one per image;
    ``region:``, ``box:`` and ``similar:`` -> the target of a segmenter, a detector, an embedding model."""
    task = parse_task_target(text)
    if task is not None:
        return task
    parts = comma_list(text)
    if len(parts) == 1 and parts[0].lower() == "all":
        return "all"
    if not parts or (len(parts) == 1 and parts[0].lower() in ("top1", "top-1")):
        return None
    values = [int(p) if p.lstrip("-").isdigit() else (None if p.lower() == "top1" else p) for p in parts]
    if len(values) == 1:
        return values[0]
    if len(values) != count:
        raise ConvlensError(f"--targets lists {len(values)} classes for {count} images; give one, or one per image")
    return values


def _slug(method: str) -> str:
    return method.replace("++", "pp")


def _save_array(array: np.ndarray, path: Path) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


INDEX_COLUMNS = ("file", "input", "method", "target_class", "predicted_class")


def _write_index(rows: list[dict], folder: Path) -> None:
    """``index.csv`` and ``index.json``: which output file came from which input, method and class."""
    import csv
    import io
    import json

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(folder / "index.csv", buffer.getvalue())
    write_text(folder / "index.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


@app.command()
@grouped
def explain(
    model: ModelArg,
    images: ImagesArg,
    method: Annotated[
        str, typer.Option("--methods", "--method", help="Comma-separated methods, e.g. gradcam,scorecam,saliency.")
    ] = "gradcam",
    layer: Annotated[
        str,
        typer.Option(
            "--layers", "--layer", help="'auto' (last spatial layer), a layer name, or several comma-separated."
        ),
    ] = "auto",
    target: Annotated[
        str,
        typer.Option(
            "--targets",
            "--target",
            help="top1, all (one map per class: CAM and Grad-CAM family), a class index or name, "
            "or one per image comma-separated; region:CLASS[:MASK.png] (segmentation), "
            "box:INDEX or box:LABEL@x0,y0,x1,y1 (detection, input pixels), "
            "similar:REF.png (embeddings).",
        ),
    ] = "top1",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs and .npy maps.")] = Path("explanations"),
    colormap: Annotated[
        str | None,
        typer.Option(
            "--colormap",
            help="A matplotlib colormap (default: jet over the photo; inferno for pixel-level maps, drawn alone).",
        ),
    ] = None,
    alpha: Annotated[
        float, typer.Option("--alpha", help="Heatmap opacity over the photo, 0-1 (pixel-level maps are drawn alone).")
    ] = 0.4,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=BATCH_MAX, help="Images per pass.")] = 8,
    opts: ModelOptions = ModelOptions(),
    cmap: CmapAliasOpt = None,
) -> None:
    """Show where the model looked: one heatmap per image per method (CAM family and gradient saliency).

    Writes, per image, IMAGE_METHOD.png (overlay at the photo's resolution, at most
    2048 px a side), IMAGE_METHOD.npy (the raw map before normalisation) and
    IMAGE_explain.png (the original beside every method). IMAGE is the file's name, with
    the folders that tell same-named inputs apart (circle_00000, cross_00000);
    index.csv and index.json list each file's input, method, target and predicted class.
    Nothing is written if any input is wrong or the disk fills up: the set appears in
    --out complete or not at all.

    Example: convlens explain resnet50 cat.jpg dog.jpg --methods gradcam,scorecam --targets top1 --out maps
    """
    check_output_dir(out)  # before any work: a bad --out must not cost a whole run
    from ..heatmaps import explain_many, get_method
    from ..images import load_images
    from ..progress import ProgressDisplay
    from ..render.overlay import check_style

    colormap = colormap if cmap is None else cmap
    methods = list(dict.fromkeys(get_method(name).name for name in named_list(method, "--methods", "gradcam")))
    check_style(colormap, alpha)
    pictures = load_images(images)
    loaded = opts.open(model)
    layers = comma_list(layer) or ["auto"]
    targets = _parse_target(target, len(pictures))
    with ProgressDisplay("explain", unit="batch") as shown:
        found = explain_many(
            loaded,
            pictures,
            methods,
            layer=layers[0] if len(layers) == 1 else layers,
            targets=targets,
            batch_size=batch_size,
            max_classes=MAX_CLASS_PANELS,
            progress=_shown_steps(shown),
        )
    # Everything is computed: only now does anything touch the disk, and only a complete set lands in --out.
    drawing = _Drawing(loaded.transform, colormap, alpha, _legends(methods, colormap, alpha))
    index = _write_outputs(found, pictures, images, out, drawing)
    if found.layers:
        typer.echo(f"layer: {', '.join(found.layers)}{' (auto)' if 'auto' in layers else ''}")
    typer.echo(f"wrote {len(index)} files to {out}, listed in {out / 'index.csv'}")


def _shown_steps(shown):
    """The display fed by :func:`explain_many`'s steps: one line (or bar position) per (method, batch)."""

    def show(step) -> None:
        if not step.part:  # a slow method's own counts are not shown: one line per batch, as the log reads
            shown.total = step.total
            shown.begin(step.name, index=step.index)

    return show


class _Drawing(NamedTuple):
    """How the maps are drawn: the preprocessing to undo, the colours, and one colour bar per style."""

    transform: object
    colormap: str | None
    alpha: float
    legends: dict


def _legends(methods: list[str], colormap: str | None, alpha: float) -> dict:
    """One colour bar per drawing style, naming the methods drawn in it."""
    from ..heatmaps import style_for
    from ..render.overlay import STYLES, describe_style

    return {
        style: (
            colormap or STYLES[style],
            ", ".join(n for n in methods if style_for(n) == style) + ": " + describe_style(style, colormap, alpha),
        )
        for style in dict.fromkeys(style_for(name) for name in methods)
    }


def _write_outputs(found, pictures: list, sources: list, out: Path, drawing: _Drawing) -> list[dict]:
    """Every file of the set, staged and moved into ``out`` complete; the rows of its index."""
    stems = distinct_stems(sources)  # circle_00000, cross_00000: named after the part of the paths that differs
    index = []
    try:
        with staged_folder(out) as stage:
            for image, picture in enumerate(pictures):
                index += _write_image(stage, found, image, stems[image], picture, str(sources[image]), drawing)
            _write_index(index, stage)
    except OSError as err:  # a full disk, a folder removed under us: nothing of the set is left behind
        raise ConvlensError(
            f"cannot write the explanations to {out}: {err.strerror or err}; nothing was written "
            "(free some space or pass another --out)"
        ) from None
    return index


def _write_image(stage: Path, found, image: int, stem: str, picture, source: str, drawing: _Drawing) -> list[dict]:
    """One input's files: per method its raw map (.npy) and its picture (.png), then the figure of them all."""
    from ..render.overlay import save_figure

    rows, panels, target_class = [], [], ""
    predicted = found.predicted[image]
    for name in found.methods:
        result, offset = found.at(name, image)
        slug = _slug(name)
        target_class = "all" if found.every_class else result.target_names[offset]
        rows += [
            {
                "file": f"{stem}_{slug}.{ext}",
                "input": source,
                "method": name,
                "target_class": target_class,
                "predicted_class": predicted,
            }
            for ext in ("png", "npy")
        ]
        _save_array(result.raw[offset].cpu().numpy(), stage / f"{stem}_{slug}.npy")
        if found.every_class:  # one panel per class: the per-class grid
            save_figure(_class_grid(picture, result, offset, drawing), stage / f"{stem}_{slug}.png")
            continue
        overlay = _overlay(picture, result, offset, drawing)
        save_image(overlay, stage / f"{stem}_{slug}.png")
        flat = " (flat map)" if result.flat[offset] else ""
        panels.append((f"{name} — {result.target_names[offset]}{flat}", overlay))
    if not found.every_class:
        save_figure(_comparison(picture, panels, predicted, drawing), stage / f"{stem}_explain.png")
        rows.append(
            {
                "file": f"{stem}_explain.png",
                "input": source,
                "method": ",".join(found.methods),
                "target_class": target_class,
                "predicted_class": predicted,
            }
        )
    return rows


def _overlay(picture, result, offset: int, drawing: _Drawing):
    """One map over its photo, with a box target's detection drawn on it."""
    from ..heatmaps import style_for
    from ..render.overlay import draw_box, overlay_heatmap

    overlay = overlay_heatmap(
        picture,
        result.maps[offset],
        transform=drawing.transform,
        colormap=drawing.colormap,
        alpha=drawing.alpha,
        style=style_for(result.method),
    )
    if result.boxes is not None:  # a box target: the detection explained, drawn
        overlay = draw_box(
            overlay,
            result.boxes[offset].tolist(),
            original_size=picture.size,
            input_size=tuple(result.maps.shape[-2:]),
            transform=drawing.transform,
        )
    return overlay


def _class_grid(picture, result, offset: int, drawing: _Drawing):
    """With --targets all: one panel per class, the figure of one method on one image."""
    from ..heatmaps import style_for
    from ..render.overlay import bounded, comparison_figure, describe_style, overlay_heatmap

    style = style_for(result.method)
    thumbnail = bounded(picture, 512)  # K panels: small pictures suffice
    grid = [
        (
            f"{label}{' (flat)' if result.flat[offset][k] else ''}",
            overlay_heatmap(
                thumbnail,
                result.maps[offset, k],
                transform=drawing.transform,
                colormap=drawing.colormap,
                alpha=drawing.alpha,
                style=style,
            ),
        )
        for k, label in enumerate(result.target_names)
    ]
    return comparison_figure(
        thumbnail,
        grid,
        columns=6,
        title=f"{result.method}: every class",
        legends=[(drawing.legends[style][0], describe_style(style, drawing.colormap, drawing.alpha))],
    )


def _comparison(picture, panels: list, predicted: str, drawing: _Drawing):
    """The original beside every method's picture, titled with the predicted class."""
    from ..render.overlay import comparison_figure

    figure = comparison_figure(picture, panels, legends=list(drawing.legends.values()))
    figure.axes[0].set_title(f"original — predicted: {predicted}", fontsize=9)
    return figure
