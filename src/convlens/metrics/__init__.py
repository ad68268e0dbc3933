"""Are the heatmaps right? Faithfulness, localisation and sanity-check metrics.

Every metric takes ``(model, x, maps, targets)`` (localisation metrics also the
ground-truth ``masks``) and returns one value per image; none needs the heatmap
engine, so any method's maps can be scored. :data:`METRICS` lists them by the
names ``convlens evaluate --metrics`` accepts.

    from convlens.metrics import METRICS, deletion, pointing_game
    curve = deletion(model, x, maps)              # Curve: .fractions, .scores, .auc
    hits = pointing_game(maps, masks, tolerance=0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import ExplainFn, heatmap_explainer, normalize_maps
from .faithfulness import (
    BASELINES,
    Curve,
    average_drop,
    confidence_change,
    deletion,
    gaussian_blur,
    increase_in_confidence,
    insertion,
)
from .localization import boxes_to_masks, energy_pointing_game, iou, pointing_game, region_boxes, scaled_tolerance
from .road import linear_imputation, road, road_gap, road_score
from .sanity import Randomization, data_randomization, parameter_randomization, spearman, ssim
from .stats import MeanCI, mean_ci


@dataclass(frozen=True)
class Metric:
    """A metric as ``convlens evaluate`` runs it.

    ``compute(model, x, maps, targets, masks, batch_size)`` returns a per-image
    tensor ``(N,)`` or a :class:`Curve` (whose ``.auc`` is the value).
    ``higher_is_better`` is the metric's direction; ``needs_masks``: it scores
    localisation against ground-truth masks (otherwise faithfulness to the model);
    ``label``: its name for a person, in a table header (the report's).
    """

    compute: Callable
    higher_is_better: bool
    needs_masks: bool
    paper: str
    label: str = ""


def _faithfulness(fn: Callable, **options) -> Callable:
    return lambda model, x, maps, targets, masks, batch_size: fn(
        model, x, maps, targets, batch_size=batch_size, **options
    )


def _localization(fn: Callable, **options) -> Callable:
    return lambda model, x, maps, targets, masks, batch_size: fn(maps, masks, **options)


METRICS: dict[str, Metric] = {
    "deletion": Metric(_faithfulness(deletion), False, False, "Petsiuk et al. 2018, arXiv:1806.07421", "Deletion AUC"),
    "insertion": Metric(
        _faithfulness(insertion), True, False, "Petsiuk et al. 2018, arXiv:1806.07421", "Insertion AUC"
    ),
    "drop": Metric(
        _faithfulness(average_drop), False, False, "Chattopadhay et al. 2018, arXiv:1710.11063", "Average drop %"
    ),
    "increase": Metric(
        _faithfulness(increase_in_confidence),
        True,
        False,
        "Chattopadhay et al. 2018, arXiv:1710.11063",
        "Confidence increase %",
    ),
    "road_morf": Metric(
        _faithfulness(road_score, order="morf"),
        False,
        False,
        "Rong et al. 2022, arXiv:2202.00449",
        "ROAD, most relevant first",
    ),
    "road_lerf": Metric(
        _faithfulness(road_score, order="lerf"),
        True,
        False,
        "Rong et al. 2022, arXiv:2202.00449",
        "ROAD, least relevant first",
    ),
    "road": Metric(_faithfulness(road_gap), True, False, "Rong et al. 2022, arXiv:2202.00449", "ROAD gap"),
    "pointing": Metric(
        _localization(pointing_game), True, True, "Zhang et al. 2016, arXiv:1608.00507", "Pointing game, 15 px"
    ),
    "pointing_strict": Metric(
        _localization(pointing_game, tolerance=0),
        True,
        True,
        "Zhang et al. 2016, arXiv:1608.00507 (no tolerance)",
        "Pointing game, exact",
    ),
    "pointing_scaled": Metric(
        lambda model, x, maps, targets, masks, batch_size: pointing_game(maps, masks, tolerance=scaled_tolerance(maps)),
        True,
        True,
        "Zhang et al. 2016, arXiv:1608.00507 (15 px per 224 px of input)",
        "Pointing game, scaled",
    ),
    "pointing_box": Metric(
        lambda model, x, maps, targets, masks, batch_size: pointing_game(maps, region_boxes(masks), tolerance=0),
        True,
        True,
        "Zhang et al. 2016, arXiv:1608.00507 (boxes of the mask's regions, no tolerance)",
        "Pointing game, boxes",
    ),
    "energy_pointing": Metric(
        _localization(energy_pointing_game),
        True,
        True,
        "Wang et al. 2020, arXiv:1910.01279",
        "Energy inside the object",
    ),
    "iou": Metric(
        _localization(iou), True, True, "IoU of the map thresholded at 0.5 with the mask", "IoU with the object"
    ),
}


__all__ = [
    "BASELINES",
    "METRICS",
    "Curve",
    "ExplainFn",
    "MeanCI",
    "Metric",
    "Randomization",
    "average_drop",
    "boxes_to_masks",
    "confidence_change",
    "data_randomization",
    "deletion",
    "energy_pointing_game",
    "gaussian_blur",
    "heatmap_explainer",
    "increase_in_confidence",
    "insertion",
    "iou",
    "linear_imputation",
    "mean_ci",
    "normalize_maps",
    "parameter_randomization",
    "pointing_game",
    "region_boxes",
    "road",
    "road_gap",
    "road_score",
    "scaled_tolerance",
    "spearman",
    "ssim",
]
