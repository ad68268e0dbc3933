"""Transformation robustness: random jitter, scale, rotation and padding, applied at every step.

Each transform is a plain differentiable function ``(images (N, C, H, W), generator) -> images``;
randomness comes only from the ``torch.Generator`` the optimiser passes, so a seed
reproduces a run. All images of a batch share one draw (one kernel launch per step).
Olah et al., "Feature Visualization" (Distill, 2017), §"Transformation robustness",
show that such jitter, scale and rotation suppress high-frequency patterns.
The chain changes the image size; for a model that takes one input size only,
:func:`fit` (appended by the optimiser) crops or pads the result back to it.

Example::

    augment = compose([pad(8), jitter(8), random_scale((0.9, 1.1)), random_rotate(10), jitter(4)])
    augment(images, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _integer(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(0, high + 1, (), generator=generator).item())


def pad(width: int, value: float = 0.5) -> Transform:
    """Pad every side by ``width`` pixels of constant ``value`` (gray), so borders can move inside."""

    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.pad(images, (width,) * 4, mode="constant", value=value)

    return apply


def jitter(distance: int) -> Transform:
    """Crop ``distance`` pixels in total from each axis at a random offset (a random shift)."""

    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dy, dx = _integer(generator, distance), _integer(generator, distance)
        height, width = images.shape[-2:]
        return images[..., dy : height - distance + dy, dx : width - distance + dx]

    return apply


def random_scale(scales: tuple[float, float] = (0.9, 1.1)) -> Transform:
    """Resize by a factor drawn uniformly from ``scales`` (bilinear)."""

    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        factor = _uniform(generator, *scales)
        height, width = images.shape[-2:]
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    return apply


def random_rotate(degrees: float = 10.0) -> Transform:
    """Rotate about the centre by an angle drawn uniformly from ``[-degrees, degrees]`` (bilinear, border kept)."""

    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        angle = math.radians(_uniform(generator, -degrees, degrees))
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype, device=images.device)
        grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return apply


def fit(size: Sequence[int], value: float = 0.5) -> Transform:
    """Centre-crop or pad (constant ``value``, gray) to exactly ``size`` ``(H, W)``.

    Ends the chain for models that take one input size only (a Keras model's
    declared input, a ``Flatten`` before a dense head): the random shifts stay,
    the canvas size does not change.
    """
    height, width = size

    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dy, dx = height - images.shape[-2], width - images.shape[-1]
        top, left = int(dy / 2), int(dx / 2)  # towards zero: the odd pixel is padded or cropped at the bottom/right
        # F.pad crops where a width is negative
        return F.pad(images, (left, dx - left, top, dy - top), mode="constant", value=value)

    return apply


def compose(transforms: Sequence[Transform]) -> Transform:
    """Apply ``transforms`` in order with the same generator."""

    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for transform in transforms:
            images = transform(images, generator)
        return images

    return apply


def standard(size: int) -> Transform:
    """The default chain, scaled to the image size: pad, jitter, scale +-10 %, rotate +-10 deg, jitter.

    Lucid's defaults use 12/8/4 pixels at 128-224 px; here the distances are a
    fixed fraction of ``size`` so small images are not shaken off the canvas.
    """
    step = max(1, round(size / 32))
    return compose([pad(2 * step), jitter(2 * step), random_scale((0.9, 1.1)), random_rotate(10.0), jitter(step)])


#: Transform chains by name, for the CLI and ``transforms=`` arguments: ``fn(size) -> Transform``.
CHAINS: dict[str, Callable[[int], Transform | None]] = {
    "standard": standard,
    "jitter": lambda size: compose([jitter(max(1, round(size / 16)))]),
    "none": lambda size: None,
}
