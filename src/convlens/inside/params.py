"""Image parameterisations: what the optimiser actually changes, as factories.

Each factory returns an :class:`ImageParam`: leaf tensors to optimise and a
``render()`` giving the RGB batch ``(N, 3, H, W)`` in ``[0, 1]``.

* ``pixel``: one free value per pixel and channel, squashed by a sigmoid,
  starting as gray with small Gaussian noise (the classic setting of Erhan et
  al., 2009 and Simonyan et al., 2013, arXiv:1312.6034).
* ``fourier``: the image's 2-D Fourier coefficients, scaled by ``1 / f``
  so that every frequency has about the same energy, with decorrelated
  colour: the three channels are mixed by the square root of ImageNet's colour
  covariance before the sigmoid (Olah, Mordvintsev & Schubert, "Feature
  Visualization", Distill 2017, §"Preconditioning and parameterization").
  This is the default: it gives smooth, colourful patterns within ~100 steps.
* :func:`given_image`: a fixed starting image in pixel space, clipped to
  ``[0, 1]`` after every step (DeepDream).

Example::

    image = PARAMETERIZATIONS["fourier"](4, 64, generator=torch.Generator().manual_seed(0))
    image.render().shape        # (4, 3, 64, 64)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Square root of ImageNet's RGB covariance (its SVD), as used by Olah et al. (2017);
#: columns are scaled so the largest has unit norm.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_MIX = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


@dataclass
class ImageParam:
    tensors: list[torch.Tensor]
    render: Callable[[], torch.Tensor]
    after_step: Callable[[], None] | None = None


def _decorrelated(image: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ck,nkhw->nchw", COLOR_MIX.to(image), image)


def pixel_image(
    batch: int, size: int | tuple[int, int], *, generator: torch.Generator, device=None, sd: float = 0.04
) -> ImageParam:
    """Gray plus ``N(0, sd)`` noise in sigmoid space; ``sd = 0.04`` is +-1 % around mid-gray."""
    height, width = (size, size) if isinstance(size, int) else size
    values = (torch.randn(batch, 3, height, width, generator=generator) * sd).to(device).requires_grad_()
    return ImageParam([values], lambda: torch.sigmoid(values))


def fourier_image(
    batch: int,
    size: int | tuple[int, int],
    *,
    generator: torch.Generator,
    device=None,
    sd: float = 0.01,
    decay_power: float = 1.0,
) -> ImageParam:
    """Fourier coefficients scaled by ``1 / max(f, 1/size) ** decay_power``, decorrelated colour, sigmoid."""
    height, width = (size, size) if isinstance(size, int) else size
    freq_y = torch.fft.fftfreq(height).view(-1, 1)
    freq_x = torch.fft.rfftfreq(width).view(1, -1)
    frequency = (freq_y**2 + freq_x**2).sqrt()
    scale = (1.0 / frequency.clamp(min=1.0 / max(height, width)) ** decay_power).to(device)
    spectrum = (torch.randn(batch, 3, height, width // 2 + 1, 2, generator=generator) * sd).to(device)
    spectrum.requires_grad_()

    def render() -> torch.Tensor:
        coefficients = torch.view_as_complex(spectrum) * scale
        image = torch.fft.irfft2(coefficients, s=(height, width), norm="ortho") / 4.0
        return torch.sigmoid(_decorrelated(image))

    return ImageParam([spectrum], render)


def given_image(images: torch.Tensor) -> ImageParam:
    """Start from ``images`` (N, 3, H, W) in ``[0, 1]`` and optimise the pixels directly, clipped after each step."""
    values = images.detach().clone().requires_grad_()

    def clip() -> None:
        with torch.no_grad():
            values.clamp_(0.0, 1.0)

    return ImageParam([values], lambda: values, after_step=clip)


#: Parameterisations by name: ``fn(batch, size, *, generator, device) -> ImageParam``.
PARAMETERIZATIONS: dict[str, Callable[..., ImageParam]] = {"fourier": fourier_image, "pixel": pixel_image}
