"""The one heatmap engine: every method, from CAM to Integrated Gradients, runs through :func:`explain`.

The heatmap contract (stated once, here):

* **Resolution.** ``Explanation.maps`` is ``(N, H, W)`` at the *input tensor's*
  resolution; ``Explanation.raw`` is the method's own map before any
  post-processing: at the layer's resolution ``(N, h, w)`` for CAM methods, at
  the input's for gradient methods. With several layers, ``raw`` is the mean of
  the per-layer normalised maps at the input's resolution.
* **Sign.** Heatmaps show evidence *for* the target: ``maps`` is
  ``min-max(upsample(ReLU(raw)))``. CAM ``raw`` is signed (the weighted
  channel sum); gradient methods' ``raw`` is already non-negative (magnitudes,
  see :mod:`convlens.heatmaps.gradients`).
* **Upsampling.** Bilinear, ``align_corners=False`` (pixel centres aligned, as
  OpenCV's ``resize`` does), from the layer to the input tensor.
* **Normalisation.** Per image, min-max to ``[0, 1]``. A constant map (all
  zero after the ReLU, say) has no spread to normalise: it is returned as
  zeros and flagged in ``Explanation.flat``, never as NaN.
* **Dtype.** ``float32`` on the input's device, whatever the model's dtype.
* **Targets.** The pre-softmax logit (see :mod:`convlens.targets`).

Methods are data: :data:`METHODS` maps a name to a :class:`Method` whose
``compute(request)`` returns the raw maps. :mod:`.cam` registers the channel
weightings, :mod:`.perturbation` Score-CAM and Ablation-CAM, :mod:`.gradients`
the input-gradient methods.

Example::

    import convlens as cl
    model = cl.load_model("resnet18", weights="none")
    res = cl.explain(model, [cl.sample_image()], method="gradcam")
    res.maps.shape        # torch.Size([1, 224, 224])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import capture, merge_rewrites, resolve_layers
from ..errors import ConvlensError, did_you_mean
from ..models import Model, Summary, as_model, summarize, survey
from ..models.model import ensure_finite
from ..targets import ScoreFn, TargetSpec, class_logits, resolve_targets

Progress = Callable[[int, int], None]  # progress(done, total)


@dataclass(frozen=True)
class Method:
    """One registered heatmap method.

    ``compute(request, **options)`` returns a :class:`RawMaps`. ``uses_layer``:
    the method reads a layer (CAM family, Guided Grad-CAM); ``multi_layer``: it
    may combine several layers.
    """

    name: str
    kind: Literal["cam", "perturbation", "gradient"]
    compute: Callable[..., RawMaps]
    uses_layer: bool = True
    multi_layer: bool = False
    summary: str = ""

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
    """Everything a method needs: the borrowed model, the batch, the layers and the resolved target.

    ``x`` is channels-first ``(N, C, H, W)`` in the model's dtype, never the caller's tensor.
    ``score_fn`` and ``class_indices`` were settled on the clean batch before the
    method runs (:func:`check_request`); a method only scores its own passes.
    """

    model: Model
    x: torch.Tensor
    layers: list[str]
    score_fn: ScoreFn
    class_indices: list[int]
    progress: Progress | None = None

    def rewrites(self, extra: Mapping[nn.Module, Callable] | None = None) -> dict[nn.Module, Callable]:
        """The model's logit rewrites (skip a final softmax/sigmoid) merged with ``extra``."""
        return merge_rewrites(self.model.logit_rewrites(), extra)

    def capture(self, layers: Sequence[str] | None = None, *, graph: bool = False, stop: bool = False,
                rewrite: Mapping[nn.Module, Callable] | None = None):
        """:func:`convlens.capture` on this request's model, always explaining logits."""
        return capture(self.model, self.layers if layers is None else layers, graph=graph, stop=stop,
                       rewrite=self.rewrites(rewrite))

    def score(self, output) -> torch.Tensor:
        """The target score per image ``(N,)`` of a pass over the request's batch."""
        return _checked_scores(self.score_fn(output), len(self.class_indices))

    def layer_output(self, rec, name: str) -> torch.Tensor:
        """The recorded ``(N, C, h, w)`` output of ``name``; a non-spatial layer is a user error."""
        output = rec.outputs.get(name)
        if output is None:
            raise ConvlensError(f"layer {name!r} did not run in the forward pass; choose another layer")
        if name not in rec.spatial:
            raise ConvlensError(_not_spatial(name, tuple(output.shape), summarize(self.model, tuple(self.x.shape[-2:]))))
        return output

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


