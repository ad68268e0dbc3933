"""``convlens report``: the main job, one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..fileio import check_output_file
from . import app
from .common import ModelOptions, grouped, parse_one_target


@app.command()
@grouped
def report(
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="Images to explain (default: generated shapes images and scikit-image photographs).",
        show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Model to report on, as MODEL in the other commands (default: shapes, the bundled "
                              "demo model).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the HTML file.")] = Path(
        "convlens-report.html"),
    target: Annotated[str, typer.Option(
        "--targets", "--target", help="What the heatmaps and the evaluation explain: top1, a class index or name; "
                                      "region:CLASS[:MASK.png], box:INDEX or box:LABEL@x0,y0,x1,y1, "
                                      "similar:REF.png or REF.npy.")] = "top1",
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Write one self-contained HTML report: model, predictions, heatmaps, activations, filters, evaluation.

    Example: convlens report --model resnet18 --weights none cat.jpg --out report.html
    """
    check_output_file(out)  # before any work: a bad --out must not cost a whole report
    from ..progress import ProgressDisplay
    from ..report import build_report

    targets = parse_one_target(target)
    loaded = opts.open(model or "shapes")  # what build_report would load, with --device and --input-size applied

    with ProgressDisplay("report", unit="section") as shown:  # a bar on a terminal, a line per step in a log
        chosen = {} if targets is None else {"targets": targets}
        path = build_report(loaded, images or None, out, progress=shown.step, **chosen)
    typer.echo(f"report written to {path.resolve()}")
