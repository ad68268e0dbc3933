"""torch-cam's Score-CAM variants: the channel masks smoothed with noise (SS-CAM) or integrated (IS-CAM).

Both score masked copies of each image as Score-CAM does (:func:`~convlens.heatmaps.perturbation.score_variants`,
batched under ``torch.inference_mode``) and weight the channels by the softmax of the mean score. The masks
are torch-cam's: each channel min-max normalised at the layer's resolution, then upsampled bilinearly
(convlens's ``scorecam`` normalises again after upsampling, as the Score-CAM paper's ``s(Up(A_k))``).
Cost: ``n_samples`` forward passes per channel; ``top_k`` scores only the ``k`` channels of largest
spatial variance (as ``scorecam``'s, approximate).
"""

from __future__ import annotations

import torch

from ..errors import ConvlensError
from .base import RawMaps, Request, normalise, upsample
from .perturbation import _layer_activations, score_variants, scorecam_batch_size


def _smoothed_scorecam(
    request: Request, kind: str, n_samples: int, stdev: float, seed: int, batch_size: int | None, top_k: int | None
) -> RawMaps:
    if (
        n_samples < 1
        or not stdev >= 0
        or (batch_size is not None and batch_size < 1)
        or (top_k is not None and top_k < 1)
    ):
        raise ConvlensError(
            f"{kind} needs n_samples >= 1, stdev >= 0, batch_size >= 1 and top_k >= 1, got "
            f"n_samples={n_samples}, stdev={stdev}, batch_size={batch_size}, top_k={top_k}"
        )
    acts, _ = _layer_activations(request)
    x = request.x
    n, channels = acts.shape[:2]
    size = tuple(x.shape[-2:])
    batch_size = scorecam_batch_size(x) if batch_size is None else batch_size
    keep = torch.arange(channels, device=acts.device).expand(n, channels)
    if top_k is not None and top_k < channels:
        keep = acts.flatten(2).var(dim=2).topk(int(top_k), dim=1).indices
    count = keep.shape[1]
    # Only the scored channels are upsampled (and, with top_k, given noise): a late layer's thousands of
    # input-sized masks would not fit. Without top_k the draws are torch-cam's: every channel of the batch.
    masks = [upsample(normalise(acts[image, keep[image]])[0], size) for image in range(n)]
    totals = torch.zeros(keep.shape, device=acts.device)
    generator, coefficient = torch.Generator().manual_seed(seed), 0.0
    for sample in range(n_samples):
        if kind == "sscam":
            noise = torch.randn((n, count, *size), generator=generator).to(acts.device) * stdev
        else:  # IS-CAM: the mask scaled by the running sum of (s + 1) / n_samples
            coefficient += (sample + 1) / n_samples
        for image in range(n):
            chosen = masks[image] + noise[image] if kind == "sscam" else masks[image] * coefficient
            image_x = x[image].unsqueeze(0).float()

            def masked(start: int, stop: int, chosen=chosen, image_x=image_x):
                return (image_x * chosen[start:stop].unsqueeze(1)).to(x.dtype), {}

            done = (sample * n + image) * count
            totals[image] += score_variants(
                request, image, count, masked, batch_size, done=done, total=n_samples * n * count
            )
    weights = torch.softmax(totals / n_samples, dim=1)
    chosen_acts = acts.gather(1, keep.view(n, count, 1, 1).expand(n, count, *acts.shape[2:]))
    return RawMaps([torch.einsum("nk,nkhw->nhw", weights, chosen_acts)])


def sscam(
    request: Request,
    *,
    n_samples: int = 35,
    stdev: float = 2.0,
    seed: int = 0,
    batch_size: int | None = None,
    top_k: int | None = None,
) -> RawMaps:
    """SS-CAM: Score-CAM with Gaussian noise added to each channel's mask, the scores averaged.

    Wang et al. 2020, "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature
    Localization", arXiv:2006.14255, as torch-cam's ``SSCAM``:
    ``w = softmax_k(1/n sum_s f_c(X * (H_k + e_sk)))``, ``e_sk ~ N(0, stdev^2)`` per pixel of
    the input-sized mask ``H_k``, ``M = ReLU(sum_k w_k A_k)``. The noise comes from a
    ``torch.Generator`` seeded with ``seed``, one ``(N, C, H, W)`` draw per sample
    (``torch.manual_seed(seed)`` before torch-cam's call gives the same draws; with
    ``top_k`` only the ``k`` scored channels get noise, so the draws differ).
    """
    return _smoothed_scorecam(request, "sscam", n_samples, stdev, seed, batch_size, top_k)


def iscam(request: Request, *, n_samples: int = 10, batch_size: int | None = None, top_k: int | None = None) -> RawMaps:
    """IS-CAM: Score-CAM with each mask's score integrated over growing mask strengths.

    Naidu et al. 2020, "IS-CAM: Integrated Score-CAM for axiomatic-based
    explanations", arXiv:2010.03023, as torch-cam's ``ISCAM``:
    ``w = softmax_k(1/n sum_s f_c(c_s X * H_k))`` with ``c_s = sum_{j<=s} j / n``
    (torch-cam's running sum; it reaches ``(n + 1) / 2``), ``M = ReLU(sum_k w_k A_k)``.
    Deterministic.
    """
    return _smoothed_scorecam(request, "iscam", n_samples, 0.0, 0, batch_size, top_k)