def _checked_scores(scores, count: int) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.shape[0] != count:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ConvlensError(f"a target must give one score per image, got {shape}")
    return scores


def _not_spatial(name: str, shape: tuple | None, summary: Summary) -> str:
    suggestion = f"such as {summary.auto!r} " if summary.auto else ""
    return (f"layer {name!r} has output shape {shape}, not a spatial feature map; "
            f"choose a convolutional layer {suggestion}(see 'convlens layers MODEL')")


@dataclass
class Plan:
    """What one forward pass over the clean batch settled, so no method has to settle it again.

    Made by :func:`check_request`; pass it to :func:`explain` as ``plan=`` to run
    several methods on one batch without repeating that pass.
    """

    model: Model
    x: torch.Tensor
    images: list | None
    layers: list[str]
    score_fn: ScoreFn
    class_indices: list[int]
    output: object = field(repr=False, default=None)  # the model's (logit) output of the clean batch

    def top1(self) -> list[str]:
        """The predicted class name of each image, from the same pass."""
        return [self.model.label(int(i)) for i in class_logits(self.model.scores(self.output)).argmax(1)]


#: Every heatmap method by name; filled by the method modules (see package ``__init__``).
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


@dataclass
class Explanation:
    """Heatmaps for a batch, one per image, and what produced them (see the module contract).

    Attributes:
        maps: ``(N, H, W)`` float32 in ``[0, 1]`` at the input tensor's resolution.
        raw: the method's map before normalisation (layer resolution for CAMs).
        method: the method's registered name.
        layer: the layer name (a list for several; ``None`` for pure gradient methods).
        targets: the class index explained per image (``-1`` for a callable target).
        target_names: the class names of ``targets``.
        flat: per image, True where the map was constant and is returned as zeros.
        attributions: per-channel input attributions for gradient methods, in the model's layout
            (``(N, C, H, W)``; ``(N, H, W, C)`` for Keras).
        images: the images explained, when :func:`explain` was given images.
    """

    maps: torch.Tensor
    raw: torch.Tensor
    method: str
    layer: str | list[str] | None
    targets: list[int]
    target_names: list[str]
    flat: list[bool]
    attributions: torch.Tensor | None = None
    images: list | None = None
    transform: Callable | None = field(default=None, repr=False)

    def overlay(self, images=None, colormap: str = "jet", alpha: float = 0.4) -> list:
        """The heatmaps over the original images, as PIL images at the originals' full resolution.

        For a resize + centre-crop preprocessing the map is placed on the crop
        region of the original; outside it the original shows unchanged.
        """
        from ..images import load_images
        from ..render.overlay import overlay_heatmaps

        images = self.images if images is None else images
        if images is None:
            raise ConvlensError("pass the original images to overlay(); explain() was given a tensor")
        pictures = load_images(images)
        if len(pictures) != self.maps.shape[0]:
            raise ConvlensError(f"{len(pictures)} images given for {self.maps.shape[0]} heatmaps")
        return overlay_heatmaps(pictures, self.maps, transform=self.transform, colormap=colormap, alpha=alpha)


# -- post-processing ----------------------------------------------------------

def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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


