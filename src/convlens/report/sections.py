"""The report's sections: each turns API results into an HTML fragment with embedded pictures.

A section is a function ``(context) -> Section``; :data:`SECTIONS` lists them in page order,
so a new section is one function and one line.

A heatmap method that does not apply to the model (CAM without a global-average-pooling +
linear head, guided backpropagation without ReLU layers) is left out of the heatmap and
evaluation sections, and the section's note names it with the reason: one inapplicable
method never costs the user the whole report.

Options (``build_report(..., **options)``): ``methods`` (heatmap methods, default all),
``activation_layers``, ``filter_layers``, ``filter_steps`` (default 96), ``filter_count``
(filters per layer, default 16), ``classes`` (class-model classes, default the first 8),
``evaluation_images``, ``evaluation_methods``, ``evaluation_metrics``, ``targets`` (what the heatmaps
and the evaluation explain: a class, a Region, a Box or a Similarity; default each image's top class),
``concepts`` (Deep Feature Factorization, :mod:`.concepts_section`) and the ``tcav_*`` options
(:mod:`.tcav_section`).

The page must read at 1280 px without sideways scrolling: the heatmaps are one
block per image, its methods wrapping in a CSS grid beside it, and every picture
drawn in a style is explained by a colour bar (``render.overlay.STYLES``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from markupsafe import Markup

from ..errors import ConvlensError
from ..models import Model
from .atlas_section import atlas_section
from .concepts_section import concepts_section
from .context import Context, Section, cell, explained, figure, join_names, left_out, outside_classes, thumbnail, words
from .evaluation_section import evaluation_section
from .tasks_section import describe_prediction, segmentation_section
from .tcav_section import tcav_section
from .templating import PARTS

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def summary_section(ctx: Context) -> Section:
    rows = []
    for row in ctx.summary.rows:
        shape = (
            "-"
            if row.output_shape is None
            else "(" + ", ".join("N" if d == -1 else str(d) for d in row.output_shape) + ")"
        )
        target = "auto" if row.spatial and row.name == ctx.summary.auto_layer else ("yes" if row.spatial else "")
        rows.append(("\u2003" * row.depth + row.name, row.type, shape, f"{row.params:,}", target))
    html = PARTS.table(
        ["layer", "type", "output shape", "params", "explanation target"], rows, numeric=(3,), scroll=True
    )
    note = (
        f"{ctx.summary.total_params:,} parameters ({ctx.summary.trainable_params:,} trainable). "
        f"Explanation targets are layers with a spatial output; 'auto' picks {ctx.summary.auto_layer}."
    )
    return Section("model", "Model", Markup(html), note)


def predictions_section(ctx: Context) -> Section:
    predictions = ctx.model.predict([item.image for item in ctx.images], top_k=3)
    outsiders = [
        (item, preds[0])
        for item, preds in zip(ctx.images, predictions)
        if preds and hasattr(preds[0], "probability") and outside_classes(ctx.model, item)
    ]
    items, rows = [], []
    for item, preds in zip(ctx.images, predictions):
        caption = item.name + (
            f" ({item.label}: not one of the model's classes)" if outside_classes(ctx.model, item) else ""
        )
        items.append(figure(thumbnail(item.image), caption))
        rows.append((item.name, *[describe_prediction(p) for p in preds]))
    k = max(1, max(len(p) for p in predictions))
    callout = PARTS.callout(_outsiders_note(ctx.model, outsiders)) if outsiders else ""
    html = PARTS.figures(items) + callout + PARTS.table(["image", *[f"top {i + 1}" for i in range(k)]], rows)
    return Section("predictions", "Predictions", Markup(html))


def _outsiders_note(model: Model, outsiders: list) -> str:
    """Why a photo of a cat gets a shape's name: said with the model's own classes and answers."""
    labels = list(model.labels or ())  # never empty here: an outsider needs class names to be outside of
    count = len(labels)
    listed = f" ({', '.join(labels)})" if count <= 20 else ""
    shown = join_names(
        [item.name if words(item.label) <= words(item.name) else f"{item.name} ({item.label})" for item, _ in outsiders]
    )
    answers = join_names([f"'{top.label}' at {top.probability:.1%} for {item.name}" for item, top in outsiders])
    verb = "is" if len(outsiders) == 1 else "are"
    return (
        f"{shown} {verb} outside the {count} classes this model knows{listed}. A classifier always answers "
        f"with one of its own classes, however sure it sounds: {answers} says which of its {count} classes "
        f"the picture resembles most, not what it shows. Look at where it looked (next section) to see "
        f"what drove the answer."
    )


#: The heatmap methods a report shows unless ``methods=`` / ``--methods`` names others: one of each family,
#: cheap enough that the default report stays quick. Every registered method can be asked for by name.
REPORT_METHODS = (
    "cam",
    "gradcam",
    "gradcam++",
    "xgradcam",
    "hirescam",
    "layercam",
    "eigencam",
    "scorecam",
    "ablationcam",
    "saliency",
    "smoothgrad",
    "integrated_gradients",
    "guided_backprop",
    "guided_gradcam",
)


def heatmaps_section(ctx: Context) -> Section:
    """The report's methods for every image: one block per image, the methods wrapping beside it."""
    from ..heatmaps import explain, style_for
    from ..render.overlay import STYLES, colorbar_css, describe_style
    from .html import outline

    methods = ctx.options.get("methods") or list(REPORT_METHODS)
    pictures = [item.image for item in ctx.images]
    x = ctx.model.preprocess(pictures)
    columns, skipped = {}, {}
    ctx.expect(len(methods))
    for name in methods:
        ctx.step(name)
        try:
            result = explain(
                ctx.model,
                x,
                method=name,
                layer=ctx.summary.auto_layer,  # already found once
                target=ctx.options.get("targets"),
            )
        except ConvlensError as err:  # the method does not apply to this model: say so, show the rest
            skipped[name] = str(err)
            continue
        columns[name] = (result, result.overlay(pictures))  # each method in its kind's style
    if not columns:
        return Section(
            "heatmaps",
            "Where the model looked",
            Markup(""),
            "No heatmap method applies to this model." + left_out(skipped),
        )
    first = next(iter(columns.values()))[0]
    blocks = []
    for i, item in enumerate(ctx.images):
        about = f"explained: {first.target_names[i]}"
        if outside_classes(ctx.model, item):
            about += f" ({item.label}: not one of the model's classes)"
        original = cell(item.image if item.mask is None else outline(item.image, item.mask), item.name)
        panels = [
            cell(
                overlays[i] if item.mask is None else outline(overlays[i], item.mask),
                f"{name}{' (flat map)' if result.flat[i] else ''}",
            )
            for name, (result, overlays) in columns.items()
        ]
        blocks.append({"original": original, "about": about, "panels": panels})
    by_style = {style: [name for name in columns if style_for(name) == style] for style in STYLES}
    legends = [
        (colorbar_css(STYLES[style]), f"{', '.join(names)}: {describe_style(style)}")
        for style, names in by_style.items()
        if names
    ]
    layer = first.layer if isinstance(first.layer, str) else ", ".join(first.layer or [])
    note = (
        f"Each map explains {explained(ctx)}, at layer {layer} for the CAM methods. "
        + " ".join(f"{join_names(names)}: {describe_style(style)}." for style, names in by_style.items() if names)
        + (
            " Pixel-level gradient maps are sparse, a few bright pixels in a dark field: blended over the "
            "photo they all but vanish, so they are shown alone, as their papers show them."
            if by_style["map"]
            else ""
        )
        + (" White outlines are the ground-truth object masks." if any(i.mask is not None for i in ctx.images) else "")
    )
    html = PARTS.colorbars(legends) + PARTS.heatmaps(blocks)
    return Section("heatmaps", "Where the model looked", Markup(html), note + left_out(skipped))


