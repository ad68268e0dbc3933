"""The report's atlas section: per layer, the units that detect a concept, the OpenAI Microscope view, offline.

For each dissected layer (Network Dissection, :mod:`convlens.atlas.dissect`)
the section lists the detectors with their concept and IoU, and for the best
unit of each concept its filter pattern beside its top dataset examples (map
overlaid), all embedded in the one HTML file.

Data: ``options["atlas_data"]`` (a folder or list file with concept masks, or
a :class:`convlens.atlas.DataSource`); by default, for a model trained on the
shapes classes (the bundled one), ``atlas_images`` (200) generated shapes
images with seed ``atlas_seed`` (2028, unseen in training). Other options:
``atlas_layers``, ``atlas_units`` (units shown per layer, 4),
``atlas_examples`` (images per unit, 4), ``atlas_steps`` (filter-pattern
steps, 32). Without data, for another model, the section is left out.
"""

from __future__ import annotations

from markupsafe import Markup

from ..data.shapes import SHAPE_CLASSES
from .context import Context, Section, figure
from .templating import PARTS

BUNDLED_LAYERS = ("features.relu3", "features.relu4")


def _default_layers(ctx: Context) -> list[str]:
    names = ctx.model.named_layers()
    if all(name in names for name in BUNDLED_LAYERS):
        return list(BUNDLED_LAYERS)
    return ctx.layers[-2:]


def _shown_units(detectors: list[tuple[int, str, float]], count: int) -> list[tuple[int, str, float]]:
    """The best unit of each concept first (variety), then the next best units, ``count`` in all."""
    best, seen = [], set()
    for row in detectors:
        if row[1] not in seen:
            best.append(row)
            seen.add(row[1])
    rest = [row for row in detectors if row not in best]
    return (best + rest)[:count]


def atlas_section(ctx: Context) -> Section | None:
    """Detectors per layer with label, IoU, filter pattern and top dataset examples."""
    from ..atlas.dissect import dissect
    from ..atlas.examples import dataset_examples

    data = ctx.options.get("atlas_data")
    if data is None and list(ctx.model.labels or []) != list(SHAPE_CLASSES):
        return None
    images = ctx.options.get("atlas_images", 200)
    seed = ctx.options.get("atlas_seed", 2028)
    layers = ctx.options.get("atlas_layers") or _default_layers(ctx)
    ctx.expect(1 + len(layers))  # the dissection, then each layer's examples
    ctx.step("dissection")
    result = dissect(
        ctx.model, data, layers, shapes=None if data is not None else images, seed=seed, k=8, figures=False
    )
    source = result.atlas.source() if data is None else None
    html: list[Markup] = []  # the section's HTML fragments, each escaped where it holds data
    counts = []
    for layer in result.iou:
        ctx.step(f"examples of {layer}")  # also for a layer without detectors, so the count holds
        detectors = result.detectors(layer)
        counts.append(f"{layer}: {len(detectors)} detectors, {result.unique_detectors[layer]} unique")
        html.append(Markup("<h3>{}</h3>").format(layer))  # a layer name is data: escaped
        if not detectors:
            html.append(
                Markup('<p class="note">No unit of this layer detects a concept (IoU &gt; {}).</p>').format(
                    result.min_iou
                )
            )
            continue
        table = [(unit, label, f"{iou:.3f}") for unit, label, iou in detectors]
        html.append(PARTS.table(["unit", "concept", "IoU"], table, numeric=(0, 2), scroll=True))
        shown = _shown_units(detectors, ctx.options.get("atlas_units", 4))
        found = dataset_examples(
            result.atlas,
            layer,
            [unit for unit, _, _ in shown],
            model=ctx.model,
            k=ctx.options.get("atlas_examples", 4),
            pattern_steps=ctx.options.get("atlas_steps", 32),
            source=source,
        )
        rows = []
        for (unit, label, iou), examples in zip(shown, found):
            cells = [figure(examples.pattern, f"unit {unit}: {label}, IoU {iou:.3f}")] if examples.pattern else []
            cells += [
                figure(image, f"{key.rsplit('/', 1)[-1]}: {value:.3g}")
                for image, key, value in zip(examples.whole, examples.keys, examples.values)
            ]
            rows.append(cells)
        columns = max(len(row) for row in rows)
        headers = ["filter pattern", *[f"top {i + 1}" for i in range(columns - 1)]]
        html.append(PARTS.grid(headers, rows))
    where = (
        "the given dataset"
        if data is not None
        else f"{images} generated shapes images (seed {seed}, unseen in training)"
    )
    note = (
        f"Network Dissection (Bau et al. 2017) on {where}: each unit's threshold is its top 0.5 % activation "
        "quantile; its map, upsampled to the mask and thresholded, is compared with each concept's masks "
        f"(IoU over the whole dataset); IoU > {result.min_iou} makes a detector. "
        + "; ".join(counts)
        + ". Rows: the filter pattern, then the images where the unit fires most "
        "(the number is the unit's maximum on that image)."
    )
    return Section("atlas", "Units and concepts (atlas)", Markup("".join(str(part) for part in html)), note)
