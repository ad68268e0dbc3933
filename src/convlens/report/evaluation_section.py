"""The report's "Which heatmap to trust": scores a person can read, the best of each highlighted, and a verdict.

Each column is a metric of :data:`convlens.metrics.METRICS`, headed by its
``label`` and its direction (↑ higher is better, ↓ lower); the best mean of each
column, as ``convlens evaluate``'s summary finds it
(:func:`convlens.evaluation.best_methods`, ties included), is highlighted. A last
column is the sanity check of Adebayo et al. 2018 (arXiv:1810.03292) at the end
of its cascade: the Spearman rank correlation between each image's map from the
trained model and from a copy with every weight redrawn (each parameter tensor
from a Gaussian of its own mean and spread,
:func:`convlens.metrics.sanity.randomize_layer`). A map that explains the model
must change, so a method fails when the correlation stays at
:data:`convlens.metrics.sanity.SANITY_THRESHOLD` (0.5) or above, as in
``benchmarks/shapes_figures.py``.

:func:`verdict` turns the table into one or two sentences: which method localises
best (best on the most localisation columns, those that need masks), which is the
most faithful (best on the most of the others) and which failed the sanity check.
It is computed from the numbers, never written by hand.

Options: ``evaluation_methods`` (default gradcam, scorecam, layercam, saliency),
``evaluation_metrics`` (default :data:`DEFAULT_METRICS`), ``evaluation_images``,
``sanity_images`` (images the sanity check re-explains, default 4).
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from markupsafe import Markup

from ..errors import ConvlensError
from ..metrics.sanity import SANITY_THRESHOLD
from ..metrics.stats import MeanCI, mean_ci
from .context import Context, Section, explained, join_names, left_out
from .templating import PARTS

#: The columns by default: one pointing game (its tolerance scaled to the input, so it means the same at
#: 64 and 224 px; at 64 px the paper's 15 px is met by every method), the map's energy and IoU against the
#: mask, and the four faithfulness scores. ``convlens evaluate`` runs the rest.
DEFAULT_METRICS = ("pointing_scaled", "energy_pointing", "iou", "deletion", "insertion", "drop", "increase")

DEFAULT_METHODS = ("gradcam", "scorecam", "layercam", "saliency")

SANITY_LABEL = "Same map, random weights"


def randomisation_similarity(model, x: torch.Tensor, method: str, *, seed: int = 0, targets=None) -> torch.Tensor:
    """Spearman rank correlation ``(N,)`` of each image's map, trained model against fully randomised copy.

    Both maps explain the trained model's top class (or ``targets``, settled on the trained model). The caller's
    model is never touched: the randomised one is a deep copy.
    """
    from ..metrics import heatmap_explainer, spearman
    from ..metrics.base import as_batch, as_targets
    from ..metrics.sanity import randomize_layer

    if model.keras_model is not None:
        raise ConvlensError("the sanity check randomises PyTorch parameters; Keras models are not supported")
    explain_fn = heatmap_explainer(method)
    targets = as_targets(model, as_batch(model, x), targets)
    trained = explain_fn(model, x, targets)
    randomised = dataclasses.replace(model, module=copy.deepcopy(model.module))
    randomize_layer(randomised.module, torch.Generator().manual_seed(seed))  # the root: every parameter
    return spearman(trained, explain_fn(randomised, x, targets))


def verdict(
    summary: Mapping[str, Mapping[str, MeanCI]],
    metrics: Mapping,
    sanity: Mapping[str, MeanCI] | None = None,
    threshold: float = SANITY_THRESHOLD,
) -> str:
    """One or two sentences from the table: the best localiser, the most faithful method, the sanity failures.

    ``summary``: method -> metric -> :class:`MeanCI`; ``metrics``: name ->
    :class:`~convlens.metrics.Metric` (``needs_masks`` makes a localisation
    column, the rest are faithfulness); ``sanity``: method -> rank correlation
    with the randomised model, or None when it was not run. A method leads a group
    by being best (ties included) on the most of its columns; leaders that tie are
    all named.
    """
    from ..evaluation import best_methods

    best = best_methods(summary, metrics)
    groups = {
        "localisation": [n for n, m in metrics.items() if m.needs_masks],
        "faithfulness": [n for n, m in metrics.items() if not m.needs_masks],
    }
    leaders = {group: _leaders(best, names) for group, names in groups.items()}
    parts = []
    for group, (names, wins) in leaders.items():
        if names:
            each = "each " if len(names) > 1 else ""
            parts.append(
                (
                    names,
                    f"{_claim(group, len(names) > 1)} ({each}best on {wins} of {len(groups[group])} {group} scores)",
                )
            )
    sentences = []
    if len(parts) == 2 and parts[0][0] == parts[1][0]:  # the same leaders: one sentence
        sentences.append(f"{join_names(parts[0][0])} both {parts[0][1]} and {parts[1][1]}.")
    else:
        sentences.extend(f"{join_names(names)} {claim}." for names, claim in parts)
    if sanity:
        scored = {method: ci.mean for method, ci in sanity.items() if ci.n}
        failed = [method for method, value in scored.items() if value >= threshold]
        if failed:
            values = ", ".join(f"{scored[m]:.2f}" for m in failed)
            sentences.append(
                f"{join_names(failed)} failed the sanity check: {'its' if len(failed) == 1 else 'their'} "
                f"maps stay alike when every weight is randomised (rank correlation {values}; a pass "
                f"is below {threshold:g}), so {'its' if len(failed) == 1 else 'their'} scores say "
                "little about this model."
            )
        elif scored:
            sentences.append(
                f"No method failed the sanity check: every map changes when the weights are "
                f"randomised (rank correlation at most {max(scored.values()):.2f}; a pass is below "
                f"{threshold:g})."
            )
    return " ".join(sentences)


def _claim(group: str, plural: bool) -> str:
    if group == "localisation":
        return "localise best" if plural else "localises best"
    return "are the most faithful to the model" if plural else "is the most faithful to the model"


def _leaders(best: Mapping[str, list[str]], columns: Sequence[str]) -> tuple[list[str], int]:
    """The methods best on the most of ``columns``, and on how many."""
    wins = Counter(method for name in columns for method in best.get(name, []))
    if not wins:
        return [], 0
    top = max(wins.values())
    return [method for method, count in wins.items() if count == top], top


def evaluation_section(ctx: Context) -> Section | None:
    """Which heatmap to trust: localisation against masks, faithfulness, the sanity check, and a verdict."""
    from ..evaluation import best_methods
    from ..evaluation.runner import evaluate_images
    from ..metrics import METRICS

    images = [(item.name, item.image, item.mask) for item in ctx.images if item.mask is not None]
    images += ctx.options.get("evaluation_images", [])
    if not images:
        return None
    methods = list(ctx.options.get("evaluation_methods", DEFAULT_METHODS))
    metrics = {name: METRICS[name] for name in ctx.options.get("evaluation_metrics", DEFAULT_METRICS)}
    summary, skipped = {}, {}
    # one sub-step per scored (method, image) pair, the long part, then one per method's sanity check
    ctx.expect(len(methods) * (len(images) + 1))

    def scored(method: str):
        return lambda done, _total: ctx.step(f"{method} on {images[done - 1][0]}")

    for method in methods:  # one at a time, so a method that does not apply leaves the others' rows
        before = ctx.progress.part
        try:
            summary.update(
                evaluate_images(
                    ctx.model,
                    images,
                    methods=[method],
                    metrics=list(metrics),
                    progress=scored(method),
                    targets=ctx.options.get("targets"),
                )[1]
            )
        except ConvlensError as err:
            skipped[method] = str(err)
            ctx.skip(len(images) - (ctx.progress.part - before) + 1)  # its pairs and its sanity check
    if not summary:
        return Section(
            "evaluation",
            "Which heatmap to trust",
            Markup(""),
            "No evaluated method applies to this model." + left_out(skipped),
        )
    sanity, sanity_note = _sanity(ctx, [image for _, image, _ in images], list(summary))
    best = best_methods(summary, metrics)
    counts = {ci.n for cells in summary.values() for ci in cells.values() if ci.n}
    show_n = len(counts) > 1  # the count goes in the note when every cell has the same
    headers = [{"text": "method"}] + [
        {"text": f"{metric.label or name} {'↑' if metric.higher_is_better else '↓'}", "title": metric.paper}
        for name, metric in metrics.items()
    ]
    if sanity is not None:
        headers.append(
            {
                "text": f"{SANITY_LABEL} ↓",
                "title": "Spearman rank correlation of the map with the map "
                "of a copy whose every weight is randomised (Adebayo et al. 2018, arXiv:1810.03292); "
                f"a pass is below {SANITY_THRESHOLD:g}",
            }
        )
    rows = []
    for method, cells in summary.items():
        row = [{"text": method}]
        for name in metrics:
            ci = cells[name]
            row.append(
                {
                    "text": ci.format() + (f" ({ci.n})" if show_n and ci.n else ""),
                    "class": "num best" if method in best[name] else "num",
                }
            )
        if sanity is not None:
            ci = sanity[method]
            failed = ci.n and ci.mean >= SANITY_THRESHOLD
            row.append(
                {
                    "text": ci.format(2) + (" fail" if failed else " pass" if ci.n else ""),
                    "class": "num fail" if failed else "num",
                }
            )
        rows.append(row)
    said = verdict(summary, metrics, sanity)
    html = (PARTS.verdict(said) if said else "") + PARTS.scores(headers, rows)
    count = counts.pop() if len(counts) == 1 else None
    over = f"{count} {_images(count == 1)}" if count else "the images"
    note = (
        f"Mean \u00b1 95% confidence half-width over {over} with ground-truth masks"
        f"{' (number of images in brackets)' if show_n else ''}, each explained for {explained(ctx)}; "
        "\u2191 higher is better, \u2193 lower is better; the best of each column is highlighted (ties "
        "included). Pointing game: the map's maximum falls on the object, within 15 px per 224 px of input; "
        "energy inside the object: the share of the map's energy inside the mask; IoU of the map thresholded "
        "at 0.5 with the mask; deletion/insertion AUC: area under the class-probability curve as pixels are "
        "removed/added most important first; average drop / confidence increase: with the image multiplied "
        "by the map. Hover a header for its paper." + sanity_note + left_out(skipped)
    )
    return Section("evaluation", "Which heatmap to trust", Markup(html), note)


def _images(one: bool) -> str:
    return "image" if one else "images"


def _sanity(ctx: Context, pictures: list, methods: list[str]) -> tuple[dict[str, MeanCI] | None, str]:
    """The sanity column (method -> MeanCI of the rank correlation) and a sentence for the note."""
    count = min(len(pictures), ctx.options.get("sanity_images", 4))
    x = ctx.model.preprocess(pictures[:count])
    column = {}
    for done, method in enumerate(methods):
        ctx.step(f"sanity check, {method}")
        try:
            column[method] = mean_ci(
                randomisation_similarity(ctx.model, x, method, targets=ctx.options.get("targets")).tolist()
            )
        except ConvlensError as err:  # a Keras model: no column, and the note says why
            ctx.skip(len(methods) - done - 1)
            return None, f" No sanity check: {err}."
    return column, (
        f" {SANITY_LABEL}: the sanity check of Adebayo et al. (2018) on {count} {_images(count == 1)}, "
        "the Spearman rank correlation between the map of the trained model and that of a copy with "
        "every weight randomised; a map that explains the model must change, so "
        f"{SANITY_THRESHOLD:g} or more fails."
    )
