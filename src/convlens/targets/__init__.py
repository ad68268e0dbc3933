"""What to explain: a target turns the model's output into one score per image.

:mod:`.core` holds the contract (which output, which score, the one-logit rule) and the
class targets; :mod:`.tasks` the targets of models that are not classifiers:
:class:`Region` (segmentation), :class:`Box` (detection), :class:`Similarity` (embeddings).
"""

from .core import (
    AllClasses,
    ClassLogits,
    OutputKey,
    ScoreFn,
    TargetSpec,
    class_logits,
    class_probabilities,
    describe_outputs,
    output_parts,
    resolve_targets,
    select_output,
    target_for_rows,
)
from .tasks import Box, Region, Similarity, detections, is_dense, output_task

__all__ = [
    "AllClasses",
    "Box",
    "ClassLogits",
    "OutputKey",
    "Region",
    "ScoreFn",
    "Similarity",
    "TargetSpec",
    "class_logits",
    "class_probabilities",
    "describe_outputs",
    "detections",
    "is_dense",
    "output_parts",
    "output_task",
    "resolve_targets",
    "select_output",
    "target_for_rows",
]
