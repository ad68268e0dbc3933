"""Where the model looked: CAM-family and gradient heatmaps through one engine.

``explain(model, inputs, method=..., layer="auto", target=None)`` returns an
:class:`Explanation`; ``explain_many(model, images, methods, batch_size=8)`` runs
several methods over many images and returns :class:`BatchedExplanations`;
:data:`METHODS` lists every method by name. The contract
(resolution, sign, normalisation, dtype) is in :mod:`convlens.heatmaps.engine`.
"""

from ..targets import ClassLogits, resolve_targets
from .base import Method
from .batched import BatchedExplanations, explain_many
from .engine import Explanation, Plan, check_request, explain
from .registry import METHODS, get_method, style_for

__all__ = [
    "METHODS",
    "BatchedExplanations",
    "ClassLogits",
    "Explanation",
    "Method",
    "Plan",
    "check_request",
    "explain",
    "explain_many",
    "get_method",
    "resolve_targets",
    "style_for",
]
