"""The one gradient-ascent loop behind filter patterns, class models and DeepDream.

At every step: render the parameterised batch ``(N, 3, H, W)`` in ``[0, 1]``,
apply the random transforms, map to the model's input (:func:`input_normalizer`),
run the model only as far as the objective's last layer
(``capture(..., graph=True, stop=True)``; layers after it never run), and
ascend ``objective - sum(weight * regulariser)``. The gradient is taken with
``torch.autograd.grad`` with respect to the image parameters only: the model's
parameters are frozen by ``capture`` and get no ``.grad``.

Optimisers (``OPTIMIZERS``): ``adam`` (default, lr 0.05), ``rmsprop`` and
``normalized``, the classic step ``x += lr * g / rms(g)`` with the gradient
normalised per image (Chollet, *Deep Learning with Python*, 2017, §5.4.2;
RMS rather than his L2 norm so ``lr`` does not depend on the image size).

Everything random draws from one ``torch.Generator`` seeded by ``seed``.
The scores returned are measured once more after the last step, on the
untransformed images, so they are comparable across runs and methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..capture import capture
from ..errors import ConvlensError
from ..models import Model
from ..progress import Progress
from .inputs import fixed_input_size, input_normalizer, run_failure
from .objectives import Objective
from .params import PARAMETERIZATIONS, ImageParam
from .regularizers import REGULARIZERS
from .transforms import CHAINS, Transform, compose, fit


class NormalizedAscent(torch.optim.Optimizer):
    """``p -= lr * g / (rms(g) + eps)``, the RMS taken per image (over every dimension but the first)."""

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dims = tuple(range(1, p.grad.ndim))
                rms = p.grad.pow(2).mean(dim=dims, keepdim=True).sqrt() if dims else p.grad.abs()
                p.sub_(group["lr"] * p.grad / (rms + group["eps"]))


#: Optimisers by name: ``fn(tensors, lr) -> torch.optim.Optimizer``; and their default step sizes.
OPTIMIZERS: dict[str, Callable[[list, float], torch.optim.Optimizer]] = {
    "adam": lambda tensors, lr: torch.optim.Adam(tensors, lr=lr),
    "rmsprop": lambda tensors, lr: torch.optim.RMSprop(tensors, lr=lr),
    "normalized": lambda tensors, lr: NormalizedAscent(tensors, lr=lr),
}
DEFAULT_LR = {"adam": 0.05, "rmsprop": 0.01, "normalized": 0.05}


@dataclass
class OptimizationResult:
    images: torch.Tensor  # (N, 3, H, W) in [0, 1], detached
    scores: torch.Tensor  # (N,) objective of the final, untransformed images
    initial_scores: torch.Tensor  # (N,) objective of the starting images


def _choose(table: Mapping, name: str, what: str):
    if name not in table:
        raise ConvlensError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]


def check_settings(
    optimizer: str,
    param: str | ImageParam,
    transforms: str | Transform | None,
    regularizers: Mapping[str, float] | None,
    steps: int,
    size: int | Sequence[int] | None = None,
) -> None:
    """Validate the options of :func:`maximize` before any work (the CLI calls it before writing)."""
    _choose(OPTIMIZERS, optimizer, "optimizer")
    if isinstance(param, str):
        _choose(PARAMETERIZATIONS, param, "image parameterisation")
    if isinstance(transforms, str):
        _choose(CHAINS, transforms, "transform chain")
    for name, weight in (regularizers or {}).items():
        _choose(REGULARIZERS, name, "regulariser")
        if weight < 0:
            raise ConvlensError(f"regulariser weights must be >= 0, got {name}={weight}")
    if steps < 0:
        raise ConvlensError(f"steps must be >= 0, got {steps}")
    if size is not None and min((size, size) if isinstance(size, int) else size) < 8:
        raise ConvlensError(f"image size must be at least 8 pixels, got {size}")


def maximize(
    model: Model,
    objective: Objective,
    *,
    batch: int = 1,
    size: int | tuple[int, int] = 128,
    steps: int = 128,
    param: str | ImageParam = "fourier",
    optimizer: str = "adam",
    lr: float | None = None,
    transforms: str | Transform | None = "standard",
    regularizers: Mapping[str, float] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> OptimizationResult:
    """Optimise a batch of images to maximise ``objective``; see the module docstring."""
    check_settings(optimizer, param, transforms, regularizers, steps)
    generator = torch.Generator().manual_seed(seed)
    device = model.device
    image = (
        PARAMETERIZATIONS[param](batch, size, generator=generator, device=device) if isinstance(param, str) else param
    )
    with torch.no_grad():
        shape = tuple(image.render().shape[-2:])
    chain = CHAINS[transforms](min(shape)) if isinstance(transforms, str) else transforms
    fixed = fixed_input_size(model)
    if chain is not None and fixed is not None:
        # A model that takes one input size only cannot see the padded, jittered, rescaled canvas:
        # the chain ends by cropping or padding back to the image's own size.
        chain = compose([chain, fit(shape)])
    ascent = OPTIMIZERS[optimizer](image.tensors, DEFAULT_LR[optimizer] if lr is None else lr)
    to_input = input_normalizer(model)
    weights = {name: float(w) for name, w in (regularizers or {}).items() if w}
    rewrite = model.logit_rewrites() if objective.needs_output else None

    with capture(model, objective.layers, graph=True, stop=not objective.needs_output, rewrite=rewrite) as rec:

        def evaluate(images: torch.Tensor) -> torch.Tensor:
            # channels-last memory lets oneDNN/cuDNN pick their fastest convolutions (~20 % per step on CPU)
            inputs = to_input(images).contiguous(memory_format=torch.channels_last)
            try:
                output = rec.forward(inputs)
            except ConvlensError:
                raise
            except (RuntimeError, ValueError, AssertionError) as err:  # Keras: ValueError; timm's ViT: AssertionError
                raise run_failure(err, tuple(images.shape[-2:]), fixed) from None
            # a class objective reads the class scores: one tensor even from a model with several outputs
            scores = model.scores(output) if objective.needs_output and output is not None else output
            return objective(rec.outputs, scores).float()

        with torch.no_grad():
            initial = evaluate(image.render())
        for step in range(steps):
            images = image.render()
            scores = evaluate(chain(images, generator) if chain is not None else images)
            loss = -scores.sum()
            for name, weight in weights.items():
                loss = loss + weight * REGULARIZERS[name](images).sum()
            grads = torch.autograd.grad(loss, image.tensors, allow_unused=True) if loss.requires_grad else [None]
            if any(g is None for g in grads):
                raise ConvlensError(
                    f"no gradient reaches the input image from {objective.description}: a part of "
                    "the model before that layer is not differentiable (detached, integer or "
                    "no_grad); choose an earlier layer"
                )
            for tensor, grad in zip(image.tensors, grads):
                tensor.grad = grad
            ascent.step()
            if image.after_step is not None:
                image.after_step()
            if progress is not None:
                progress(step + 1, steps)
        with torch.no_grad():
            final_images = image.render().detach()
            final = evaluate(final_images)
    return OptimizationResult(final_images, final.detach(), initial.detach())
