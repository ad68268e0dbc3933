"""Does the model's score follow the heatmap? Deletion, insertion, Average Drop, Increase in Confidence.

Deletion and insertion (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling
for Explanation of Black-box Models", BMVC 2018, arXiv:1806.07421). Pixels are
ranked by the heatmap, most important first (ties in raster order). For
``k = 0 .. S`` with ``S = ceil(H*W / step)``, the first ``min(k*step, H*W)``
pixels (all channels) are

* *deletion*: replaced by the baseline in the image (the score should fall fast:
  lower area is better; the paper's baseline is zeros);
* *insertion*: copied from the image into the baseline (the score should rise
  fast: higher area is better; the paper's baseline is a blurred image).

The curve is the target-class probability at each ``k`` against the fraction
of pixels changed ``min(k*step, H*W) / (H*W)``; its area is the trapezoid rule
over that fraction. When ``step`` divides ``H*W`` this is exactly RISE's
``(sum(s) - s_0/2 - s_S/2) / S``; otherwise the last, shorter step is weighted
by its true width (RISE spaces all points evenly). The ``S + 1`` perturbed
images are built lazily and scored ``batch_size`` at a time, so a curve costs
``ceil((S + 1) / batch_size)`` batched forward passes.

Baselines: ``"zeros"`` (0 in the model's input space, i.e. the normalisation mean
for ImageNet-normalised models), ``"mean"`` (each image's mean colour),
``"blur"`` (Gaussian blur, 11x11 kernel, sigma 5, as in RISE's code; borders are
replicated where RISE pads with zeros), or a tensor broadcastable to the
channels-first batch.

Average Drop % and Increase in Confidence % (Chattopadhay, Sarkar, Howlader &
Balasubramanian, "Grad-CAM++", WACV 2018, arXiv:1710.11063; the protocol of
Wang et al., "Score-CAM", CVPRW 2020, arXiv:1910.01279): with ``Y`` the score of
the image and ``O`` the score of the image multiplied by its min-max normalised
heatmap (in the model's input space, as pytorch-grad-cam does),
``drop = 100 * max(0, Y - O) / Y`` and ``increase = 100 * [O > Y]`` per image;
their means over a data set are the papers' figures.

Example::

    curve = deletion(model, x, maps, targets=[281], step=224)
    print(curve.auc)                      # (N,) area under the curve
    print(average_drop(model, x, maps))   # (N,) percent
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels
from ..errors import ConvlensError
from .base import Prepared, Score, Targets, normalize_maps, prepare, score_inputs, trapezoid_auc

BASELINES = ("zeros", "blur", "mean")


@dataclass
class Curve:
    """A perturbation curve per image: ``scores (N, S)`` at ``fractions (S,)`` of pixels changed."""

    fractions: torch.Tensor
    scores: torch.Tensor

    @property
    def auc(self) -> torch.Tensor:
        """Area under each curve by the trapezoid rule over the fraction of pixels, ``(N,)``."""
        return trapezoid_auc(self.fractions, self.scores)


def gaussian_blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Blur each channel of ``(N, C, H, W)`` with a normalised ``size``-tap Gaussian; borders replicated."""
    return kernels.gaussian_blur(x, sigma, size // 2, padding="replicate")


def make_baseline(x: torch.Tensor, baseline: str | torch.Tensor) -> torch.Tensor:
    """The substrate pixels are replaced with (deletion) or revealed on (insertion), ``(N, C, H, W)``."""
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(x), x.shape)
        except RuntimeError:
            raise ConvlensError(
                f"a baseline of shape {tuple(baseline.shape)} does not fit inputs of shape "
                f"{tuple(x.shape)} (channels-first)"
            ) from None
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if baseline == "blur":
        return gaussian_blur(x)
    raise ConvlensError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)} or pass a tensor")


