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

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from ..capture import LayerRef, resolve_layers
from ..errors import ConvlensError
from ..images import ImageLike, load_image
from ..models import Model, as_model
from .objectives import layer_l2
from .optimize import Progress, maximize
from .params import given_image


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def deepdream(model: Model | nn.Module, image: ImageLike, layers: Sequence[LayerRef], *, octaves: int = 4,
              octave_scale: float = 1.4, steps: int = 20, lr: float = 0.01, seed: int = 0,
              progress: Progress | None = None) -> Image.Image:
    """Return ``image`` dreamed on by ``layers`` (a PIL image of the same size)."""
    model = as_model(model)
    names = list(resolve_layers(model, list(layers)))
    if not names:
        raise ConvlensError("no layers given; name at least one layer to dream with")
    if octaves < 1 or octave_scale <= 1.0 or steps < 0:
        raise ConvlensError(f"need octaves >= 1, octave scale > 1 and steps >= 0; got {octaves}, {octave_scale}, {steps}")
    objective = layer_l2(names[0])
    for name in names[1:]:
        objective = objective + layer_l2(name)
    original = pil_to_tensor(load_image(image)).float().div(255).unsqueeze(0).to(model.device)
    height, width = original.shape[-2:]
    shapes = [(max(1, round(height / octave_scale ** i)), max(1, round(width / octave_scale ** i)))
              for i in reversed(range(octaves))]
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

        dream = maximize(model, objective, steps=steps, param=given_image(dream), optimizer="normalized", lr=lr,
                         transforms="jitter", seed=seed + octave, progress=report).images
    from ..render.grid import to_pil  # PIL at the edge; keeps matplotlib out of `import convlens`

    return to_pil(dream[0])
