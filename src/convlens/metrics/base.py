"""What every metric shares: reading ``(model, inputs, maps, targets)`` and scoring inputs in batches.

The contract of every metric in :mod:`convlens.metrics`:

* ``model``: a :class:`convlens.Model` or a bare ``nn.Module`` (channels-first).
  It is borrowed through :func:`convlens.capture` (eval mode, state restored).
* ``x``: a batch in the model's own layout (``(N, C, H, W)``, or ``(N, H, W, C)``
  for Keras); a single image without the batch dimension is accepted.
* ``maps``: heatmaps ``(N, H, W)`` (or ``(H, W)`` for one image), larger =
  more important. Maps at another resolution are resized bilinearly to the
  input's. An object with a ``.maps`` attribute (an ``Explanation``) is accepted.
* ``targets``: the class each map explains, by the one target contract
  (:mod:`convlens.targets`): ``None`` (the model's top class), an index or a
  class name for all images, or one per image. On a segmenter or a detector
  (and with a ``Region``, ``Box`` or ``Similarity``) the target is settled on the
  clean images and each perturbed input gets *its* score (the region's logit sum
  over the fixed mask, the matched detection's score, the cosine similarity):
  see :class:`TargetRows`.
* The score of an input is the probability of the target class: softmax of the
  logits, or the sigmoid of a single-logit model (``Model.probabilities``).
  ``score="logit"`` uses the raw target output instead (``-z`` / ``z`` for the
  two classes of a single-logit model).

Nothing here changes the caller's tensors; every result is a float32 tensor on
the input's device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F

from ..capture import capture
from ..errors import ConvlensError
from ..heatmaps import explain
from ..heatmaps.base import normalise
from ..models import Model, as_model
from ..scoring import score_batches
from ..targets import AllClasses, ClassLogits, class_logits, resolve_targets

Targets = int | str | Sequence[int | str] | torch.Tensor | None
#: settled targets: class indices ``(N,)``, or a task target's rows (:class:`TargetRows`), which stand in for them
ClassTargets = Union[torch.Tensor, "TargetRows"]
Score = Literal["probability", "logit"]


@dataclass
class Prepared:
    """Validated metric inputs: the model, a channels-first batch, maps at its resolution, targets."""

    model: Model
    x: torch.Tensor  # (N, C, H, W), channels-first, float
    maps: torch.Tensor  # (N, H, W) float32
    targets: ClassTargets  # (N,) long; a TargetRows for a segmenter's, detector's or embedding's target


def as_batch(model: Model, x) -> torch.Tensor:
    """The user's input as channels-first ``(N, C, H, W)`` (:meth:`Model.as_batch`'s one contract)."""
    return model.as_batch(x)[0]


def as_maps(maps, n: int, size: Sequence[int]) -> torch.Tensor:
    """Heatmaps as float32 ``(N, H, W)`` at ``size``; an ``Explanation`` gives its ``.maps``."""
    maps = getattr(maps, "maps", maps)
    if not isinstance(maps, torch.Tensor):
        raise ConvlensError(f"expected heatmaps as a torch.Tensor (N, H, W), got {type(maps).__name__}")
    maps = maps.detach().float()
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim == 2:
        maps = maps.unsqueeze(0)
    if maps.ndim != 3 or maps.shape[0] != n:
        raise ConvlensError(f"expected {n} heatmaps of shape (H, W), got a tensor of shape {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise ConvlensError("the heatmaps contain NaN or infinite values")
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of ``(N, H, W)`` to [0, 1]; a flat map becomes zeros, never NaN (:func:`normalise`)."""
    return normalise(maps)[0]


def forward(model: Model, x: torch.Tensor) -> Any:
    """The model's output for a channels-first batch, without gradients (a tensor, or a tuple/dict of them)."""
    with capture(model) as rec, torch.no_grad():
        return rec.forward(x)


