"""Objectives to maximise: small callables that compose with ``+``, ``-`` and a scalar ``*``.

An objective reads the recorded layer outputs (and, for a class logit, the
model's output) and returns one score per image, shape ``(N,)``; the
optimiser maximises their sum. Each objective names the layers it needs, so
the forward pass can stop after the last of them (Olah et al., "Feature
Visualization", Distill 2017, compose objectives the same way).

Example::

    objective = channel("layer2", torch.arange(64)) + 0.5 * layer_l2("layer1")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Scores = Callable[[Mapping[str, torch.Tensor], "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """``score(outputs, model_output) -> (N,)``; ``layers`` it reads; whether it needs the model's output."""

    score: Scores
    layers: tuple[str, ...] = ()
    needs_output: bool = False
    description: str = ""

    def __call__(self, outputs: Mapping[str, torch.Tensor], model_output: torch.Tensor | None) -> torch.Tensor:
        return self.score(outputs, model_output)

    def __add__(self, other: Objective) -> Objective:
        return Objective(
            lambda o, y: self(o, y) + other(o, y),
            _union(self.layers, other.layers),
            self.needs_output or other.needs_output,
            f"{self.description} + {other.description}",
        )

    def __mul__(self, weight: float) -> Objective:
        return Objective(
            lambda o, y: weight * self(o, y), self.layers, self.needs_output, f"{weight} * {self.description}"
        )

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return self * -1.0

    def __sub__(self, other: Objective) -> Objective:
        return self + (-other)


def _union(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return a + tuple(name for name in b if name not in a)


def _per_channel_mean(activation: torch.Tensor) -> torch.Tensor:
    """``(N, C, ...)`` -> ``(N, C)``: the spatial mean (a dense layer's units pass through)."""
    return activation.flatten(2).mean(2) if activation.ndim > 2 else activation


def channel(layer: str, index: int | torch.Tensor) -> Objective:
    """Mean activation of one channel; with a ``(N,)`` tensor of indices image ``i`` scores channel ``index[i]``.

    The batched form is what renders a grid of filters as one batch (Erhan et
    al., "Visualizing Higher-Layer Features of a Deep Network", 2009).
    """

    def score(outputs, _):
        means = _per_channel_mean(outputs[layer])
        if isinstance(index, torch.Tensor):
            return means.gather(1, index.to(means.device).view(-1, 1)).squeeze(1)
        return means[:, index]

    return Objective(score, (layer,), description=f"channel({layer}, {index if isinstance(index, int) else '...'})")


def class_logit(index: int | torch.Tensor) -> Objective:
    """The pre-activation logit of a class (Simonyan et al., 2013, arXiv:1312.6034, §2).

    The optimiser feeds logits: a final softmax/sigmoid is skipped through
    ``Model.logit_rewrites()``, since a saturated probability has vanishing gradients.
    """

    def score(_, logits):
        logits = logits.flatten(1)
        if isinstance(index, torch.Tensor):
            return logits.gather(1, index.to(logits.device).view(-1, 1)).squeeze(1)
        return logits[:, index]

    return Objective(score, (), needs_output=True, description=f"class_logit({index})")


def layer_l2(layer: str) -> Objective:
    """Mean squared activation of a whole layer: DeepDream's objective (Mordvintsev et al., 2015)."""

    def score(outputs, _):
        return outputs[layer].flatten(1).pow(2).mean(1)

    return Objective(score, (layer,), description=f"layer_l2({layer})")