#: Models with more classes than this get no per-class grid: one panel per class stops being readable.
MAX_CLASS_GRID = 20


def classes_section(ctx: Context) -> Section | None:
    """Grad-CAM for every class of the first image, from one forward pass (``target="all"``)."""
    from ..heatmaps import explain

    item = ctx.images[0]
    try:
        result = explain(ctx.model, [item.image], method="gradcam", layer=ctx.summary.auto_layer, target="all")
    except ConvlensError:  # not a classifier (a segmenter, a detector): its own section shows its classes
        return None
    if len(result.targets) > MAX_CLASS_GRID:
        return None
    overlays = [result.overlay_class(k, [item.image])[0] for k in range(len(result.targets))]
    flat = cast("list[bool]", result.flat[0])  # target="all": one flag per class for each image
    items = [
        cell(overlay, f"{name}{' (flat map)' if flat[k] else ''}")
        for k, (name, overlay) in enumerate(zip(result.target_names, overlays))
    ]
    note = (
        f"Where the model would look for each of its {len(items)} classes in {item.name}: Grad-CAM at "
        f"{result.layer}, every class's gradient from the same forward pass (target='all')."
    )
    return Section("classes", "Every class", Markup(PARTS.figures(items)), note)


def _spread(names: list[str], count: int) -> list[str]:
    """``count`` names spread evenly from first to last."""
    if len(names) <= count:
        return names
    step = (len(names) - 1) / (count - 1)
    return [names[round(i * step)] for i in range(count)]


def activations_section(ctx: Context) -> Section:
    """Every channel of a few layers, for the first image, from one truncated forward pass."""
    from ..inside import activations
    from ..render.grid import activation_grid

    item = ctx.images[0]
    layers = ctx.options.get("activation_layers") or _spread(ctx.layers, 4)
    recorded = activations(ctx.model, item.image, layers)
    items = [
        figure(activation_grid(recorded[name][0], f"{name}  ({recorded[name].shape[1]} channels)"), name)
        for name in layers
    ]
    note = (
        f"Image: {item.name}. Each tile is one channel, standardised for display (viridis); "
        "a blank tile is a dead channel."
    )
    return Section("activations", "Inside the network: activations", Markup(PARTS.figures(items)), note)


