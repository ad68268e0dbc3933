"""The CAM family: a heatmap is a weighted sum of a layer's channels, ``M = sum_k w_k * A_k``.

The methods differ only in the weights. A weighting takes the layer's
activations ``A`` and the target's gradient ``G = dS/dA`` (both ``(N, C, h, w)``)
and returns weights of any rank that broadcasts against ``A``: ``(N, C, 1, 1)``
for Grad-CAM, ``(N, C, h, w)`` for HiResCAM and LayerCAM. One function,
:func:`weighted_channel_sum`, runs the forward pass, takes the gradient down to
the layer only (``torch.autograd.grad`` on the recorded output: no parameter
gradients, no backward through the layers before it) and applies the weighting.

Every ``raw`` map here is the signed channel sum; the engine applies the ReLU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConvlensError
from ..models.heads import linear_head
from ..targets import AllClasses, Box, ClassLogits, Region, Similarity, class_logits
from .base import RawMaps, Request

Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 0 where the denominator is 0 (those terms carry no signal)."""
    nonzero = denominator != 0
    return torch.where(
        nonzero,
        numerator / torch.where(nonzero, denominator, torch.ones_like(denominator)),
        torch.zeros_like(numerator),
    )


def layer_gradients(request: Request) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One forward pass and the target's gradient down to each layer: ``(acts, grads)``, float32, detached.

    The gradient only down to the recorded outputs: the layers before them never
    see a backward pass. With ``target="all"`` the scores are ``(N, K)`` and each
    gradient is ``(K, N, C, h, w)``, all classes at once as a batched
    vector-Jacobian product from the same pass.
    """
    with request.capture(graph=True) as rec:
        output = rec.forward(request.x)
        scores = request.score(output, clean=True)
        acts = [request.layer_output(rec, name) for name in request.layers]
        grads = (
            _class_gradients(scores, acts)
            if scores.ndim == 2
            else torch.autograd.grad(scores.sum(), acts, allow_unused=True)
        )
    for name, grad in zip(request.layers, grads):
        if grad is None:
            raise ConvlensError(f"the target does not depend on layer {name!r}; choose a layer before the output")
    return [act.detach().float() for act in acts], [grad.float() for grad in grads]


def weighted_channel_sum(request: Request, weighting: Weighting) -> RawMaps:
    """Forward, gradient of the target down to each layer, ``sum_k weighting(A, G)_k * A_k``.

    With ``target="all"`` the K classes' gradients come from the same forward pass
    (see :func:`layer_gradients`) and the raw maps are ``(N, K, h, w)``.
    """
    maps = []
    for act, grad in zip(*layer_gradients(request)):
        if grad.ndim == 5:  # (K, N, C, h, w): classes folded into the batch, so every weighting works as it is
            classes, n = grad.shape[:2]
            folded = act.unsqueeze(0).expand(classes, *act.shape).flatten(0, 1)
            per_class = (weighting(folded, grad.flatten(0, 1)) * folded).sum(dim=1)
            maps.append(per_class.view(classes, n, *per_class.shape[1:]).transpose(0, 1))
        else:
            maps.append((weighting(act, grad) * act).sum(dim=1))
    return RawMaps(maps)


def _class_gradients(scores: torch.Tensor, acts: list[torch.Tensor]) -> tuple:
    """``d scores[:, k] / d act`` for every class k: ``(K, N, C, h, w)`` per layer, from one graph."""
    classes = scores.shape[1]
    basis = torch.eye(classes, dtype=scores.dtype, device=scores.device).unsqueeze(1).expand(classes, *scores.shape)
    try:
        return torch.autograd.grad(scores, acts, grad_outputs=basis, is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an operation without a batching rule: one backward per class, same forward pass
        per_class = [
            torch.autograd.grad(scores[:, k].sum(), acts, retain_graph=True, allow_unused=True) for k in range(classes)
        ]
        return tuple(None if grads[0] is None else torch.stack(grads) for grads in zip(*per_class))


def gradcam(request: Request) -> RawMaps:
    """Grad-CAM: weights are the spatially averaged gradients.

    Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", arXiv:1610.02391:
    ``w_k = 1/Z sum_ij dS/dA_k(i, j)``, ``M = ReLU(sum_k w_k A_k)``.
    """
    return weighted_channel_sum(request, lambda act, grad: grad.mean(dim=(2, 3), keepdim=True))


def gradcam_plusplus(request: Request, *, eps: float = 1e-6) -> RawMaps:
    """Grad-CAM++: positive gradients weighted by closed-form per-pixel coefficients.

    Chattopadhay et al. 2018, "Grad-CAM++: Improved Visual Explanations for Deep
    Convolutional Networks", arXiv:1710.11063, eq. 19 with the exponential
    score assumption:
    ``alpha_kij = G^2 / (2 G^2 + sum_ab A_kab G^3 + eps)``, ``w_k = sum_ij alpha_kij ReLU(G_kij)``.
    ``alpha = 0`` where the gradient is 0 (and where the guarded denominator is
    still exactly 0). With activations that can be negative (SiLU, GELU) the
    paper's denominator ``G^2 (2 + G sum A)`` passes through zero, and ``alpha``
    there is as large as float32 rounding makes it; ``eps`` (default ``1e-6``,
    the value pytorch-grad-cam adds) bounds it, so the maps agree with the
    reference on such networks. The price: channels whose gradients are about
    ``1e-3`` or smaller get visibly smaller weights than the paper's formula
    gives; ``eps=0`` computes the formula exactly.
    """

    def weights(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        grad2 = grad.pow(2)
        grad3 = grad2 * grad  # the reference's order of operations: near-zero denominators amplify rounding
        denominator = 2 * grad2 + act.sum(dim=(2, 3), keepdim=True) * grad3 + eps
        alpha = torch.where(grad != 0, _safe_divide(grad2, denominator), torch.zeros_like(grad))
        return (alpha * grad.clamp(min=0)).sum(dim=(2, 3), keepdim=True)

    return weighted_channel_sum(request, weights)


def xgradcam(request: Request, *, eps: float = 1e-7) -> RawMaps:
    """XGrad-CAM: gradients averaged with the activations' own spatial distribution as weights.

    Fu et al. 2020, "Axiom-based Grad-CAM", arXiv:2008.02312, eq. 12:
    ``w_k = sum_ij (A_kij / (sum_ab A_kab + eps)) G_kij``. The paper has no
    ``eps``; after SiLU/GELU a channel's activations can sum to almost zero
    (positive and negative parts cancel) and its weight then depends on
    float32 rounding alone. ``eps`` (default ``1e-7``, the value
    pytorch-grad-cam adds) is what the reference divides by there, so the maps
    agree with it; a channel whose guarded sum is exactly zero gets ``w_k = 0``.
    ``eps=0`` computes the paper's formula.
    """

    def weights(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        total = act.sum(dim=(2, 3), keepdim=True) + eps
        return _safe_divide(grad * act, total).sum(dim=(2, 3), keepdim=True)

    return weighted_channel_sum(request, weights)


def hirescam(request: Request) -> RawMaps:
    """HiResCAM: the element-wise product of gradient and activation, summed over channels.

    Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful
    explanations of convolutional neural networks", arXiv:2011.08891:
    ``M = ReLU(sum_k G_k * A_k)``.
    """
    return weighted_channel_sum(request, lambda act, grad: grad)


def layercam(request: Request) -> RawMaps:
    """LayerCAM: positive gradients as per-pixel weights; works at shallow layers too.

    Jiang et al. 2021, "LayerCAM: Exploring Hierarchical Class Activation Maps
    for Localization", IEEE TIP 30:5875: ``M = ReLU(sum_k ReLU(G_k) * A_k)``.
    Several layers are fused by averaging their normalised maps (as
    pytorch-grad-cam does; the paper also rescales shallow maps with tanh).
    """
    return weighted_channel_sum(request, lambda act, grad: grad.clamp(min=0))


def eigencam(request: Request, *, sign_correction: bool = True) -> RawMaps:
    """Eigen-CAM: the activations projected on their first principal component (no gradients).

    Muhammad & Yeasin 2020, "Eigen-CAM: Class Activation Map using Principal
    Components", arXiv:2008.00299: with ``A`` reshaped to ``(h*w, C)`` and its
    columns centred, ``M = A v_1`` where ``v_1`` is the first right singular
    vector. Class-agnostic: the target only names the class in titles.
    The sign of a singular vector is arbitrary; with ``sign_correction`` the map
    is flipped when its most extreme value is negative (Chung & Ying 2025,
    Seg-Eigen-CAM, eq. 13). pytorch-grad-cam leaves the sign as the SVD returns it.
    """
    with torch.inference_mode(), request.capture() as rec:
        output = rec.forward(request.x)
        request.score(output, clean=True)
        acts = [request.layer_output(rec, name).float() for name in request.layers]
    return RawMaps([principal_projection(act, sign_correction) for act in acts])


def principal_projection(maps: torch.Tensor, sign_correction: bool = True) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N, h, w)``: each image's pixels, as C-vectors centred over the pixels,
    projected on their first principal component (the first right singular vector).

    ``sign_correction`` flips a projection whose most extreme value is negative
    (the singular vector's sign is arbitrary). NaN entries count as 0, as in pytorch-grad-cam.
    """
    n, _, h, w = maps.shape
    matrix = torch.nan_to_num(maps.float(), nan=0.0).flatten(2).transpose(1, 2)  # (N, h*w, C)
    matrix = matrix - matrix.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    projection = (matrix @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)
    if sign_correction:
        projection = flip_to_positive(projection)
    return projection.view(n, h, w)


