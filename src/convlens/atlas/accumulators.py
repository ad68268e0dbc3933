"""Mergeable per-channel statistics of a layer over a dataset.

Everything here is a monoid: ``a.merge(b)`` gives what one pass over the
images of ``a`` and ``b`` gives, so a scan can be cut into parts (resume),
spread over Ray actors, or run on two datasets and combined. Exactly:

* top-k images per channel, by the maximum of the channel's map over positions,
  with that position; ties go to the smaller image index, so the order never
  depends on which part saw an image first;
* counts (values seen, positive values, images per class) and the quantile
  sketch's bucket counts;

and up to float64 rounding (merged in another order):

* mean and standard deviation over every value (image x position), kept as
  count, mean and sum of squared deviations ``M2`` and merged with Chan, Golub
  & LeVeque's formula (1979): ``delta = mean_b - mean_a``,
  ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``;
* per-class means of each image's spatial mean, and from them Morcos et al.'s
  class-selectivity index (2018, arXiv:1803.06959):
  ``SI = (mu_max - mu_rest) / (mu_max + mu_rest)``, ``mu_max`` the largest
  class mean and ``mu_rest`` the mean of the other class means (meaningful for
  non-negative activations, e.g. after a ReLU; NaN when the denominator is not positive).

The quantile sketch is a log-bucket histogram in the manner of DDSketch
(Masson, Rim & Lee 2019, arXiv:1908.10693), with the bucket read straight
from a float32's bits, the cheap "linearly interpolated" mapping of that
paper: ``|x| = 2^e (1 + f)`` falls in bucket ``(e, floor(f * 2^m))`` (the
exponent and the top ``m`` mantissa bits), so buckets are
``[lo, lo (1 + 2^-m))`` wide at most and the value ``2 lo hi / (lo + hi)``
answered for a bucket is within relative error ``alpha = 1 / (2^(m+1) + 1)``
(``m = 6``: 0.78 %) of any value in it, hence of the exact
(``numpy.quantile(..., method="lower")``) quantile, for ``|x|`` in
``[2^-E, 2^E)`` (``E = 24``: about 6e-8 to 1.7e7). Smaller magnitudes fall in
the lowest bucket of their sign, larger ones in the outermost; zero has its own
bucket, so the positive values are exactly those in positive buckets. Keys are
signed, ``-half..half``, and ordered like the values. All channels share one
``(C, buckets)`` count array, updated for a whole batch with a shift, one
table lookup and one ``bincount``: no logarithm is taken.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

MANTISSA_BITS = 6
EXPONENT_RANGE = 24
ALPHA = 1 / (2 ** (MANTISSA_BITS + 1) + 1)


@dataclass(frozen=True)
class SketchGrid:
    """The bucket layout of a sketch: ``bits`` mantissa bits kept, magnitudes in ``[2^-exponent, 2^exponent)``."""

    bits: int = MANTISSA_BITS
    exponent: int = EXPONENT_RANGE

    @property
    def alpha(self) -> float:
        """The relative error of a quantile answered from this grid."""
        return 1 / (2 ** (self.bits + 1) + 1)

    @property
    def half(self) -> int:
        """Buckets per sign; keys run from ``-half`` to ``half`` with 0 the zero bucket."""
        return 2 * self.exponent * 2**self.bits

    @property
    def size(self) -> int:
        return 2 * self.half + 1

    def lookup(self) -> torch.Tensor:
        """int32 table: ``(bits >> (23 - m)) + 2^(31 - (23 - m))`` of a float32 -> its bucket's position ``half + key``.

        The shifted bits hold the sign, the exponent and the top ``m`` mantissa bits; the table
        does the rest (zero bucket, clamping to the range, the sign) in one gather.
        """
        return _lookup(self.bits, self.exponent)

    def keys(self, values: torch.Tensor, offsets: torch.Tensor | int = 0) -> torch.Tensor:
        """``offsets + half + key`` of each value (as float32), int32; ``key`` in ``[-half, half]``."""
        shift = 23 - self.bits
        raw = (values.float().contiguous().view(torch.int32) >> shift).add_(1 << (31 - shift))
        table = self.lookup().to(values.device)
        return table.index_select(0, raw.view(-1)).view(values.shape).add_(offsets)

    def _bounds(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` magnitudes of the buckets ``|key| >= 1``."""
        index = np.abs(np.asarray(key, dtype=np.int64)) - 1
        scale = np.ldexp(1.0, index // 2**self.bits - self.exponent)
        lo = scale * (1 + (index % 2**self.bits) / 2**self.bits)
        return lo, lo + scale / 2**self.bits

    def value(self, key: np.ndarray) -> np.ndarray:
        """The value a bucket stands for: ``sign * 2 lo hi / (lo + hi)`` (0 for the zero bucket)."""
        key = np.asarray(key)
        lo, hi = self._bounds(np.where(key == 0, 1, key))
        return np.where(key == 0, 0.0, np.sign(key) * 2 * lo * hi / (lo + hi))

    def lower_edge(self, key: np.ndarray) -> np.ndarray:
        """A threshold ``t`` such that ``x >= t`` selects bucket ``key`` and every bucket above it.

        For a positive key that is the bucket's ``lo``; for the zero bucket ``2^-exponent``
        (a unit whose quantile is zero keeps only clearly positive values, as Bau et al.'s
        ``a > 0`` for a dead unit); for a negative one ``-hi``.
        """
        key = np.asarray(key)
        lo, hi = self._bounds(np.where(key == 0, 1, key))
        return np.where(key > 0, lo, np.where(key == 0, 2.0**-self.exponent, -hi))


@functools.lru_cache(maxsize=8)
def _lookup(bits: int, exponent: int) -> torch.Tensor:
    """The table of :meth:`SketchGrid.lookup` (a constant of the grid, built once per grid)."""
    shift = 23 - bits
    raw = np.arange(1 << (32 - shift), dtype=np.int64)
    negative = raw < (1 << (31 - shift))
    magnitude_bits = np.where(negative, raw, raw - (1 << (31 - shift)))  # (exponent field, top mantissa bits)
    half = 2 * exponent * 2**bits
    key = np.clip(magnitude_bits - (((127 - exponent) << bits) - 1), 1, half)  # tiny magnitudes: lowest bucket
    key = np.where(magnitude_bits == 0, 0, key)  # +-0 (and magnitudes below ~1e-38): the zero bucket
    table = torch.from_numpy((np.where(negative, -key, key) + half).astype(np.int32))
    table.requires_grad_(False)
    return table


def quantile_keys(counts: np.ndarray, q: float) -> np.ndarray:
    """Per row of bucket ``counts`` ``(C, size)``, the key of the bucket holding the ``q``-quantile.

    The rank is numpy's ``method="lower"``: the ``floor(q * (n - 1))``-th smallest value (from 0).
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = counts.sum(axis=1)
    rank = np.floor(q * (total - 1)).astype(np.int64)
    cumulative = np.cumsum(counts, axis=1)
    position = (cumulative <= rank[:, None]).sum(axis=1)  # first bucket whose cumulative count exceeds the rank
    half = (counts.shape[1] - 1) // 2
    return np.minimum(position, counts.shape[1] - 1) - half


class LayerStats:
    """Running statistics of every channel of one layer (see the module docstring).

    Arrays (``C`` channels, ``k`` top images, ``K`` classes): ``mean``, ``m2``,
    ``max`` float64 ``(C,)``; ``positive`` int64 ``(C,)``; ``top_value`` float64
    ``(C, k)`` (``-inf`` where empty), ``top_image``, ``top_y``, ``top_x`` int64
    ``(C, k)`` (``-1`` where empty); ``class_sum`` float64 ``(K, C)``,
    ``class_images`` int64 ``(K,)``; ``sketch`` int64 ``(C, grid.size)``.
    """

    ARRAYS = (
        "mean",
        "m2",
        "max",
        "positive",
        "top_value",
        "top_image",
        "top_y",
        "top_x",
        "class_sum",
        "class_images",
        "sketch",
    )

    def __init__(
        self, channels: int, height: int, width: int, k: int = 16, classes: int = 0, grid: SketchGrid = SketchGrid()
    ):
        self.channels, self.height, self.width, self.k, self.grid = channels, height, width, k, grid
        self.images = 0
        self.count = 0  # values seen per channel: images x height x width
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self.max = np.full(channels, -np.inf)
        self.positive = np.zeros(channels, dtype=np.int64)
        self.top_value = np.full((channels, k), -np.inf)
        self.top_image = np.full((channels, k), -1, dtype=np.int64)
        self.top_y = np.full((channels, k), -1, dtype=np.int64)
        self.top_x = np.full((channels, k), -1, dtype=np.int64)
        self.class_sum = np.zeros((classes, channels))
        self.class_images = np.zeros(classes, dtype=np.int64)
        self.sketch = np.zeros((channels, grid.size), dtype=np.int64)

    # -- updating ---------------------------------------------------------
    def update(self, maps: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add a batch: ``maps`` ``(N, C, h, w)``, ``indices`` (N,) global image indices, ``labels`` (N,) or -1."""
        maps = maps.detach().float().contiguous()
        n, channels, height, width = maps.shape
        if (channels, height, width) != (self.channels, self.height, self.width):
            raise ValueError(
                f"maps of shape {tuple(maps.shape[1:])} for a layer of {(self.channels, self.height, self.width)}"
            )
        flat = maps.view(n, channels, height * width)
        # per image and channel in float32, two passes (the mean, then the centred squares: stable, and
        # ten times faster on CPU than torch.var_mean); the (N, C) partial moments are then combined in
        # float64 (Chan et al.)
        image_mean = flat.mean(dim=2)
        centred = flat - image_mean.unsqueeze(2)
        image_m2 = torch.linalg.vecdot(centred, centred).double()
        image_mean = image_mean.double()
        batch_mean = image_mean.mean(dim=0)
        batch_m2 = image_m2.sum(dim=0) + (height * width) * ((image_mean - batch_mean) ** 2).sum(dim=0)
        self._merge_moments(n * height * width, batch_mean.cpu().numpy(), batch_m2.cpu().numpy())
        best, where = flat.max(dim=2)  # (N, C): each image's maximum and its first position
        self.max = np.maximum(self.max, best.max(dim=0).values.double().cpu().numpy())
        positions = where.cpu().numpy().T
        images = np.broadcast_to(indices.cpu().numpy().astype(np.int64)[None, :], (channels, n))
        self._merge_tops(best.double().cpu().numpy().T, images, positions // width, positions % width)
        if labels is not None and self.class_images.size:
            labels = labels.cpu()
            known = labels >= 0
            if known.any():
                spatial_mean = image_mean.cpu()[known].numpy()
                np.add.at(self.class_sum, labels[known].numpy(), spatial_mean)
                np.add.at(self.class_images, labels[known].numpy(), 1)
        offsets = (torch.arange(channels, device=maps.device, dtype=torch.int32) * self.grid.size)[None, :, None, None]
        keys = self.grid.keys(maps, offsets)
        counts = (
            torch.bincount(keys.view(-1), minlength=channels * self.grid.size)
            .cpu()
            .numpy()
            .reshape(channels, self.grid.size)
        )
        self.sketch += counts
        # positive values are exactly those in positive buckets (but for magnitudes below ~1e-38)
        self.positive += counts[:, self.grid.half + 1 :].sum(axis=1)
        self.images += n

    def _merge_moments(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    def _merge_tops(self, values: np.ndarray, images: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> None:
        values = np.concatenate([self.top_value, values], axis=1)
        images = np.concatenate([self.top_image, images], axis=1)
        ys = np.concatenate([self.top_y, ys], axis=1)
        xs = np.concatenate([self.top_x, xs], axis=1)
        # larger value first; among equal values the smaller image index; empty slots (-1) last
        order = np.lexsort((np.where(images < 0, np.iinfo(np.int64).max, images), -values), axis=1)[:, : self.k]
        self.top_value = np.take_along_axis(values, order, axis=1)
        self.top_image = np.take_along_axis(images, order, axis=1)
        self.top_y = np.take_along_axis(ys, order, axis=1)
        self.top_x = np.take_along_axis(xs, order, axis=1)

    def merge(self, other: LayerStats) -> LayerStats:
        """Add ``other`` (statistics of other images of the same layer) into this one; returns ``self``."""
        if (other.channels, other.height, other.width, other.k, other.grid) != (
            self.channels,
            self.height,
            self.width,
            self.k,
            self.grid,
        ) or other.class_images.shape != self.class_images.shape:
            raise ValueError("cannot merge statistics of different layers or settings")
        self._merge_moments(other.count, other.mean, other.m2)
        self.max = np.maximum(self.max, other.max)
        self.positive = self.positive + other.positive
        self._merge_tops(other.top_value, other.top_image, other.top_y, other.top_x)
        self.class_sum = self.class_sum + other.class_sum
        self.class_images = self.class_images + other.class_images
        self.sketch = self.sketch + other.sketch
        self.images += other.images
        return self

    # -- reading ----------------------------------------------------------
    @property
    def std(self) -> np.ndarray:
        """Population standard deviation of each channel's values."""
        return np.sqrt(self.m2 / self.count) if self.count else np.full(self.channels, np.nan)

    @property
    def fraction_positive(self) -> np.ndarray:
        return self.positive / self.count if self.count else np.full(self.channels, np.nan)

    @property
    def class_means(self) -> np.ndarray:
        """``(K, C)`` mean over each class's images of the channel's spatial mean (NaN for an unseen class)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.class_sum / self.class_images[:, None]

    @property
    def selectivity(self) -> np.ndarray:
        """Morcos et al. (2018) class-selectivity index per channel; NaN without labels or for a non-positive mean."""
        means = self.class_means[self.class_images > 0]
        if means.shape[0] < 2:
            return np.full(self.channels, np.nan)
        top = means.max(axis=0)
        rest = (means.sum(axis=0) - top) / (means.shape[0] - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(top + rest > 0, (top - rest) / (top + rest), np.nan)

    def quantile(self, q: float) -> np.ndarray:
        """The ``q``-quantile of each channel's values, within the sketch's relative error."""
        return self.grid.value(quantile_keys(self.sketch, q))

    def threshold(self, q: float) -> np.ndarray:
        """Per channel, ``t`` such that ``x >= t`` keeps the values in the ``q``-quantile's bucket and above."""
        return self.grid.lower_edge(quantile_keys(self.sketch, q))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything as plain arrays (for the store and for sending between processes)."""
        arrays = {name: getattr(self, name) for name in self.ARRAYS}
        arrays["shape"] = np.array(
            [self.channels, self.height, self.width, self.k, self.class_images.size, self.images, self.count],
            dtype=np.int64,
        )
        arrays["grid"] = np.array([self.grid.bits, self.grid.exponent], dtype=np.int64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LayerStats:
        channels, height, width, k, classes, images, count = (int(v) for v in arrays["shape"])
        stats = cls(channels, height, width, k, classes, SketchGrid(*(int(v) for v in arrays["grid"])))
        for name in cls.ARRAYS:
            setattr(stats, name, np.array(arrays[name], dtype=getattr(stats, name).dtype))
        stats.images, stats.count = images, count
        return stats


class ConceptOverlap:
    """Network Dissection's sums over a dataset for one layer (Bau et al. 2017, arXiv:1704.05796).

    For unit ``c`` and concept ``k``, over every image ``x``: ``intersection[c, k] =
    sum_x |L_c(x) & M_k(x)|``, ``unit_pixels[c] = sum_x |L_c(x)|``, ``concept_pixels[k] =
    sum_x |M_k(x)|``, where ``L_c(x)`` is the unit's map upsampled to the mask size and
    thresholded and ``M_k(x)`` the concept's mask. Integer counts: merging is exact.
    """

    def __init__(self, channels: int, concepts: int):
        self.intersection = np.zeros((channels, concepts), dtype=np.int64)
        self.unit_pixels = np.zeros(channels, dtype=np.int64)
        self.concept_pixels = np.zeros(concepts, dtype=np.int64)
        self.images = 0

    def update(self, regions: torch.Tensor, masks: torch.Tensor) -> None:
        """``regions`` bool ``(N, C, H, W)`` (thresholded maps), ``masks`` bool ``(N, K, H, W)``."""
        n = regions.shape[0]
        left = regions.flatten(2).float()
        right = masks.flatten(2).float()
        # per image the counts are below 2^24, exact in float32; summed over images in int64
        self.intersection += torch.bmm(left, right.transpose(1, 2)).to(torch.int64).sum(0).cpu().numpy()
        self.unit_pixels += regions.sum(dim=(0, 2, 3)).cpu().numpy()
        self.concept_pixels += masks.sum(dim=(0, 2, 3)).cpu().numpy()
        self.images += n

    def merge(self, other: ConceptOverlap) -> ConceptOverlap:
        self.intersection = self.intersection + other.intersection
        self.unit_pixels = self.unit_pixels + other.unit_pixels
        self.concept_pixels = self.concept_pixels + other.concept_pixels
        self.images += other.images
        return self

    @property
    def iou(self) -> np.ndarray:
        """``(C, K)``: intersection over union, accumulated over the whole dataset (0 where both are empty)."""
        union = self.unit_pixels[:, None] + self.concept_pixels[None, :] - self.intersection
        return np.divide(self.intersection, union, out=np.zeros(union.shape), where=union > 0)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "intersection": self.intersection,
            "unit_pixels": self.unit_pixels,
            "concept_pixels": self.concept_pixels,
            "images": np.array([self.images], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ConceptOverlap:
        overlap = cls(*arrays["intersection"].shape)
        overlap.intersection = np.array(arrays["intersection"], dtype=np.int64)
        overlap.unit_pixels = np.array(arrays["unit_pixels"], dtype=np.int64)
        overlap.concept_pixels = np.array(arrays["concept_pixels"], dtype=np.int64)
        overlap.images = int(arrays["images"][0])
        return overlap
