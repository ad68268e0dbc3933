"""Filter patterns and class models: the input each unit likes best (activation maximisation).

Filter patterns (Erhan et al., "Visualizing Higher-Layer Features of a Deep
Network", 2009; Olah et al., "Feature Visualization", Distill 2017) maximise
the spatial mean of one channel of a layer, ``mean_{h,w} A_c(x)[h, w]``,
over the image ``x``. All requested filters are optimised together as one
batch (image ``i`` maximises filter ``filters[i]``) and the forward pass stops
after the target layer, so a grid of 64 filters costs one truncated pass per step.

Class models (Simonyan, Vedaldi & Zisserman, 2013, arXiv:1312.6034, §2)
maximise a class's pre-activation logit ``S_c(x)``: a final softmax/sigmoid
(torch module or Keras activation) is skipped automatically, since a
saturated probability has vanishing gradients. The paper's L2 penalty is
available as ``regularizers={"lp": w}`` (with p = 6, see regularizers.py).

Example::

    model = cl.load_model("resnet18", weights="none")
    patterns = cl.filter_patterns(model, "layer2", filters=range(8), size=64, steps=32)
    patterns.images.shape, patterns.activations.shape     # (8, 3, 64, 64), (8,)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import LayerRef, capture, resolve_layers
from ..errors import ConvlensError
from ..models import Model, as_model
from ..progress import Progress
from .inputs import fixed_input_size, input_normalizer, run_failure
from .objectives import channel, class_logit
from .optimize import check_settings, maximize
from .transforms import Transform


@dataclass
class FilterPatterns:
    images: torch.Tensor  # (N, 3, H, W) RGB in [0, 1]
    activations: torch.Tensor  # (N,) final mean activation of each filter on its image
    filters: list[int]
    layer: str
    initial_activations: torch.Tensor  # (N,) the same on the starting noise


@dataclass
class ClassModel:
    images: torch.Tensor  # (N, 3, H, W) RGB in [0, 1]
    logits: torch.Tensor  # (N,) final pre-activation logit of each class on its image
    classes: list[int]
    initial_logits: torch.Tensor  # (N,)


def _probe(model: Model, layer: str | None, size: tuple[int, int]) -> torch.Tensor:
    """One gray image through the model (to ``layer``, or to the logits): its output, or a clear error."""
    gray = torch.full((1, 3, *size), 0.5, device=model.device)
    rewrite = model.logit_rewrites() if layer is None else None
    with capture(model, [layer] if layer else [], stop=layer is not None, rewrite=rewrite) as rec, torch.no_grad():
        try:
            output = rec.forward(input_normalizer(model)(gray))
        except ConvlensError:
            raise
        except (RuntimeError, ValueError, AssertionError) as err:  # Keras: ValueError; timm's ViT: AssertionError
            raise run_failure(err, size, fixed_input_size(model)) from None
    if layer is None:
        return model.scores(output)
    return rec.output(layer)


def _image_size(model: Model, size: int | Sequence[int] | None, default: int) -> tuple[int, int]:
    """``(H, W)`` to optimise at: the size asked for, else the model's when it takes one size only, else ``default``."""
    if size is None:
        size = fixed_input_size(model) or default
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _indices(requested: Iterable[int] | None, count: int, what: str, where: str, default: int) -> list[int]:
    indices = list(range(min(default, count))) if requested is None else [int(i) for i in requested]
    if not indices:
        raise ConvlensError(f"no {what}s given; pass at least one {what} index")
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise ConvlensError(f"{what} index {bad[0]} is out of range: {where} has {count} {what}s (0-{count - 1})")
    return indices


def filter_patterns(
    model: Model | nn.Module,
    layer: LayerRef,
    filters: Iterable[int] | None = None,
    *,
    max_filters: int = 64,
    size: int | Sequence[int] | None = None,
    steps: int = 128,
    seed: int = 0,
    param: str = "fourier",
    optimizer: str = "adam",
    lr: float | None = None,
    transforms: str | Transform | None = "standard",
    regularizers: Mapping[str, float] | None = None,
    progress: Progress | None = None,
) -> FilterPatterns:
    """Optimise one image per filter of ``layer`` (default: the first 64), all in one batch.

    Args:
        model: a :class:`convlens.Model` or an ``nn.Module`` (ImageNet preprocessing assumed).
        layer: the layer's name or module; its output must have channels in dimension 1.
        filters: channel indices (default: the first ``max_filters``, fewer if the layer is narrower).
        size: side of the square images, or ``(H, W)``, optimised at this size (never resampled);
            default: the model's input size when it takes one size only (a Keras model), else 128.
        steps, seed, param, optimizer, lr, transforms, regularizers, progress: see
            :func:`convlens.inside.optimize.maximize`.
    """
    model = as_model(model)
    check_settings(optimizer, param, transforms, regularizers, steps, size)
    size = _image_size(model, size, 128)
    name = next(iter(resolve_layers(model, [layer])))
    output = _probe(model, name, size)
    if output.ndim < 2:
        raise ConvlensError(
            f"layer {name!r} has no channels (output shape {tuple(output.shape)}); choose another layer"
        )
    chosen = _indices(filters, output.shape[1], "filter", f"layer {name!r}", max_filters)
    objective = channel(name, torch.tensor(chosen, device=model.device))
    result = maximize(
        model,
        objective,
        batch=len(chosen),
        size=size,
        steps=steps,
        param=param,
        optimizer=optimizer,
        lr=lr,
        transforms=transforms,
        regularizers=regularizers,
        seed=seed,
        progress=progress,
    )
    return FilterPatterns(result.images, result.scores, chosen, name, result.initial_scores)


def class_model(
    model: Model | nn.Module,
    class_index: int | Iterable[int],
    *,
    size: int | Sequence[int] | None = None,
    steps: int = 128,
    seed: int = 0,
    param: str = "fourier",
    optimizer: str = "adam",
    lr: float | None = None,
    transforms: str | Transform | None = "standard",
    regularizers: Mapping[str, float] | None = None,
    progress: Progress | None = None,
) -> ClassModel:
    """Optimise one image per class to maximise its pre-activation logit (default size: the model's input)."""
    model = as_model(model)
    check_settings(optimizer, param, transforms, regularizers, steps, size)
    size = _image_size(model, size, model.input_size[0])
    logits = _probe(model, None, size).flatten(1)
    requested = [class_index] if isinstance(class_index, int) else class_index
    classes = _indices(requested, logits.shape[1], "class", model.name, 1)
    objective = class_logit(torch.tensor(classes, device=model.device))
    result = maximize(
        model,
        objective,
        batch=len(classes),
        size=size,
        steps=steps,
        param=param,
        optimizer=optimizer,
        lr=lr,
        transforms=transforms,
        regularizers=regularizers,
        seed=seed,
        progress=progress,
    )
    return ClassModel(result.images, result.scores, classes, result.initial_scores)
