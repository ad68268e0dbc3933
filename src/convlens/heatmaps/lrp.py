"""Layer-wise Relevance Propagation (LRP) with zennit's composites.

Bach et al. 2015, "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
Layer-Wise Relevance Propagation", PLoS ONE 10(7); Montavon et al. 2019, "Layer-Wise
Relevance Propagation: An Overview". The target score ``R = S`` is handed down layer
by layer, each layer by its rule (:mod:`convlens.heatmaps.lrp_rules`), to the input
pixels. The relevance of the output is the target's input x gradient at the logits
(for one logit ``c``: ``one_hot(c) * logits``, as zennit users seed it).

How each layer is treated (zennit 0.5's composites, checked value by value in tests/test_lrp.py):

* ``Conv2d`` and ``Linear``: the composite's rule; a ``BatchNorm`` that reads a
  convolution's (or linear layer's) output is folded into it (zennit's canonizers),
  ``w' = w g / sqrt(v + eps)``, ``b' = (b - m) g / sqrt(v + eps) + beta``, and the pair
  is one layer; a BatchNorm anywhere else has no rule.
* ``AvgPool2d``/``AdaptiveAvgPool2d`` and the addition of two branches (a residual
  ``out += identity``): zennit's ``Norm`` rule, each input's share of the output.
* ``ReLU``, ``MaxPool2d`` (the winner takes it), ``Flatten``, ``Dropout``, ``Identity``,
  concatenation, reshapes: the relevance passes as the gradient passes.
* Anything else (another activation, a normalisation, attention, a product of two
  activations) has no rule: a one-line error names it.

The composites (``first``: the first ``Conv2d``/``Linear`` in the model's module order):

* ``lrp`` = zennit ``EpsilonPlusFlat``: flat on the first layer, z+ on convolutions, epsilon on linear layers;
* ``lrp_epsilon_gamma_box`` = ``EpsilonGammaBox``: z^B on the first convolution (``low``/``high`` are the
  pixel bounds 0 and 1 through the model's normalisation), gamma on the other convolutions, epsilon on linear;
* ``lrp_alpha_beta`` = ``EpsilonAlpha2Beta1Flat``: flat first, alpha2-beta1 on convolutions, epsilon on linear.

Against zennit: equal to 1e-4 of the largest relevance; the rest is zennit's canonizer, which
leaves each merged BatchNorm computing ``x / sqrt(1 + eps)`` (about ``1 - 5e-6``), where convlens
explains the model's own output; with ``eps = 0`` the two agree to float64 precision.

The map is the input relevance summed over colour channels, signed (positive: for the
target); ``attributions`` keep it per channel. Without biases (and epsilon 0) the relevances
add up to the score.

Example::

    result = cl.explain(model, image, method="lrp")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..capture import OutputRewrite
from ..errors import ConvlensError
from .base import RawMaps, Request
from .lrp_rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    NormRelevance,
    Relevance,
    Rule,
    ZBox,
    ZPlus,
    affine,
    conv_padding,
)

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
PASSING = (
    nn.ReLU,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Sequential,
)  # an empty Sequential is the identity
SUPPORTED = "Conv2d, Linear, BatchNorm after a Conv2d/Linear, ReLU, max/average pooling, Flatten, Dropout, Identity"


@dataclass(frozen=True)
class Composite:
    """Which rule each layer gets: ``first`` on the first layer of ``first_types``, ``conv``/``linear`` elsewhere."""

    conv: Rule
    linear: Rule
    first: Rule | None = None
    first_types: tuple = (nn.Conv2d, nn.Linear)
    stabilizer: float = 1e-6  # of the Norm rule (pooling, sums of branches)


def _norm_with_activation(module: nn.Module) -> bool:
    """A BatchNorm followed by a ReLU (or nothing) in one module: timm's ``BatchNormAct2d``."""
    children = list(module.children())
    return (
        isinstance(module, NORMS)
        and bool(children)
        and hasattr(module, "act")
        and all(isinstance(child, PASSING) and not list(child.children()) for child in children)
    )


def assign_rules(module: nn.Module, composite: Composite, skip: Sequence[nn.Module] = ()) -> dict[nn.Module, Rule]:
    """Each ``Conv2d``/``Linear`` of ``module`` with its rule; a module LRP has no rule for is a one-line error.

    ``skip``: modules whose output the caller replaces (a final softmax explained as logits).
    """
    rules: dict[nn.Module, Rule] = {}
    first_done = composite.first is None
    inside_norms = {id(c) for m in module.modules() if _norm_with_activation(m) for c in m.children()}
    for name, child in module.named_modules():
        if child in skip:
            continue
        children = list(child.children())
        own_params = any(p is not None for p in child._parameters.values())
        if isinstance(child, (nn.Conv2d, nn.Linear)) and not children:
            if isinstance(child, nn.Conv2d) and conv_padding(child) is None:
                raise ConvlensError(
                    f"LRP has no rule for {name} (Conv2d with {child.padding_mode} padding "
                    f"{child.padding!r}); it supports zero-padded convolutions"
                )
            if not first_done and composite.first is not None and isinstance(child, composite.first_types):
                rules[child], first_done = composite.first, True
            else:
                rules[child] = composite.conv if isinstance(child, nn.Conv2d) else composite.linear
        elif (
            (isinstance(child, NORMS + POOLS + PASSING) and not children)
            or _norm_with_activation(child)
            or id(child) in inside_norms
        ):
            continue
        elif own_params or not children:
            raise ConvlensError(
                f"LRP has no rule for {name or 'the model'} ({type(child).__name__}); supported: {SUPPORTED}"
            )
    if not rules:
        raise ConvlensError("LRP needs Conv2d or Linear layers; this model has none")
    return rules


