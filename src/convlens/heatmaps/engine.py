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

from ..capture import capture, resolve_layers
from ..errors import ConvlensError, did_you_mean
from ..models import Model, as_model, summarize
from ..models.model import ensure_finite
from ..targets import ScoreFn, TargetSpec, resolve_targets

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
    """Everything a method needs: the borrowed model, the batch, the layers and the target.

    ``x`` is channels-first ``(N, C, H, W)`` in the model's dtype, never the caller's tensor.
    """

    model: Model
    x: torch.Tensor
    layers: list[str]
    target: TargetSpec
    progress: Progress | None = None
    score_fn: ScoreFn | None = None
    class_indices: list[int] | None = None

    def rewrites(self, extra: Mapping[nn.Module, Callable] | None = None) -> dict[nn.Module, Callable]:
        """The model's logit rewrites (skip a final softmax/sigmoid) merged with ``extra``.

        When both touch one module, ``extra`` runs on the logit rewrite's result.
        """
        merged = dict(self.model.logit_rewrites())
        for module, fn in (extra or {}).items():
            base = merged.get(module)
            merged[module] = fn if base is None else (
                lambda mod, inputs, output, fn=fn, base=base: fn(mod, inputs, base(mod, inputs, output)))
        return merged

    def capture(self, layers: Sequence[str] | None = None, *, graph: bool = False, stop: bool = False,
                rewrite: Mapping[nn.Module, Callable] | None = None):
        """:func:`convlens.capture` on this request's model, always explaining logits."""
        return capture(self.model, self.layers if layers is None else layers, graph=graph, stop=stop,
                       rewrite=self.rewrites(rewrite))

    def score(self, output) -> torch.Tensor:
        """The target score per image ``(N,)``; the target is resolved (and the output checked) on the first call."""
        if self.score_fn is None:
            ensure_finite(self.model, self.x, output)  # a NaN model gives NaN maps: say which layer, once
            with torch.no_grad():
                self.score_fn, self.class_indices = resolve_targets(self.target, output, self.model.labels,
                                                                    self.model.select)
        scores = self.score_fn(output)
        if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.shape[0] != len(self.class_indices):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ConvlensError(f"a target must give one score per image, got {shape}")
        return scores

    def layer_output(self, rec, name: str) -> torch.Tensor:
        """The recorded ``(N, C, h, w)`` output of ``name``; a non-spatial layer is a user error."""
        output = rec.outputs.get(name)
        if output is None:
            raise ConvlensError(f"layer {name!r} did not run in the forward pass; choose another layer")
        if name not in rec.spatial:
            raise ConvlensError(
                f"layer {name!r} has output shape {tuple(output.shape)}, not a spatial feature map; "
                f"choose a convolutional layer such as {summarize(self.model, tuple(self.x.shape[-2:])).auto_layer!r} "
                "(see 'convlens layers MODEL')")
        return output

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


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
    """Per-image min-max to ``[0, 1]``; constant (or non-finite) maps become zeros and are flagged."""
    flat_maps = maps.flatten(1)
    low = flat_maps.min(dim=1).values
    high = flat_maps.max(dim=1).values
    span = high - low
    scale = torch.maximum(high.abs(), low.abs())
    flat = ~torch.isfinite(span) | (span <= rtol * scale) | (scale == 0)
    safe_span = torch.where(flat, torch.ones_like(span), span)
    normalised = (maps - low.view(-1, 1, 1)) / safe_span.view(-1, 1, 1)
    normalised = torch.where(flat.view(-1, 1, 1), torch.zeros_like(normalised), normalised)
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


def _resolve_layer_names(model: Model, method: Method, layer, x: torch.Tensor) -> list[str]:
    if not method.uses_layer:
        return []
    refs = layer if isinstance(layer, (list, tuple)) else [layer]
    if not refs:
        raise ConvlensError("no layer given; pass a layer name or 'auto'")
    names = []
    for ref in refs:
        if isinstance(ref, str) and ref == "auto":
            names.append(summarize(model, tuple(x.shape[-2:])).auto_layer)
        else:
            names.extend(resolve_layers(model, [ref]))
    names = list(dict.fromkeys(names))
    if len(names) > 1 and not method.multi_layer:
        raise ConvlensError(f"method {method.name!r} takes one layer, got {len(names)}: {', '.join(names)}")
    return names


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
                  target: TargetSpec = None) -> list[str]:
    """Validate methods, layers and targets with one forward pass, computing nothing else.

    Raises :class:`ConvlensError` for what :func:`explain` would reject; returns
    the layer names the layer-reading methods will use. The CLI calls this
    before any slow method runs, so a bad layer or target fails in seconds.
    """
    chosen = [get_method(name) for name in methods]
    loaded = as_model(model)
    x, _ = loaded.as_batch(inputs)
    readers = [method for method in chosen if method.uses_layer]  # they all read the same layers
    names = _resolve_layer_names(loaded, readers[0], layer, x) if readers else []
    request = Request(loaded, x, names, target)
    with torch.inference_mode(), request.capture() as rec:
        request.score(rec.forward(x))
        for name in names:
            request.layer_output(rec, name)
    return names


def explain(model, inputs, method: str = "gradcam", layer: str | nn.Module | Sequence = "auto",
            target: TargetSpec = None, *, progress: Progress | None = None, **options) -> Explanation:
    """Compute one heatmap per image with a registered method.

    Args:
        model: a :class:`convlens.Model`, a bare ``nn.Module`` (channels-first)
            or a Keras model.
        inputs: a preprocessed batch in the model's layout (channels-first for
            torch, channels-last for Keras), or images (paths, PIL, arrays).
        method: a name in :data:`METHODS` (``gradcam``, ``scorecam``, ...).
        layer: ``"auto"`` (the last layer with a spatial output), a layer name
            or module, or a list of them for methods that combine layers.
        target: ``None`` (top-1), a class index or name, one per image, or a
            callable on the output (see :mod:`convlens.targets`).
        progress: ``progress(done, total)`` called by the slower methods.
        **options: the method's own options (``batch_size``, ``n_samples``, ...).

    Returns:
        An :class:`Explanation` following the contract in this module's docstring.
    """
    chosen = get_method(method)
    _check_options(chosen, options)
    loaded = as_model(model)
    # A caller inside torch.inference_mode() (an evaluation loop) still gets gradients here.
    with torch.inference_mode(False):
        x, images = loaded.as_batch(inputs)
        names = _resolve_layer_names(loaded, chosen, layer, x)
        request = Request(loaded, x, names, target, progress)
        result = chosen.compute(request, **options)
    per_layer = [m.detach().float() for m in result.per_layer]
    raw, combined = _combine(per_layer, tuple(x.shape[-2:]))
    maps, flat = normalise(combined)
    indices = request.class_indices or [-1] * x.shape[0]
    return Explanation(
        maps=maps, raw=raw, method=chosen.name,
        layer=(names[0] if len(names) == 1 else names) if names else None,
        targets=indices, target_names=[loaded.label(i) if i >= 0 else "custom target" for i in indices],
        flat=flat,
        attributions=None if result.attributions is None else loaded.from_internal(result.attributions.detach().float()),
        images=images, transform=loaded.transform)
