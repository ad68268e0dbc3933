"""Preprocessing: PIL image -> channels-first float tensor, as each kind of model expects."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ..errors import ConvlensError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: keras.applications preprocessing modes, plus plain 1/255 scaling and raw 0-255.
KERAS_MODES = ("rescale", "raw", "tf", "torch", "caffe")


#: The long side of a resize-then-crop is kept within this many times the short side's size: a 1x3000 strip
#: resized to a short side of 256 would otherwise become a 256x768000 image (gigabytes) for a 224 crop.
MAX_ASPECT = 8


class ShortSideResize(torch.nn.Module):
    """torchvision's ``Resize(size, max_size=...)`` for the short side, that never shrinks a side to 0 pixels.

    The short side becomes ``size`` and the long side follows (truncated, as
    torchvision does); when that would exceed ``max_size`` the long side becomes
    ``max_size`` and the short one follows, at least 1 pixel (torchvision's own
    ``max_size`` fails there on a 1x3000 strip).
    """

    def __init__(self, size: int, max_size: int):
        super().__init__()
        self.size, self.max_size = int(size), int(max_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        short, long = min(height, width), max(height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        if new_long > self.max_size:
            new_short, new_long = max(1, int(self.max_size * new_short / new_long)), self.max_size
        size = [new_short, new_long] if height <= width else [new_long, new_short]
        resized: torch.Tensor = v2.functional.resize(image, size, antialias=True)
        return resized

    def __repr__(self) -> str:
        return f"ShortSideResize(size={self.size}, max_size={self.max_size})"


def imagenet_transform(crop: int = 224, resize: int | None = 256) -> v2.Compose:
    """Resize the short side, centre-crop, scale to [0, 1], normalise with ImageNet statistics.

    The long side is capped at :data:`MAX_ASPECT` times ``resize`` (torchvision's
    ``max_size``): a photo more than 8 times longer than wide shrinks to that
    length instead, and the crop pads its short side with zeros.
    """
    steps = [v2.ToImage()]
    if resize:
        steps += [ShortSideResize(resize, max_size=MAX_ASPECT * resize), v2.CenterCrop(crop)]
    else:
        steps += [v2.Resize((crop, crop), antialias=True)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def plain_transform(size: Sequence[int], mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> v2.Compose:
    """Resize to ``size`` (H, W), scale to [0, 1], and normalise when mean/std are given."""
    steps = [v2.ToImage(), v2.Resize(tuple(size), antialias=True), v2.ToDtype(torch.float32, scale=True)]
    if mean is not None and std is not None:
        steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def make_transform(size: Sequence[int], mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   crop: float | None = None, source: str = "") -> tuple[v2.Compose, str]:
    """The preprocessing for ``size`` (H, W), and what it does in words.

    ``crop`` is the centre-crop ratio (torchvision's 224/256 = 0.875, timm's
    ``crop_pct``): the short side is resized to ``size / crop`` and the centre
    cut out. Without it (or for a non-square size) the whole picture is resized.
    """
    height, width = int(size[0]), int(size[1])
    if crop and height == width and crop < 1:
        transform = imagenet_transform(height, resize=int(round(height / crop)))
        if mean is not None and std is not None:
            transform.transforms[-1] = v2.Normalize(list(mean), list(std))
        else:
            transform.transforms.pop()
        geometry = f"short side to {int(round(height / crop))} px, centre crop {height}x{width}"
    else:
        transform = plain_transform((height, width), mean, std)
        geometry = f"resize to {height}x{width}"
    norm = "ImageNet mean/std" if (tuple(mean or ()), tuple(std or ())) == (IMAGENET_MEAN, IMAGENET_STD) else (
        f"mean {tuple(round(m, 4) for m in mean)}, std {tuple(round(s, 4) for s in std)}" if mean is not None
        else "no normalisation")
    return transform, f"{geometry}, scale to [0, 1], {norm}" + (f" (from the {source})" if source else "")


class KerasTransform:
    """Resize to the Keras model's input size and apply a ``keras.applications`` mode.

    Returns channels-first ``(C, H, W)``; the model's layout conversion happens elsewhere.
    Modes: ``rescale`` (x/255), ``raw`` (0-255, for models that start with a
    Rescaling layer), ``tf`` (x/127.5 - 1), ``torch`` (ImageNet mean/std),
    ``caffe`` (BGR, ImageNet means subtracted, no scaling).
    """

    def __init__(self, size: Sequence[int], mode: str = "rescale", channels: int = 3):
        if mode not in KERAS_MODES:
            raise ConvlensError(f"unknown preprocessing mode {mode!r}; choose one of {', '.join(KERAS_MODES)}")
        self.size, self.mode, self.channels = tuple(size), mode, channels

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        if self.channels == 1:
            image = image.convert("L")
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        if self.mode == "rescale":
            return x / 255.0
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = torch.tensor(IMAGENET_MEAN[: x.shape[0]]).view(-1, 1, 1)
            std = torch.tensor(IMAGENET_STD[: x.shape[0]]).view(-1, 1, 1)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe" and x.shape[0] == 3:
            return x.flip(0) - torch.tensor([103.939, 116.779, 123.68]).view(3, 1, 1)
        return x
