"""Options shared by the commands, and the one way the CLI opens a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ConvlensError
from ..models import Model, load_model

ModelArg = Annotated[str, typer.Argument(
    help="A torchvision name (resnet50), a .pt/.pth/TorchScript file, a convlens checkpoint, or a Keras .keras/.h5 file.",
    show_default=False)]
ImagesArg = Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...).", show_default=False)]
WeightsOpt = Annotated[str, typer.Option(
    "--weights", help="For a torchvision name: 'default' (download once), 'none' (random), or a state-dict file.")]
ArchOpt = Annotated[Optional[str], typer.Option(
    "--arch", help="Architecture of a state-dict file, e.g. resnet18.")]
LabelsOpt = Annotated[Optional[Path], typer.Option(
    "--labels", help="Text file with one class name per line.")]
PreprocessingOpt = Annotated[Optional[str], typer.Option(
    "--preprocessing", help="Keras models: rescale (x/255, default), raw, tf, torch or caffe.")]
TrustCodeOpt = Annotated[bool, typer.Option(
    "--trust-code", help="Allow a pickled module (torch.save(model)): loading it runs code from the file, "
                         "so only for files you trust. State dicts, checkpoints and TorchScript never need it.")]


InputSizeOpt = Annotated[Optional[str], typer.Option(
    "--input-size", help="H or HxW to run the model at (default: what the model says; 224 for a plain module).")]
OutputOpt = Annotated[Optional[str], typer.Option(
    "--output", help="Models with several outputs (tuple, list, dict): the index or key of the class scores.")]


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"224"`` -> ``(224, 224)``, ``"224x160"`` -> ``(224, 160)``, ``None`` -> ``None``."""
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts if p.strip()]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ConvlensError(f"--input-size must look like 224 or 224x160, got {text!r}")
    return (sizes[0], sizes[-1])


def comma_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; empty or ``None`` -> ``[]``."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def open_model(model: str, weights: str = "default", arch: str | None = None, labels: Path | None = None,
               preprocessing: str | None = None, trust_code: bool = False, input_size: str | None = None,
               output: str | None = None) -> Model:
    """:func:`convlens.load_model` with the CLI's options; ``trust_code`` is ``--trust-code``."""
    return load_model(model, weights=weights, arch=arch, labels=labels, preprocessing=preprocessing,
                      trust_code=trust_code, input_size=parse_size(input_size), output=output)
