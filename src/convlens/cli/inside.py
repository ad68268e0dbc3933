"""``convlens activations``, ``filters``, ``class-model`` and ``deepdream``: look inside the network.

Each command checks every input, computes everything, renders it in memory, and
only then writes its files as one set (a staged folder), so a mistake, a full
disk or an interruption never leaves half an output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, overload

import typer

from ..errors import ConvlensError
from ..fileio import check_output_dir, check_output_file, save_image, staged_folder, write_text
from . import app
from .common import (
    SEED_MAX,
    SIDE_MAX,
    STEPS_MAX,
    CmapAliasOpt,
    ColormapOpt,
    ModelArg,
    ModelOptions,
    OptionGroup,
    grouped,
    named_list,
)

if TYPE_CHECKING:
    from PIL import Image

ImageArg = Annotated[Path, typer.Argument(help="An image file (PNG, JPEG, ...).", show_default=False)]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder to write into (created if missing).")]
StepsOpt = Annotated[int, typer.Option("--steps", min=0, max=STEPS_MAX, help="Gradient-ascent steps.")]
SizeOpt = Annotated[
    int | None,
    typer.Option(
        "--size",
        min=8,
        max=SIDE_MAX,
        help="Side of the optimised square images, in pixels (default: the model's input size when it "
        "takes one size only, as Keras models do; else 128).",
        show_default=False,
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed: the same seed gives the same images.")]
ParamOpt = Annotated[str, typer.Option("--param", help="Image parameterisation: fourier (default) or pixel.")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="adam (default), rmsprop or normalized.")]
LrOpt = Annotated[float | None, typer.Option("--lr", min=0, help="Step size (default depends on the optimizer).")]
TransformsOpt = Annotated[str, typer.Option("--transforms", help="Robustness transforms: standard, jitter or none.")]
TvOpt = Annotated[float, typer.Option("--tv", min=0, help="Weight of the total-variation penalty.")]
LpOpt = Annotated[float, typer.Option("--lp", min=0, help="Weight of the L6-norm penalty.")]
BlurOpt = Annotated[float, typer.Option("--blur", min=0, help="Weight of the blur penalty.")]


class AscentOptions(OptionGroup):
    """How ``filters`` and ``class-model`` optimise their images (see :func:`convlens.inside.optimize.maximize`)."""

    OPTIONS: ClassVar[dict[str, tuple[Any, Any]]] = {
        "steps": (StepsOpt, 128),
        "seed": (SeedOpt, 0),
        "param": (ParamOpt, "fourier"),
        "optimizer": (OptimizerOpt, "adam"),
        "lr": (LrOpt, None),
        "transforms": (TransformsOpt, "standard"),
        "tv": (TvOpt, 0.0),
        "lp": (LpOpt, 0.0),
        "blur": (BlurOpt, 0.0),
    }

    def settings(self) -> dict:
        """Keyword arguments of :func:`~convlens.filter_patterns` and :func:`~convlens.class_model`."""
        settings = {name: value for name, value in self.values.items() if name not in ("tv", "lp", "blur")}
        return {**settings, "regularizers": {"tv": self.tv, "lp": self.lp, "blur": self.blur}}

    def check(self, size: int | None) -> None:
        """Refuse a bad setting before any work (one line)."""
        from ..inside.optimize import check_settings

        check_settings(self.optimizer, self.param, self.transforms, self.settings()["regularizers"], self.steps, size)


@overload
def _integers(text: str, what: str) -> list[int]: ...
@overload
def _integers(text: None, what: str) -> None: ...
@overload
def _integers(text: str | None, what: str) -> list[int] | None: ...
def _integers(text: str | None, what: str) -> list[int] | None:
    parts = named_list(text, what, "0,1,2")
    if parts is None:
        return None
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise ConvlensError(f"{what} must be comma-separated integers, got {text!r}") from None


def _grid(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise ConvlensError(f"--grid must look like 8x8 (rows x columns), got {text!r}") from None
    if rows < 1 or cols < 1:
        raise ConvlensError(f"--grid needs at least one row and column, got {text!r}")
    return rows, cols


def _file_name(layer: str) -> str:
    return layer.replace("/", "_").replace("\\", "_")


def _progress(total: int, description: str):
    """A bar on a terminal, a line per quarter of the steps in a log; a ``(done, total)`` callback for ``with``."""
    from ..progress import ProgressDisplay

    return ProgressDisplay(description, total, lines=4)


@app.command()
@grouped
def activations(
    model: ModelArg,
    image: ImageArg,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            "--layer",
            help="Comma-separated layer names (default: every conv and pooling layer up to the last spatial one).",
        ),
    ] = None,
    out: OutDirOpt = Path("activations"),
    per_row: Annotated[int, typer.Option("--per-row", min=1, max=SIDE_MAX, help="Channels per row of the grid.")] = 16,
    colormap: ColormapOpt = "viridis",
    channel: Annotated[
        int | None,
        typer.Option(
            "--channel", min=0, help="Also draw this channel of each layer on its own, full size (LAYER.channelK.png)."
        ),
    ] = None,
    opts: ModelOptions = ModelOptions(without=("labels",)),
    cmap: CmapAliasOpt = None,
) -> None:
    """Write one PNG per layer with every channel of its activation on IMAGE, tiled in a grid.

    Example: convlens activations resnet18 cat.jpg --layers layer1,layer2 --out acts/
    """
    check_output_dir(out)
    from ..images import load_image
    from ..inside import activations as compute_activations
    from ..render.grid import activation_grid, channel_image

    cmap = colormap if cmap is None else cmap
    picture = load_image(image)
    loaded = opts.open(model)
    maps = compute_activations(loaded, picture, named_list(layers, "--layers", "layer4"))
    rendered = {}
    for name, value in maps.items():
        if channel is not None and not 0 <= channel < value.shape[1]:
            raise ConvlensError(f"channel {channel} is out of range: layer {name!r} has {value.shape[1]} channels")
        rendered[f"{_file_name(name)}.png"] = activation_grid(
            value[0], f"{name}  ({value.shape[1]} channels)", per_row=per_row, cmap=cmap
        )
        if channel is not None:
            rendered[f"{_file_name(name)}.channel{channel}.png"] = channel_image(
                value[0, channel], f"{name}, channel {channel}", cmap=cmap
            )
    with staged_folder(out) as stage:  # all the grids or none: a full disk leaves the folder as it was
        for file_name, picture_out in rendered.items():
            save_image(picture_out, stage / file_name)
    typer.echo(f"wrote {len(rendered)} images to {out}")


@app.command()
@grouped
def filters(
    model: ModelArg,
    layers: Annotated[
        str, typer.Option("--layers", "--layer", help="Comma-separated layer names.", show_default=False)
    ],
    grid: Annotated[str, typer.Option("--grid", help="Rows x columns: renders filters 0..rows*cols-1.")] = "8x8",
    filter_indices: Annotated[
        str | None, typer.Option("--filters", help="Comma-separated filter indices instead of the grid's first ones.")
    ] = None,
    size: SizeOpt = None,
    ascent: AscentOptions = AscentOptions(),
    out: OutDirOpt = Path("filters"),
    opts: ModelOptions = ModelOptions(without=("labels",)),
) -> None:
    """Render each layer's filter patterns as one grid (LAYER.png) plus their activations (LAYER.json).

    Example: convlens filters resnet18 --layers layer1,layer2 --grid 8x8 --steps 128 --size 128 --out filters/
    """
    check_output_dir(out)
    from ..capture import resolve_layers
    from ..inside import filter_patterns
    from ..render.grid import filter_grid

    rows, cols = _grid(grid)
    chosen = _integers(filter_indices, "--filters")  # None: the grid's first rows*cols filters
    ascent.check(size)
    loaded = opts.open(model)
    names = list(resolve_layers(loaded, named_list(layers, "--layers", "layer4")))
    written: dict[str, Image.Image | str] = {}
    for name in names:
        with _progress(ascent.steps, name) as progress:
            patterns = filter_patterns(
                loaded, name, chosen, max_filters=rows * cols, size=size, **ascent.settings(), progress=progress
            )
        written[f"{_file_name(name)}.png"] = filter_grid(
            patterns.images, [f"#{i}" for i in patterns.filters], f"{name}: filter patterns", per_row=cols
        )
        height, width = patterns.images.shape[-2:]  # the size used: --size, or the model's own
        written[f"{_file_name(name)}.json"] = json.dumps(
            {
                "layer": name,
                "size": height if height == width else [height, width],
                "steps": ascent.steps,
                "seed": ascent.seed,
                "param": ascent.param,
                "optimizer": ascent.optimizer,
                "filters": [
                    {"index": i, "activation": float(a), "initial_activation": float(a0)}
                    for i, a, a0 in zip(patterns.filters, patterns.activations, patterns.initial_activations)
                ],
            },
            indent=2,
        )
    _write_all(written, out)


def _write_all(written: Mapping[str, Image.Image | str], out: Path) -> None:
    """Write the files as one set (:func:`~convlens.fileio.staged_folder`): a full disk leaves ``out`` as it was."""
    with staged_folder(out) as stage:
        for file_name, content in written.items():
            if isinstance(content, str):
                write_text(stage / file_name, content)
            else:
                save_image(content, stage / file_name)
    typer.echo(f"wrote {len(written)} files to {out}")


@app.command("class-model")
@grouped
def class_model_command(
    model: ModelArg,
    classes: Annotated[str, typer.Option("--classes", help="Comma-separated class indices.", show_default=False)],
    size: Annotated[
        int | None, typer.Option("--size", min=8, max=SIDE_MAX, help="Image side (default: the model's input size).")
    ] = None,
    ascent: AscentOptions = AscentOptions(),
    out: OutDirOpt = Path("class_model"),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Render the image each class's logit likes best (class_model.png and class_model.json).

    Example: convlens class-model resnet50 --classes 281,285 --steps 256 --out classes/
    """
    check_output_dir(out)
    from ..inside import class_model as compute_class_model
    from ..render.grid import filter_grid

    indices = _integers(classes, "--classes")
    ascent.check(size)
    loaded = opts.open(model)
    with _progress(ascent.steps, "class model") as progress:
        result = compute_class_model(loaded, indices, size=size, **ascent.settings(), progress=progress)
    names = [loaded.label(i) for i in result.classes]
    _write_all(
        {
            "class_model.png": filter_grid(
                result.images,
                [f"{i}: {n}"[:24] for i, n in zip(result.classes, names)],
                "class models",
                per_row=min(8, len(names)),
            ),
            "class_model.json": json.dumps(
                {
                    "classes": [
                        {"index": i, "label": n, "logit": float(v), "initial_logit": float(v0)}
                        for i, n, v, v0 in zip(result.classes, names, result.logits, result.initial_logits)
                    ]
                },
                indent=2,
            ),
        },
        out,
    )


