"""What to explain: a target turns the model's output into one score per image.

The one target contract for heatmaps, metrics and ``predict``.

**Which output.** A model may return a tensor, or a tuple, list, named tuple
or dict of them (detectors' heads, a face net's class and box heads,
Inception's auxiliary logits). :func:`select_output` picks the tensor that
holds the class scores: the one chosen with ``output=`` (an index or a key;
CLI ``--output``), else the only tensor, else a ``"logits"`` entry; anything
more ambiguous is a one-line error that lists the outputs. Class targets read
the selected tensor; a callable target receives the *whole* output.

**Which score.** A target is a callable ``score(output) -> (N,)`` on the model's pre-softmax
output (the engine always runs with :meth:`Model.logit_rewrites`, so a final
softmax/sigmoid is skipped: saturated probabilities have vanishing gradients).
What a user may pass, resolved by :func:`resolve_targets`:

* ``None``: each image's top-1 class (for a single-logit binary model, the
  positive class);
* an ``int`` ``k``: logit ``k`` for every image (single-logit model: ``1`` is the
  positive class, its logit; ``0`` the negative class, minus the logit);
* a ``str``: a class name looked up in ``model.labels``;
* a list/tuple/1-D tensor: one of the above per image;
* ``"all"``: every class at once, one map per class for each image (CAM and the
  gradient-weighted CAM methods: their scores are ``(N, K)``, see :class:`AllClasses`);
* a callable ``fn(output) -> (N,)``: any scalar per image (a probability, a
  region of a segmentation map, one head of a multi-output model: it gets
  the whole output); its class index is reported as ``-1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..errors import ConvlensError, did_you_mean

if TYPE_CHECKING:
    from ..models.model import Model

TargetSpec = int | str | Sequence[Any] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None
ScoreFn = Callable[[Any], torch.Tensor]
OutputKey = int | str | None


@runtime_checkable
class SettlingTarget(Protocol):
    """A target that settles itself on the model's output (:mod:`convlens.targets.tasks`)."""

    def settle(
        self, output: Any, *, labels: list[str] | None = None, select: OutputKey = None, model: Model | None = None
    ) -> tuple[ScoreFn, list[int]]: ...


@runtime_checkable
class PerImageTarget(Protocol):
    """A settled target that holds something per image (a class, a mask, a box, a reference)."""

    def rows(self, rows: Sequence[int]) -> ScoreFn: ...


def target_for_rows(score_fn: ScoreFn | None, rows: Sequence[int]) -> ScoreFn:
    """The target for a batch whose row ``r`` is a variant of image ``rows[r]`` (perturbation batches).

    A target that holds something per image gives it for those rows; a callable target
    must score each row on its own.
    """
    if score_fn is None:
        raise RuntimeError("a method scored a pass before the target was settled on the clean batch")
    if isinstance(score_fn, PerImageTarget):
        return score_fn.rows(rows)
    return score_fn


def output_parts(output: Any) -> list[tuple[str, Any]]:
    """``[(key, value)]`` of a tuple, list, named tuple or dict output, in order."""
    if isinstance(output, Mapping):
        return [(str(key), value) for key, value in output.items()]
    if isinstance(output, (tuple, list)):
        fields = getattr(output, "_fields", None)
        return [(str(fields[i]) if fields else str(i), value) for i, value in enumerate(output)]
    raise ConvlensError(
        f"the model returns a {type(output).__name__}, not a tensor, tuple, list or dict; "
        "pass a callable target that turns its output into one score per image"
    )


def describe_outputs(output: Any) -> str:
    """``"0: (1, 10), 1: (1, 4)"``: each part of a multi-part output and its shape."""
    return ", ".join(
        f"{key}: {tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
        for key, value in output_parts(output)
    )


