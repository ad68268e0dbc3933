"""ROAD: RemOve And Debias, with noisy linear imputation (Rong, Leemann, Borisov, Kasneci & Kasneci,
"A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022, arXiv:2202.00449).

Removing pixels by painting them a constant colour leaks the removed shape to
the model ("class information leakage"). ROAD instead fills every removed pixel
with the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct ones,
1/12 for the diagonals, renormalised at the image border), solving one sparse
linear system for all removed pixels of an image at once, per channel, and
adds Gaussian noise (std ``noise``, 0.01 in the paper) to the filled values.

Orders, for each fraction ``f`` of pixels removed:

* MoRF (most relevant first): the ``round(f * H * W)`` highest-ranked pixels
  are imputed; the score should fall (lower is better);
* LeRF (least relevant first): the ``round(f * H * W)`` lowest-ranked pixels are
  imputed; the score should stay (higher is better).

The score is the target-class probability of the imputed image, as in the
paper's figures; :func:`road_score` averages it over the fractions and
``road_gap`` is ``(LeRF - MoRF) / 2`` averaged over fractions (pytorch-grad-cam's
``ROADCombined``). pytorch-grad-cam names its thresholds by the *percentage
kept*: its ``ROADMostRelevantFirst(percentile=p)`` and
``ROADLeastRelevantFirst(percentile=p)`` both remove ``1 - p/100`` of the pixels.

The linear system is solved with SciPy's sparse LU (SciPy ships with
scikit-image), on the CPU, once per image and fraction.

Example::

    curve = road(model, x, maps, order="morf", fractions=(0.1, 0.5, 0.9), seed=0)
    curve.scores   # (N, 3) probabilities after removing 10 %, 50 %, 90 %
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConvlensError
from .base import Score, Targets, prepare, score_inputs
from .faithfulness import Curve, importance_ranks

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ORDERS = ("morf", "lerf")

# (row offset, column offset, weight) of the 8 neighbours in the paper's imputation.
_NEIGHBOURS = (
    (-1, -1, 1 / 12),
    (-1, 0, 1 / 6),
    (-1, 1, 1 / 12),
    (0, -1, 1 / 6),
    (0, 1, 1 / 6),
    (1, -1, 1 / 12),
    (1, 0, 1 / 6),
    (1, 1, 1 / 12),
)


def linear_imputation(image: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Fill the ``removed`` pixels of ``image (C, H, W)`` by the neighbour-mean linear system.

    For each removed pixel ``p``: ``s_p * v_p - sum_{removed q ~ p} w_q v_q = sum_{kept q ~ p} w_q v_q``,
    with ``s_p`` the total weight of ``p``'s neighbours inside the image. Kept
    pixels are unchanged. Returns a new tensor; no noise is added here.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    channels, height, width = image.shape
    values = image.detach().double().cpu().reshape(channels, -1).numpy()
    missing = removed.detach().cpu().reshape(-1).numpy().astype(bool)
    unknown = np.flatnonzero(missing)
    if unknown.size == 0:
        return image.clone()
    if unknown.size == missing.size:
        raise ConvlensError("ROAD cannot remove every pixel: nothing is left to impute from")
    variable = np.full(missing.size, -1)
    variable[unknown] = np.arange(unknown.size)
    rows_of, cols_of = unknown // width, unknown % width
    diagonal = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, channels))
    entries_row, entries_col, entries_value = [], [], []
    for d_row, d_col, weight in _NEIGHBOURS:
        r, c = rows_of + d_row, cols_of + d_col
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        equation = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        diagonal[equation] += weight
        is_unknown = missing[neighbour]
        entries_row.append(equation[is_unknown])
        entries_col.append(variable[neighbour[is_unknown]])
        entries_value.append(np.full(int(is_unknown.sum()), -weight))
        np.add.at(rhs, equation[~is_unknown], weight * values[:, neighbour[~is_unknown]].T)
    rows = np.concatenate([np.arange(unknown.size), *entries_row])
    cols = np.concatenate([np.arange(unknown.size), *entries_col])
    data = np.concatenate([diagonal, *entries_value])
    system = coo_matrix((data, (rows, cols)), shape=(unknown.size, unknown.size)).tocsc()
    solution = spsolve(system, rhs).reshape(unknown.size, channels)
    filled = values.copy()
    filled[:, unknown] = solution.T
    return torch.from_numpy(filled).reshape(image.shape).to(image)


def removal_mask(maps: torch.Tensor, fraction: float, order: str) -> torch.Tensor:
    """Which pixels ROAD removes, ``(N, H, W)`` bool: the top (MoRF) or bottom (LeRF) ``fraction``."""
    n, height, width = maps.shape
    count = int(round(fraction * height * width))
    ranks = importance_ranks(maps if order == "morf" else -maps)
    return (ranks < count).view(n, height, width)


def road(
    model,
    x: torch.Tensor,
    maps,
    targets: Targets = None,
    *,
    order: str = "morf",
    fractions=FRACTIONS,
    noise: float = 0.01,
    seed: int | None = 0,
    batch_size: int = 64,
    score: Score = "probability",
) -> Curve:
    """Target scores after ROAD imputation of each fraction of pixels, ``Curve(fractions, (N, F))``.

    Args:
        order: ``"morf"`` (most relevant removed first) or ``"lerf"``.
        fractions: fractions of pixels removed, each in (0, 1).
        noise: std of the Gaussian noise added to imputed pixels (paper: 0.01).
        seed: seeds the noise (a ``torch.Generator``; ``None`` draws a fresh seed).
    """
    if order not in ORDERS:
        raise ConvlensError(f"unknown ROAD order {order!r}; choose 'morf' or 'lerf'")
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise ConvlensError(f"ROAD fractions must lie strictly between 0 and 1, got {fractions}")
    prepared = prepare(model, x, maps, targets)
    x, settled = prepared.x, prepared.targets
    generator = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
    imputed = []
    for fraction in fractions:
        removed = removal_mask(prepared.maps, fraction, order)
        for image, mask in zip(x, removed):
            filled = linear_imputation(image, mask)
            jitter = noise * torch.randn(filled.shape, generator=generator).to(filled)
            imputed.append(torch.where(mask.to(filled.device), filled + jitter, filled))
    stack = torch.stack(imputed)  # (F * N, C, H, W), fraction-major
    scores = score_inputs(
        prepared.model,
        lambda a, b: stack[a:b],
        stack.shape[0],
        settled.repeat(len(fractions)),
        batch_size=batch_size,
        score=score,
    )
    return Curve(torch.tensor(fractions), scores.view(len(fractions), -1).T.contiguous())


def road_score(
    model, x: torch.Tensor, maps, targets: Targets = None, *, order: str = "morf", **options
) -> torch.Tensor:
    """Mean target probability over ROAD's removal fractions, ``(N,)`` (MoRF: lower is better)."""
    return road(model, x, maps, targets, order=order, **options).scores.mean(1)


def road_gap(model, x: torch.Tensor, maps, targets: Targets = None, **options) -> torch.Tensor:
    """``(LeRF - MoRF) / 2`` averaged over fractions, ``(N,)``; higher is better (pytorch-grad-cam's ROADCombined)."""
    lerf = road_score(model, x, maps, targets, order="lerf", **options)
    morf = road_score(model, x, maps, targets, order="morf", **options)
    return (lerf - morf) / 2