def filters_section(ctx: Context) -> Section:
    """Filter patterns by gradient ascent (all filters of a layer in one batch) and class-model images."""
    from ..inside import class_model, filter_patterns
    from ..inside.inputs import fixed_input_size
    from ..render.grid import filter_grid

    layers = ctx.options.get("filter_layers") or _spread(
        [n for n in ctx.layers if "pool" not in type(ctx.model.named_layers()[n]).__name__.lower()], 3
    )
    # A model that takes one input size only (Keras) is optimised at it, others at a square of the larger side.
    size = tuple(ctx.model.input_size) if fixed_input_size(ctx.model) else max(ctx.model.input_size)
    steps = ctx.options.get("filter_steps", 96)
    items, skipped = [], {}
    ctx.expect(len(layers) + 1)  # the layers, then the class models
    for name in layers:
        ctx.step(name)
        try:
            patterns = filter_patterns(
                ctx.model, name, max_filters=ctx.options.get("filter_count", 16), size=size, steps=steps, seed=0
            )
        except ConvlensError as err:  # the model cannot run this part (a dense head at another size): say so
            skipped[name] = str(err)
            continue
        labels = [f"{f}: {a:.2f}" for f, a in zip(patterns.filters, patterns.activations.tolist())]
        items.append(figure(filter_grid(patterns.images, labels, name), name))
    classes = ctx.options.get("classes") or list(range(min(len(ctx.model.labels or []) or 8, 8)))
    ctx.step("class models")
    try:
        models = class_model(ctx.model, classes, size=size, steps=steps, seed=0)
    except ConvlensError as err:
        skipped["class models"] = str(err)
    else:
        class_labels = [ctx.model.label(c) for c in models.classes]
        items.append(
            figure(filter_grid(models.images, class_labels, "class models (pre-softmax logits)"), "class-model images")
        )
    height, width = (size, size) if isinstance(size, int) else size
    note = (
        f"Each tile is the {height}x{width} image that maximises one filter's mean activation ({steps} steps, "
        "Fourier parameterisation with decorrelated colour, jitter/scale/rotation robustness); the number "
        "under it is the filter index and its final activation. Class-model images maximise a class logit."
        + left_out(skipped, "as the model cannot run them")
    )
    return Section("filters", "What the filters want to see", Markup(PARTS.figures(items)), note)


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def training_section(ctx: Context) -> Section | None:
    """The numbers ``convlens train`` wrote into the checkpoint: accuracy, per-class scores, AUC, curves."""
    from ..render.overlay import figure_image
    from ..render.training import confusion_figure, curves_figure, roc_figure

    metrics, history = ctx.model.info.get("metrics"), ctx.model.info.get("history")
    if not metrics:
        return None
    facts = [
        ("validation accuracy", f"{metrics['accuracy']:.2%}"),
        ("validation images", metrics.get("val_images", "-")),
        ("training images", metrics.get("train_images", "-")),
        ("macro F1", f"{metrics['macro_f1']:.4f}" if "macro_f1" in metrics else "-"),
    ]
    roc = metrics.get("roc") or {}
    if roc.get("auc") is not None:
        low, high = roc.get("ci95", (float("nan"), float("nan")))
        facts.append(
            (
                f"ROC AUC, positive class {roc['positive_class']} (Hanley & McNeil SE, 95% CI)",
                f"{roc['auc']:.4f} \u00b1 {roc.get('se', float('nan')):.4f} [{low:.4f}, {high:.4f}]",
            )
        )
    elif metrics.get("macro_auc") is not None:
        facts.append(("macro one-vs-rest ROC AUC", f"{metrics['macro_auc']:.5f}"))
    per_class = [
        (
            name,
            f"{v['precision']:.3f}",
            f"{v['recall']:.3f}",
            f"{v['f1']:.3f}",
            _number(metrics.get("one_vs_rest_auc", {}).get(name)),
        )
        for name, v in metrics.get("per_class", {}).items()
    ]
    plots: list[tuple[Callable[[Any], Figure], Any, str]] = [
        (curves_figure, history, "loss and accuracy per epoch"),
        (confusion_figure, metrics, "confusion matrix (validation)"),
    ]
    if roc.get("fpr"):
        plots.append((roc_figure, metrics, "ROC curve"))
    items = [figure(figure_image(draw(data)), caption) for draw, data, caption in plots if data]
    html = (
        PARTS.table(["", ""], facts)
        + PARTS.table(["class", "precision", "recall", "F1", "AUC (one vs rest)"], per_class, numeric=(1, 2, 3, 4))
        + PARTS.figures(items)
    )
    return Section(
        "training", "Training evaluation", Markup(html), "Written by convlens train on the held-out validation split."
    )


SECTIONS = [
    summary_section,
    predictions_section,
    heatmaps_section,
    concepts_section,
    tcav_section,
    segmentation_section,
    classes_section,
    activations_section,
    filters_section,
    training_section,
    evaluation_section,
]
SECTIONS.append(atlas_section)
