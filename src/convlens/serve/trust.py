"""The explorer's trust view: the report's "which heatmap to trust" table and verdict, for the image on the page.

The same pieces as the report (:mod:`convlens.report.evaluation_section`): each method
scored by :func:`convlens.evaluation.runner.evaluate_images` on the report's metrics (the
localisation ones only when the image has a ground-truth mask), the best of each column
from :func:`convlens.evaluation.best_methods`, the sanity check of Adebayo et al. 2018
(:func:`~convlens.report.evaluation_section.randomisation_similarity`) and the verdict
sentence computed from those numbers (:func:`~convlens.report.evaluation_section.verdict`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConvlensError
from ..progress import Progress


def trust_table(model, picture, methods: Sequence[str], metric_names: Sequence[str], progress: Progress) -> dict:
    """Headers, rows (value, best, sanity pass/fail), the verdict and what was left out, as plain JSON."""
    from ..evaluation import best_methods
    from ..evaluation.runner import evaluate_images
    from ..metrics import METRICS
    from ..metrics.sanity import SANITY_THRESHOLD
    from ..metrics.stats import mean_ci
    from ..report.evaluation_section import SANITY_LABEL, randomisation_similarity, verdict

    names = [n for n in metric_names if picture.mask is not None or not METRICS[n].needs_masks]
    metrics = {name: METRICS[name] for name in names}
    total = 2 * len(methods)
    summary, skipped, sanity = {}, {}, {}
    for done, method in enumerate(methods):
        progress(done, total)
        try:
            summary.update(
                evaluate_images(model, [(picture.id, picture.image, picture.mask)], methods=[method], metrics=names)[1]
            )
        except ConvlensError as err:
            skipped[method] = str(err)
    x = model.preprocess([picture.image])
    for done, method in enumerate(list(summary)):
        progress(len(methods) + done, total)
        try:
            sanity[method] = mean_ci(randomisation_similarity(model, x, method).tolist())
        except ConvlensError as err:  # Keras: no sanity column
            skipped["sanity check"] = str(err)
            sanity = {}
            break
    progress(total, total)
    best = best_methods(summary, metrics) if summary else {}
    headers = [
        {
            "name": name,
            "label": metric.label or name,
            "higher_is_better": metric.higher_is_better,
            "paper": metric.paper,
        }
        for name, metric in metrics.items()
    ]
    rows = []
    for method, cells in summary.items():
        row: dict[str, object] = {
            "method": method,
            "cells": [
                {"text": cells[name].format(), "value": cells[name].mean, "best": method in best.get(name, [])}
                for name in metrics
            ],
        }
        if method in sanity:
            value = sanity[method].mean
            row["sanity"] = {"text": f"{value:.2f}", "value": value, "failed": bool(value >= SANITY_THRESHOLD)}
        rows.append(row)
    return {
        "headers": headers,
        "rows": rows,
        "sanity_label": SANITY_LABEL if sanity else None,
        "verdict": verdict(summary, metrics, sanity or None) if summary else "",
        "skipped": skipped,
        "masked": picture.mask is not None,
        "threshold": SANITY_THRESHOLD,
    }
