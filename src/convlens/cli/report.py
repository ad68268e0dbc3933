"""``convlens report``: the main job, one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..fileio import check_output_file
from ..report import build_report
from . import app
from .common import ArchOpt, LabelsOpt, PreprocessingOpt, InputSizeOpt, OutputOpt, TrustCodeOpt, WeightsOpt, open_model


@app.command()
def report(
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="Images to explain (default: generated shapes images and scikit-image photographs).",
        show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Model to report on (default: the bundled shapes model).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the HTML file.")] = Path(
        "convlens-report.html"),
    weights: WeightsOpt = "default",
    arch: ArchOpt = None,
    labels: LabelsOpt = None,
    preprocessing: PreprocessingOpt = None,
    trust_code: TrustCodeOpt = False,
    input_size: InputSizeOpt = None,
    output: OutputOpt = None,
) -> None:
    """Write one self-contained HTML report: model, predictions, heatmaps, activations, filters, evaluation.

    Example: convlens report --model resnet18 --weights none cat.jpg --out report.html
    """
    check_output_file(out)  # before any work: a bad --out must not cost a whole report
    loaded = open_model(model, weights, arch, labels, preprocessing, trust_code, input_size, output) if model else None
    from ..progress import ProgressDisplay

    with ProgressDisplay("report", unit="section") as shown:  # a bar on a terminal, a line per step in a log
        path = build_report(loaded, images or None, out, progress=shown.step)
    typer.echo(f"report written to {path.resolve()}")
