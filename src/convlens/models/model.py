"""`Model`: a loaded network plus what it takes to feed it and read its output.

Inside convlens every tensor is channels-first ``(N, C, H, W)``. A Keras model
(channels-last under its torch backend) is wrapped once, here, by
:class:`ChannelsLastAdapter`; users still hand Keras models channels-last
batches, converted by :meth:`Model.to_internal` at the API boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..errors import ConvlensError
from ..images import ImageLike, load_images
from ..targets import OutputKey, class_probabilities, select_output
from .transforms import within_aspect

if TYPE_CHECKING:
    from PIL import Image

    from ..capture import OutputRewrite

Layout = Literal["channels_first", "channels_last"]
OutputKind = Literal["logits", "softmax", "sigmoid"]


@dataclass
class Prediction:
    """One class of a top-k list."""

    index: int
    label: str
    probability: float


class ChannelsLastAdapter(nn.Module):
    """Presents a channels-last Keras model (torch backend) as a channels-first module."""

    def __init__(self, keras_model: Any):
        super().__init__()
        self.keras_model = keras_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.keras_model(x.permute(0, 2, 3, 1))
        return output


@dataclass
class Model:
    """A network ready to explain.

    Attributes:
        module: the network as an ``nn.Module`` taking channels-first input.
        name: what it was loaded from.
        transform: PIL image -> channels-first float tensor ``(C, H, W)``.
        input_size: ``(H, W)`` the transform produces.
        labels: class names, index-aligned with the output, or ``None``.
        layout: the layout a user's tensors have (Keras: ``"channels_last"``).
        output: what the final output is: raw ``"logits"``, or probabilities
            from a final ``"softmax"`` or ``"sigmoid"``.
        framework: ``"torch"`` or ``"keras"``.
        select: for a model that returns several outputs (a tuple, list or dict),
            which one holds the class scores: an index or a key (``load_model(output=...)``,
            CLI ``--output``). See :mod:`convlens.targets`.
        preprocessing: what :attr:`transform` does, in words (shown by ``layers``/``predict``).
    """

    module: nn.Module
    name: str
    transform: Callable[[Image.Image], torch.Tensor]
    input_size: tuple[int, int]
    labels: list[str] | None = None
    layout: Layout = "channels_first"
    output: OutputKind = "logits"
    framework: str = "torch"
    keras_model: Any = None  # a keras.Model (keras ships no types)
    info: dict[str, Any] = field(default_factory=dict)
    select: OutputKey = None
    preprocessing: str = ""

    # -- layout -----------------------------------------------------------
    def to_internal(self, x: torch.Tensor) -> torch.Tensor:
        """A user's batch (in ``layout``) as channels-first ``(N, C, H, W)``."""
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ConvlensError(f"expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2) if self.layout == "channels_last" else x

    def from_internal(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-first ``(N, C, H, W)`` back to the user's layout."""
        return x.permute(0, 2, 3, 1) if self.layout == "channels_last" and x.ndim == 4 else x

    # -- device -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def to(self, device: str | torch.device) -> Model:
        self.module.to(device)
        return self

    # -- layers -----------------------------------------------------------
    def named_layers(self) -> dict[str, nn.Module]:
        """Layers by the framework's own names (``layer4``, ``features.29``, ``conv2d_3``)."""
        if self.keras_model is not None:
            from .keras import keras_layers

            return keras_layers(self.keras_model)
        return {name: m for name, m in self.module.named_modules() if name}

    # -- input ------------------------------------------------------------
    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Images (paths, PIL images, arrays) -> a batch in the model's layout and device."""
        batch = torch.stack([self.transform(within_aspect(image, self.transform)) for image in load_images(images)])
        return self.from_internal(batch).to(device=self.device, dtype=self.dtype)

    def as_batch(
        self, inputs: ImageLike | Sequence[ImageLike] | torch.Tensor
    ) -> tuple[torch.Tensor, list[Image.Image] | None]:
        """The one input contract: anything a user passes -> ``(x, images)``.

        ``x`` is a channels-first ``(N, C, H, W)`` float copy in the model's dtype
        and device (never the caller's tensor); ``images`` are the PIL images when
        pictures were given, else ``None``. The rules:

        * a 4-D tensor is a preprocessed batch in the model's layout
          (``(N, H, W, C)`` for Keras), a 3-D tensor one preprocessed image;
        * anything else (a path, a PIL image, a NumPy array, or a list of any of
          these) is a picture, run through the model's :attr:`transform`.
        """
        images: list[Image.Image] | None
        if isinstance(inputs, torch.Tensor) and inputs.ndim in (3, 4):
            batch, images = self.to_internal(inputs.detach()), None
        else:
            images = load_images(inputs)
            batch = self.to_internal(self.preprocess(images))
        if not batch.is_floating_point():
            batch = batch.float()
        return batch.to(device=self.device, dtype=self.dtype).clone(), images

    # -- output -----------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> Any:
        """Forward a batch in the user's layout; the model's state is borrowed, not changed.

        Returns the module's whole output (a tensor, or a tuple/dict for a multi-output model).
        """
        from ..capture import capture

        with capture(self) as rec:
            return rec.forward(self.to_internal(x))

    def scores(self, output: Any) -> torch.Tensor:
        """The class-score tensor of the model's output (``select`` picks it from several)."""
        return select_output(output, self.select)

    def probabilities(self, output: Any) -> torch.Tensor:
        """Class probabilities ``(N, K)``; a single sigmoid/logit output gives ``[1-p, p]``."""
        return class_probabilities(self.scores(output), self.output)

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"

    def predict(self, images: ImageLike | Sequence[ImageLike] | torch.Tensor, top_k: int = 5) -> list[list[Any]]:
        """Top-k classes per image with their probabilities (:class:`Prediction`).

        A segmentation model (a dense output ``(N, K, H, W)``) gives each image's classes by the share
        of pixels they win (:class:`~convlens.models.tasks.PixelShare`), a detector its first ``top_k``
        detections (:class:`~convlens.models.tasks.Detection`), never a flattened index.
        ``images``: anything :meth:`as_batch` reads. A model whose output is not
        finite is a one-line error naming the first layer that produced NaN or infinity.
        """
        from ..capture import capture
        from .tasks import task_predictions

        x, _ = self.as_batch(images)
        with torch.inference_mode(), capture(self) as rec:
            output = rec.forward(x)
        ensure_finite(self, x, output)
        special = task_predictions(output, self.select, self.label, top_k)
        if special is not None:
            return special
        probs = self.probabilities(output)
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        return [
            [Prediction(int(i), self.label(int(i)), float(v)) for v, i in zip(vs, ix)]
            for vs, ix in zip(values.tolist(), indices.tolist())
        ]

    def logit_rewrites(self) -> dict[nn.Module, OutputRewrite]:
        """Output rewrites that skip a final softmax/sigmoid, so targets see pre-activation logits.

        Saturated probabilities have vanishing gradients; every gradient method
        and class-model visualisation explains the logit instead.
        """
        if self.output == "logits":
            return {}
        if self.keras_model is not None:
            from .keras import keras_logit_rewrites

            return keras_logit_rewrites(self.keras_model)
        final = _final_activation(self.module)
        return {final: lambda mod, inputs, output: inputs[0]} if final is not None else {}


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    return [value for value in values if isinstance(value, torch.Tensor)]


def first_nonfinite_layer(model: Model, x: torch.Tensor) -> str | None:
    """The first layer (in the order outputs are finished) whose output holds NaN or infinity."""
    from ..capture import capture

    layers = model.named_layers()
    by_module = {m: n for n, m in layers.items()}
    found: list[str] = []

    def check(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not found and any(not torch.isfinite(t).all() for t in _tensors(output) if t.is_floating_point()):
            found.append(by_module[module])
        return output

    with torch.inference_mode(), capture(model, rewrite=dict.fromkeys(layers.values(), check)) as rec:
        rec.forward(x)
    return found[0] if found else None


def ensure_finite(model: Model, x: torch.Tensor, output: Any) -> None:
    """A one-line error when the model's output (for channels-first ``x``) holds NaN or infinity."""
    if all(torch.isfinite(t).all() for t in _tensors(output) if t.is_floating_point()):
        return
    if not torch.isfinite(x).all():
        raise ConvlensError("the input holds NaN or infinite values; check the images or the preprocessing")
    layer = first_nonfinite_layer(model, x) if not isinstance(model.module, torch.jit.ScriptModule) else None
    where = f"; the first layer whose output is not finite is {layer!r}" if layer else ""
    raise ConvlensError(
        f"the model's output is not finite (NaN or infinity){where}: "
        "check its weights (a diverged training run?) or its input scale"
    )


def _final_activation(module: nn.Module) -> nn.Module | None:
    leaves = [m for m in module.modules() if not list(m.children())]
    if leaves and isinstance(leaves[-1], (nn.Softmax, nn.Sigmoid, nn.LogSoftmax)):
        return leaves[-1]
    return None


def detect_output(module: nn.Module) -> OutputKind:
    """``"softmax"``/``"sigmoid"`` when the module's last leaf is that activation, else ``"logits"``."""
    final = _final_activation(module)
    if isinstance(final, nn.Sigmoid):
        return "sigmoid"
    if isinstance(final, nn.Softmax):
        return "softmax"
    return "logits"
