"""The report's TCAV section: which of the user's concepts the report's classes lean on (Kim et al. 2018).

It appears when concepts are given (``tcav_concepts``: a folder of concept folders, or a data folder
with dissection masks) with random sets (``tcav_random``: a folder of random folders, or a pool);
:func:`convlens.tcav` does the work and its test decides what is significant. Further options:
``tcav_inputs`` (the classes' images: a folder with a folder per class, or one set for every class;
default the report's own images), ``tcav_classes`` (default the classes the report's images are
predicted as, at most :data:`MAX_CLASSES`), ``tcav_layers`` (default the explained layer),
``tcav_runs`` (10) and ``tcav_random_size`` (the draw from a pool).
"""

from __future__ import annotations

from markupsafe import Markup

from ..errors import ConvlensError
from .context import Context, Section, figure
from .templating import PARTS

#: The most classes the section scores by default (each costs a gradient pass over its inputs per layer).
MAX_CLASSES = 4


def check_tcav_options(options: dict) -> None:
    """One line before any section runs when the TCAV options cannot make a section (folders listed, not read)."""
    from ..concepts.sources import concept_sets, random_sets

    concepts, random = options.get("tcav_concepts"), options.get("tcav_random")
    if concepts is not None and random is None:
        raise ConvlensError(
            "TCAV needs random sets beside the concepts: give tcav_random / --tcav-random "
            "(a folder of random folders, or a pool of images)"
        )
    if random is not None and concepts is None:
        raise ConvlensError("random sets were given for TCAV but no concepts: give tcav_concepts / --tcav-concepts")
    if concepts is not None and random is not None:  # both or neither, by the checks above
        concept_sets(concepts)
        random_sets(random, options.get("tcav_runs", 10), size=options.get("tcav_random_size"))


def _predicted_classes(ctx: Context) -> list[int]:
    """The report's images' top classes, first seen first, at most :data:`MAX_CLASSES`."""
    predictions = ctx.model.predict([item.image for item in ctx.images], top_k=1)
    return list(dict.fromkeys(top[0].index for top in predictions))[:MAX_CLASSES]


def tcav_section(ctx: Context) -> Section | None:
    from ..concepts import tcav
    from ..render.concepts import tcav_figure
    from ..render.overlay import figure_image

    concepts = ctx.options.get("tcav_concepts")
    if concepts is None:
        return None
    layers = list(ctx.options.get("tcav_layers") or [ctx.summary.auto_layer])
    classes = list(ctx.options.get("tcav_classes") or _predicted_classes(ctx))
    inputs = ctx.options.get("tcav_inputs") or [item.image for item in ctx.images]
    ctx.expect(1)
    ctx.step(f"TCAV of {len(classes)} class(es) at {', '.join(layers)}")
    result = tcav(
        ctx.model,
        classes,
        concepts,
        layers,
        ctx.options["tcav_random"],
        inputs=inputs,
        n_runs=ctx.options.get("tcav_runs", 10),
        random_size=ctx.options.get("tcav_random_size"),
    )
    header = ["class", "concept", "layer", "TCAV", "± std", "random CAVs", "p", "significant", "CAV accuracy"]
    rows = [
        (
            r.class_,
            r.concept,
            r.layer,
            f"{r.score:.3f}",
            f"{r.std:.3f}",
            f"{r.random_score:.3f}",
            f"{r.p_value:.3g}",
            "yes" if r.significant else "no",
            f"{r.accuracy:.2f}",
        )
        for r in result.rows
    ]
    items = [figure(figure_image(tcav_figure(result, layer)), layer) for layer in result.layers]
    where = "the report's images" if ctx.options.get("tcav_inputs") is None else "the given inputs"
    leaning = [
        f"{r.class_} on {r.concept} at {r.layer} ({r.score:.2f})"
        for r in result.rows
        if r.significant and r.score > r.random_score
    ]
    found = (
        "Significant and above the random CAVs: " + "; ".join(leaning) + "."
        if leaning
        else "No concept lifts a class significantly above the random CAVs."
    )
    note = (
        f"A concept's TCAV score is the fraction of {where} whose class logit rises along the concept's "
        f"activation vector, over {result.runs} runs against different random sets; p is the two-sided t-test "
        f"against random-vs-random vectors (significant below {result.threshold:g}). {found}"
    )
    html = PARTS.table(header, rows, numeric=(3, 4, 5, 6, 8)) + PARTS.figures(items)
    return Section("tcav", "Concepts the classes lean on (TCAV)", Markup(html), note)
