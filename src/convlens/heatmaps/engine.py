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
  see :mod:`convlens.heatmaps.gradients`); LRP's is the signed relevance
  (see :mod:`convlens.heatmaps.lrp`).
* **Upsampling.** Bilinear, ``align_corners=False`` (pixel centres aligned, as
  OpenCV's ``resize`` does), from the layer to the input tensor.
* **Normalisation.** Per image, min-max to ``[0, 1]``. A constant map (all
  zero after the ReLU, say) has no spread to normalise: it is returned as
  zeros and flagged in ``Explanation.flat``, never as NaN.
* **Dtype.** ``float32`` on the input's device, whatever the model's dtype.
* **Targets.** The pre-softmax logit (see :mod:`convlens.targets`).

Methods are data: :data:`~convlens.heatmaps.registry.METHODS` maps a name to a
:class:`~convlens.heatmaps.base.Method` whose ``compute(request)`` returns the raw
maps; :mod:`.cam` holds the channel weightings, :mod:`.perturbation` Score-CAM and
Ablation-CAM, :mod:`.gradients` the input-gradient methods; this module runs them.

Example::

    import convlens as cl
    model = cl.load_model("resnet18", weights="none")
    res = cl.explain(model, [cl.sample_image()], method="gradcam")
    res.maps.shape        # torch.Size([1, 224, 224])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture import not_spatial, resolve_layers
from ..errors import ConvlensError
from ..models import Model, as_model, survey
from ..progress import Progress
from ..targets import ScoreFn, TargetSpec, class_logits
from .base import Method, Request, normalise, prepare_target, settle_target, upsample
from .registry import METHODS, get_method


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
        """The predicted class name of each image, from the same pass (a segmenter: the class of most
        pixels; a detector: its top detection, or ``nothing found``)."""
        from ..models.tasks import task_predictions

        special = task_predictions(self.output, self.model.select, self.model.label, 1)
        if special is not None:
            return [rows[0].label if rows else "nothing found" for rows in special]
        return [self.model.label(int(i)) for i in class_logits(self.model.scores(self.output)).argmax(1)]


@dataclass
class Explanation:
    """Heatmaps for a batch, one per image, and what produced them (see the module contract).

    With ``target="all"`` every class of every image has a map: ``maps`` is
    ``(N, K, H, W)``, ``raw`` ``(N, K, h, w)``, ``targets`` lists the K classes and
    ``flat`` holds K flags per image.

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
    flat: list[Any]  # per image a bool; with target="all" a list of K bools
    attributions: torch.Tensor | None = None
    images: list | None = None
    transform: Callable | None = field(default=None, repr=False)
    boxes: torch.Tensor | None = None  # a detection target's box per image (N, 4), in the input's pixels

    def _drawn(self, pictures: list, overlays: list) -> list:
        """The overlays with each image's detection box drawn on them, for a box target."""
        if self.boxes is None:
            return overlays
        from ..render.overlay import draw_box

        size = tuple(self.maps.shape[-2:])
        return [
            draw_box(drawn, box.tolist(), original_size=picture.size, input_size=size, transform=self.transform)
            for picture, drawn, box in zip(pictures, overlays, self.boxes)
        ]

    def overlay(self, images=None, colormap: str | None = None, alpha: float = 0.4, style: str | None = None) -> list:
        """The heatmaps drawn for the original images, as PIL images (longest side at most 2048 px).

        ``style``: ``"blend"`` (over the photo at opacity ``alpha``) or ``"map"``
        (the map alone, for sparse pixel-level maps); default chosen per method
        kind by :func:`convlens.heatmaps.style_for`. A box target's detection is drawn on it. ``colormap`` defaults to
        the style's own (jet, inferno). For a resize + centre-crop preprocessing the
        map is placed on the crop region of the original; outside it the original
        shows unchanged. The drawing is :func:`convlens.render.overlay.overlay_heatmaps`.
        """
        from ..render.overlay import overlay_heatmaps
        from .registry import style_for

        if self.maps.ndim != 3:
            raise ConvlensError("overlay() draws one map per image; with target='all' pick a class: overlay_class(k)")
        pictures = self._pictures(images)
        return self._drawn(
            pictures,
            overlay_heatmaps(
                pictures,
                self.maps,
                transform=self.transform,
                colormap=colormap,
                alpha=alpha,
                style=style or style_for(self.method),
            ),
        )

    def overlay_class(
        self, k: int, images=None, colormap: str | None = None, alpha: float = 0.4, style: str | None = None
    ) -> list:
        """With ``target="all"``: class ``k``'s maps for the original images (see :meth:`overlay`)."""
        from ..render.overlay import overlay_heatmaps
        from .registry import style_for

        pictures = self._pictures(images)
        return overlay_heatmaps(
            pictures,
            self.maps[:, k],
            transform=self.transform,
            colormap=colormap,
            alpha=alpha,
            style=style or style_for(self.method),
        )

    # -- inline display in a notebook (IPython's rich display protocol) ------------------------------------
    #: At most this many images are drawn inline, each this many pixels high.
    SHOWN_IMAGES, SHOWN_HEIGHT = 8, 224

    def _strip(self):
        """The overlays of the first images side by side, one PIL image; ``None`` without images to draw on."""
        if self.images is None or self.maps.ndim != 3:
            return None
        from PIL import Image

        count = min(len(self.images), self.SHOWN_IMAGES)
        drawn = [
            picture.resize((max(1, round(picture.width * self.SHOWN_HEIGHT / picture.height)), self.SHOWN_HEIGHT))
            for picture in Explanation(
                self.maps[:count],
                self.raw[:count],
                self.method,
                self.layer,
                self.targets[:count],
                self.target_names[:count],
                self.flat[:count],
                images=self.images[:count],
                transform=self.transform,
            ).overlay()
        ]
        strip = Image.new("RGB", (sum(p.width for p in drawn) + 4 * (len(drawn) - 1), self.SHOWN_HEIGHT), "white")
        left = 0
        for picture in drawn:
            strip.paste(picture, (left, 0))
            left += picture.width + 4
        return strip

    def _repr_png_(self) -> bytes | None:
        """The overlays as one PNG (Jupyter shows an ``Explanation`` inline with it; no extension needed)."""
        import io

        strip = self._strip()
        if strip is None:
            return None
        buffer = io.BytesIO()
        strip.save(buffer, format="PNG")
        return buffer.getvalue()

    def _repr_html_(self) -> str | None:
        """The overlays with a caption saying what they show (method, layer, explained classes)."""
        import base64
        import html

        data = self._repr_png_()
        if data is None:
            return None
        layer = ", ".join(self.layer) if isinstance(self.layer, list) else self.layer
        caption = f"{self.method}{f' at {layer}' if layer else ''}: " + ", ".join(
            f"{name}{' (flat map)' if flat else ''}" for name, flat in zip(self.target_names, self.flat)
        )
        return (
            f'<figure style="margin:0"><img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" '
            f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        )

    def _pictures(self, images) -> list:
        from ..images import load_images

        images = self.images if images is None else images
        if images is None:
            raise ConvlensError("pass the original images to overlay(); explain() was given a tensor")
        pictures = load_images(images)
        if len(pictures) != self.maps.shape[0]:
            raise ConvlensError(f"{len(pictures)} images given for {self.maps.shape[0]} heatmaps")
        return pictures


# -- post-processing ----------------------------------------------------------


def _combine(per_layer: list[torch.Tensor], size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw and final maps from one or several layers' raw maps (see the contract)."""
    if len(per_layer) == 1:
        raw = per_layer[0]
        return raw, upsample(raw.clamp(min=0), size)
    # As pytorch-grad-cam and LayerCAM's fusion across stages: each layer's map is
    # normalised on its own (deep layers have far larger values), then averaged.
    stack = [upsample(normalise(m.clamp(min=0))[0], size) for m in per_layer]
    raw = torch.stack(stack).mean(0)
    return raw, raw


def _check_options(method: Method, options: dict) -> None:
    allowed = method.option_names()
    for key in options:
        if key not in allowed:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
            raise ConvlensError(f"method {method.name!r} has no option {key!r}; {takes}")


def check_request(
    model, inputs, methods: Sequence[str], layer: str | nn.Module | Sequence = "auto", target: TargetSpec = None
) -> Plan:
    """Settle the batch, layers and targets with one forward pass, computing no heatmap.

    Raises :class:`ConvlensError` for what :func:`explain` would reject (unknown
    method or layer, a layer without a spatial output, a target out of range, a
    model whose output is not finite). The CLI calls this before any slow method
    runs, so a bad request fails in seconds, and hands the plan to every method.
    """
    chosen = [get_method(name) for name in methods]
    loaded = as_model(model)
    x, images = loaded.as_batch(inputs)
    target = prepare_target(loaded, target)
    readers = [method for method in chosen if method.uses_layer]  # they all read the same layers
    refs = _layer_refs(layer)
    if readers and not refs:
        raise ConvlensError("no layer given; pass a layer name or 'auto'")
    explicit = [ref for ref in refs if not (isinstance(ref, str) and ref == "auto")] if readers else []
    resolve_layers(loaded, explicit)  # an unknown name fails before the pass
    with torch.inference_mode(False):
        summary, output = survey(loaded, x, logits=True)
    names: list[str] = []
    for ref in refs if readers else []:
        if isinstance(ref, str) and ref == "auto":
            names.append(summary.auto_layer)
        else:
            names.extend(resolve_layers(loaded, [ref]))
    names = list(dict.fromkeys(names))
    rows = {row.name: row for row in summary.rows}
    for name in names:
        if not rows[name].spatial:
            raise not_spatial(name, rows[name].output_shape, summary.auto)
    for method in readers:
        if len(names) > 1 and not method.multi_layer:
            raise ConvlensError(f"method {method.name!r} takes one layer, got {len(names)}: {', '.join(names)}")
    score_fn, indices = settle_target(loaded, x, output, target)
    return Plan(loaded, x, images, names, score_fn, indices, output)


def _request(
    method: Method, model, inputs, layer, target, plan: Plan | None, progress: Progress | None
) -> tuple[Request, list | None]:
    """The method's request: from ``plan``; else settled by a checking pass when the layer is ``auto``
    (that pass finds the layer); else left to the method's own first pass over the clean batch, so a
    one-off Grad-CAM on a named layer runs the model once, not twice."""
    if plan is None and method.uses_layer and _names_auto(layer):
        plan = check_request(model, inputs, [method.name], layer, target)
    if plan is not None:
        names = plan.layers if method.uses_layer else []
        return Request(plan.model, plan.x, names, plan.score_fn, plan.class_indices, progress), plan.images
    loaded = as_model(model)
    x, images = loaded.as_batch(inputs)
    target = prepare_target(loaded, target)
    refs = _layer_refs(layer)
    names = list(dict.fromkeys(resolve_layers(loaded, refs))) if method.uses_layer else []
    if method.uses_layer and not names:
        raise ConvlensError("no layer given; pass a layer name or 'auto'")
    return Request(loaded, x, names, None, None, progress, target), images


def _layer_refs(layer: object) -> list[Any]:
    """The layer references the caller passed: the items of a list or tuple, or the one value given.

    Items are not checked here: :func:`resolve_layers` rejects whatever names no layer."""
    return list(layer) if isinstance(layer, (list, tuple)) else [layer]


def _names_auto(layer: object) -> bool:
    refs = _layer_refs(layer)
    return any(isinstance(ref, str) and ref == "auto" for ref in refs)


def explain(
    model,
    inputs=None,
    method: str = "gradcam",
    layer: str | nn.Module | Sequence = "auto",
    target: TargetSpec = None,
    *,
    plan: Plan | None = None,
    progress: Progress | None = None,
    **options,
) -> Explanation:
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
        target: ``None`` (top-1), a class index or name, one per image, ``"all"``
            (one map per class: ``maps`` is ``(N, K, H, W)``), or a callable on the
            output (see :mod:`convlens.targets`).
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
        request, images = _request(chosen, model, inputs, layer, target, plan, progress)
        if request.all_classes and not chosen.all_classes:
            capable = ", ".join(name for name, m in METHODS.items() if m.all_classes)
            raise ConvlensError(
                f"method {chosen.name!r} explains one class at a time; target='all' "
                f"(one map per class from one pass) is for {capable}"
            )
        names = request.layers
        if len(names) > 1 and not chosen.multi_layer:
            raise ConvlensError(f"method {chosen.name!r} takes one layer, got {len(names)}: {', '.join(names)}")
        result = chosen.compute(request, **options)
    loaded, x = request.model, request.x
    per_layer = [m.detach().float() for m in result.per_layer]
    classes = per_layer[0].shape[1] if per_layer[0].ndim == 4 else 0  # target="all": (N, K, h, w)
    if classes:  # every (image, class) map goes through the contract on its own
        per_layer = [m.flatten(0, 1) for m in per_layer]
    raw, combined = _combine(per_layer, tuple(x.shape[-2:]))
    maps, flat_maps = normalise(combined)
    flat: list[Any] = list(flat_maps)
    if classes:
        raw, maps = raw.unflatten(0, (-1, classes)), maps.unflatten(0, (-1, classes))
        flat = [flat_maps[i : i + classes] for i in range(0, len(flat_maps), classes)]
    indices = request.class_indices
    if indices is None:
        raise RuntimeError(f"method {chosen.name!r} returned without settling the target")
    return Explanation(
        maps=maps,
        raw=raw,
        method=chosen.name,
        layer=(names[0] if len(names) == 1 else names) if names else None,
        targets=indices,
        target_names=[loaded.label(i) if i >= 0 else "custom target" for i in indices],
        flat=flat,
        attributions=(
            None if result.attributions is None else loaded.from_internal(result.attributions.detach().float())
        ),
        images=images,
        transform=loaded.transform,
        boxes=_boxes(request.score_fn),
    )


def _boxes(score_fn) -> torch.Tensor | None:
    boxes = getattr(score_fn, "boxes", None)
    return boxes.detach().float().cpu() if isinstance(boxes, torch.Tensor) else None
