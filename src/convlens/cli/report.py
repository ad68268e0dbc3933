"""``convlens report``: the main job, one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..fileio import check_output_file
from . import app
from .common import ModelOptions, grouped, named_list, parse_one_target


@app.command()
@grouped
def report(
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Images to explain (default: generated shapes images and scikit-image photographs).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model to report on, as MODEL in the other commands (default: shapes, the bundled demo model).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the HTML file.")] = Path(
        "convlens-report.html"
    ),
    target: Annotated[
        str,
        typer.Option(
            "--targets",
            "--target",
            help="What the heatmaps and the evaluation explain: top1, a class index or name; "
            "region:CLASS[:MASK.png], box:INDEX or box:LABEL@x0,y0,x1,y1, "
            "similar:REF.png or REF.npy.",
        ),
    ] = "top1",
    tcav_concepts: Annotated[
        Path | None,
        typer.Option(
            "--tcav-concepts",
            help="Adds a TCAV section: a folder of concept folders, or a data folder with dissection "
            "masks (as convlens tcav --concepts).",
            show_default=False,
        ),
    ] = None,
    tcav_random: Annotated[
        Path | None,
        typer.Option(
            "--tcav-random",
            help="The TCAV section's random sets: a folder of random folders, or a pool of images.",
            show_default=False,
        ),
    ] = None,
    tcav_inputs: Annotated[
        Path | None,
        typer.Option(
            "--tcav-inputs",
            help="The TCAV classes' images: a folder per class, or one folder for every class "
            "(default: the report's images).",
            show_default=False,
        ),
    ] = None,
    tcav_classes: Annotated[
        str | None,
        typer.Option(
            "--tcav-classes",
            help="Comma-separated classes TCAV scores (default: the report's images' top classes, at most 4).",
            show_default=False,
        ),
    ] = None,
    tcav_layers: Annotated[
        str | None,
        typer.Option(
            "--tcav-layers",
            help="Comma-separated layers of the TCAV section (default: the explained layer).",
            show_default=False,
        ),
    ] = None,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Write one self-contained HTML report: model, predictions, heatmaps, activations, filters, evaluation.

    Example: convlens report --model resnet18 --weights none cat.jpg --out report.html
    """
    check_output_file(out)  # before any work: a bad --out must not cost a whole report
    from ..progress import ProgressDisplay
    from ..report import build_report

    targets = parse_one_target(target)
    tcav = {
        "tcav_concepts": tcav_concepts,
        "tcav_random": tcav_random,
        "tcav_inputs": tcav_inputs,
        "tcav_classes": named_list(tcav_classes, "--tcav-classes", "circle"),
        "tcav_layers": named_list(tcav_layers, "--tcav-layers", "layer4"),
    }
    chosen = {name: value for name, value in tcav.items() if value is not None}
    if targets is not None:
        chosen["targets"] = targets
    from ..report.tcav_section import check_tcav_options

    check_tcav_options(chosen)  # a missing folder must not cost a whole report
    loaded = opts.open(model or "shapes")  # what build_report would load, with --device and --input-size applied

    with ProgressDisplay("report", unit="section") as shown:  # a bar on a terminal, a line per step in a log
        path = build_report(loaded, images or None, out, progress=shown.step, **chosen)
    typer.echo(f"report written to {path.resolve()}")
