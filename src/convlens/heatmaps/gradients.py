"""Gradient saliency: heatmaps from the target's gradient with respect to the input pixels.

Each method returns per-channel input attributions ``(N, C, H, W)`` (kept in
``Explanation.attributions``) and a raw map at the input's resolution,
aggregated over colour channels as its paper does: the largest magnitude over
channels for gradients (Simonyan et al.), the magnitude of the channel sum for
Integrated Gradients (whose attributions add up to the score difference).

Guided backpropagation changes only the backward pass of ReLUs, through
``capture(..., rewrite={relu: gate})``: the gate is the identity forward and
lets only positive gradients through backward; placed after a ReLU, whose own
backward already zeroes where its input was negative, the pair is exactly
Springenberg's guided ReLU. ``nn.ReLU`` modules and Keras layers with a ReLU
activation are guided; a ReLU called as a function cannot be and is an error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConvlensError
from ..targets import ScoreFn, target_for_rows
from .base import RawMaps, Request, upsample
from .cam import gradcam

DEFAULT_BATCH_SIZE = 16


def _row_score(request: Request, rows: list[int]) -> ScoreFn:
    """Score for a batch whose row ``r`` is a variant of image ``rows[r]``."""
    return target_for_rows(request.score_fn, rows)


def input_gradients(
    request: Request,
    inputs: torch.Tensor,
    rows: list[int],
    batch_size: int,
    rewrite: dict | None = None,
    references: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dS/dx`` for each row of ``inputs`` ``(B, C, H, W)`` (row ``r`` scored with image ``rows[r]``'s target).

    When ``inputs`` is the clean batch itself in one chunk, its pass settles the target.
    ``references`` ``(B, C, H, W)``: each chunk runs stacked on top of its references
    (DeepLIFT's paired pass), both halves scored, the gradient taken to the inputs.
    """
    clean = inputs is request.x and batch_size >= inputs.shape[0] and references is None
    if not clean:
        request.settle_on_clean_batch()
    grads = []
    for start in range(0, inputs.shape[0], batch_size):
        chunk = inputs[start : start + batch_size].detach().clone().requires_grad_()
        chunk_rows = rows[start : start + batch_size]
        batch = chunk
        if references is not None:
            batch = torch.cat([chunk, references[start : start + batch_size].detach().to(chunk.dtype)])
            chunk_rows = chunk_rows * 2
        with request.capture([], rewrite=rewrite) as rec, torch.enable_grad():
            output = rec.forward(batch)
            if clean:
                request.settle(output)
            scores = _row_score(request, chunk_rows)(output)
            (grad,) = torch.autograd.grad(scores.sum(), chunk)
        grads.append(grad.float())
        request.report(min(start + batch_size, inputs.shape[0]), inputs.shape[0])
    return torch.cat(grads)


def saliency(request: Request) -> RawMaps:
    """Vanilla gradient saliency.

    Simonyan, Vedaldi & Zisserman 2013, "Deep Inside Convolutional Networks",
    arXiv:1312.6034: ``M_ij = max_c |dS/dx_cij|``.
    """
    grads = input_gradients(request, request.x, list(range(request.x.shape[0])), len(request.x)).abs()
    return RawMaps([grads.amax(dim=1)], grads)


#: The attributions a NoiseTunnel variant (SmoothGrad-Squared, VarGrad) may smooth.
TUNNELLED = ("saliency", "input_x_gradient")


