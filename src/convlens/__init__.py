"""convlens: see what a convolutional network has learned and why it decides what it decides.

    import convlens as cl
    model = cl.load_model("resnet50")
    x = model.preprocess(["cat.jpg"])
    print(model.predict(x, top_k=3))
    heatmaps = cl.explain(model, x, method="gradcam")   # .maps (N, H, W) in [0, 1], .overlay(images)
"""

from .capture import borrow, capture
from .errors import ConvlensError
from .heatmaps import METHODS, Explanation, explain
from .images import load_image, load_images, sample_image
from .inside import activations, class_model, deepdream, filter_patterns
from .models import Model, auto_layer, load_model, summarize
from . import metrics  # noqa: E402  (convlens.metrics: faithfulness, localisation, sanity checks)
from .atlas import dissect, scan  # noqa: E402  (convlens.atlas: whole datasets)

__version__ = "0.1.0"

__all__ = ["METHODS", "ConvlensError", "Explanation", "Model", "activations", "auto_layer", "borrow", "capture",
           "class_model", "deepdream", "explain", "filter_patterns", "load_image", "load_images", "load_model",
           "sample_image", "summarize"]
