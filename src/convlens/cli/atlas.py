"""``convlens scan``, ``examples`` and ``dissect``: whole datasets (see :mod:`convlens.atlas`).

Every input is checked before anything is written. ``scan`` and ``dissect``
commit their SQLite store part by part (run the same command again to resume
an interrupted run); ``examples`` and the dissection figures are computed in
memory and then written, each file atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer

from ..errors import ConvlensError
from . import app
from .common import (
    BATCH_MAX,
    GPUS_MAX,
    IMAGES_MAX,
    SEED_MAX,
    SIDE_MAX,
    STEPS_MAX,
    TOP_MAX,
    WORKERS_MAX,
    ModelArg,
    ModelOptions,
    OptionGroup,
    comma_list,
    grouped,
    named_list,
)

DataArg = Annotated[
    Path | None,
    typer.Argument(
        help="A folder of class folders, a flat folder, or a .txt/.csv list of image paths (or use --shapes N).",
        show_default=False,
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option("--layers", "--layer", help="Comma-separated spatial layers (default: every conv and pooling layer)."),
]
ShapesOpt = Annotated[
    int | None,
    typer.Option(
        "--shapes",
        min=1,
        max=IMAGES_MAX,
        help="Generate N shapes images in memory instead of reading DATA (no files written).",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of the generated shapes images.")]
SizeOpt = Annotated[
    int | None,
    typer.Option("--size", min=1, max=SIDE_MAX, help="Side of the generated images (default: the model's input)."),
]
MasksOpt = Annotated[
    Path | None,
    typer.Option("--masks", help="Concept masks folder, masks/<concept>/<image>.png (default: DATA/masks)."),
]
TopOpt = Annotated[int, typer.Option("--top", min=1, max=TOP_MAX, help="Top images kept per unit.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, max=BATCH_MAX, help="Images per forward pass.")]
WorkersOpt = Annotated[
    int, typer.Option("--workers", min=0, max=WORKERS_MAX, help="DataLoader processes reading images (local engine).")
]
PartOpt = Annotated[
    int, typer.Option("--part-size", min=1, max=IMAGES_MAX, help="Images per committed part (the unit of resume).")
]
EngineOpt = Annotated[str, typer.Option("--engine", help="local, or ray (Ray Data; pip install 'convlens[ray]').")]
RayAddressOpt = Annotated[
    str | None,
    typer.Option("--ray-address", help="Ray cluster to use, HOST:PORT (default: RAY_ADDRESS, else Ray starts here)."),
]
ConcurrencyOpt = Annotated[
    int | None,
    typer.Option(
        "--concurrency", min=1, max=WORKERS_MAX, help="Ray actors (default: one per CPU, or per GPU with --num-gpus)."
    ),
]
FollowOpt = Annotated[
    bool,
    typer.Option(
        "--follow-links", help="Read symbolic links in DATA that lead outside it (default: left out, with a warning)."
    ),
]
GpusOpt = Annotated[
    float | None,
    typer.Option(
        "--num-gpus", min=0, max=GPUS_MAX, help="GPUs per Ray actor (default: 1 when CUDA is available, else 0)."
    ),
]


class ScanOptions(OptionGroup):
    """What ``scan`` and ``dissect`` share: the layers, the data, and how the pass runs."""

    OPTIONS: ClassVar[dict[str, tuple[Any, Any]]] = {
        "layers": (LayersOpt, None),
        "shapes": (ShapesOpt, None),
        "seed": (SeedOpt, 0),
        "size": (SizeOpt, None),
        "masks": (MasksOpt, None),
        "top": (TopOpt, 16),
        "batch_size": (BatchOpt, 64),
        "workers": (WorkersOpt, 0),
        "part_size": (PartOpt, 1024),
        "engine": (EngineOpt, "local"),
        "ray_address": (RayAddressOpt, None),
        "concurrency": (ConcurrencyOpt, None),
        "num_gpus": (GpusOpt, None),
        "follow_links": (FollowOpt, False),
    }

    def run_options(self) -> dict:
        """Keyword arguments of :func:`convlens.atlas.scan` and :func:`~convlens.atlas.dissect`, the engine
        checked (an unknown name, or a Ray address that is not a Ray cluster, is refused before the model
        and the data are loaded)."""
        from ..engines import resolve_engine

        engine = resolve_engine(self.engine, self.ray_address, self.concurrency, self.num_gpus)
        engine.check()
        options = {
            name: value
            for name, value in self.values.items()
            if name not in ("layers", "top", "engine", "ray_address", "concurrency", "num_gpus")
        }
        return {"layers": named_list(self.layers, "--layers", "layer4"), "k": self.top, "engine": engine, **options}


def _bar(desc: str):
    """Images done: a bar on a terminal, a line per 5 % in a log; nothing before the first report,
    so an input error prints on one line with no bar."""
    from ..progress import ProgressDisplay

    return ProgressDisplay(desc, unit="img", lines=20)


@app.command()
@grouped
def scan(
    model: ModelArg,
    data: DataArg = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The atlas store to write (SQLite), resumed if it exists.")
    ] = Path("atlas.sqlite"),
    run: ScanOptions = ScanOptions(),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Stream a dataset once through the model and store per-unit statistics and top images.

    Example: convlens scan shapes --shapes 200 --layers features.relu3,features.relu4 --out atlas.sqlite
    """
    from ..atlas import scan as run_scan

    options = run.run_options()
    loaded = opts.open(model)
    bar = _bar("scan")
    try:
        atlas = run_scan(loaded, data, out=out, **options, model_source=model, progress=bar)
    finally:
        bar.close()
    for layer, stats in atlas.stats.items():
        typer.echo(f"{layer}: {stats.channels} units, {stats.images} images, map {stats.height}x{stats.width}")
    skipped = f" ({atlas.skipped} unreadable image(s) skipped)" if atlas.skipped else ""
    typer.echo(f"atlas written to {out}{skipped}")


