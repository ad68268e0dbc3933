"""Where the model looked: CAM-family and gradient heatmaps through one engine.

``explain(model, inputs, method=..., layer="auto", target=None)`` returns an
:class:`Explanation`; :data:`METHODS` lists every method by name. The contract
(resolution, sign, normalisation, dtype) is in :mod:`convlens.heatmaps.engine`.
"""

from . import cam, gradients, perturbation  # noqa: F401  (each module registers its methods)
from .engine import METHODS, Explanation, Method, check_request, explain, get_method
from ..targets import ClassLogits, resolve_targets

__all__ = ["METHODS", "ClassLogits", "Explanation", "Method", "check_request", "explain", "get_method", "resolve_targets"]
