"""The report's concepts section: Deep Feature Factorization of the explained layer over the report's images.

One factorization over every image (so a concept means the same in each), drawn per image: each pixel in
its strongest concept's colour, then each concept alone, titled with the classes its direction raises most
(:func:`convlens.factorize`). Options: ``concepts`` (how many, default 4; 0 leaves the section out) and
``concepts_layer`` (default the explained layer).
"""

from __future__ import annotations

from markupsafe import Markup

from ..errors import ConvlensError
from .context import Context, Section, figure
from .templating import PARTS


def concepts_section(ctx: Context) -> Section | None:
    from ..inside.factorization import factorize
    from ..render.factorization import factorization_figure
    from ..render.overlay import figure_image

    components = ctx.options.get("concepts", 4)
    if not components:
        return None
    layer = ctx.options.get("concepts_layer") or ctx.summary.auto_layer
    title = "Concepts in the layer (Deep Feature Factorization)"
    ctx.expect(1)
    ctx.step(f"factorize {layer}")
    pictures = [item.image for item in ctx.images]
    try:
        parts = factorize(ctx.model, ctx.model.preprocess(pictures), layer, components)
    except ConvlensError as err:  # a layer too narrow, or constant on these images: say so, keep the report
        return Section("concepts", title, Markup(""), f"Left out: {err}.")
    items = [
        figure(
            figure_image(
                factorization_figure(picture, parts.maps[index], parts.top_classes, transform=ctx.model.transform)
            ),
            item.name,
        )
        for index, (item, picture) in enumerate(zip(ctx.images, pictures))
    ]
    classes = (
        "Each concept's title names the classes its direction raises most, through the model's linear head."
        if not parts.head_note
        else f"No classes are named: {parts.head_note}."
    )
    note = (
        f"{parts.layer}'s activations over all {len(pictures)} images, split into {parts.components} "
        f"non-negative concepts (Collins et al. 2018), so a concept means the same in every image; the first "
        f"picture colours each pixel by its strongest concept. {classes} The split leaves "
        f"{parts.error:.0%} of the activations unexplained."
    )
    return Section("concepts", title, Markup(PARTS.figures(items)), note)
