"""``convlens tcav``: TCAV scores of classes for concepts (see :mod:`convlens.concepts`).

Every input is checked (the output folder, the concepts, the random sets, the layers)
before anything is written; the table, its CSV and one figure per layer are written
into a staged folder that becomes ``--out`` only when all of them are done.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Annotated

import typer

from . import app
from .common import BATCH_MAX, IMAGES_MAX, SEED_MAX, ModelArg, ModelOptions, grouped, named_list

#: Runs (CAVs per concept and layer): each is a logistic regression and one sample of the t-test.
RUNS_MAX = 10_000


def _file_name(layer: str) -> str:
    return "tcav_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", layer) + ".png"


def write_tcav(result, out: Path, *, figures: bool = True, store: Path | None = None, model=None) -> list[Path]:
    """``tcav.csv``, ``tcav.md`` and (with ``figures``) ``tcav_<layer>.png`` in ``out``, all or none of them.

    With ``store``, the rows go into its ``tcav`` table last, inside the staged write: a store that
    cannot be written leaves no ``out`` either.
    """
    from ..concepts.storing import store_tcav
    from ..fileio import staged_folder, write_text
    from ..render.concepts import tcav_figure
    from ..render.overlay import save_figure

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(result.rows[0].COLUMNS)
    writer.writerows(result.table())
    names = ["tcav.csv", "tcav.md"] + ([_file_name(layer) for layer in result.layers] if figures else [])
    with staged_folder(out) as stage:
        write_text(stage / "tcav.csv", table.getvalue())
        write_text(stage / "tcav.md", result.markdown())
        if figures:
            for layer in result.layers:
                save_figure(tcav_figure(result, layer), stage / _file_name(layer))
        if store is not None:
            store_tcav(result, store, model)
    return [out / name for name in names]


@app.command()
@grouped
def tcav(
    model: ModelArg,
    concepts: Annotated[
        Path,
        typer.Option(
            "--concepts",
            help="A folder of concept folders (CONCEPTS/<concept>/*.png, 10 images or more each), or a "
            "data folder with dissection masks (masks/<concept>/<image>.png).",
            show_default=False,
        ),
    ],
    random: Annotated[
        Path,
        typer.Option(
            "--random",
            help="A folder of random folders (one per run), or a pool of images to draw the random sets "
            "from (images directly in it, or any folder with --random-size).",
            show_default=False,
        ),
    ],
    inputs: Annotated[
        Path,
        typer.Option(
            "--inputs",
            help="The classes' images: a folder with a folder per class, or one folder for every class.",
            show_default=False,
        ),
    ],
    classes: Annotated[
        str, typer.Option("--classes", help="Comma-separated class names or indices.", show_default=False)
    ],
    layers: Annotated[
        str | None,
        typer.Option("--layers", "--layer", help="Comma-separated layers (default: the last spatial layer)."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (tcav.csv, tcav.md, one figure per layer).")
    ] = Path("tcav"),
    runs: Annotated[
        int,
        typer.Option(
            "--runs", min=10, max=RUNS_MAX, help="CAVs per concept and layer, each against another random set."
        ),
    ] = 10,
    random_size: Annotated[
        int | None,
        typer.Option(
            "--random-size",
            min=10,
            max=IMAGES_MAX,
            help="Draw the random sets from every image under --random, this many each (default for a folder of "
            "loose images: half of them, at most 50).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of the CAVs' splits and the draws.")
    ] = 0,
    alpha: Annotated[
        float, typer.Option("--alpha", min=0, max=1, help="Level of the t-test against random CAVs, between 0 and 1.")
    ] = 0.05,
    bonferroni: Annotated[bool, typer.Option("--bonferroni", help="Divide --alpha by the number of tests.")] = False,
    masks: Annotated[
        Path | None, typer.Option("--masks", help="Masks folder of a --concepts data folder (default: CONCEPTS/masks).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=BATCH_MAX, help="Images per forward pass.")
    ] = 32,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="One bar figure per layer.")] = True,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store", help="An atlas store of this model (convlens scan/dissect) to add the rows to, table tcav."
        ),
    ] = None,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """TCAV (Kim et al. 2018): how much each class's logit leans on each concept, tested against random concepts.

    Example: convlens tcav shapes --concepts shapes_data --random random --inputs shapes_data --classes circle
    --layers features.relu3 --out tcav
    """
    from ..concepts import tcav as run_tcav
    from ..concepts.storing import check_store
    from ..fileio import check_output_dir
    from ..models import auto_layer

    check_output_dir(out)
    class_list = named_list(classes, "--classes", "0")
    loaded = opts.open(model)
    if store is not None:
        check_store(store, loaded)
    layer_list = named_list(layers, "--layers", "layer4") or [auto_layer(loaded)]
    result = run_tcav(
        loaded,
        class_list,
        concepts,
        layer_list,
        random,
        inputs=inputs,
        n_runs=runs,
        seed=seed,
        batch_size=batch_size,
        alpha=alpha,
        bonferroni=bonferroni,
        masks=masks,
        random_size=random_size,
    )
    typer.echo(result.markdown())
    files = write_tcav(result, out, figures=figures, store=store, model=loaded)
    typer.echo("wrote " + ", ".join(str(path) for path in files) + (f"; rows added to {store}" if store else ""))