class TargetRows:
    """A settled task target (Region, Box, Similarity) and the image each input row is scored for.

    It stands where a classifier's ``(N,)`` class indices stand (repeated, sliced, moved) so every
    metric scores a segmenter's region, a detector's box or an embedding's similarity the same way:
    the target's own score replaces the class probability (``score`` does not apply).
    """

    def __init__(self, target, rows: torch.Tensor, classes: list[int]):
        self.target, self.rows, self.classes = target, rows, list(classes)

    def repeat_interleave(self, count: int) -> TargetRows:
        return TargetRows(self.target, self.rows.repeat_interleave(count), self.classes)

    def repeat(self, count: int) -> TargetRows:
        return TargetRows(self.target, self.rows.repeat(count), self.classes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TargetRows(self.target, self.rows[index], self.classes)
        return torch.tensor(self.classes[int(self.rows[index])])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def to(self, device) -> TargetRows:
        return self

    def scores(self, output) -> torch.Tensor:
        return self.target.rows(self.rows.tolist())(output).float()


def class_scores(
    model: Model, output: torch.Tensor, targets: torch.Tensor, score: Score = "probability"
) -> torch.Tensor:
    """The score of each row's target class: its probability, or its raw output (``"logit"``);
    for a task target (:class:`TargetRows`) the target's own score."""
    if isinstance(targets, TargetRows):
        return targets.scores(output)
    if score == "probability":
        values = model.probabilities(output)
    elif score == "logit":
        values = class_logits(model.scores(output).float())
    else:
        raise ConvlensError(f"unknown score {score!r}; choose 'probability' or 'logit'")
    return values.gather(1, targets.view(-1, 1).to(values.device)).squeeze(1)


def as_targets(model: Model, x: torch.Tensor, targets: Targets) -> ClassTargets:
    """Target classes ``(N,)`` by the one target contract (:func:`convlens.targets.resolve_targets`).

    ``None`` is each image's top class; an index or a class name for all images, or one per image.
    """
    if isinstance(targets, TargetRows):  # settled already, on these images
        return targets
    if callable(targets) and not isinstance(targets, (str, torch.Tensor)) and not hasattr(targets, "settle"):
        raise ConvlensError(
            "a metric scores the probability of a class; pass class indices or names as targets, not a function"
        )
    score_fn, indices = resolve_targets(targets, forward(model, x), model.labels, model.select, model)
    if isinstance(score_fn, AllClasses):
        raise ConvlensError("a metric scores one class per image; target='all' is for heatmaps")
    if hasattr(score_fn, "rows") and not isinstance(score_fn, ClassLogits):  # a Region, Box or Similarity
        return TargetRows(score_fn, torch.arange(x.shape[0], device=x.device), indices)
    return torch.as_tensor(indices, dtype=torch.long, device=x.device)


def prepare(model, x: torch.Tensor, maps, targets: Targets = None) -> Prepared:
    """Check and convert a metric's inputs (see the module docstring)."""
    model = as_model(model)
    batch = as_batch(model, x)
    return Prepared(
        model, batch, as_maps(maps, batch.shape[0], tuple(batch.shape[-2:])), as_targets(model, batch, targets)
    )


def score_inputs(
    model: Model,
    make_inputs: Callable[[int, int], torch.Tensor],
    count: int,
    targets: ClassTargets,
    *,
    batch_size: int = 64,
    score: Score = "probability",
) -> torch.Tensor:
    """Score ``count`` inputs built lazily, ``batch_size`` at a time (:func:`convlens.scoring.score_batches`).

    ``make_inputs(start, stop)`` returns the channels-first inputs ``start..stop-1``
    and ``targets[i]`` is the class input ``i`` is scored for, so no more than
    ``batch_size`` perturbed images exist at once. Returns float32 ``(count,)``.
    """
    scores = score_batches(
        model,
        count,
        lambda start, stop: (make_inputs(start, stop), {}),
        lambda output, start, stop: class_scores(model, output, targets[start:stop], score),
        batch_size=batch_size,
    )
    return scores.to(targets.device)


def trapezoid_auc(fractions: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Area under ``scores (N, S)`` over ``fractions (S,)`` by the trapezoid rule, ``(N,)``."""
    return torch.trapezoid(scores, fractions.to(scores), dim=-1)


#: ``explain_fn(model, x, targets) -> maps (N, H, W)``: how sanity checks and ``evaluate`` get heatmaps.
ExplainFn = Callable[[Model, torch.Tensor, ClassTargets], torch.Tensor]


def heatmap_explainer(method: str, **options) -> ExplainFn:
    """An ``explain_fn`` that calls ``convlens.explain(model, x, method=method, target=targets)``."""

    def explain_fn(model: Model, x: torch.Tensor, targets: ClassTargets) -> torch.Tensor:
        if isinstance(targets, TargetRows):  # the settled region, box or similarity: the same on the same images
            return explain(model, x, method=method, target=targets.target.rows(targets.rows.tolist()), **options).maps
        return explain(model, x, method=method, target=[int(t) for t in targets], **options).maps

    explain_fn.__name__ = f"explain_{method}"
    return explain_fn
