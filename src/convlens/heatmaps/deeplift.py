"""DeepLIFT (rescale rule) and DeepLIFT-SHAP: attributions as differences from a reference, backpropagated.

Shrikumar, Greenside & Kundaje 2017, "Learning Important Features Through
Propagating Activation Differences", arXiv:1704.02685. Each image runs stacked
on top of its reference in one pass (the batch ``[x; x']``, both halves scored);
the backward pass is the gradient's, except at each nonlinearity, whose local
derivative is replaced by a multiplier:

- an elementwise activation (ReLU, LeakyReLU, ELU, Sigmoid, Tanh, Softplus, and
  the ones captum leaves to the plain gradient: GELU, SiLU, Hardswish, ReLU6,
  Mish...) passes ``g * (y - y') / (z - z')``, the rescale rule, and the
  gradient ``g * f'(z)`` where ``|z - z'| < 1e-10`` (captum's ``eps``);
- a max pooling passes captum's rule: with ``m = max(y, y')``,
  ``(P_z(g * (m - y')) + P_z'(g' * (y - m))) / (z - z')`` to both halves, where
  ``P_z`` is the pooling's own backward at ``z`` (the gradient where ``|z - z'| < 1e-10``).

Attributions are ``A = (x - x') * m`` for the multipliers ``m`` reached at the
input; ``M = |sum_c A_c|``. When every nonlinearity of the model is such a layer,
``sum A = S(x) - S(x')`` (completeness). A nonlinearity called as a function
(attention's softmax, a squeeze-excitation product, LayerNorm) passes the plain
gradient, as in captum, and completeness is then approximate.

Departures from captum's ``DeepLift`` (0.9), each of which costs it completeness
or the model: a layer called twice (torchvision's ResNet blocks call their
``relu`` twice) gets the rule at each call, where captum keeps one input per
module and refuses the model; a nonlinearity whose output feeds a max pooling
rescales the pooling's multiplier, where captum's hooks on that shared tensor
hand it the pooling's plain gradient; and the max-pool rule sends each window's
share back by the pooling's own backward, which adds the shares of overlapping
windows with a common maximum, where captum's ``max_unpool2d`` keeps one.
``tests/test_deeplift_lime.py`` shows captum equal to this once a copy of the
model and its scatter avoid the three.

Example::

    res = convlens.explain(model, x, method="deeplift", baseline=0.0)
    res.attributions.sum((1, 2, 3))  # S(x) - S(0) per image, when every nonlinearity is a layer
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConvlensError
from .attribution import baseline_batch
from .base import RawMaps, Request
from .gradients import DEFAULT_BATCH_SIZE, input_gradients

#: captum's threshold below which a reference difference counts as none (the gradient is used there)
EPS = 1e-10
#: elementwise activations by lower-cased class (or Keras activation) name, underscores dropped
ELEMENTWISE = {
    "relu",
    "relu6",
    "leakyrelu",
    "prelu",
    "elu",
    "selu",
    "celu",
    "gelu",
    "silu",
    "swish",
    "mish",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "sigmoid",
    "tanh",
    "softplus",
    "softsign",
}


def _key(name: str) -> str:
    return name.lower().replace("_", "")


def _rule_of(module: nn.Module) -> str | None:
    """``"rescale"``, ``"maxpool"`` or ``None`` (a linear or unknown layer, left to the gradient)."""
    kind = _key(type(module).__name__)
    if kind == "activation":  # a Keras Activation layer
        kind = _key(getattr(getattr(module, "activation", None), "__name__", ""))
    if kind in ELEMENTWISE:
        return "rescale"
    if kind.startswith(("maxpool", "adaptivemaxpool", "globalmaxpool")):
        return "maxpool"
    return None


def rule_modules(request: Request, method: str = "deeplift") -> dict[nn.Module, str]:
    """The model's nonlinear layers and the rule each gets; a fused or absent nonlinearity is a user error."""
    skipped = set(request.model.logit_rewrites())  # a final softmax/sigmoid: the target explains logits
    rules: dict[nn.Module, str] = {}
    for module in request.model.named_layers().values():
        rule = _rule_of(module)
        activation = _key(getattr(getattr(module, "activation", None), "__name__", ""))
        if rule is None and activation in ELEMENTWISE and module not in skipped:
            raise ConvlensError(
                f"{method} needs each nonlinearity as a layer of its own, and layer "
                f"{type(module).__name__} applies its {activation} inside; use integrated_gradients"
            )
        if rule is not None and module not in skipped:
            rules[module] = rule
    if not rules:
        raise ConvlensError(
            f"{method} needs the model's nonlinearities as layers (ReLU, Sigmoid, MaxPool2d...); "
            "this model has none or calls them as functions; use integrated_gradients"
        )
    return rules


class _Multiplier(torch.autograd.Function):
    """The layer's forward value; backward: the DeepLIFT multiplier of the paired batch ``[z; z']``."""

    @staticmethod
    def forward(ctx, inputs, value, vjp, rule):
        ctx.save_for_backward(inputs, value)
        ctx.vjp, ctx.rule = vjp, rule
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        inputs, value = ctx.saved_tensors
        half = inputs.shape[0] // 2
        delta_in = (inputs[:half] - inputs[half:]).repeat(2, *([1] * (inputs.ndim - 1)))
        if ctx.rule == "rescale":
            delta_out = (value[:half] - value[half:]).repeat(2, *([1] * (value.ndim - 1)))
            shared = grad * delta_out
        else:  # max pooling: each half's share of the output difference, routed by its own argmax
            top = torch.maximum(value[:half], value[half:])
            routed = ctx.vjp(grad * torch.cat([top - value[half:], value[:half] - top]))
            shared = (routed[:half] + routed[half:]).repeat(2, *([1] * (inputs.ndim - 1)))
        tiny = delta_in.abs() < EPS
        rescaled = shared / torch.where(tiny, 1.0, delta_in)
        if tiny.any():  # no difference to rescale: the layer's own gradient, as captum
            rescaled = torch.where(tiny, ctx.vjp(grad), rescaled)
        return rescaled, None, None, None


