"""Attribution over superpixels: feature ablation and Shapley value sampling (captum's perturbation family).

An image is cut into superpixels by scikit-image's SLIC (``n_segments``,
``compactness``) or by the caller's ``segments`` (an integer map ``(H, W)`` or one
per image ``(N, H, W)``, captum's ``feature_mask``). A superpixel is removed by
setting all its channels to ``baseline``; every pixel of a superpixel gets that
superpixel's attribution. All variants of an image are scored in batches of
``batch_size`` through :func:`convlens.heatmaps.perturbation.score_variants`.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.segmentation import slic

from ..errors import ConvlensError
from .base import RawMaps, Request
from .perturbation import clean_scores, score_variants


def superpixels(request: Request, segments=None, n_segments: int = 50, compactness: float = 10.0) -> torch.Tensor:
    """``(N, H, W)`` int64 superpixel ids ``0..K-1`` per image: the caller's ``segments`` or SLIC's."""
    x = request.x
    n, _, height, width = x.shape
    if segments is not None:
        ids = torch.as_tensor(segments, device=x.device)
        if ids.is_floating_point() or ids.shape[-2:] != (height, width) or ids.ndim not in (2, 3) or \
                (ids.ndim == 3 and ids.shape[0] not in (1, n)):
            raise ConvlensError(f"segments must be an integer map of shape ({height}, {width}) or ({n}, {height}, "
                                f"{width}), got {'float ' if ids.is_floating_point() else ''}{tuple(ids.shape)}")
        return ids.long().expand(n, height, width)
    if n_segments < 1:
        raise ConvlensError(f"n_segments must be at least 1, got {n_segments}")
    maps = []
    for image in x.detach().float().cpu():
        picture = image.permute(1, 2, 0).numpy()
        picture = (picture - picture.min()) / max(float(np.ptp(picture)), 1e-12)  # SLIC's colour distances in [0, 1]
        maps.append(torch.from_numpy(slic(picture, n_segments=n_segments, compactness=compactness, start_label=0,
                                          channel_axis=-1 if picture.shape[-1] > 1 else None)))
    return torch.stack(maps).long().to(x.device)


def _per_pixel(values: torch.Tensor, ids: torch.Tensor, channels: int) -> torch.Tensor:
    """``(C, H, W)``: each pixel gets the value of its superpixel."""
    return values[ids].expand(channels, -1, -1)


def feature_ablation(request: Request, *, segments=None, n_segments: int = 50, compactness: float = 10.0,
                     baseline: float = 0.0, batch_size: int = 64) -> RawMaps:
    """Feature ablation: the score drop when one superpixel is set to ``baseline``.

    The leave-one-out attribution of Zeiler & Fergus' occlusion, over superpixels
    instead of a sliding window (captum's ``FeatureAblation`` with a
    ``feature_mask``): ``A_k = S(x) - S(x with superpixel k removed)``.
    """
    ids = superpixels(request, segments, n_segments, compactness)
    x = request.x
    clean = clean_scores(request)
    attributions = []
    for image in range(x.shape[0]):
        count = int(ids[image].max()) + 1

        def make_batch(start: int, stop: int, image=image):
            removed = ids[image] == torch.arange(start, stop, device=x.device).view(-1, 1, 1)
            batch = x[image:image + 1].repeat(stop - start, 1, 1, 1)
            return batch.masked_fill(removed.unsqueeze(1), baseline), {}

        drops = clean[image] - score_variants(request, image, count, make_batch, batch_size)
        attributions.append(_per_pixel(drops, ids[image], x.shape[1]))
    attributions = torch.stack(attributions)
    return RawMaps([attributions.mean(dim=1)], attributions)


def shapley_sampling(request: Request, *, segments=None, n_segments: int = 25, compactness: float = 10.0,
                     n_samples: int = 25, baseline: float = 0.0, seed: int = 0, batch_size: int = 64) -> RawMaps:
    """Shapley value sampling over superpixels.

    Castro, Gomez & Tejada 2009, "Polynomial calculation of the Shapley value based
    on sampling" (captum's ``ShapleyValueSampling``): for ``n_samples`` random
    orders of the superpixels, start from the image with all of them at
    ``baseline`` and put them back one by one; a superpixel's attribution is its
    mean marginal change of the score. The orders are ``torch.randperm`` draws
    from a generator seeded with ``seed``, as captum draws them from the global
    one, so equal seeds give equal values. Cost: ``n_samples * K + 1`` passes per
    image for ``K`` superpixels.
    """
    if n_samples < 1:
        raise ConvlensError(f"n_samples must be at least 1, got {n_samples}")
    ids = superpixels(request, segments, n_segments, compactness)
    x = request.x
    request.settle_on_clean_batch()
    generator = torch.Generator().manual_seed(seed)
    attributions = []
    for image in range(x.shape[0]):
        count = int(ids[image].max()) + 1
        orders = torch.stack([torch.randperm(count, generator=generator) for _ in range(n_samples)]).to(x.device)
        ranks = torch.argsort(orders, dim=1)  # ranks[s, k]: when superpixel k comes back in order s

        def make_batch(start: int, stop: int, image=image):
            # variant 0: every superpixel removed; variant 1 + s*K + j: the first j + 1 of order s back
            variant = torch.arange(start, stop, device=x.device)
            sample, step = (variant - 1).clamp(min=0) // count, (variant - 1) % count
            back = (ranks[sample][:, ids[image]] <= step.view(-1, 1, 1)) & (variant > 0).view(-1, 1, 1)
            batch = x[image:image + 1].repeat(stop - start, 1, 1, 1)
            return batch.masked_fill(~back.unsqueeze(1), baseline), {}

        scores = score_variants(request, image, 1 + n_samples * count, make_batch, batch_size)
        paths = torch.cat([scores[:1].expand(n_samples, 1), scores[1:].view(n_samples, count)], dim=1)
        marginal = paths.diff(dim=1)  # (n_samples, K): the change when order s's j-th superpixel came back
        values = torch.zeros(count, device=x.device).index_add_(0, orders.flatten(), marginal.flatten()) / n_samples
        attributions.append(_per_pixel(values, ids[image], x.shape[1]))
    attributions = torch.stack(attributions)
    return RawMaps([attributions.mean(dim=1)], attributions)
