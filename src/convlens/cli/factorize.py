"""``convlens factorize``: Deep Feature Factorization of a layer over images, as figures and a concept table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..fileio import check_output_dir, distinct_stems, save_image, staged_folder, write_text
from . import app
from .common import SEED_MAX, ImagesArg, ModelArg, ModelOptions, grouped


@app.command()
@grouped
def factorize(
    model: ModelArg,
    images: ImagesArg,
    layer: Annotated[
        str, typer.Option("--layers", "--layer", help="'auto' (the last spatial layer) or a layer name.")
    ] = "auto",
    components: Annotated[
        int, typer.Option("--components", "-k", min=1, max=64, help="How many concepts to split the layer into.")
    ] = 5,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", min=0, max=SEED_MAX, help="Seed of the factorization's start: the same seed, the same concepts."
        ),
    ] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the figures and concepts.json.")] = Path(
        "concepts"
    ),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Split a layer's activations over IMAGES into concepts (Deep Feature Factorization, Collins et al. 2018).

    One factorization over all the images, so a concept means the same in each. Writes IMAGE_concepts.png per
    image (every concept in its own colour, then each concept's heatmap, titled with the classes it raises
    most) and concepts.json (per concept: its top classes and their share). Nothing is written if any input
    is wrong.

    Example: convlens factorize resnet50 cat.jpg dog.jpg --components 4 --out concepts
    """
    check_output_dir(out)
    from ..images import load_images
    from ..inside.factorization import factorize as compute
    from ..render.factorization import concept_caption, factorization_figure
    from ..render.overlay import figure_image

    pictures = load_images(images)
    loaded = opts.open(model)
    parts = compute(loaded, pictures, None if layer == "auto" else layer, components, seed=seed)
    stems = distinct_stems(images)
    figures = {
        f"{stem}_concepts.png": figure_image(
            factorization_figure(
                picture,
                parts.maps[index],
                parts.top_classes,
                transform=loaded.transform,
                title=f"{parts.components} concepts of {parts.layer}",
            )
        )
        for index, (stem, picture) in enumerate(zip(stems, pictures))
    }
    table = {
        "layer": parts.layer,
        "components": parts.components,
        "reconstruction_error": parts.error,
        "head": parts.head_note or "scored through the model's linear head",
        "concepts": [
            {
                "concept": k + 1,
                "top_classes": [{"class": label, "share": share} for label, share in parts.top_classes[k]],
            }
            for k in range(parts.components)
        ],
    }
    with staged_folder(out) as stage:
        for name, picture in figures.items():
            save_image(picture, stage / name)
        write_text(stage / "concepts.json", json.dumps(table, indent=2) + "\n")
    for k in range(parts.components):
        typer.echo(concept_caption(k, parts.top_classes[k], shown=3))
    if parts.head_note:
        typer.echo(f"(no classes: {parts.head_note})")
    typer.echo(
        f"wrote {len(figures)} figures and concepts.json to {out} "
        f"({parts.layer}, reconstruction error {parts.error:.1%})"
    )
