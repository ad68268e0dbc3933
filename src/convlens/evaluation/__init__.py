"""``convlens evaluate``: every heatmap method on every image of a folder, scored by :mod:`convlens.metrics`.

The run itself lives here: discovering images and their masks, the journal that
lets a run resume (and refuses to resume another run), the results CSV and the
summary tables and plots. :mod:`convlens.metrics` keeps only functions of tensors.

    from convlens.evaluation import evaluate
    result = evaluate("shapes", "data/val", methods=["gradcam", "scorecam"], out_dir="eval")
"""

from .runner import EXPLAINERS, Evaluation, evaluate, evaluate_images, find_mask, list_images, resolve_methods
from .summary import best_methods, summary_table

__all__ = [
    "EXPLAINERS",
    "Evaluation",
    "best_methods",
    "evaluate",
    "evaluate_images",
    "find_mask",
    "list_images",
    "resolve_methods",
    "summary_table",
]
