"""What every heatmap method is made of: the method record, the request it gets, the maps it returns.

A method is a function ``compute(request, **options) -> RawMaps``; :class:`Method`
describes it for the registry (:mod:`convlens.heatmaps.registry`) and the engine
(:mod:`convlens.heatmaps.engine`) hands it a :class:`Request`: the borrowed model,
the batch, the layers and the target already settled on the clean batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import capture, merge_rewrites
from ..errors import ConvlensError
from ..models import Model, summarize
from ..models.model import ensure_finite
from ..progress import Progress
from ..targets import AllClasses, OutputKey, ScoreFn, TargetSpec, resolve_targets


@runtime_checkable
class PreparingTarget(Protocol):
    """A target that runs the model once before it is used (a similarity's reference image)."""

    def prepare(self, model: Model, select: OutputKey = None) -> TargetSpec: ...


@dataclass(frozen=True)
class Method:
    """One registered heatmap method.

    ``compute(request, **options)`` returns a :class:`RawMaps`. ``uses_layer``:
    the method reads a layer (CAM family, Guided Grad-CAM); ``multi_layer``: it
    may combine several layers; ``all_classes``: it takes ``target="all"``;
    ``pixel_level``: the map has one value per input pixel and is sparse (input
    gradients), so it is drawn on its own, not blended over the photo (see
    :func:`convlens.heatmaps.style_for`).
    """

    name: str
    kind: Literal["cam", "perturbation", "gradient"]
    compute: Callable[..., RawMaps]
    uses_layer: bool = True
    multi_layer: bool = False
    all_classes: bool = False  # explains every class from one pass (target="all")
    pixel_level: bool = False  # a sparse per-pixel map (input gradients), not a smooth layer-resolution one

    def option_names(self) -> list[str]:
        params = list(inspect.signature(self.compute).parameters.values())[1:]
        return [p.name for p in params if p.kind == p.KEYWORD_ONLY]


@dataclass
class RawMaps:
    """What a method hands back: one raw map per layer, and per-channel input attributions if any."""

    per_layer: list[torch.Tensor]
    attributions: torch.Tensor | None = None


@dataclass
class Request:
    """Everything a method needs: the borrowed model, the batch, the layers and the target.

    ``x`` is channels-first ``(N, C, H, W)`` in the model's dtype, never the caller's tensor.
    The target is settled on a pass over the clean batch ``x``, once: by
    :func:`~convlens.heatmaps.engine.check_request` before the method runs (then
    ``score_fn`` is given), or, so that a one-off Grad-CAM costs one forward pass and
    not two, by the method itself on its own first pass over ``x``:
    ``request.score(output, clean=True)``. A method whose first pass is not over the
    clean batch (SmoothGrad's noisy copies) calls :meth:`settle_on_clean_batch` first.
    Scoring any other pass before the target is settled is a programming error.
    """

    model: Model
    x: torch.Tensor
    layers: list[str]
    score_fn: ScoreFn | None
    class_indices: list[int] | None
    progress: Progress | None = None
    target: TargetSpec = None

    def settle(self, output) -> None:
        """:func:`settle_target` on ``output``, a pass over the clean batch, unless already settled."""
        if self.score_fn is None:
            self.score_fn, self.class_indices = settle_target(self.model, self.x, output, self.target)

    def settle_on_clean_batch(self) -> None:
        """:meth:`settle`, with a pass of its own when the target is not settled yet."""
        if self.score_fn is None:
            with torch.inference_mode(), self.capture([]) as rec:
                self.settle(rec.forward(self.x))

    def rewrites(self, extra: Mapping[nn.Module, Callable] | None = None) -> dict[nn.Module, Callable]:
        """The model's logit rewrites (skip a final softmax/sigmoid) merged with ``extra``."""
        return merge_rewrites(self.model.logit_rewrites(), extra)

    def capture(
        self,
        layers: Sequence[str] | None = None,
        *,
        graph: bool = False,
        stop: bool = False,
        rewrite: Mapping[nn.Module, Callable] | None = None,
    ):
        """:func:`convlens.capture` on this request's model, always explaining logits."""
        return capture(
            self.model,
            self.layers if layers is None else layers,
            graph=graph,
            stop=stop,
            rewrite=self.rewrites(rewrite),
        )

    def score(self, output, *, clean: bool = False) -> torch.Tensor:
        """The target score per image ``(N,)`` of a pass over the request's batch; ``(N, K)`` for ``target="all"``.

        ``clean``: ``output`` is of a pass over the clean batch ``x``, on which the target may be settled.
        """
        if clean:
            self.settle(output)
        score_fn = self.score_fn
        if score_fn is None:
            raise RuntimeError("a method scored a pass before the target was settled on the clean batch")
        return _checked_scores(score_fn(output), self.x.shape[0], score_fn)

    @property
    def all_classes(self) -> bool:
        """Whether the target is every class (``"all"``), settled or not."""
        if self.score_fn is not None:
            return isinstance(self.score_fn, AllClasses)
        return isinstance(self.target, str) and self.target.lower() == "all"

    def layer_output(self, rec, name: str) -> torch.Tensor:
        """The recorded ``(N, C, h, w)`` output of ``name``; a non-spatial layer is a user error."""
        return rec.spatial_output(name, suggest=lambda: summarize(self.model, tuple(self.x.shape[-2:])).auto)

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


def prepare_target(model: Model, target: TargetSpec) -> TargetSpec:
    """A target that runs the model itself (a similarity's reference image) does so here, before any capture."""
    return target.prepare(model, model.select) if isinstance(target, PreparingTarget) else target


def settle_target(model: Model, x: torch.Tensor, output, target: TargetSpec) -> tuple[ScoreFn, list[int]]:
    """The one place a target is settled on a clean pass: the output is finite, the target resolves, and
    its scores have the right shape. Returns ``(score_fn, class_indices)``."""
    ensure_finite(model, x, output)
    with torch.no_grad():
        score_fn, indices = resolve_targets(target, output, model.labels, model.select, model)
        _checked_scores(score_fn(output), x.shape[0], score_fn)
    return score_fn, indices


def _checked_scores(scores, count: int, score_fn: ScoreFn) -> torch.Tensor:
    rank = 2 if isinstance(score_fn, AllClasses) else 1
    if not isinstance(scores, torch.Tensor) or scores.ndim != rank or scores.shape[0] != count:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ConvlensError(f"a target must give one score per image, got {shape}")
    return scores


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, h, w)`` -> ``(N, H, W)``, bilinear with pixel centres aligned."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def normalise(maps: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, list[bool]]:
    """Min-max each map of ``(N, ...)`` to ``[0, 1]``: the one normaliser of convlens.

    The flat-map rule, stated once: a map whose spread is at most ``rtol`` times
    its largest magnitude (a constant map, all zero after the ReLU, say), or that
    holds a non-finite value, has nothing to normalise: it becomes zeros and is
    flagged, never NaN. Heatmaps, Score-CAM's masks and the metrics all use it.
    """
    flat_maps = maps.flatten(1)
    low = flat_maps.min(dim=1).values
    high = flat_maps.max(dim=1).values
    span = high - low
    scale = torch.maximum(high.abs(), low.abs())
    flat = ~torch.isfinite(span) | (span <= rtol * scale) | (scale == 0)
    shape = (-1,) + (1,) * (maps.ndim - 1)
    safe_span = torch.where(flat, torch.ones_like(span), span)
    normalised = (maps - low.view(shape)) / safe_span.view(shape)
    normalised = torch.where(flat.view(shape), torch.zeros_like(normalised), normalised)
    return normalised.clamp_(0, 1), flat.tolist()
