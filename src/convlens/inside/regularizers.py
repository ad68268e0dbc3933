"""Image priors for activation maximisation, each a penalty ``(N, 3, H, W) -> (N,)`` to subtract, weighted.

* ``lp``: the Lp norm of the image centred on gray, ``(mean |x - 0.5|^p)^(1/p)``
  (Simonyan et al., 2013, arXiv:1312.6034 use L2; Mahendran & Vedaldi, 2015,
  arXiv:1412.0035 use higher p to stop single pixels saturating). p = 6 here.
* ``tv``: total variation, the mean absolute difference between neighbouring
  pixels (Mahendran & Vedaldi, 2015, eq. 5 with beta = 1).
* ``blur``: the squared distance to a Gaussian-blurred copy of the image
  (the blur is not differentiated through), a smooth form of Yosinski et
  al.'s (2015, arXiv:1506.06579) "blur every few steps" and of weight decay.

Example::

    penalty = REGULARIZERS["tv"](images)          # (N,)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import gaussian_blur

Regularizer = Callable[[torch.Tensor], torch.Tensor]


def lp_norm(images: torch.Tensor, p: float = 6.0) -> torch.Tensor:
    return (images - 0.5).abs().pow(p).flatten(1).mean(1).pow(1.0 / p)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    return dx + dy


def blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur, separable, reflect padding; ``(N, C, H, W)`` -> same shape."""
    return gaussian_blur(images, sigma, max(1, int(round(2 * sigma))), padding="reflect")


def blur_penalty(images: torch.Tensor) -> torch.Tensor:
    return (images - blur(images).detach()).pow(2).flatten(1).mean(1)


#: Regularisers by name; pass ``regularizers={"tv": 0.05, "lp": 0.1}`` to weight them.
REGULARIZERS: dict[str, Regularizer] = {"lp": lp_norm, "tv": total_variation, "blur": blur_penalty}
