"""Captum's attribution family on CNNs.

Input x gradient, deconvolution, GradientSHAP, the NoiseTunnel variants, occlusion.

Every method returns per-channel input attributions ``(N, C, H, W)`` and a map at
the input's resolution, aggregated over colour channels as the method's kind
asks: ``|sum_c A_c|`` for attributions that add up to a score difference (input x
gradient, GradientSHAP), ``max_c |A_c|`` for gradient magnitudes (deconvolution),
``max_c A_c`` for the non-negative NoiseTunnel moments, and the channel mean for
occlusion, whose window covers every channel (the score drop is the same on each).

Random draws are made from generators seeded with ``seed`` in the order captum
draws from its global ones (``torch`` for noise, NumPy for baselines and path
points), so that equal seeds give equal attributions and the reference tests
compare value by value.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import ConvlensError
from .base import RawMaps, Request
from .gradients import DEFAULT_BATCH_SIZE, input_gradients, noisy_gradients, relu_modules
from .perturbation import clean_scores, score_variants


def _rows(request: Request) -> list[int]:
    return list(range(request.x.shape[0]))


def input_x_gradient(request: Request) -> RawMaps:
    """Input x gradient: the gradient scaled by the input, ``A = x * dS/dx``.

    Shrikumar et al. 2016, "Not Just a Black Box", arXiv:1605.01713 (captum's
    ``InputXGradient``); ``M = |sum_c A_c|``.
    """
    x = request.x.float()
    attributions = x * input_gradients(request, request.x, _rows(request), len(request.x))
    return RawMaps([attributions.sum(dim=1).abs()], attributions)


class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward ``ReLU(grad)``, blind to where the forward input was negative."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def deconvolution(request: Request) -> RawMaps:
    """Deconvolution (the "deconvnet" backward pass).

    Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks",
    arXiv:1311.2901: each ReLU passes the backward signal through a ReLU of its
    own, ``R_l = ReLU(R_{l+1})``, whatever the sign of its forward input (guided
    backpropagation adds that mask); ``M = max_c |R_0|``. Each ReLU's input is
    kept before the layer runs, so an in-place ReLU cannot hide it.
    """
    kept: dict[torch.nn.Module, torch.Tensor] = {}

    def keep(module, args):
        kept[module] = args[0]
        return (args[0].clone(),)  # an in-place ReLU now overwrites a copy

    def deconv(module, inputs, output):
        return _DeconvReLU.apply(kept.pop(module))

    modules = relu_modules(request, "deconvolution", fused=False)
    with contextlib.ExitStack() as hooks:
        for module in modules:
            hooks.callback(module.register_forward_pre_hook(keep).remove)
        grads = input_gradients(request, request.x, _rows(request), len(request.x), dict.fromkeys(modules, deconv))
    return RawMaps([grads.abs().amax(dim=1)], grads)


def smoothgrad_sq(
    request: Request,
    *,
    of: str = "saliency",
    n_samples: int = 25,
    noise_level: float = 0.15,
    stdev: float | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> RawMaps:
    """SmoothGrad-Squared: the mean of the squared attributions over noisy copies.

    Hooker et al. 2019, "A Benchmark for Interpretability Methods in Deep Neural
    Networks" (ROAR), arXiv:1806.10758: ``A = 1/n sum_s g(x + e_s)^2`` for ``g`` the
    gradient (``of="saliency"``) or input x gradient; noise as :func:`smoothgrad`
    (captum's ``NoiseTunnel(nt_type="smoothgrad_sq")``); ``M = max_c A_c``.
    """
    attributions = noisy_gradients(request, of, n_samples, noise_level, stdev, seed, batch_size).square().mean(1)
    return RawMaps([attributions.amax(dim=1)], attributions)


def vargrad(
    request: Request,
    *,
    of: str = "saliency",
    n_samples: int = 25,
    noise_level: float = 0.15,
    stdev: float | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> RawMaps:
    """VarGrad: the variance of the attributions over noisy copies.

    Adebayo et al. 2018, "Local Explanation Methods for Deep Neural Networks Lack
    Sensitivity to Parameter Values", arXiv:1810.03307: ``A = Var_s g(x + e_s)``
    (the population variance, ``E[g^2] - E[g]^2``, as captum's
    ``NoiseTunnel(nt_type="vargrad")``) of the signed gradient; captum's
    ``Saliency`` takes its magnitude first unless told ``abs=False``; ``M = max_c A_c``.
    """
    grads = noisy_gradients(request, of, n_samples, noise_level, stdev, seed, batch_size)
    attributions = (grads.square().mean(1) - grads.mean(1).square()).clamp(min=0)
    return RawMaps([attributions.amax(dim=1)], attributions)


def baseline_batch(request: Request, baselines) -> torch.Tensor:
    """The ``(B, C, H, W)`` baseline distribution in the model's internal layout."""
    x = request.x
    reference = torch.as_tensor(0.0 if baselines is None else baselines, dtype=torch.float32, device=x.device)
    if reference.ndim == 3:
        reference = reference.unsqueeze(0)
    if reference.ndim == 4 and request.model.layout == "channels_last":
        reference = reference.permute(0, 3, 1, 2)
    if reference.ndim == 0:
        reference = reference.expand(1, *x.shape[1:])
    if reference.ndim != 4 or tuple(reference.shape[1:]) != tuple(x.shape[1:]):
        raise ConvlensError(
            f"baselines of shape {tuple(torch.as_tensor(baselines).shape)} do not fit inputs of "
            f"shape {tuple(request.model.from_internal(x).shape[1:])}; give a number, one "
            "image of that shape or a batch of them"
        )
    return reference


def gradient_shap(
    request: Request,
    *,
    baselines=None,
    n_samples: int = 25,
    stdev: float = 0.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> RawMaps:
    """GradientSHAP: expected gradients between the input and baselines drawn from a distribution.

    Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions",
    arXiv:1705.07874 (captum's ``GradientShap``): for ``s = 1..n`` a baseline
    ``b_s`` drawn from ``baselines``, noise ``e_s ~ N(0, stdev^2)``, ``a_s ~ U(0, 1)``,
    ``A = 1/n sum_s (x + e_s - b_s) * dS/dx (b_s + a_s (x + e_s - b_s))``;
    ``M = |sum_c A_c|``. ``baselines``: a number, one image or a batch of them in
    the model's input layout (default 0). Draws: NumPy ``RandomState(seed)`` for
    the baseline choices and then ``a``, as captum draws them from NumPy's global
    generator (equal seeds give captum's attributions at ``stdev=0``), and
    ``torch`` noise seeded with ``seed``.
    """
    if n_samples < 1:
        raise ConvlensError(f"n_samples must be at least 1, got {n_samples}")
    x = request.x.float()
    n = x.shape[0]
    reference = baseline_batch(request, baselines)
    numpy_draws = np.random.RandomState(seed)
    chosen = reference[torch.as_tensor(numpy_draws.choice(reference.shape[0], n * n_samples))]
    noise = torch.randn((n * n_samples, *x.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(x.device)
    noisy = x.repeat_interleave(n_samples, dim=0) + noise * stdev
    alphas = torch.as_tensor(numpy_draws.uniform(0.0, 1.0, n * n_samples), dtype=x.dtype, device=x.device)
    points = chosen + alphas.view(-1, 1, 1, 1) * (noisy - chosen)
    rows = [i for i in range(n) for _ in range(n_samples)]
    grads = input_gradients(request, points.to(request.x.dtype), rows, batch_size)
    attributions = ((noisy - chosen) * grads).view(n, n_samples, *x.shape[1:]).mean(1)
    return RawMaps([attributions.sum(dim=1).abs()], attributions)


def _windows(size: int, window: int, stride: int) -> list[int]:
    return list(range(0, size - window + 1, stride))


def occlusion(
    request: Request, *, window: int = 16, stride: int = 8, baseline: float = 0.0, batch_size: int = 64
) -> RawMaps:
    """Occlusion: the score drop when a square window of the image is replaced by a baseline.

    Zeiler & Fergus 2014, arXiv:1311.2901, section 4.2 (captum's ``Occlusion``
    with a window over every channel): each ``window x window`` patch at
    ``stride`` steps is set to ``baseline``; a pixel's attribution is the mean of
    ``S(x) - S(x with the patch occluded)`` over the patches that cover it (a
    pixel no patch covers gets 0, where captum divides by zero). All patches of
    an image are scored in batches of ``batch_size`` (captum scores one by default).
    """
    x = request.x
    n, channels, height, width = x.shape
    if window < 1 or stride < 1:
        raise ConvlensError(f"occlusion window and stride must be at least 1, got window={window}, stride={stride}")
    if window > min(height, width):
        raise ConvlensError(
            f"occlusion window {window} is larger than the {height}x{width} input; "
            f"choose a window of at most {min(height, width)}"
        )
    clean = clean_scores(request)
    patches = [(top, left) for top in _windows(height, window, stride) for left in _windows(width, window, stride)]
    coverage = torch.zeros((height, width), device=x.device)
    for top, left in patches:
        coverage[top : top + window, left : left + window] += 1
    total = n * len(patches)
    attributions = []
    for image in range(n):

        def make_batch(start: int, stop: int, image=image):
            batch = x[image : image + 1].repeat(stop - start, 1, 1, 1)
            for row, (top, left) in enumerate(patches[start:stop]):
                batch[row, :, top : top + window, left : left + window] = baseline
            return batch, {}

        scores = score_variants(
            request, image, len(patches), make_batch, batch_size, done=image * len(patches), total=total
        )
        drop = torch.zeros((height, width), device=x.device)
        for (top, left), score in zip(patches, (clean[image] - scores).tolist()):
            drop[top : top + window, left : left + window] += score
        attributions.append((drop / coverage.clamp(min=1)).expand(channels, -1, -1))
    stacked = torch.stack(attributions)
    return RawMaps([stacked.mean(dim=1)], stacked)


__all__ = ["deconvolution", "gradient_shap", "input_x_gradient", "occlusion", "smoothgrad_sq", "vargrad"]
