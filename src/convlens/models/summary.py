"""The layer table (like Keras's ``model.summary()``) and the ``auto`` layer choice.

A layer is a valid explanation target when its output is a spatial feature map:
4-D, with more than one spatial position. ``auto`` is the last such layer to
finish in a forward pass at the model's input size, adaptive pooling excepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import capture
from ..errors import ConvlensError, first_line
from .model import Model

TORCHSCRIPT_LAYERS = ("a TorchScript model cannot be hooked, so convlens cannot see its layers (it can still "
                      "predict); pass the eager nn.Module instead, or its state dict with --arch")


@dataclass
class LayerRow:
    name: str
    type: str
    output_shape: tuple[int, ...] | None  # in the framework's own layout, batch dimension as -1
    params: int
    spatial: bool
    depth: int


@dataclass
class Summary:
    rows: list[LayerRow]  # in the order the framework lists its layers
    total_params: int
    trainable_params: int
    input_size: tuple[int, int]
    forward_order: list[str]  # layers in the order their outputs were finished
    scripted: bool = False  # TorchScript: no hooks, so no output shapes and no layer to explain

    @property
    def spatial_layers(self) -> list[str]:
        """Valid explanation targets, in forward order."""
        spatial = {r.name for r in self.rows if r.spatial}
        return [name for name in self.forward_order if name in spatial]

    @property
    def auto_layer(self) -> str:
        """The last spatial layer, skipping adaptive pooling (VGG's 7x7 ``avgpool`` only resamples)."""
        types = {r.name: r.type for r in self.rows}
        candidates = [n for n in self.spatial_layers if not types[n].startswith("Adaptive")]
        if self.scripted:
            raise ConvlensError(TORCHSCRIPT_LAYERS)
        if not candidates:
            raise ConvlensError("this model has no layer with a spatial output; CAM methods need one")
        return candidates[-1]


def _own_params(module: nn.Module, keras: bool) -> int:
    if keras:
        return int(module.count_params()) if getattr(module, "built", False) else 0
    return sum(p.numel() for p in module.parameters())


def summarize(model: Model, input_size: tuple[int, int] | None = None) -> Summary:
    """Run one forward pass at ``input_size`` and tabulate every layer's output shape and parameters."""
    size = tuple(input_size or model.input_size)
    layers = model.named_layers()
    keras = model.keras_model is not None
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    by_module = {m: n for n, m in layers.items()}

    def record(mod, inputs, output):
        name = by_module[mod]
        if isinstance(output, torch.Tensor):
            shapes[name] = (-1, *output.shape[1:])
        if name in order:
            order.remove(name)  # a module called twice finishes last at its last call
        order.append(name)
        return output

    channels = 1 if getattr(model.transform, "channels", 3) == 1 else 3
    x = torch.zeros(1, channels, *size, device=model.device, dtype=model.dtype)
    scripted = isinstance(model.module, torch.jit.ScriptModule)  # cannot be hooked: parameters only
    try:
        if not scripted:
            with capture(model, rewrite={m: record for m in layers.values()}) as rec, torch.no_grad():
                rec.forward(x)
    except RuntimeError as err:
        raise ConvlensError(
            f"the model cannot run on a {size[0]}x{size[1]} input ({first_line(err)}); "
            "try another --input-size"
        ) from None
    rows = []
    for name in layers:
        shape = shapes.get(name)
        if shape is not None and len(shape) == 4:
            h, w = (shape[1], shape[2]) if keras else (shape[2], shape[3])
            spatial = h * w > 1
        else:
            spatial = False
        rows.append(LayerRow(name, type(layers[name]).__name__, shape, _own_params(layers[name], keras),
                             spatial, name.count(".") if not keras else 0))
    params = list(model.module.parameters())
    if keras:
        total = int(model.keras_model.count_params())
        trainable = sum(math.prod(v.shape) for v in model.keras_model.trainable_weights)
    else:
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
    return Summary(rows, total, trainable, size, order, scripted)


def auto_layer(model: Model) -> str:
    """The last layer with a spatial output, as ``layer="auto"`` picks it."""
    return summarize(model).auto_layer
