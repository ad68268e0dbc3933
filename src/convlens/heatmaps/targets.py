"""What to explain: a target turns the model's output into one score per image.

A target is a callable ``score(output) -> (N,)`` on the model's pre-softmax
output (the engine always runs with :meth:`Model.logit_rewrites`, so a final
softmax/sigmoid is skipped: saturated probabilities have vanishing gradients).
What a user may pass, resolved by :func:`resolve_targets`:

* ``None``: each image's top-1 class (for a single-logit binary model, the
  positive class);
* an ``int`` ``k``: logit ``k`` for every image (single-logit model: ``1`` is the
  positive class, its logit; ``0`` the negative class, minus the logit);
* a ``str``: a class name looked up in ``model.labels``;
* a list/tuple/1-D tensor: one of the above per image;
* a callable ``fn(output) -> (N,)``: any scalar per image (a probability, a
  region of a segmentation map); its class index is reported as ``-1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

from ..errors import ConvlensError, did_you_mean

TargetSpec = Union[None, int, str, Sequence, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


class ClassLogits:
    """``score(output)[i] = output[i, class_indices[i]]``, with a single logit read as two classes."""

    def __init__(self, class_indices: list[int]):
        self.class_indices = list(class_indices)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        output = output.flatten(1)
        index = torch.as_tensor(self.class_indices[: output.shape[0]], device=output.device)
        if output.shape[1] == 1:
            # One logit z means p(positive) = sigmoid(z); the negative class's logit is -z.
            sign = torch.where(index == 1, 1.0, -1.0).to(output.dtype)
            return output[:, 0] * sign
        return output.gather(1, index.view(-1, 1)).squeeze(1)

    def __repr__(self) -> str:
        return f"ClassLogits({self.class_indices})"


def _class_count(output: torch.Tensor) -> int:
    count = output.flatten(1).shape[1]
    return 2 if count == 1 else count


def _one_index(spec, output: torch.Tensor, labels: list[str] | None, image: int) -> int:
    count = _class_count(output)
    if isinstance(spec, torch.Tensor):
        spec = spec.item()
    if spec is None or (isinstance(spec, str) and spec.lower() in ("top1", "top-1")):
        scores = output.flatten(1)[image]
        return int(scores[0] > 0) if scores.numel() == 1 else int(scores.argmax())
    if isinstance(spec, bool):
        raise ConvlensError(f"target {spec!r} is not a class; pass a class index or name")
    if isinstance(spec, str):
        if spec.lstrip("-").isdigit():
            spec = int(spec)
        elif labels is not None and spec in labels:
            return labels.index(spec)
        elif labels is None:
            raise ConvlensError(f"target {spec!r} is a class name but the model has no labels; "
                                "pass a class index or give the model labels")
        else:
            raise ConvlensError(f"unknown class {spec!r}{did_you_mean(spec, labels)}")
    if isinstance(spec, float) and spec.is_integer():
        spec = int(spec)
    if not isinstance(spec, int):
        raise ConvlensError(f"target {spec!r} is not a class index, a class name or None")
    if not 0 <= spec < count:
        raise ConvlensError(f"target {spec} is out of range: the model has {count} classes (0..{count - 1})")
    return spec


def resolve_targets(target: TargetSpec, output: torch.Tensor,
                    labels: list[str] | None = None) -> tuple[ScoreFn, list[int]]:
    """Turn what the user asked for into ``(score_fn, class_indices)`` given the model's output.

    Args:
        target: see the module docstring.
        output: the model's pre-softmax output ``(N, K)`` for the batch.
        labels: class names, for targets given by name.

    Returns:
        ``score_fn(output) -> (N,)`` and the class index explained for each image
        (``-1`` for a callable target).
    """
    count = output.shape[0]
    if callable(target) and not isinstance(target, (str, torch.Tensor)):
        return target, [-1] * count
    if isinstance(target, torch.Tensor) and target.ndim == 0:
        target = target.item()
    if isinstance(target, (list, tuple, torch.Tensor)):
        specs = list(target)
        if len(specs) != count:
            raise ConvlensError(f"{len(specs)} targets given for {count} images; give one per image or one for all")
    else:
        specs = [target] * count
    indices = [_one_index(spec, output, labels, i) for i, spec in enumerate(specs)]
    return ClassLogits(indices), indices