def noisy_gradients(
    request: Request, of: str, n_samples: int, noise_level: float, stdev: float | None, seed: int, batch_size: int
) -> torch.Tensor:
    """``(N, n_samples, C, H, W)``: the gradients (``of="saliency"``) or input x gradients of noisy copies.

    ``sigma = noise_level * (max(x) - min(x))`` per image, or ``stdev`` when given; the
    noise comes from a ``torch.Generator`` seeded with ``seed``, drawn image by image in
    the order captum's ``NoiseTunnel`` uses, so equal seeds give equal noise.
    """
    if of not in TUNNELLED:
        raise ConvlensError(f"a NoiseTunnel variant smooths one of {', '.join(TUNNELLED)}, got {of!r}")
    if n_samples < 1:
        raise ConvlensError(f"n_samples must be at least 1, got {n_samples}")
    x = request.x.float()
    n = x.shape[0]
    if stdev is None:
        sigma = noise_level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    else:
        sigma = torch.full((n,), float(stdev), device=x.device)
    noise = torch.randn((n * n_samples, *x.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(x.device)
    noisy = x.repeat_interleave(n_samples, dim=0) + noise * sigma.repeat_interleave(n_samples).view(-1, 1, 1, 1)
    rows = [i for i in range(n) for _ in range(n_samples)]
    grads = input_gradients(request, noisy.to(request.x.dtype), rows, batch_size)
    if of == "input_x_gradient":
        grads = grads * noisy
    return grads.view(n, n_samples, *x.shape[1:])


def smoothgrad(
    request: Request,
    *,
    n_samples: int = 25,
    noise_level: float = 0.15,
    stdev: float | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> RawMaps:
    """SmoothGrad: the saliency averaged over noisy copies of the image.

    Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise",
    arXiv:1706.03825: ``A = 1/n sum_s |dS/dx (x + e_s)|``, ``e_s ~ N(0, sigma^2)``,
    ``sigma = noise_level * (max(x) - min(x))`` per image (the paper's 10-20%),
    or ``stdev`` when given; ``M = max_c A_c``. Noise as :func:`noisy_gradients`.
    """
    attributions = noisy_gradients(request, "saliency", n_samples, noise_level, stdev, seed, batch_size).abs().mean(1)
    return RawMaps([attributions.amax(dim=1)], attributions)


def integrated_gradients(
    request: Request, *, steps: int = 50, baseline: float | torch.Tensor = 0.0, batch_size: int = DEFAULT_BATCH_SIZE
) -> RawMaps:
    """Integrated Gradients along the straight path from a baseline.

    Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep Networks",
    arXiv:1703.01365: ``A = (x - x') * int_0^1 dS/dx (x' + a (x - x')) da``,
    here by the trapezoidal rule on ``steps`` evenly spaced points, weights
    summing to 1 (the paper uses a right Riemann sum; captum's
    ``riemann_trapezoid`` samples the same points but its weights sum to
    ``1 - 1/steps``, so its attributions are that much smaller, maps equal);
    ``M = |sum_c A_c|``. ``baseline``: a number or a tensor broadcastable to the
    channels-first input (default black, 0).
    """
    if steps < 2:
        raise ConvlensError(f"steps must be at least 2, got {steps}")
    x = request.x.float()
    n = x.shape[0]
    reference = torch.as_tensor(baseline, dtype=torch.float32, device=x.device).expand_as(x)
    alphas = torch.linspace(0, 1, steps, device=x.device)
    step_weights = torch.full((steps,), 1.0 / (steps - 1), device=x.device)
    step_weights[0] /= 2
    step_weights[-1] /= 2
    path = reference.unsqueeze(1) + alphas.view(1, -1, 1, 1, 1) * (x - reference).unsqueeze(1)
    rows = [i for i in range(n) for _ in range(steps)]
    grads = input_gradients(request, path.flatten(0, 1).to(request.x.dtype), rows, batch_size)
    average = (grads.view(n, steps, *x.shape[1:]) * step_weights.view(1, -1, 1, 1, 1)).sum(dim=1)
    attributions = (x - reference) * average
    return RawMaps([attributions.sum(dim=1).abs()], attributions)


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward passes only the positive part of the gradient."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def _guide(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _PositiveGradient.apply(output)


def relu_modules(request: Request, method: str = "guided backpropagation", fused: bool = True) -> list[nn.Module]:
    """The model's ReLU modules; ``fused``: also layers with a ReLU activation of their own (Keras ``Conv2D``)."""
    modules = []
    for module in request.model.named_layers().values():
        activation = getattr(getattr(module, "activation", None), "__name__", "")
        standalone = type(module).__name__ == "ReLU" or (type(module).__name__ == "Activation" and activation == "relu")
        if isinstance(module, nn.ReLU) or standalone:  # a Keras Activation("relu") layer is a ReLU of its own
            modules.append(module)
        elif activation == "relu":
            if not fused:
                raise ConvlensError(
                    f"{method} needs each ReLU as a layer of its own, and layer {type(module).__name__} "
                    "applies its ReLU inside; use guided_backprop or saliency"
                )
            modules.append(module)
    if not modules:
        raise ConvlensError(
            f"{method} needs ReLU layers (nn.ReLU modules); this model has none "
            "or calls ReLU as a function; use saliency or smoothgrad"
        )
    return modules


def guided_gradients(request: Request) -> torch.Tensor:
    """Springenberg's guided-backpropagation gradient ``(N, C, H, W)``."""
    guide = dict.fromkeys(relu_modules(request), _guide)
    return input_gradients(request, request.x, list(range(request.x.shape[0])), len(request.x), guide)


def guided_backprop(request: Request) -> RawMaps:
    """Guided backpropagation.

    Springenberg et al. 2014, "Striving for Simplicity: The All Convolutional
    Net", arXiv:1412.6806: at each ReLU the backward signal is
    ``R_l = 1[x_l > 0] * ReLU(R_{l+1})``; ``M = max_c |R_0|``.
    """
    grads = guided_gradients(request)
    return RawMaps([grads.abs().amax(dim=1)], grads)


def guided_gradcam(request: Request) -> RawMaps:
    """Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM map.

    Selvaraju et al. 2017, arXiv:1610.02391, section 3.1:
    ``A = R_0 * Up(ReLU(Grad-CAM))`` (bilinear), ``M = max_c |A_c|``.
    """
    cam = gradcam(request).per_layer[0].clamp(min=0)
    attributions = guided_gradients(request) * upsample(cam, tuple(request.x.shape[-2:])).unsqueeze(1)
    return RawMaps([attributions.abs().amax(dim=1)], attributions)
