"""The LRP rules: how one layer hands the relevance of its outputs down to its inputs.

Each rule is a small frozen record called in the backward pass as
``rule(layer, x, z, relevance) -> input relevance``, where ``layer`` is the
layer's affine map (:class:`Affine`: a convolution or a linear layer, a
BatchNorm already folded in), ``x`` its input, ``z`` its output and
``relevance`` the relevance ``R`` of each output. With ``z_k = sum_j w_jk x_j + b_k``
the rules are (Montavon et al. 2019, "Layer-Wise Relevance Propagation: An
Overview", doi:10.1007/978-3-030-28954-6_10; Bach et al. 2015, PLoS ONE 10(7)):

* :class:`Epsilon` ``R_j = x_j sum_k w_jk R_k / (z_k + eps sign(z_k))``; ``eps=0`` is LRP-0.
* :class:`ZPlus` (alpha1-beta0 on any input sign) ``R_j = sum_k (x+_j w+_jk + x-_j w-_jk) R_k / z+_k``
  with ``z+_k = sum_j x+_j w+_jk + x-_j w-_jk + b+_k``.
* :class:`AlphaBeta` ``R = alpha R(positive contributions) - beta R(negative contributions)``,
  ``alpha - beta = 1``.
* :class:`Gamma` the weights ``w + gamma w+`` (or ``w + gamma w-`` for negative ``z``) in the
  LRP-0 formula, generalised to negative inputs as zennit's ``Gamma`` (Andeol et al. 2021).
* :class:`ZBox` (z^B, for the input layer, pixels in ``[l, h]``)
  ``R_j = sum_k (x_j w_jk - l_j w+_jk - h_j w-_jk) R_k / sum_j (x_j w_jk - l_j w+_jk - h_j w-_jk)``.
* :class:`Flat` ``R_j = sum_k R_k / n_k``, ``n_k`` the number of inputs of ``k`` (weights and inputs
  taken as ones; Lapuschkin et al. 2019).

Every denominator is stabilised as zennit does, ``d + eps * sign(d)`` with ``sign(0) = 1``,
so the relevances equal zennit's; with ``eps = 0`` a zero denominator passes no relevance.
The input relevance is computed with the layer's own input-gradient operation
(``conv2d_input``, a matrix product): one extra affine pass per rule term, no autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input


def stabilise(denominator: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``d + epsilon * sign(d)``, ``sign(0) = 1`` (zennit's ``stabilize``)."""
    return denominator + torch.where(denominator >= 0, epsilon, -epsilon)


def divide(relevance: torch.Tensor, denominator: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``relevance / stabilise(denominator)``; where that is zero (``epsilon = 0``) nothing passes."""
    stable = stabilise(denominator, epsilon)
    if epsilon:
        return relevance / stable
    return torch.where(stable == 0, torch.zeros_like(relevance), relevance / torch.where(stable == 0, 1, stable))


@dataclass
class Affine:
    """A convolution's or linear layer's affine map ``x -> x W + b`` with the weights a rule chooses."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    backward: Callable[
        [torch.Size, torch.Tensor, torch.Tensor], torch.Tensor
    ]  # (input shape, weight, grad) -> J^T grad


def conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """The convolution's padding as two integers (``"same"`` resolved), or ``None`` when it is not symmetric zeros."""
    if module.padding_mode != "zeros":
        return None
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in totals) or any(s != 1 for s in module.stride):
            return None
        return (totals[0] // 2, totals[1] // 2)
    if isinstance(module.padding, str):  # torch takes no padding string but "valid" and "same"
        return None
    height, width = module.padding
    return (int(height), int(width))


def affine(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> Affine:
    """The :class:`Affine` of a ``Conv2d`` or ``Linear`` module with the given (possibly folded) parameters."""
    if isinstance(module, nn.Conv2d):
        options: dict[str, Any] = {
            "stride": module.stride,
            "padding": conv_padding(module),
            "dilation": module.dilation,
            "groups": module.groups,
        }
        return Affine(
            weight,
            bias,
            lambda x, w, b: F.conv2d(x, w, b, **options),
            lambda shape, w, g: conv2d_input(shape, w, g, **options),
        )
    return Affine(weight, bias, F.linear, lambda shape, w, g: g @ w)


@overload
def _part(tensor: torch.Tensor, positive: bool) -> torch.Tensor: ...
@overload
def _part(tensor: None, positive: bool) -> None: ...
@overload
def _part(tensor: torch.Tensor | None, positive: bool) -> torch.Tensor | None: ...
def _part(tensor: torch.Tensor | None, positive: bool) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.clamp(min=0) if positive else tensor.clamp(max=0)


def _signed_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x+, x-)``; ``x-`` is ``None`` when no input is negative (after a ReLU).

    Its terms, all zero, are then skipped.
    """
    if bool(x.min() >= 0):
        return x, None
    return x.clamp(min=0), x.clamp(max=0)


def _total(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the tensors, without ``sum()``'s extra ``0 +`` pass over the first."""
    first, *rest = tensors
    for tensor in rest:
        first = first + tensor
    return first


#: ``(input, weight, bias)`` of one term; the weight is ``None`` only where the input is (a term skipped)
Term = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _terms(layer: Affine, inputs: list[Term]) -> torch.Tensor:
    """``sum_i layer(input_i; w_i, b_i)`` over the inputs that are not ``None``, biases only where given."""
    return _total([layer.forward(x, w, b) for x, w, b in inputs if x is not None and w is not None])


def _back(
    layer: Affine, scaled: torch.Tensor, inputs: list[tuple[torch.Tensor | None, torch.Tensor | None]]
) -> torch.Tensor:
    """``sum_i x_i * J_i^T scaled`` over the inputs that are not ``None`` (a weight is ``None`` only with its input)."""
    return _total([x * layer.backward(x.shape, w, scaled) for x, w in inputs if x is not None and w is not None])


@dataclass(frozen=True)
class Epsilon:
    """LRP-epsilon (``epsilon=0``: LRP-0) on the layer's own output."""

    epsilon: float = 1e-6

    def __call__(self, layer: Affine, x: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        return x * layer.backward(x.shape, layer.weight, divide(relevance, z, self.epsilon))


@dataclass(frozen=True)
class ZPlus:
    """LRP-z+ (alpha1-beta0): only the positive contributions ``x+ w+ + x- w-`` (and ``b+``) count."""

    stabilizer: float = 1e-6

    def __call__(self, layer: Affine, x: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        positive, negative = _signed_inputs(x)
        w_pos, w_neg = _part(layer.weight, True), None if negative is None else _part(layer.weight, False)
        denominator = _terms(layer, [(positive, w_pos, _part(layer.bias, True)), (negative, w_neg, None)])
        if negative is None and self.stabilizer:  # a sum of non-negative terms: its stabilised value is d + eps
            scaled = relevance / denominator.add_(self.stabilizer)
        else:
            scaled = divide(relevance, denominator, self.stabilizer)
        return _back(layer, scaled, [(positive, w_pos), (negative, w_neg)])


@dataclass(frozen=True)
class AlphaBeta:
    """LRP-alpha-beta: ``alpha`` times the positive contributions' share, minus ``beta`` times the negative ones'."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6

    def __call__(self, layer: Affine, x: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        positive, negative = _signed_inputs(x)
        w_pos, w_neg = _part(layer.weight, True), _part(layer.weight, False)
        b_pos, b_neg = _part(layer.bias, True), _part(layer.bias, False)
        up = divide(relevance, _terms(layer, [(positive, w_pos, b_pos), (negative, w_neg, None)]), self.stabilizer)
        down = divide(relevance, _terms(layer, [(positive, w_neg, b_neg), (negative, w_pos, None)]), self.stabilizer)
        return self.alpha * _back(layer, up, [(positive, w_pos), (negative, w_neg)]) - self.beta * _back(
            layer, down, [(positive, w_neg), (negative, w_pos)]
        )


@dataclass(frozen=True)
class Gamma:
    """LRP-gamma: the weights ``w + gamma w+`` where ``z > 0`` (``w + gamma w-`` where ``z < 0``), any input sign."""

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def __call__(self, layer: Affine, x: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        positive, negative = _signed_inputs(x)
        w, b, g = layer.weight, layer.bias, self.gamma
        w_up, w_down = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        b_up = None if b is None else b + g * b.clamp(min=0)
        b_down = None if b is None else b + g * b.clamp(max=0)
        up = (z > 0) * divide(
            relevance, _terms(layer, [(positive, w_up, b_up), (negative, w_down, None)]), self.stabilizer
        )
        down = (z < 0) * divide(
            relevance, _terms(layer, [(positive, w_down, b_down), (negative, w_up, None)]), self.stabilizer
        )
        return _back(layer, up, [(positive, w_up), (negative, w_down)]) + _back(
            layer, down, [(positive, w_down), (negative, w_up)]
        )


@dataclass(frozen=True)
class ZBox:
    """LRP-z^B for inputs bounded by ``low`` and ``high`` (numbers, or tensors broadcastable to ``(1, C, 1, 1)``)."""

    low: float | torch.Tensor
    high: float | torch.Tensor
    stabilizer: float = 1e-6

    def __call__(self, layer: Affine, x: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        low = torch.as_tensor(self.low).to(x).expand(x.shape)
        high = torch.as_tensor(self.high).to(x).expand(x.shape)
        w_pos, w_neg = _part(layer.weight, True), _part(layer.weight, False)
        denominator = (
            z
            - layer.forward(low, w_pos, _part(layer.bias, True))
            - layer.forward(high, w_neg, _part(layer.bias, False))
        )
        scaled = divide(relevance, denominator, self.stabilizer)
        return (
            x * layer.backward(x.shape, layer.weight, scaled)
            - low * layer.backward(x.shape, w_pos, scaled)
            - high * layer.backward(x.shape, w_neg, scaled)
        )


@dataclass(frozen=True)
class Flat:
    """LRP-flat: each output's relevance spread evenly over the inputs it reads."""

    stabilizer: float = 1e-6

    def __call__(self, layer: Affine, x: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        ones, weights = torch.ones_like(x), torch.ones_like(layer.weight)
        scaled = divide(relevance, layer.forward(ones, weights, None), self.stabilizer)
        return layer.backward(x.shape, weights, scaled)


Rule = Epsilon | ZPlus | AlphaBeta | Gamma | ZBox | Flat


#: the rules whose formula reads the layer's output ``z`` (the others need only its input)
READS_OUTPUT = (Epsilon, Gamma, ZBox)


class Relevance(torch.autograd.Function):
    """Forward: the layer's output as it is; backward: the rule's input relevance instead of the gradient.

    ``output`` is a one-element list holding the output detached: a tensor that is not an input of the
    function is returned without a copy, and an in-place op after the layer (ReLU) may change it; a rule
    that reads the output keeps a copy of its own.
    """

    @staticmethod
    def forward(ctx, x, rule, layer, output):
        z = output[0]
        ctx.rule, ctx.layer = rule, layer
        ctx.z = z.clone() if isinstance(rule, READS_OUTPUT) else None
        ctx.save_for_backward(x)
        return z

    @staticmethod
    def backward(ctx, relevance):
        (x,) = ctx.saved_tensors
        result = ctx.rule(ctx.layer, x, ctx.z, relevance)
        ctx.z = None
        return result, None, None, None


class NormRelevance(torch.autograd.Function):
    """zennit's ``Norm`` rule for a parameter-free linear layer ``f`` (average pooling) and for a sum of branches:
    ``R_x = x * J_f^T (R / stabilise(f(x)))``; the sum ``a + b`` gives ``R_a = a R / (a + b)``."""

    @staticmethod
    def forward(ctx, fn, stabilizer, overwritten, *inputs):
        with torch.enable_grad():
            # ``overwritten``: an in-place sum (``out += identity``) overwrites its first input afterwards: a copy
            leaves = [
                (x.detach().clone() if overwritten and i == 0 else x.detach()).requires_grad_()
                for i, x in enumerate(inputs)
            ]
            output = fn(*leaves)
        ctx.stabilizer, ctx.leaves, ctx.output = stabilizer, leaves, output
        ctx.versions = [x._version for x in leaves]  # a detached tensor shares its original's version counter
        return output.detach()

    @staticmethod
    def backward(ctx, relevance):
        if [x._version for x in ctx.leaves] != ctx.versions:
            raise RuntimeError("an input of a summed or pooled layer was modified in place after the layer ran")
        scaled = divide(relevance, ctx.output.detach(), ctx.stabilizer)
        grads = torch.autograd.grad(ctx.output, ctx.leaves, scaled)
        relevances = tuple(x.detach() * g for x, g in zip(ctx.leaves, grads))
        del ctx.leaves, ctx.output
        return (None, None, None, *relevances)