def _folded(layer: nn.Conv2d | nn.Linear, norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``layer`` followed by the BatchNorm ``norm`` in eval mode, as one affine layer."""
    mean, var = norm.running_mean, norm.running_var
    if mean is None or var is None:
        raise ConvlensError(
            f"LRP folds a {type(norm).__name__} into the layer before it, which needs its running "
            "statistics; this one has none (track_running_stats=False)"
        )
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    bias = layer.bias if layer.bias is not None else torch.zeros_like(mean)
    folded_bias = (bias - mean) * scale
    if norm.bias is not None:
        folded_bias = folded_bias + norm.bias
    return layer.weight * scale.view(-1, *([1] * (layer.weight.ndim - 1))), folded_bias


def _plain_norm(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The BatchNorm alone of a norm-and-activation module, in eval mode."""
    return torch.nn.functional.batch_norm(
        x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
    )


class _Branches(TorchFunctionMode):
    """During the forward pass: the sum of two activations (a residual addition) gets the Norm rule,
    and a product of two activations (gating, attention), which LRP has no rule for, is refused."""

    SUMS = frozenset(
        {
            torch.add,
            torch.Tensor.add,
            torch.Tensor.__add__,
            torch.Tensor.__radd__,
            torch.Tensor.__iadd__,
            torch.Tensor.add_,
        }
    )
    PRODUCTS = frozenset(
        {
            torch.mul,
            torch.Tensor.mul,
            torch.Tensor.__mul__,
            torch.Tensor.__rmul__,
            torch.Tensor.__imul__,
            torch.Tensor.mul_,
            torch.matmul,
            torch.Tensor.matmul,
            torch.Tensor.__matmul__,
            torch.bmm,
        }
    )

    def __init__(self, stabilizer: float):
        super().__init__()
        self.stabilizer = stabilizer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        both = len(args) == 2 and all(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if both and func in self.SUMS and not kwargs and args[0].shape == args[1].shape:
            total = NormRelevance.apply(torch.add, self.stabilizer, func is torch.Tensor.add_, *args)
            if func is torch.Tensor.add_:
                return args[0].copy_(total)  # in place, as the caller expects; the graph now goes through the rule
            return total
        if both and func in self.PRODUCTS:
            raise ConvlensError(
                "LRP has no rule for a product of two activations (gating or attention) in this "
                f"model; supported: {SUPPORTED}"
            )
        return func(*args, **kwargs)


class _Pass:
    """The forward hooks of one LRP pass: every rule layer's output routed through its rule."""

    def __init__(self, module: nn.Module, rules: dict[nn.Module, Rule], stabilizer: float):
        self.rules = rules
        self.stabilizer = stabilizer
        self.names = {m: n for n, m in module.named_modules()}
        self.pending: dict[int, tuple[torch.Tensor, nn.Module, torch.Tensor]] = {}

    def hooks(self, module: nn.Module) -> dict[nn.Module, OutputRewrite]:
        hooks: dict[nn.Module, OutputRewrite] = dict.fromkeys(self.rules, self.layer)
        for child in module.modules():
            if isinstance(child, NORMS) and (not list(child.children()) or _norm_with_activation(child)):
                hooks[child] = self.norm
            elif isinstance(child, POOLS):
                hooks[child] = self.pool
        return hooks

    def layer(self, module, inputs, output):
        x = inputs[0]
        routed = Relevance.apply(x, self.rules[module], affine(module, module.weight, module.bias), [output.detach()])
        self.pending[id(routed)] = (routed, module, x)
        return routed

    def norm(self, module, inputs, output):
        entry = self.pending.pop(id(inputs[0]), None)
        if entry is None or entry[0] is not inputs[0]:
            raise ConvlensError(
                f"LRP has no rule for {self.names.get(module, 'a layer')} ({type(module).__name__}) "
                "where it does not read a Conv2d or Linear layer's output (only then is it folded "
                f"into that layer); supported: {SUPPORTED}"
            )
        _, layer, x = entry
        weight, bias = _folded(layer, module)
        if not _norm_with_activation(module):
            return Relevance.apply(x, self.rules[layer], affine(layer, weight, bias), [output.detach()])
        normalised = _plain_norm(module, inputs[0])
        routed = Relevance.apply(x, self.rules[layer], affine(layer, weight, bias), [normalised.detach()])
        return module.act(module.drop(routed) if hasattr(module, "drop") else routed)

    def pool(self, module, inputs, output):
        return NormRelevance.apply(lambda t: type(module).forward(module, t), self.stabilizer, False, inputs[0])


def relevance(request: Request, composite: Composite) -> torch.Tensor:
    """The input relevance ``(N, C, H, W)`` of the request's target under ``composite``."""
    module = request.model.module
    if request.model.framework == "keras":
        raise ConvlensError(f"LRP has no rule for Keras layers; it runs on PyTorch models ({SUPPORTED})")
    rules = assign_rules(module, composite, skip=list(request.rewrites()))
    propagation = _Pass(module, rules, composite.stabilizer)
    x = request.x.detach().clone().requires_grad_()
    with request.capture([], rewrite=propagation.hooks(module)) as rec, torch.enable_grad():
        with _Branches(composite.stabilizer):
            output = rec.forward(x)
        propagation.pending.clear()
        logits = request.model.scores(output)
        scores = request.score(output, clean=True)
        (seed,) = torch.autograd.grad(scores.sum(), logits, retain_graph=True)
        (result,) = torch.autograd.grad(logits, x, seed * logits.detach())
    request.report(1, 1)
    return result.float()


def _maps(request: Request, composite: Composite) -> RawMaps:
    attributions = relevance(request, composite)
    return RawMaps([attributions.sum(dim=1)], attributions)


def input_bounds(request: Request) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` per channel ``(1, C, 1, 1)``: pixels 0 and 1 through the model's ``Normalize``, if any;
    else the batch's own per-channel extremes."""
    steps = getattr(request.model.transform, "transforms", [request.model.transform])
    for step in steps:
        mean, std = getattr(step, "mean", None), getattr(step, "std", None)
        if mean is not None and std is not None and len(mean) == request.x.shape[1]:
            mean = torch.as_tensor(mean, dtype=request.x.dtype, device=request.x.device).view(1, -1, 1, 1)
            std = torch.as_tensor(std, dtype=request.x.dtype, device=request.x.device).view(1, -1, 1, 1)
            return (0 - mean) / std, (1 - mean) / std
    channels = request.x.transpose(0, 1).flatten(1)
    return channels.amin(1).view(1, -1, 1, 1), channels.amax(1).view(1, -1, 1, 1)


def _bound(value, default: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if value is None:
        return default
    bound = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return bound.view(1, -1, 1, 1) if bound.ndim == 1 else bound


def lrp(request: Request, *, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> RawMaps:
    """LRP with zennit's ``EpsilonPlusFlat``: flat on the first layer, z+ on convolutions, epsilon on linear layers.

    Bach et al. 2015; Montavon et al. 2019 (see :mod:`convlens.heatmaps.lrp`). ``epsilon``: of the
    epsilon rule; ``stabilizer``: the other rules' denominators. ``M = sum_c R_c``, signed.
    """
    return _maps(
        request,
        Composite(conv=ZPlus(stabilizer), linear=Epsilon(epsilon), first=Flat(stabilizer), stabilizer=stabilizer),
    )


def lrp_epsilon_gamma_box(
    request: Request,
    *,
    gamma: float = 0.25,
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
    low: float | Sequence[float] | None = None,
    high: float | Sequence[float] | None = None,
) -> RawMaps:
    """LRP with zennit's ``EpsilonGammaBox``: z^B on the first convolution, gamma on the others, epsilon on linear.

    Montavon et al. 2019's recommended composite. ``low``/``high``: the lowest and highest input
    values (per channel or one number); by default pixels 0 and 1 through the model's normalisation.
    """
    default_low, default_high = input_bounds(request)
    box = ZBox(_bound(low, default_low, request.x), _bound(high, default_high, request.x), stabilizer)
    return _maps(
        request,
        Composite(
            conv=Gamma(gamma, stabilizer),
            linear=Epsilon(epsilon),
            first=box,
            first_types=(nn.Conv2d,),
            stabilizer=stabilizer,
        ),
    )


def lrp_alpha_beta(
    request: Request, *, alpha: float = 2.0, beta: float = 1.0, epsilon: float = 1e-6, stabilizer: float = 1e-6
) -> RawMaps:
    """LRP with zennit's ``EpsilonAlpha2Beta1Flat``: flat first, alpha-beta on convolutions, epsilon on linear.

    ``alpha - beta`` must be 1 (Bach et al. 2015).
    """
    if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-9:
        raise ConvlensError(f"alpha and beta must be non-negative with alpha - beta = 1, got {alpha} and {beta}")
    return _maps(
        request,
        Composite(
            conv=AlphaBeta(alpha, beta, stabilizer),
            linear=Epsilon(epsilon),
            first=Flat(stabilizer),
            stabilizer=stabilizer,
        ),
    )
