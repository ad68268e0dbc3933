"""convlens: see what a convolutional network has learned and why it decides what it decides.

    import convlens as cl
    model = cl.load_model("resnet50")
    x = model.preprocess(["cat.jpg"])
    print(model.predict(x, top_k=3))
    heatmaps = cl.explain(model, x, method="gradcam")   # .maps (N, H, W) in [0, 1], .overlay(images)

The public names load on first use (PEP 562): ``import convlens`` alone does not
import torch, so ``convlens --help`` answers at once; ``cl.explain`` imports
:mod:`convlens.heatmaps` (and torch) the first time it is looked up.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "borrow": "capture",
    "capture": "capture",
    "ConvlensError": "errors",
    "METHODS": "heatmaps",
    "BatchedExplanations": "heatmaps",
    "Explanation": "heatmaps",
    "explain": "heatmaps",
    "explain_many": "heatmaps",
    "load_image": "images",
    "load_images": "images",
    "sample_image": "images",
    "activations": "inside",
    "class_model": "inside",
    "deepdream": "inside",
    "factorize": "inside",
    "filter_patterns": "inside",
    "Model": "models",
    "auto_layer": "models",
    "load_model": "models",
    "summarize": "models",
    "dissect": "atlas",
    "scan": "atlas",
    "tcav": "concepts",
    "serve": "serve",
}
#: Subpackages reachable as attributes (``convlens.metrics.deletion``) without an explicit import.
_SUBMODULES = (
    "atlas",
    "concepts",
    "data",
    "errors",
    "evaluation",
    "fileio",
    "heatmaps",
    "images",
    "inside",
    "kernels",
    "metrics",
    "models",
    "render",
    "report",
    "scoring",
    "targets",
    "train",
)

__all__ = [
    "METHODS",
    "BatchedExplanations",
    "ConvlensError",
    "Explanation",
    "Model",
    "activations",
    "auto_layer",
    "borrow",
    "capture",
    "class_model",
    "deepdream",
    "dissect",
    "explain",
    "explain_many",
    "factorize",
    "filter_patterns",
    "load_image",
    "load_images",
    "load_model",
    "metrics",
    "sample_image",
    "scan",
    "serve",
    "summarize",
    "tcav",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # looked up once; later accesses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


#: Names that are both a submodule and the function it defines (``convlens.serve`` is ``cl.serve``).
_FUNCTION_MODULES = ("capture", "serve")


class _Package(types.ModuleType):
    """The ``convlens`` module, keeping ``convlens.capture`` and ``convlens.serve`` the functions users call.

    ``capture`` names both a submodule and the context manager it defines (``serve``
    a subpackage and its function). The import system binds a submodule on its
    package when it first loads it, so with lazy imports ``convlens.capture`` would
    become the module as soon as any other part of convlens imported it; the
    function is kept instead, as the eager ``from .capture import capture`` did before.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _FUNCTION_MODULES and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