@contextlib.contextmanager
def _rules(request: Request, method: str):
    """The rewrites that give each nonlinear layer its multiplier; pre-hooks removed on exit."""
    rules = rule_modules(request, method)
    kept: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module, args):
        # The layer runs on a copy of its own (an in-place ReLU cannot overwrite the input the rule needs),
        # from a detached leaf, so that its own backward is there for the rule and free of the outer graph.
        leaf = args[0].detach().requires_grad_()
        kept[module] = (args[0], leaf)
        return (leaf.clone(), *args[1:])

    def multiplier(module, inputs, output):
        original, leaf = kept.pop(module)
        if not original.requires_grad:
            return output

        def vjp(grad, output=output, leaf=leaf):
            return torch.autograd.grad(output, leaf, grad, retain_graph=True)[0]

        return _Multiplier.apply(original, output.detach(), vjp, rules[module])

    with contextlib.ExitStack() as hooks:
        for module in rules:
            hooks.callback(module.register_forward_pre_hook(keep).remove)
        yield dict.fromkeys(rules, multiplier)


def _multipliers(
    request: Request, inputs: torch.Tensor, references: torch.Tensor, rows: list[int], batch_size: int, method: str
) -> torch.Tensor:
    """``(B, C, H, W)``: the multipliers of ``inputs`` against ``references``, row by row."""
    if batch_size < 1:
        raise ConvlensError(f"batch_size must be at least 1, got {batch_size}")
    request.settle_on_clean_batch()  # before the rules' hooks are on: that pass is not a paired one
    with torch.enable_grad(), _rules(request, method) as rewrite:
        return input_gradients(request, inputs, rows, batch_size, rewrite, references=references.to(inputs.dtype))


def deeplift(request: Request, *, baseline=None, batch_size: int = DEFAULT_BATCH_SIZE) -> RawMaps:
    """DeepLIFT with the rescale rule (captum's ``DeepLift``), against one reference per image.

    Shrikumar et al. 2017, arXiv:1704.02685: ``A = (x - x') * m`` with the
    multipliers of the module docstring; ``M = |sum_c A_c|``. ``baseline``: a
    number, one image or one per image, in the model's input layout (default 0,
    black). ``batch_size``: images per paired pass (each pass holds twice as many).
    """
    x = request.x.float()
    n = x.shape[0]
    reference = baseline_batch(request, baseline)
    if reference.shape[0] not in (1, n):
        raise ConvlensError(
            f"deeplift takes one baseline or one per image ({n}), got {reference.shape[0]}; "
            "for a distribution of baselines use deeplift_shap"
        )
    reference = reference.expand(n, *x.shape[1:])
    grads = _multipliers(request, request.x, reference, list(range(n)), batch_size, "deeplift")
    attributions = (x - reference) * grads
    return RawMaps([attributions.sum(dim=1).abs()], attributions)


def default_baselines(request: Request, count: int, seed: int) -> torch.Tensor:
    """``(count, C, H, W)`` uniform noise within the batch's value range, from a generator seeded with ``seed``."""
    x = request.x.float()
    noise = torch.rand((count, *x.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(x.device)
    return x.min() + noise * (x.max() - x.min())


def deeplift_shap(
    request: Request, *, baselines=None, n_baselines: int = 8, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE
) -> RawMaps:
    """DeepLIFT-SHAP: DeepLIFT averaged over a distribution of references (captum's ``DeepLiftShap``).

    Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions",
    arXiv:1705.07874, section 4.2: ``A = 1/B sum_b (x - x'_b) * m(x, x'_b)``;
    ``M = |sum_c A_c|``. ``baselines``: a batch of reference images (or one) in
    the model's input layout, shared by every image. Default: ``n_baselines``
    images of uniform noise over the batch's value range, drawn from a generator
    seeded with ``seed`` (a reference distribution that favours no colour; pass
    black, white and a blurred copy to follow the paper's examples). Cost: ``N * B``
    paired passes, ``batch_size`` pairs at a time.
    """
    x = request.x.float()
    n = x.shape[0]
    if baselines is None:
        if n_baselines < 1:
            raise ConvlensError(f"n_baselines must be at least 1, got {n_baselines}")
        reference = default_baselines(request, n_baselines, seed)
    else:
        reference = baseline_batch(request, baselines)
    count = reference.shape[0]
    inputs = request.x.repeat_interleave(count, dim=0)
    references = reference.repeat(n, 1, 1, 1)
    rows = [i for i in range(n) for _ in range(count)]
    grads = _multipliers(request, inputs, references, rows, batch_size, "deeplift_shap")
    attributions = ((inputs.float() - references) * grads).view(n, count, *x.shape[1:]).mean(1)
    return RawMaps([attributions.sum(dim=1).abs()], attributions)


__all__ = ["deeplift", "deeplift_shap", "rule_modules"]