@app.command()
@grouped
def examples(
    atlas: Annotated[Path, typer.Argument(help="An atlas store written by 'convlens scan'.", show_default=False)],
    layer: Annotated[str, typer.Option("--layer", help="A scanned layer.")],
    units: Annotated[str, typer.Option("--units", help="Comma-separated unit (channel) indices, e.g. 0,5,17.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write one PNG per unit into.")],
    top: Annotated[
        int | None, typer.Option("--top", min=1, max=TOP_MAX, help="Images per unit (default: all the scan kept).")
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=0, max=STEPS_MAX, help="Filter-pattern steps (0: no pattern).")
    ] = 128,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="The scanned model, when it cannot be loaded again from the atlas's MODEL (it runs "
            "at the size the atlas was scanned at).",
        ),
    ] = None,
    opts: ModelOptions = ModelOptions(without=("labels", "preprocessing", "input_size", "output")),
) -> None:
    """For each unit: its top dataset images, whole with the map overlaid and cropped around the maximum,
    beside its filter pattern.

    Example: convlens examples atlas.sqlite --layer features.relu4 --units 0,5,17 --out examples
    """
    from ..atlas.examples import open_scanned_model, write_examples
    from ..atlas.scan import open_atlas

    parts = comma_list(units)
    try:
        unit_list = [int(part) for part in parts]
    except ValueError:
        raise ConvlensError(f"--units must be comma-separated integers, got {units!r}") from None
    opened = open_atlas(atlas)
    loaded = opts.place(open_scanned_model(opened, model or opened.meta["model_source"], **opts.load_options()))
    files = write_examples(opened, layer, unit_list, out, model=loaded, k=top, pattern_steps=steps)
    typer.echo("wrote " + ", ".join(str(path) for path in files))


@app.command()
@grouped
def dissect(
    model: ModelArg,
    data: DataArg = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (atlas.sqlite, dissection.csv, summary.md, figures/); resumed if it exists.",
        ),
    ] = Path("dissection"),
    quantile: Annotated[
        float, typer.Option("--quantile", min=0, max=1, help="Activation quantile of each unit's threshold.")
    ] = 0.995,
    min_iou: Annotated[
        float, typer.Option("--min-iou", min=0, max=1, help="IoU a detector's concept must exceed.")
    ] = 0.04,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="One figure per detector.")] = True,
    run: ScanOptions = ScanOptions(),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Network Dissection (Bau et al. 2017): label units with the concept their top 0.5 % activations cover.

    Example: convlens dissect shapes --shapes 200 --seed 1 --layers features.relu4 --out dissection
    """
    from ..atlas.dissect import dissect as run_dissect

    options = run.run_options()
    loaded = opts.open(model)
    bar = _bar("dissect")
    try:
        run_dissect(
            loaded,
            data,
            out=out,
            quantile=quantile,
            min_iou=min_iou,
            figures=figures,
            **options,
            model_source=model,
            progress=bar,
        )
    finally:
        bar.close()
    typer.echo((out / "summary.md").read_text(encoding="utf-8"))
    typer.echo(f"dissection written to {out}")
