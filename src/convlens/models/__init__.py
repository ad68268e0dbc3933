"""Loading networks and describing them: `load_model`, `Model`, `summarize`."""

from .loading import ARCHITECTURES, as_model, load_model, torchvision_names
from .model import Model, Prediction
from .summary import Summary, auto_layer, summarize, survey

__all__ = [
    "ARCHITECTURES",
    "Model",
    "Prediction",
    "Summary",
    "as_model",
    "auto_layer",
    "load_model",
    "summarize",
    "survey",
    "torchvision_names",
]
