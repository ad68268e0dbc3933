"""Inside the network: intermediate activations, filter patterns, class models, DeepDream, concepts.

The flow: :mod:`activations` records layers in one truncated forward pass;
:mod:`optimize` is the one gradient-ascent loop, fed by :mod:`objectives`
(what to maximise), :mod:`params` (how the image is parameterised),
:mod:`transforms` (robustness) and :mod:`regularizers` (image priors);
:mod:`filters` and :mod:`deepdream` are the user-facing recipes on top;
:mod:`factorization` splits a layer into concepts (Deep Feature Factorization).
"""

from .activations import activations, default_layers
from .deepdream import deepdream
from .factorization import Factorization, factorize
from .filters import ClassModel, FilterPatterns, class_model, filter_patterns
from .inputs import input_normalizer
from .objectives import Objective, channel, class_logit, layer_l2
from .optimize import OPTIMIZERS, maximize
from .params import PARAMETERIZATIONS
from .regularizers import REGULARIZERS
from .transforms import CHAINS

__all__ = [
    "CHAINS",
    "OPTIMIZERS",
    "PARAMETERIZATIONS",
    "REGULARIZERS",
    "ClassModel",
    "Factorization",
    "FilterPatterns",
    "Objective",
    "activations",
    "channel",
    "class_logit",
    "class_model",
    "deepdream",
    "default_layers",
    "factorize",
    "filter_patterns",
    "input_normalizer",
    "layer_l2",
    "maximize",
]
