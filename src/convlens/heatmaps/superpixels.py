"""Attribution over superpixels: feature ablation, Shapley value sampling, LIME and KernelSHAP (captum's family).

An image is cut into superpixels by scikit-image's SLIC (``n_segments``,
``compactness``) or by the caller's ``segments`` (an integer map ``(H, W)`` or one
per image ``(N, H, W)``, captum's ``feature_mask``). A superpixel is removed by
setting all its channels to ``baseline``; every pixel of a superpixel gets that
superpixel's attribution. All variants of an image are scored in batches of
``batch_size`` through :func:`convlens.heatmaps.perturbation.score_variants`.

LIME and KernelSHAP fit a linear model to the scores of random coalitions
(binary vectors over the superpixels: 1 kept, 0 at ``baseline``) by weighted
least squares with an intercept, centred on the weighted means as
scikit-learn's ``LinearRegression`` does, in float64; a superpixel's attribution
is its coefficient. The coalitions are drawn from a ``torch.Generator`` seeded
with ``seed`` in the order captum draws them from the global one.
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
        if (
            ids.is_floating_point()
            or ids.shape[-2:] != (height, width)
            or ids.ndim not in (2, 3)
            or (ids.ndim == 3 and ids.shape[0] not in (1, n))
        ):
            raise ConvlensError(
                f"segments must be an integer map of shape ({height}, {width}) or ({n}, {height}, "
                f"{width}), got {'float ' if ids.is_floating_point() else ''}{tuple(ids.shape)}"
            )
        return ids.long().expand(n, height, width)
    if n_segments < 1:
        raise ConvlensError(f"n_segments must be at least 1, got {n_segments}")
    maps = []
    for image in x.detach().float().cpu():
        picture = image.permute(1, 2, 0).numpy()
        picture = (picture - picture.min()) / max(float(np.ptp(picture)), 1e-12)  # SLIC's colour distances in [0, 1]
        maps.append(
            torch.from_numpy(
                slic(
                    picture,
                    n_segments=n_segments,
                    compactness=compactness,
                    start_label=0,
                    channel_axis=-1 if picture.shape[-1] > 1 else None,
                )
            )
        )
    return torch.stack(maps).long().to(x.device)


def _per_pixel(values: torch.Tensor, ids: torch.Tensor, channels: int) -> torch.Tensor:
    """``(C, H, W)``: each pixel gets the value of its superpixel."""
    return values[ids].expand(channels, -1, -1)


def feature_ablation(
    request: Request,
    *,
    segments=None,
    n_segments: int = 50,
    compactness: float = 10.0,
    baseline: float = 0.0,
    batch_size: int = 64,
) -> RawMaps:
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
            batch = x[image : image + 1].repeat(stop - start, 1, 1, 1)
            return batch.masked_fill(removed.unsqueeze(1), baseline), {}

        drops = clean[image] - score_variants(request, image, count, make_batch, batch_size)
        attributions.append(_per_pixel(drops, ids[image], x.shape[1]))
    stacked = torch.stack(attributions)
    return RawMaps([stacked.mean(dim=1)], stacked)


def shapley_sampling(
    request: Request,
    *,
    segments=None,
    n_segments: int = 25,
    compactness: float = 10.0,
    n_samples: int = 25,
    baseline: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
) -> RawMaps:
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

        def make_batch(start: int, stop: int, image=image, count=count, ranks=ranks):
            # variant 0: every superpixel removed; variant 1 + s*K + j: the first j + 1 of order s back
            variant = torch.arange(start, stop, device=x.device)
            sample, step = (variant - 1).clamp(min=0) // count, (variant - 1) % count
            back = (ranks[sample][:, ids[image]] <= step.view(-1, 1, 1)) & (variant > 0).view(-1, 1, 1)
            batch = x[image : image + 1].repeat(stop - start, 1, 1, 1)
            return batch.masked_fill(~back.unsqueeze(1), baseline), {}

        scores = score_variants(request, image, 1 + n_samples * count, make_batch, batch_size)
        paths = torch.cat([scores[:1].expand(n_samples, 1), scores[1:].view(n_samples, count)], dim=1)
        marginal = paths.diff(dim=1)  # (n_samples, K): the change when order s's j-th superpixel came back
        values = torch.zeros(count, device=x.device).index_add_(0, orders.flatten(), marginal.flatten()) / n_samples
        attributions.append(_per_pixel(values, ids[image], x.shape[1]))
    stacked = torch.stack(attributions)
    return RawMaps([stacked.mean(dim=1)], stacked)


def _coalition_scores(
    request: Request, ids: torch.Tensor, image: int, coalitions: torch.Tensor, baseline: float, batch_size: int
) -> torch.Tensor:
    """Scores ``(S,)`` of image ``image`` with superpixel ``k`` kept where ``coalitions[s, k]``, else ``baseline``."""
    x = request.x
    kept = coalitions.to(x.device, torch.bool)

    def make_batch(start: int, stop: int):
        keep = kept[start:stop][:, ids[image]].unsqueeze(1)
        return x[image : image + 1].repeat(stop - start, 1, 1, 1).masked_fill(~keep, baseline), {}

    return score_variants(request, image, len(coalitions), make_batch, batch_size)


def weighted_least_squares(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coefficients ``(K,)`` of ``targets ~ features @ c + b`` minimising ``sum_s w_s r_s^2``.

    As scikit-learn's ``LinearRegression(sample_weight=w)`` (what captum fits):
    centred on the weighted means, rows scaled by ``sqrt(w)``, the minimum-norm
    least-squares solution (SVD, on the CPU, in float64), so that fewer samples
    than superpixels still give an answer. captum fits in float32, which with
    KernelSHAP's weights of 10^6 is off by ~4e-4 relative at 49 superpixels;
    scikit-learn in float64 agrees with this to ~1e-13.
    """
    features, targets, weights = (t.detach().cpu().double() for t in (features, targets, weights))
    weights = weights / weights.sum()
    centred = features - weights @ features
    scale = weights.sqrt().unsqueeze(1)
    solution = torch.linalg.lstsq(centred * scale, (targets - weights @ targets).unsqueeze(1) * scale, driver="gelsd")
    return solution.solution.squeeze(1)


