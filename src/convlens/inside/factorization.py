"""Deep Feature Factorization: a layer's activations split into K concepts, one heatmap per concept.

Collins, Achanta and Süsstrunk 2018, "Deep Feature Factorization for Concept Discovery",
arXiv:1806.10206. The layer's activations over every image and position form a matrix
``A`` (channels x N·H·W); non-negative matrix factorization writes ``A ≈ W H`` with
``W`` (channels x K) the concepts' directions in channel space and ``H`` (K x N·H·W)
how strongly each position shows each concept. Each row of ``H``, read back on the
layer's grid, is a concept's heatmap; run through the classifier's linear head, each
concept's direction says which classes it raises most.

Example::

    model = cl.load_model("resnet50")
    parts = cl.factorize(model, ["cat.jpg", "dog.jpg"], components=4)
    parts.maps.shape            # (2, 4, 224, 224), each map in [0, 1]
    parts.top_classes[0]        # [("tabby", 0.41), ("tiger cat", 0.22), ...]: what concept 0 stands for

pytorch-grad-cam's ``DeepFeatureFactorization`` is the reference: the same shift of each
channel to a minimum of 0 before the factorization, the same NMF (scikit-learn's, random
initialisation seeded), the concept directions with the shift added back, each map
scaled to [0, 1] and resized to the input. Its concept scores are the raw head outputs;
``top_classes`` here are their softmax, as its ``run_dff_on_image`` shows them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..capture import LayerRef
from ..errors import ConvlensError
from ..images import ImageLike
from ..models import Model, as_model, auto_layer
from ..models.heads import linear_head
from .activations import activations

#: More concepts than this is no longer a summary of a layer.
COMPONENTS_MAX = 64


@dataclass
class Factorization:
    """The concepts of one layer over a batch of images.

    ``concepts`` ``(C, K)``: each concept's direction in the layer's channels. ``maps``
    ``(N, K, H, W)`` at the input's size, each in [0, 1]; ``raw`` ``(N, K, h, w)`` the NMF
    coefficients on the layer's grid. ``class_scores`` ``(K, classes)``: the linear head
    applied to each concept's direction (None when the head does not read this layer's
    channels, with the reason in ``head_note``); ``top_classes[k]``: the five classes concept
    ``k`` raises most, with their softmax share. ``error``: the relative reconstruction error
    ``|A - WH| / |A|``.
    """

    layer: str
    concepts: np.ndarray
    maps: np.ndarray
    raw: np.ndarray
    class_scores: np.ndarray | None
    top_classes: list[list[tuple[str, float]]]
    error: float
    head_note: str = ""

    @property
    def components(self) -> int:
        return self.concepts.shape[1]


def nmf(matrix: np.ndarray, components: int, seed: int = 0, max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """``W (rows, K), H (K, columns)`` with ``matrix ≈ W @ H``, both non-negative (scikit-learn's NMF)."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # an approximate split is still the split asked for
        model = NMF(n_components=components, init="random", random_state=seed, max_iter=max_iter)
        w = model.fit_transform(matrix)
    return w, model.components_


def _scale_each(maps: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """Each ``(h, w)`` map shifted to 0 and divided by its maximum, then resized bilinearly to ``size``."""
    shifted = maps - maps.amin(dim=(-2, -1), keepdim=True)
    scaled = shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + 1e-7)
    n, k = scaled.shape[:2]
    resized = F.interpolate(
        scaled.reshape(n * k, 1, *scaled.shape[-2:]), size=size, mode="bilinear", align_corners=False
    )
    return resized.reshape(n, k, *size).numpy()


def _concept_classes(model: Model, concepts: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The head's scores of each concept direction ``(K, classes)``, or None and why not."""
    try:
        head, weight, bias = linear_head(model.named_layers(), "this model has no linear head")
    except ConvlensError as err:
        return None, str(err)
    if weight.shape[1] != concepts.shape[0]:
        return None, (
            f"the linear head reads {weight.shape[1]} features and this layer has {concepts.shape[0]} "
            "channels, so its concepts cannot be scored as classes"
        )
    directions = torch.as_tensor(concepts.T, dtype=torch.float32)
    if isinstance(head, nn.Module) and isinstance(head, nn.Linear):
        with torch.no_grad():
            return head(directions.to(weight.device, weight.dtype)).float().cpu().numpy(), ""
    scores = directions @ weight.float().cpu().T + (bias.float().cpu() if bias is not None else 0.0)
    return scores.numpy(), ""


def factorize(
    model: Model | nn.Module,
    images: ImageLike | Sequence[ImageLike] | torch.Tensor,
    layer: LayerRef | None = None,
    components: int = 5,
    *,
    seed: int = 0,
    max_iter: int = 200,
) -> Factorization:
    """Deep Feature Factorization of ``layer`` (default: the last spatial layer) over ``images``.

    The factorization is over the whole batch at once, so one concept means the same thing in
    every image. ``components`` concepts (1 to 64); ``seed`` fixes NMF's random start; ``max_iter``
    its iterations (scikit-learn's default, 200, as the reference).
    """
    if not 1 <= components <= COMPONENTS_MAX:
        raise ConvlensError(f"components must be 1 to {COMPONENTS_MAX}, not {components}")
    model = as_model(model)
    name = layer if layer is not None else auto_layer(model)
    x, _ = model.as_batch(images)  # channels-first; activations takes the model's own layout (Keras: last)
    ((layer_name, recorded),) = activations(model, model.from_internal(x), [name]).items()
    act = recorded.detach().float().cpu()
    n, channels, h, w = act.shape
    if channels < components:
        raise ConvlensError(
            f"layer {layer_name!r} has {channels} channels, fewer than the {components} concepts "
            "asked for; ask for fewer components or choose a wider layer"
        )
    matrix = torch.nan_to_num(act, nan=0.0).permute(1, 0, 2, 3).reshape(channels, -1).numpy().astype(np.float64)
    offset = matrix.min(axis=1, keepdims=True)
    shifted = matrix - offset
    if not shifted.any():
        raise ConvlensError(f"layer {layer_name!r} is constant on these images: there is nothing to factorize")
    directions, strengths = nmf(shifted, components, seed=seed, max_iter=max_iter)
    error = float(np.linalg.norm(shifted - directions @ strengths) / np.linalg.norm(shifted))
    concepts = directions + offset
    raw = torch.as_tensor(strengths.reshape(components, n, h, w).transpose(1, 0, 2, 3), dtype=torch.float32)
    maps = _scale_each(raw, tuple(x.shape[-2:]))
    scores, note = _concept_classes(model, concepts)
    top: list[list[tuple[str, float]]] = [[] for _ in range(components)]
    if scores is not None:
        shares = torch.softmax(torch.as_tensor(scores), dim=1).numpy()
        for k in range(components):
            order = np.argsort(-shares[k], kind="stable")[:5]
            top[k] = [(model.label(int(c)), float(shares[k, c])) for c in order]
    return Factorization(layer_name, concepts, maps, raw.numpy(), scores, top, error, note)