@app.command()
@grouped
def deepdream(
    model: ModelArg,
    image: ImageArg,
    layers: Annotated[
        str,
        typer.Option(
            "--layers", "--layer", show_default=False, help="Comma-separated layers whose activations to amplify."
        ),
    ],
    octaves: Annotated[int, typer.Option("--octaves", min=1, max=16, help="Number of scales, smallest first.")] = 4,
    octave_scale: Annotated[
        float, typer.Option("--octave-scale", min=1, max=4, help="Size ratio between octaves.")
    ] = 1.4,
    steps: Annotated[int, typer.Option("--steps", min=1, max=STEPS_MAX, help="Gradient-ascent steps per octave.")] = 20,
    lr: Annotated[float, typer.Option("--lr", min=0, help="Step size (pixels in [0, 1]).")] = 0.01,
    seed: SeedOpt = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output image file.")] = Path("dream.png"),
    opts: ModelOptions = ModelOptions(without=("labels",)),
) -> None:
    """Amplify what LAYERS see in IMAGE (DeepDream with octaves and detail re-injection).

    Example: convlens deepdream resnet18 cat.jpg --layers layer2,layer3 --octaves 4 --out dream.png
    """
    check_output_file(out)
    from ..images import load_image
    from ..inside import deepdream as compute_deepdream
    from ..render.grid import to_pil

    picture = load_image(image)
    loaded = opts.open(model)
    with _progress(octaves * steps, "deepdream") as progress:
        dream = compute_deepdream(
            loaded,
            picture,
            named_list(layers, "--layers", "layer4"),
            octaves=octaves,
            octave_scale=octave_scale,
            steps=steps,
            lr=lr,
            seed=seed,
            progress=progress,
        )
    save_image(to_pil(dream), out)
    typer.echo(f"wrote {out}")