def _cosine_to_original(x: torch.Tensor, ids: torch.Tensor, coalitions: torch.Tensor, baseline: float) -> torch.Tensor:
    """``(S,)`` cosine similarity between the image ``(C, H, W)`` and each of its coalitions' inputs, in closed form."""
    image = x.detach().double()
    count = coalitions.shape[1]
    flat_ids = ids.flatten().repeat(image.shape[0])
    squares = torch.zeros(count, dtype=torch.float64, device=x.device).index_add_(0, flat_ids, image.flatten() ** 2)
    sums = torch.zeros(count, dtype=torch.float64, device=x.device).index_add_(0, flat_ids, image.flatten())
    sizes = torch.bincount(flat_ids, minlength=count).double()
    kept = coalitions.to(x.device).double()
    dot = kept @ squares + (1 - kept) @ sums * baseline
    norm = (kept @ squares + (1 - kept) @ sizes * baseline**2).sqrt() * squares.sum().sqrt()
    return dot / norm.clamp(min=1e-8)


def _skip_fit_draws(generator: torch.Generator, count: int) -> None:
    """Take the draws captum's fit takes from the global generator between images, so that the next
    image's coalitions are captum's too: its ``DataLoader`` seeds itself (one int64) and its surrogate
    is built as an ``nn.Linear(K, 1)``, whose initialisation draws ``K + 1`` uniforms."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    torch.empty(1, count).uniform_(generator=generator)
    torch.empty(1).uniform_(generator=generator)


def _check_samples(n_samples: int) -> None:
    if n_samples < 1:
        raise ConvlensError(f"n_samples must be at least 1, got {n_samples}")


def lime(
    request: Request,
    *,
    segments=None,
    n_segments: int = 25,
    compactness: float = 10.0,
    n_samples: int = 200,
    baseline: float = 0.0,
    kernel_width: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> RawMaps:
    """LIME over superpixels: the coefficients of a linear model fitted to random coalitions.

    Ribeiro, Singh & Guestrin 2016, "Why Should I Trust You?", arXiv:1602.04938:
    ``n_samples`` coalitions ``z``, each superpixel kept with probability 1/2
    (``torch.bernoulli`` draws, captum's ``Lime`` order), are weighted by
    ``exp(-d^2 / (2 kernel_width^2))`` with ``d`` the cosine distance between the
    image and the coalition's input (captum's default kernel), and the scores
    fitted by weighted least squares (:func:`weighted_least_squares`); ``A_k`` is
    superpixel ``k``'s coefficient. Departure: captum's default surrogate is a
    Lasso (``alpha=0.01``) and the paper's a K-LASSO selection; this one keeps
    every superpixel, so equal seeds give captum's ``Lime`` with
    ``interpretable_model=SkLearnLinearRegression()``.
    """
    _check_samples(n_samples)
    if kernel_width <= 0:
        raise ConvlensError(f"kernel_width must be positive, got {kernel_width}")
    ids = superpixels(request, segments, n_segments, compactness)
    x = request.x
    request.settle_on_clean_batch()
    generator = torch.Generator().manual_seed(seed)
    attributions = []
    for image in range(x.shape[0]):
        count = int(ids[image].max()) + 1
        half = torch.full((1, count), 0.5)
        coalitions = torch.cat([torch.bernoulli(half, generator=generator) for _ in range(n_samples)])
        distance = 1 - _cosine_to_original(x[image], ids[image], coalitions, baseline)
        weights = torch.exp(-distance.square() / (2 * kernel_width**2))
        scores = _coalition_scores(request, ids, image, coalitions, baseline, batch_size)
        values = weighted_least_squares(coalitions, scores, weights).to(device=x.device, dtype=torch.float32)
        attributions.append(_per_pixel(values, ids[image], x.shape[1]))
        _skip_fit_draws(generator, count)
    stacked = torch.stack(attributions)
    return RawMaps([stacked.mean(dim=1)], stacked)


def shapley_kernel_coalitions(count: int, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """``(n_samples, K)`` coalitions as captum's ``KernelShap`` draws them.

    All kept, none kept, then for each further sample a size ``k`` with
    probability ``(K - 1) / (k (K - k))`` and ``k`` superpixels chosen uniformly
    (the ``k`` largest of ``K`` normal draws), so that plain least squares on
    them is the Shapley kernel's weighting (Lundberg & Lee 2017, Theorem 2).
    A single superpixel has only the two end points, whatever ``n_samples``.
    """
    sizes = torch.arange(count, dtype=torch.float)
    probabilities = torch.tensor(count - 1) / (sizes * (count - sizes))
    probabilities[0] = 0.0
    probabilities = (probabilities / probabilities.sum()).view(1, -1)
    coalitions = [torch.ones(1, count), torch.zeros(1, count)]
    if count == 1:  # the two end points are every coalition: the fit is the exact score difference
        return torch.cat(coalitions)
    while len(coalitions) < n_samples:
        size = int(torch.multinomial(probabilities, 1, True, generator=generator))
        draws = torch.randn(1, count, generator=generator)
        coalitions.append((draws > torch.kthvalue(draws, count - size).values.item()).float())
    return torch.cat(coalitions)[:n_samples]


def kernel_shap(
    request: Request,
    *,
    segments=None,
    n_segments: int = 25,
    compactness: float = 10.0,
    n_samples: int = 200,
    baseline: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
) -> RawMaps:
    """KernelSHAP over superpixels: Shapley values by weighted linear regression on coalitions.

    Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions",
    arXiv:1705.07874, section 4.1 (captum's ``KernelShap``): ``n_samples``
    coalitions from :func:`shapley_kernel_coalitions`, weight 1 each and 10^6 for
    the full and the empty one (the kernel's infinite end points, as captum),
    fitted by :func:`weighted_least_squares`; ``A_k`` is superpixel ``k``'s
    coefficient, and ``sum_k A_k = S(x) - S(baseline)`` up to the end points'
    finite weight. Equal seeds give captum's values.
    """
    _check_samples(n_samples)
    ids = superpixels(request, segments, n_segments, compactness)
    x = request.x
    request.settle_on_clean_batch()
    generator = torch.Generator().manual_seed(seed)
    attributions = []
    for image in range(x.shape[0]):
        count = int(ids[image].max()) + 1
        coalitions = shapley_kernel_coalitions(count, n_samples, generator)
        size = coalitions.sum(dim=1)
        weights = torch.where((size == 0) | (size == count), 1e6, 1.0)
        scores = _coalition_scores(request, ids, image, coalitions, baseline, batch_size)
        values = weighted_least_squares(coalitions, scores, weights).to(device=x.device, dtype=torch.float32)
        attributions.append(_per_pixel(values, ids[image], x.shape[1]))
        _skip_fit_draws(generator, count)
    stacked = torch.stack(attributions)
    return RawMaps([stacked.mean(dim=1)], stacked)
