"""Intermediate activations: every channel of the chosen layers from one forward pass.

Only the requested layers' outputs are kept (detached copies), and the pass
ends after the last of them (``capture(..., stop=True)``), so asking for the
first block of a VGG never runs its classifier.

Example::

    model = cl.load_model("vgg16", weights="none")
    maps = cl.activations(model, cl.sample_image("chelsea"), ["features.0", "features.4"])
    maps["features.4"].shape        # (1, 64, 112, 112)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..capture import LayerRef, capture, resolve_layers
from ..errors import ConvlensError
from ..images import ImageLike
from ..models import Model, as_model, summarize
from .inputs import run_failure


def _is_conv_or_pool(type_name: str) -> bool:
    lowered = type_name.lower()
    return ("conv" in lowered or "pool" in lowered) and not lowered.startswith("adaptive")


def default_layers(model: Model, input_size: tuple[int, int] | None = None) -> list[str]:
    """Every convolution and pooling layer, in forward order, up to the ``auto`` (last spatial) layer."""
    summary = summarize(model, input_size)
    types = {row.name: row.type for row in summary.rows}
    spatial = summary.spatial_layers
    last = spatial.index(summary.auto_layer)
    chosen = [name for name in spatial[: last + 1] if _is_conv_or_pool(types[name])]
    if not chosen:
        raise ConvlensError(
            f"{model.name} has no convolution or pooling layer with a spatial output; name the layers with --layers"
        )
    return chosen


def activations(
    model: Model | nn.Module,
    image_or_batch: ImageLike | Sequence[ImageLike] | torch.Tensor,
    layers: Sequence[LayerRef] | None = None,
) -> dict[str, torch.Tensor]:
    """Return ``{layer name: (N, C, H, W) output}`` for each requested layer, from one forward pass.

    Args:
        model: a :class:`convlens.Model` or an ``nn.Module``.
        image_or_batch: image(s) (paths, PIL, arrays), preprocessed with the model's
            transform, or a preprocessed tensor batch in the model's layout.
        layers: names or modules; default :func:`default_layers`.

    Outputs are channels-first whatever the framework, detached, on the model's device.
    """
    model = as_model(model)
    x, _ = model.as_batch(image_or_batch)
    names = list(resolve_layers(model, list(layers))) if layers is not None else default_layers(model)
    if not names:
        raise ConvlensError("no layers given; name at least one layer or leave the choice to the default")
    with capture(model, names, stop=True) as rec, torch.no_grad():
        try:
            rec.forward(x)
        except (RuntimeError, AssertionError) as err:  # timm asserts a ViT's input size
            raise run_failure(err, tuple(x.shape[-2:])) from None
    return rec.spatial_outputs(names)
