"""DeepDream: amplify what chosen layers see in a given image (Mordvintsev, Olah & Tyka, 2015).

Gradient ascent on the image itself for ``sum_l mean(A_l(x)^2)`` over the
chosen layers, with the classic normalised step, a random shift every step,
and octaves: the image is processed from ``octave_scale ** (octaves - 1)``
times smaller up to full size, and at each enlargement the detail lost by
shrinking the original is added back ("detail re-injection", as in Chollet,
*Deep Learning with Python*, 2017, §8.2). Pixels stay in ``[0, 1]``.

Example::

    dream = cl.deepdream(model, cl.sample_image("chelsea"), ["layer2", "layer3"], octaves=3, steps=10)
    dream.save("dream.png")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from ..capture import LayerRef, capture, resolve_layers
from ..errors import ConvlensError
from ..images import ImageLike, load_image
from ..models import Model, as_model
from ..progress import Progress
from .inputs import input_normalizer
from .objectives import layer_l2
from .optimize import maximize
from .params import given_image
from .transforms import CHAINS

#: The random shift applied at every step; it crops a few pixels, so the size check goes through it too.
_TRANSFORMS = "jitter"
#: Largest side the size check tries when looking for the smallest one the layers accept.
_LARGEST_PROBE = 1024


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def _runs_at(model: Model, names: list[str], to_input: Callable, shape: tuple[int, int]) -> bool:
    """Whether ``names`` can be computed on an octave of ``shape`` pixels, after the per-step shift."""
    image = torch.zeros(1, 3, *shape, device=model.device)
    chain = CHAINS[_TRANSFORMS](min(shape))
    shaken = chain(image, torch.Generator().manual_seed(0)) if chain is not None else image
    if min(shaken.shape[-2:]) < 1:
        return False
    try:
        with capture(model, names, stop=True) as rec, torch.no_grad():
            rec.forward(to_input(shaken))
    except RuntimeError:  # kernel larger than the input, pooling to nothing, ...
        return False
    return True


def _too_small(
    model: Model,
    names: list[str],
    to_input: Callable,
    image_size: tuple[int, int],
    smallest: tuple[int, int],
    octaves: int,
    octave_scale: float,
) -> str:
    """The one-line error for an image whose smallest octave the layers cannot take, with the size they need."""
    height, width = image_size
    where = (
        f"the image is {width}x{height} pixels, too small for DeepDream on {', '.join(names)}: its smallest "
        f"octave ({octaves} octave{'s' if octaves > 1 else ''}, scale {octave_scale:g}) is "
        f"{smallest[1]}x{smallest[0]} pixels"
    )
    high = max(smallest)
    while not _runs_at(model, names, to_input, (high, high)):
        high *= 2
        if high > _LARGEST_PROBE:
            return f"{where}, and these layers cannot be computed even on {_LARGEST_PROBE}x{_LARGEST_PROBE}"
    low = 0  # binary search for the smallest square side that runs; larger inputs only get more capable
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if _runs_at(model, names, to_input, (middle, middle)) else (middle, high)
    # The smallest octave's side is round(side / shrink), as in deepdream(): the first side that rounds to `high`.
    shrink = octave_scale ** (octaves - 1)
    needed = max(1, math.floor((high - 0.5) * shrink))
    while round(needed / shrink) < high:
        needed += 1
    fewer = ", or fewer octaves" if octaves > 1 else ""
    return (
        f"{where}, and these layers need at least {high}x{high}; "
        f"use an image of at least {needed}x{needed} pixels{fewer}"
    )


def deepdream(
    model: Model | nn.Module,
    image: ImageLike,
    layers: Sequence[LayerRef],
    *,
    octaves: int = 4,
    octave_scale: float = 1.4,
    steps: int = 20,
    lr: float = 0.01,
    seed: int = 0,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Return ``image`` dreamed on by ``layers``: RGB ``(3, H, W)`` in ``[0, 1]`` at the image's size.

    A tensor, like every result of the core; ``convlens.render.grid.to_pil`` makes it a picture.
    """
    model = as_model(model)
    names = list(resolve_layers(model, list(layers)))
    if not names:
        raise ConvlensError("no layers given; name at least one layer to dream with")
    if octaves < 1 or octave_scale <= 1.0 or steps < 0:
        raise ConvlensError(
            f"need octaves >= 1, octave scale > 1 and steps >= 0; got {octaves}, {octave_scale}, {steps}"
        )
    objective = layer_l2(names[0])
    for name in names[1:]:
        objective = objective + layer_l2(name)
    original = pil_to_tensor(load_image(image)).float().div(255).unsqueeze(0).to(model.device)
    height, width = original.shape[-2:]
    shapes = [
        (max(1, round(height / octave_scale**i)), max(1, round(width / octave_scale**i)))
        for i in reversed(range(octaves))
    ]
    # Checked before any step: otherwise the first octave fails deep in the loop with the size of
    # an already-cropped image (down to "0x0") and no hint of what size would do.
    to_input = input_normalizer(model)
    if not _runs_at(model, names, to_input, shapes[0]):
        raise ConvlensError(_too_small(model, names, to_input, (height, width), shapes[0], octaves, octave_scale))
    dream = _resize(original, shapes[0])
    previous = shapes[0]
    for octave, shape in enumerate(shapes):
        if octave:
            # Shrinking lost detail; put back the difference between the original at this size and
            # the shrunk original enlarged, so the dream keeps the photograph's sharpness.
            detail = _resize(original, shape) - _resize(_resize(original, previous), shape)
            dream = (_resize(dream, shape) + detail).clamp(0, 1)
            previous = shape

        def report(step: int, total: int, done: int = octave * steps) -> None:
            if progress is not None:
                progress(done + step, octaves * steps)

        dream = maximize(
            model,
            objective,
            steps=steps,
            param=given_image(dream),
            optimizer="normalized",
            lr=lr,
            transforms="jitter",
            seed=seed + octave,
            progress=report,
        ).images
    return dream[0]