def flip_to_positive(projection: torch.Tensor) -> torch.Tensor:
    """Each row of ``(N, P)`` negated where its most extreme value is negative (Seg-Eigen-CAM, eq. 13)."""
    flip = projection.min(dim=1).values.abs() > projection.max(dim=1).values.abs()
    return torch.where(flip.unsqueeze(1), -projection, projection)


def _linear_head(request: Request) -> tuple[nn.Module, torch.Tensor]:
    """The last linear layer and its weight ``(K, C)``; a Keras ``Dense`` counts too."""
    head, weight, _ = linear_head(
        request.model.named_layers(),
        "CAM needs a global-average-pooling + linear head and this model has no linear "
        "layer; use gradcam, which equals CAM on such models",
    )
    return head, weight


def class_activation_map(request: Request) -> RawMaps:
    """CAM: the channels weighted by the linear classifier's weights for the class.

    Zhou et al. 2016, "Learning Deep Features for Discriminative Localization",
    arXiv:1512.04150: for ``S_c = sum_k w_ck GAP(A_k) + b_c``, ``M_c = sum_k w_ck A_k``.
    Only defined when the layer's global average is exactly what the final
    linear layer reads; anything else is a one-line error.
    """
    if hasattr(request.target, "settle") or isinstance(request.score_fn, (Region, Box, Similarity)):
        kind = type(request.score_fn if request.score_fn is not None else request.target).__name__
        raise ConvlensError(
            f"CAM reads a classifier's linear head and cannot serve a {kind} target; "
            "use gradcam (or another gradient CAM) instead"
        )
    if (callable(request.target) and not isinstance(request.target, (str, torch.Tensor))) or (
        request.score_fn is not None and not isinstance(request.score_fn, (ClassLogits, AllClasses))
    ):
        raise ConvlensError("CAM explains a class; pass a class index or name as the target, not a function")
    head, weight = _linear_head(request)
    head_inputs: list[torch.Tensor] = []

    def record_head_input(module, inputs, output):
        head_inputs.append(inputs[0])
        return output

    name = request.layers[0]
    with torch.inference_mode(), request.capture(rewrite={head: record_head_input}) as rec:
        output = rec.forward(request.x)
        request.score(output, clean=True)
        act = request.layer_output(rec, name).float()
    pooled = act.mean(dim=(2, 3))
    features = head_inputs[-1].float().flatten(1) if head_inputs else None
    if (
        features is None
        or features.shape != pooled.shape
        or not torch.allclose(features, pooled, rtol=1e-3, atol=1e-4 * float(pooled.abs().max()) + 1e-6)
    ):
        raise ConvlensError(
            f"CAM needs layer {name!r} followed by global average pooling and a linear head; "
            "this model's classifier reads something else: use gradcam (the same map where CAM applies)"
        )
    weight = weight.float().to(act.device)
    weight = class_logits(weight.T).T  # one logit: the negative class's weights are the negated ones
    if request.all_classes:
        return RawMaps([torch.einsum("kc,nchw->nkhw", weight, act)])
    rows = weight[torch.as_tensor(request.class_indices, device=act.device)]
    return RawMaps([torch.einsum("nc,nchw->nhw", rows, act)])