def _combine(per_layer: list[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw and final maps from one or several layers' raw maps (see the contract)."""
    if len(per_layer) == 1:
        raw = per_layer[0]
        return raw, upsample(raw.clamp(min=0), size)
    # As pytorch-grad-cam and LayerCAM's fusion across stages: each layer's map is
    # normalised on its own (deep layers have far larger values), then averaged.
    stack = [upsample(normalise(m.clamp(min=0))[0], size) for m in per_layer]
    raw = torch.stack(stack).mean(0)
    return raw, raw


def get_method(name: str) -> Method:
    key = name.strip().lower().replace("_", "").replace("-", "")
    aliases = {m.replace("_", "").replace("-", ""): m for m in METHODS}
    aliases.update({"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++", "ig": "integrated_gradients",
                    "vanilla": "saliency", "gradient": "saliency"})
    if key not in aliases:
        raise ConvlensError(f"unknown method {name!r}{did_you_mean(name, METHODS)} "
                            f"(choose from {', '.join(METHODS)})")
    return METHODS[aliases[key]]


def _check_options(method: Method, options: dict) -> None:
    allowed = method.option_names()
    for key in options:
        if key not in allowed:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
            raise ConvlensError(f"method {method.name!r} has no option {key!r}; {takes}")


def check_request(model, inputs, methods: Sequence[str], layer: str | nn.Module | Sequence = "auto",
                  target: TargetSpec = None) -> Plan:
    """Settle the batch, layers and targets with one forward pass, computing no heatmap.

    Raises :class:`ConvlensError` for what :func:`explain` would reject (unknown
    method or layer, a layer without a spatial output, a target out of range, a
    model whose output is not finite). The CLI calls this before any slow method
    runs, so a bad request fails in seconds, and hands the plan to every method.
    """
    chosen = [get_method(name) for name in methods]
    loaded = as_model(model)
    x, images = loaded.as_batch(inputs)
    readers = [method for method in chosen if method.uses_layer]  # they all read the same layers
    refs = layer if isinstance(layer, (list, tuple)) else [layer]
    if readers and not refs:
        raise ConvlensError("no layer given; pass a layer name or 'auto'")
    explicit = [ref for ref in refs if not (isinstance(ref, str) and ref == "auto")] if readers else []
    resolve_layers(loaded, explicit)  # an unknown name fails before the pass
    with torch.inference_mode(False):
        summary, output = survey(loaded, x, logits=True)
    ensure_finite(loaded, x, output)
    names = []
    for ref in refs if readers else []:
        if isinstance(ref, str) and ref == "auto":
            names.append(summary.auto_layer)
        else:
            names.extend(resolve_layers(loaded, [ref]))
    names = list(dict.fromkeys(names))
    rows = {row.name: row for row in summary.rows}
    for name in names:
        if not rows[name].spatial:
            raise ConvlensError(_not_spatial(name, rows[name].output_shape, summary))
    for method in readers:
        if len(names) > 1 and not method.multi_layer:
            raise ConvlensError(f"method {method.name!r} takes one layer, got {len(names)}: {', '.join(names)}")
    with torch.no_grad():
        score_fn, indices = resolve_targets(target, output, loaded.labels, loaded.select)
        _checked_scores(score_fn(output), x.shape[0])
    return Plan(loaded, x, images, names, score_fn, indices, output)


def explain(model, inputs=None, method: str = "gradcam", layer: str | nn.Module | Sequence = "auto",
            target: TargetSpec = None, *, plan: Plan | None = None, progress: Progress | None = None,
            **options) -> Explanation:
    """Compute one heatmap per image with a registered method.

    Args:
        model: a :class:`convlens.Model`, a bare ``nn.Module`` (channels-first)
            or a Keras model.
        inputs: a preprocessed batch in the model's layout (channels-first for
            torch, channels-last for Keras), or images (paths, PIL, arrays);
            see :meth:`convlens.Model.as_batch`.
        method: a name in :data:`METHODS` (``gradcam``, ``scorecam``, ...).
        layer: ``"auto"`` (the last layer with a spatial output), a layer name
            or module, or a list of them for methods that combine layers.
        target: ``None`` (top-1), a class index or name, one per image, or a
            callable on the output (see :mod:`convlens.targets`).
        plan: what :func:`check_request` settled for these inputs, layer and target;
            when given, ``inputs``, ``layer`` and ``target`` are taken from it and
            the method runs without a checking pass of its own.
        progress: ``progress(done, total)`` called by the slower methods.
        **options: the method's own options (``batch_size``, ``n_samples``, ...).

    Returns:
        An :class:`Explanation` following the contract in this module's docstring.
    """
    chosen = get_method(method)
    _check_options(chosen, options)
    # A caller inside torch.inference_mode() (an evaluation loop) still gets gradients here.
    with torch.inference_mode(False):
        if plan is None:
            plan = check_request(model, inputs, [chosen.name], layer, target)
        names = plan.layers if chosen.uses_layer else []
        if len(names) > 1 and not chosen.multi_layer:
            raise ConvlensError(f"method {chosen.name!r} takes one layer, got {len(names)}: {', '.join(names)}")
        loaded, x = plan.model, plan.x
        request = Request(loaded, x, names, plan.score_fn, plan.class_indices, progress)
        result = chosen.compute(request, **options)
    per_layer = [m.detach().float() for m in result.per_layer]
    raw, combined = _combine(per_layer, tuple(x.shape[-2:]))
    maps, flat = normalise(combined)
    indices = request.class_indices
    return Explanation(
        maps=maps, raw=raw, method=chosen.name,
        layer=(names[0] if len(names) == 1 else names) if names else None,
        targets=indices, target_names=[loaded.label(i) if i >= 0 else "custom target" for i in indices],
        flat=flat,
        attributions=None if result.attributions is None else loaded.from_internal(result.attributions.detach().float()),
        images=plan.images, transform=loaded.transform)