def importance_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Each pixel's rank, 0 = most important, ``(N, H*W)``; ties keep raster order."""
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def _perturbation_curve(
    prepared: Prepared, baseline, step: int | None, batch_size: int, score: Score, reveal: bool
) -> Curve:
    x, maps, targets = prepared.x, prepared.maps, prepared.targets
    n, _, height, width = x.shape
    pixels = height * width
    step = math.ceil(pixels / 224) if step is None else int(step)
    if step < 1:
        raise ConvlensError(f"step must be at least 1 pixel, got {step}")
    steps = math.ceil(pixels / step)
    points = steps + 1
    substrate = make_baseline(x, baseline)
    start_from, change_to = (substrate, x) if reveal else (x, substrate)
    ranks = importance_ranks(maps.to(x.device))
    changed = (torch.arange(points, device=x.device) * step).clamp(max=pixels)

    def make_inputs(start: int, stop: int) -> torch.Tensor:
        flat = torch.arange(start, stop, device=x.device)
        image, k = flat // points, flat % points
        mask = (ranks[image] < changed[k].unsqueeze(1)).view(-1, 1, height, width)
        return torch.where(mask, change_to[image], start_from[image])

    per_input_targets = targets.repeat_interleave(points)
    scores = score_inputs(
        prepared.model, make_inputs, n * points, per_input_targets, batch_size=batch_size, score=score
    )
    return Curve(changed.float() / pixels, scores.view(n, points))


def deletion(
    model,
    x: torch.Tensor,
    maps,
    targets: Targets = None,
    *,
    step: int | None = None,
    baseline: str | torch.Tensor = "zeros",
    batch_size: int = 64,
    score: Score = "probability",
) -> Curve:
    """Deletion curve (RISE, Petsiuk et al. 2018): most important pixels replaced by ``baseline`` first.

    Args:
        step: pixels changed per step (default ``ceil(H*W / 224)``: 224 steps at any size).
        baseline: ``"zeros"`` (paper), ``"blur"``, ``"mean"`` or a tensor.
        batch_size: perturbed images per forward pass.

    Returns a :class:`Curve`; lower ``curve.auc`` is better.
    """
    return _perturbation_curve(prepare(model, x, maps, targets), baseline, step, batch_size, score, reveal=False)


def insertion(
    model,
    x: torch.Tensor,
    maps,
    targets: Targets = None,
    *,
    step: int | None = None,
    baseline: str | torch.Tensor = "blur",
    batch_size: int = 64,
    score: Score = "probability",
) -> Curve:
    """Insertion curve (RISE, Petsiuk et al. 2018): most important pixels revealed on ``baseline`` first.

    Same options as :func:`deletion`; the paper's baseline is ``"blur"``. Higher ``curve.auc`` is better.
    """
    return _perturbation_curve(prepare(model, x, maps, targets), baseline, step, batch_size, score, reveal=True)


def confidence_change(
    model, x: torch.Tensor, maps, targets: Targets = None, *, batch_size: int = 64, score: Score = "probability"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, O)``: each image's target score, and that of the image times its normalised map."""
    prepared = prepare(model, x, maps, targets)
    x, settled = prepared.x, prepared.targets
    masked = x * normalize_maps(prepared.maps).to(x).unsqueeze(1)
    both = torch.cat([x, masked])
    scores = score_inputs(
        prepared.model, lambda a, b: both[a:b], both.shape[0], settled.repeat(2), batch_size=batch_size, score=score
    )
    return scores[: x.shape[0]], scores[x.shape[0] :]


def average_drop(
    model, x: torch.Tensor, maps, targets: Targets = None, *, batch_size: int = 64, score: Score = "probability"
) -> torch.Tensor:
    """Per-image drop in confidence ``100 * max(0, Y - O) / Y`` (Grad-CAM++, Chattopadhay et al. 2018).

    The mean over images is the paper's Average Drop %; lower is better.
    """
    full, masked = confidence_change(model, x, maps, targets, batch_size=batch_size, score=score)
    return 100 * (full - masked).clamp_min(0) / full.clamp_min(torch.finfo(torch.float32).tiny)


def increase_in_confidence(
    model, x: torch.Tensor, maps, targets: Targets = None, *, batch_size: int = 64, score: Score = "probability"
) -> torch.Tensor:
    """Per-image ``100 * [O > Y]`` (Grad-CAM++, Chattopadhay et al. 2018); the mean is the paper's %.

    Higher is better.
    """
    full, masked = confidence_change(model, x, maps, targets, batch_size=batch_size, score=score)
    return 100 * (masked > full).float()
