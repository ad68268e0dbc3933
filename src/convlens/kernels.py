"""The one Gaussian kernel, and the separable blur built on it.

Used by the deletion/insertion ``"blur"`` baseline (:mod:`convlens.metrics.faithfulness`),
the blur regulariser of filter patterns (:mod:`convlens.inside.regularizers`) and
SSIM's window (:mod:`convlens.metrics.sanity`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel(
    sigma: float, radius: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """``exp(-d^2 / 2 sigma^2)`` for ``d = -radius..radius``, summing to 1, ``(2 * radius + 1,)``."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (weights / weights.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int, padding: str = "replicate") -> torch.Tensor:
    """Blur each channel of ``(N, C, H, W)`` with a separable Gaussian; borders ``padding`` (F.pad's mode)."""
    kernel = gaussian_kernel(sigma, radius, dtype=x.dtype, device=x.device)
    channels, size = x.shape[1], kernel.numel()
    padded = F.pad(x, (radius, radius, radius, radius), mode=padding)
    rows = F.conv2d(padded, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
