"""The layer table (like Keras's ``model.summary()``) and the ``auto`` layer choice.

A layer is a valid explanation target when its output is a spatial feature map
with more than one position, as :func:`convlens.capture.spatial_view` sees it:
``(N, C, h, w)``, a channels-last ``(N, h, w, C)`` stage, or a ViT's token
sequence ``(N, P + h*w, C)`` on the patch grid. Attention tensors, logits and
anything else are not. ``auto`` is the last such layer to finish in a forward
pass at the model's input size, adaptive pooling excepted. In a transformer
the last blocks' patch tokens often do not reach the output (only the class
token does), so among token layers ``auto`` takes the last one whose gradient
reaches more than one grid position (one extra backward pass, token models only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..capture import capture, merge_rewrites, prefix_tokens, spatial_view
from ..errors import ConvlensError, first_line
from .model import Model

TORCHSCRIPT_LAYERS = (
    "a TorchScript model cannot be hooked, so convlens cannot see its layers (it can still "
    "predict); pass the eager nn.Module instead, or its state dict with --arch"
)


@dataclass
class LayerRow:
    name: str
    type: str
    output_shape: tuple[int, ...] | None  # in the framework's own layout, batch dimension as -1
    params: int
    spatial: bool
    depth: int
    layout: str = ""  # how the output is read as a map: channels_first, channels_last, tokens; "" if not spatial


@dataclass
class Summary:
    rows: list[LayerRow]  # in the order the framework lists its layers
    total_params: int
    trainable_params: int
    input_size: tuple[int, int]
    forward_order: list[str]  # layers in the order their outputs were finished
    auto: str | None = None  # the layer 'auto' picks, None when there is none
    scripted: bool = False  # TorchScript: no hooks, so no output shapes and no layer to explain

    @property
    def spatial_layers(self) -> list[str]:
        """Valid explanation targets, in forward order."""
        spatial = {r.name for r in self.rows if r.spatial}
        return [name for name in self.forward_order if name in spatial]

    @property
    def auto_layer(self) -> str:
        """The last spatial layer, skipping adaptive pooling (VGG's 7x7 ``avgpool`` only resamples)."""
        if self.scripted:
            raise ConvlensError(TORCHSCRIPT_LAYERS)
        if self.auto is None:
            raise ConvlensError("this model has no layer with a spatial output; CAM methods need one")
        return self.auto


#: Modules whose output only passes their input on (or drops parts of it): never the auto layer of a token model.
_PASS_THROUGH = ("Identity", "Dropout", "DropPath", "Linear")


def _auto_candidates(rows: list[LayerRow], order: list[str]) -> list[str]:
    by_name = {r.name: r for r in rows}
    spatial = [n for n in order if n in by_name and by_name[n].spatial]
    return [
        n
        for n in spatial
        if not by_name[n].type.startswith("Adaptive")
        and not (by_name[n].layout == "tokens" and by_name[n].type in _PASS_THROUGH)
    ]


def _reaches_output(model: Model, x: torch.Tensor, names: list[str]) -> list[str]:
    """Those of ``names`` whose output the model's scores depend on at more than one grid position."""
    with capture(model, names, graph=True, rewrite=model.logit_rewrites()) as rec:
        output = rec.forward(x)
        try:
            total = model.scores(output).float().sum()
        except ConvlensError:  # several outputs and none chosen: any of them will do here
            from ..targets import output_parts

            # the output holds a tensor (the forward pass ran), so the sum is one, not sum()'s start 0
            total = cast(
                torch.Tensor, sum(v.float().sum() for _, v in output_parts(output) if isinstance(v, torch.Tensor))
            )
        acts = [rec.outputs[n] for n in names]
        grads = torch.autograd.grad(total, acts, allow_unused=True)
    reached = []
    for name, grad in zip(names, grads):
        if grad is not None and int((grad.abs().sum(dim=(0, 1)) > 0).sum()) > 1:
            reached.append(name)
    return reached


def _choose_auto(model: Model, x: torch.Tensor, rows: list[LayerRow], order: list[str]) -> str | None:
    candidates = _auto_candidates(rows, order)
    within = model.info.get("auto_within")  # a segmenter's or detector's features, not its heads
    if within and any(n.startswith(within + ".") for n in candidates):
        candidates = [n for n in candidates if n.startswith(within + ".")]
    if not candidates:
        return None
    layouts = {r.name: r.layout for r in rows}
    if layouts[candidates[-1]] != "tokens":
        return candidates[-1]
    tail = [n for n in candidates if layouts[n] == "tokens"][-8:]  # the last blocks are enough to look at
    reached = _reaches_output(model, x, tail)
    return reached[-1] if reached else candidates[-1]


def _own_params(module: nn.Module, keras: bool) -> int:
    if keras:
        layer: Any = module  # a Keras layer (keras ships no types)
        return int(layer.count_params()) if getattr(layer, "built", False) else 0
    return sum(p.numel() for p in module.parameters())


def summarize(model: Model, input_size: Sequence[int] | None = None) -> Summary:
    """Run one forward pass at ``input_size`` and tabulate every layer's output shape and parameters."""
    size = tuple(input_size or model.input_size)
    channels = 1 if getattr(model.transform, "channels", 3) == 1 else 3
    return survey(model, torch.zeros(1, channels, *size, device=model.device, dtype=model.dtype))[0]


def survey(model: Model, x: torch.Tensor, *, logits: bool = False) -> tuple[Summary, Any]:
    """:func:`summarize` on a real channels-first batch ``x``, returning the model's output of that same pass.

    One pass tells which layers are maps, which one ``auto`` picks, and what the
    model answers, so a caller checking a request needs no second pass. With
    ``logits`` a final softmax/sigmoid is skipped (:meth:`Model.logit_rewrites`).
    """
    height, width = (int(v) for v in x.shape[-2:])
    size = (height, width)
    layers = model.named_layers()
    keras = model.keras_model is not None
    shapes: dict[str, tuple[int, ...]] = {}
    views: dict[str, str] = {}
    order: list[str] = []
    by_module = {m: n for n, m in layers.items()}
    prefix = prefix_tokens(model.module)

    def record(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        name = by_module[mod]
        if isinstance(output, torch.Tensor):
            shapes[name] = (-1, *output.shape[1:])
            view = spatial_view(output, size, batch=x.shape[0], channels_last=keras, prefix_tokens=prefix)
            if view is not None and view.map.shape[-1] * view.map.shape[-2] > 1:
                views[name] = view.kind
        if name in order:
            order.remove(name)  # a module called twice finishes last at its last call
        order.append(name)
        return output

    scripted = isinstance(model.module, torch.jit.ScriptModule)  # cannot be hooked: parameters only
    recording = dict.fromkeys(layers.values(), record)
    output = None
    try:
        if scripted:
            with capture(model) as rec, torch.no_grad():
                output = rec.forward(x)
        else:
            rewrite = merge_rewrites(model.logit_rewrites(), recording) if logits else recording
            with capture(model, rewrite=rewrite) as rec, torch.no_grad():
                output = rec.forward(x)
    except (RuntimeError, AssertionError) as err:  # timm asserts a ViT's input size
        raise ConvlensError(
            f"the model cannot run on a {size[0]}x{size[1]} input ({first_line(err)}); try another --input-size"
        ) from None
    rows = [
        LayerRow(
            name,
            type(layers[name]).__name__,
            shapes.get(name),
            _own_params(layers[name], keras),
            name in views,
            name.count(".") if not keras else 0,
            views.get(name, ""),
        )
        for name in layers
    ]
    auto = None if scripted else _choose_auto(model, x, rows, order)
    params = list(model.module.parameters())
    if keras:
        total = int(model.keras_model.count_params())
        trainable = sum(math.prod(v.shape) for v in model.keras_model.trainable_weights)
    else:
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
    return Summary(rows, total, trainable, size, order, auto, scripted), output


def auto_layer(model: Model) -> str:
    """The last layer with a spatial output, as ``layer="auto"`` picks it."""
    return summarize(model).auto_layer