def select_output(output: Any, key: OutputKey = None) -> torch.Tensor:
    """The tensor of class scores in a model's output (see the module docstring)."""
    if isinstance(output, torch.Tensor):
        return output
    from .tasks import detections

    if detections(output) is not None:
        raise ConvlensError(
            "this model is a detector: it returns boxes, labels and scores per image, no class-score "
            "tensor; explain one of its detections with a box target (Box, CLI --targets box:INDEX)"
        )
    parts = output_parts(output)
    keys = [k for k, _ in parts]
    if key is None:
        tensors = [value for _, value in parts if isinstance(value, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        if "logits" in keys:
            key = "logits"
        else:
            raise ConvlensError(
                f"the model returns {len(parts)} outputs ({describe_outputs(output)}); choose the one with the "
                "class scores with output=KEY (CLI --output KEY), or pass a callable target that takes the whole output"
            )
    text = str(key)
    if text in keys:
        value = parts[keys.index(text)][1]
    elif text.lstrip("-").isdigit() and -len(parts) <= int(text) < len(parts):
        value = parts[int(text)][1]
    else:
        raise ConvlensError(f"the model has no output {key!r}; it returns {describe_outputs(output)}")
    if not isinstance(value, torch.Tensor):
        raise ConvlensError(
            f"output {key!r} is a {type(value).__name__}, not a tensor; the model returns {describe_outputs(output)}"
        )
    return value


def class_logits(scores: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` logits with the one-logit rule applied: a single logit ``z`` is two classes ``[-z, z]``.

    The rule, stated once: a model with one output unit is a binary classifier whose
    logit ``z`` is the log-odds of class 1, so class 0's logit is ``-z``
    (``sigmoid(-z) = 1 - sigmoid(z)``). Heatmap targets, metrics, ``predict`` and
    training all read two classes from it through this function.
    """
    scores = scores.flatten(1)
    return torch.cat([-scores, scores], dim=1) if scores.shape[1] == 1 else scores


def class_probabilities(scores: torch.Tensor, activation: str = "logits") -> torch.Tensor:
    """``(N, K)`` class probabilities from the class-score tensor; one unit gives ``[1 - p, p]``.

    ``activation``: what the model already applied (``"logits"``, ``"softmax"``, ``"sigmoid"``).
    """
    scores = scores.float().flatten(1)
    if scores.shape[1] == 1:
        return (
            torch.cat([1 - scores, scores], dim=1) if activation == "sigmoid" else torch.sigmoid(class_logits(scores))
        )
    return scores if activation in ("softmax", "sigmoid") else scores.softmax(dim=1)


class ClassLogits:
    """``score(output)[i] = output[i, class_indices[i]]``, with a single logit read as two classes.

    ``output`` is the model's whole output; ``select`` is the key of the class-score
    tensor in a multi-output model (see :func:`select_output`).
    """

    def __init__(self, class_indices: list[int], select: OutputKey = None):
        self.class_indices = list(class_indices)
        self.select = select

    def rows(self, rows: Sequence[int]) -> ClassLogits:
        """The same target for a batch made of these rows of the original one (perturbation batches)."""
        return ClassLogits([self.class_indices[i] for i in rows], self.select)

    def __call__(self, output: Any) -> torch.Tensor:
        logits = class_logits(select_output(output, self.select))
        index = torch.as_tensor(self.class_indices[: logits.shape[0]], device=logits.device)
        return logits.gather(1, index.view(-1, 1)).squeeze(1)

    def __repr__(self) -> str:
        return f"ClassLogits({self.class_indices})"


class AllClasses:
    """``score(output) = class_logits(output)``, ``(N, K)``: every class of every image at once (``target="all"``)."""

    def __init__(self, select: OutputKey = None):
        self.select = select

    def __call__(self, output: Any) -> torch.Tensor:
        return class_logits(select_output(output, self.select))

    def __repr__(self) -> str:
        return "AllClasses()"


def _class_count(output: torch.Tensor) -> int:
    count = output.flatten(1).shape[1]
    return 2 if count == 1 else count


def _one_index(spec: Any, output: torch.Tensor, labels: list[str] | None, image: int) -> int:
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
            raise ConvlensError(
                f"target {spec!r} is a class name but the model has no labels; "
                "pass a class index or give the model labels"
            )
        else:
            raise ConvlensError(f"unknown class {spec!r}{did_you_mean(spec, labels)}")
    if isinstance(spec, float) and spec.is_integer():
        spec = int(spec)
    if not isinstance(spec, int):
        raise ConvlensError(f"target {spec!r} is not a class index, a class name or None")
    if not 0 <= spec < count:
        raise ConvlensError(f"target {spec} is out of range: the model has {count} classes (0..{count - 1})")
    return spec


def resolve_targets(
    target: TargetSpec,
    output: Any,
    labels: list[str] | None = None,
    select: OutputKey = None,
    model: Model | None = None,
) -> tuple[ScoreFn, list[int]]:
    """Turn what the user asked for into ``(score_fn, class_indices)`` given the model's output.

    Args:
        target: see the module docstring.
        output: the model's whole pre-softmax output for the batch (a tensor ``(N, K)``,
            or a tuple/list/dict of tensors).
        labels: class names, for targets given by name.
        select: which part of a multi-part output holds the class scores.
        model: the :class:`~convlens.Model`, for targets that run it (a similarity's reference image).

    A target with a ``settle`` method (:mod:`convlens.targets.tasks`) settles itself on ``output``.
    On a segmentation model (a dense output ``(N, K, H, W)``) ``None``, a class or one per image
    is a :class:`~convlens.targets.tasks.Region` of that class; on a detector (a list of boxes,
    labels and scores per image) ``None`` is :class:`~convlens.targets.tasks.Box` ``(0)``, its top detection.

    Returns:
        ``score_fn(output) -> (N,)`` and the class index explained for each image
        (``-1`` for a callable target); for ``"all"``, ``score_fn(output) -> (N, K)`` and the K classes.
    """
    from .tasks import Box, Region, detections, is_dense

    if isinstance(target, SettlingTarget):
        return target.settle(output, labels=labels, select=select, model=model)
    if callable(target) and not isinstance(target, (str, torch.Tensor)):
        return target, [-1] * _batch_size(output)
    if detections(output) is not None:
        if target is None or (isinstance(target, str) and target.lower() in ("top1", "top-1")):
            return Box(0).settle(output, labels=labels)
        raise ConvlensError(
            f"this model is a detector: its target is a box, not {target!r}; pass Box(index) or "
            "Box(label, iou_with=(x0, y0, x1, y1)) (CLI: box:INDEX or box:LABEL@x0,y0,x1,y1)"
        )
    output = select_output(output, select).detach()
    if is_dense(output):
        if isinstance(target, str) and target.lower() == "all":
            raise ConvlensError(
                "target 'all' is for classifiers; a segmentation model explains one class's "
                "region at a time: pass a class (a Region)"
            )
        spec = None if isinstance(target, str) and target.lower() in ("top1", "top-1") else target
        spec = (
            list(spec)
            if isinstance(spec, (tuple, torch.Tensor)) and not (isinstance(spec, torch.Tensor) and spec.ndim == 0)
            else spec
        )
        return Region(spec).settle(output, labels=labels)
    count = output.shape[0]
    if isinstance(target, str) and target.lower() == "all":
        return AllClasses(select), list(range(_class_count(output)))
    one: Any = target.item() if isinstance(target, torch.Tensor) and target.ndim == 0 else target
    if isinstance(one, (list, tuple, torch.Tensor)):
        specs = list(one)
        if len(specs) != count:
            raise ConvlensError(f"{len(specs)} targets given for {count} images; give one per image or one for all")
    else:
        specs = [one] * count
    indices = [_one_index(spec, output, labels, i) for i, spec in enumerate(specs)]
    return ClassLogits(indices, select), indices


def _batch_size(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.shape[0]
    tensors = [value for _, value in output_parts(output) if isinstance(value, torch.Tensor)]
    return tensors[0].shape[0] if tensors else 0
