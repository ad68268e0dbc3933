"""Preprocessing and its geometry: PIL image -> channels-first float tensor, and where that input lies in the photo.

The transforms (:func:`imagenet_transform`, :func:`plain_transform`,
:class:`KerasTransform`) make the model's input. The geometry helpers say what
part of the original photo that input shows, for anything drawn over the photo
or compared with it: :func:`crop_box` (the region a resize-then-centre-crop
keeps; the whole photo for a plain resize), :func:`input_box_in_picture` (a box
in input pixels back on the photo), :func:`mask_for_model` and
:func:`mask_at_input` (a mask of the photo at the input's resolution), and
:func:`within_aspect` (a torchvision preset's crop of a long strip, cut first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ..errors import ConvlensError

if TYPE_CHECKING:
    from .model import Model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: keras.applications preprocessing modes, plus plain 1/255 scaling and raw 0-255.
KERAS_MODES = ("rescale", "raw", "tf", "torch", "caffe")


#: The long side of a resize-then-crop is kept within this many times the short side's size: a 1x3000 strip
#: resized to a short side of 256 would otherwise become a 256x768000 image (gigabytes) for a 224 crop.
MAX_ASPECT = 8

Box = tuple[float, float, float, float]  # left, top, right, bottom in original pixels
#: A model's preprocessing, PIL image -> channels-first tensor (torchvision's, or one of the transforms here).
#: The geometry helpers read its resize and crop steps; ``None`` stands for one that keeps the whole photo.
Preprocess = Callable[[Image.Image], torch.Tensor]
#: A torchvision size: one int (a short side, or both sides of a square) or a sequence ``(H, W)`` / ``(S,)``.
Size = int | Sequence[int]


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


def plain_transform(
    size: Sequence[int], mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> v2.Compose:
    """Resize to ``size`` (H, W), scale to [0, 1], and normalise when mean/std are given."""
    steps = [v2.ToImage(), v2.Resize(tuple(size), antialias=True), v2.ToDtype(torch.float32, scale=True)]
    if mean is not None and std is not None:
        steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def make_transform(
    size: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop: float | None = None,
    source: str = "",
) -> tuple[v2.Compose, str]:
    """The preprocessing for ``size`` (H, W), and what it does in words.

    ``crop`` is the centre-crop ratio (torchvision's 224/256 = 0.875, timm's
    ``crop_pct``): the short side is resized to ``size / crop`` and the centre
    cut out. Without it (or for a non-square size) the whole picture is resized.
    ``mean`` and ``std`` come together or not at all.
    """
    if (mean is None) != (std is None):
        raise ConvlensError(
            f"preprocessing{f' from the {source}' if source else ''} gives a "
            f"{'mean' if std is None else 'std'} without a {'std' if std is None else 'mean'}; "
            "normalisation needs both (or neither)"
        )
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
    norm = (
        "ImageNet mean/std"
        if (tuple(mean or ()), tuple(std or ())) == (IMAGENET_MEAN, IMAGENET_STD)
        else (
            f"mean {tuple(round(m, 4) for m in mean)}, std {tuple(round(s, 4) for s in std)}"
            if mean is not None and std is not None
            else "no normalisation"
        )
    )
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


# -- geometry: where the model input lies in the original photo ---------------------------------------------


def _sizes(transform: Preprocess | None) -> tuple[Size | None, Size | None, int | None]:
    """``(resize, crop, max_size)`` of a torchvision transform, ``(None, None, None)`` when it does not crop."""
    if transform is None:
        return None, None, None
    if hasattr(transform, "resize_size") and hasattr(transform, "crop_size"):  # weights.transforms()
        return transform.resize_size, transform.crop_size, None
    resize = crop = max_size = None
    for step in getattr(transform, "transforms", []):
        name = type(step).__name__
        if name in ("Resize", "ShortSideResize"):
            resize, max_size = step.size, getattr(step, "max_size", None)
        elif name == "CenterCrop":
            crop = step.size
    return resize, crop, max_size


def crop_box(transform: Preprocess | None, width: int, height: int) -> Box:
    """The region of a ``width`` x ``height`` original that ``transform`` turns into the model input."""
    resize, crop, max_size = _sizes(transform)
    if crop is None:
        return (0.0, 0.0, float(width), float(height))
    crop_h, crop_w = (crop[0], crop[-1]) if isinstance(crop, Sequence) else (crop, crop)
    if resize is None:
        scale_x = scale_y = 1.0
    elif isinstance(resize, Sequence) and len(resize) == 2:
        scale_x, scale_y = resize[1] / width, resize[0] / height
    else:  # a single size: the short side becomes that size, the aspect ratio is kept
        short = resize[0] if isinstance(resize, Sequence) else resize
        scale_x = scale_y = short / min(width, height)
        if max_size is not None and scale_x * max(width, height) > max_size:  # a long strip: its long side is capped
            scale_x = scale_y = max_size / max(width, height)
    resized_w, resized_h = width * scale_x, height * scale_y
    left = (resized_w - crop_w) / 2
    top = (resized_h - crop_h) / 2
    return (
        max(0.0, left / scale_x),
        max(0.0, top / scale_y),
        min(float(width), (left + crop_w) / scale_x),
        min(float(height), (top + crop_h) / scale_y),
    )


def scaled_crop_box(
    transform: Preprocess | None, size: tuple[int, int], shown_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """:func:`crop_box` of a ``size`` (width, height) photo, in the pixels of that photo shown at ``shown_size``."""
    left, top, right, bottom = crop_box(transform, *size)
    scale_x, scale_y = shown_size[0] / size[0], shown_size[1] / size[1]
    return (
        int(round(left * scale_x)),
        int(round(top * scale_y)),
        int(round(right * scale_x)),
        int(round(bottom * scale_y)),
    )


def input_box_in_picture(
    transform: Preprocess | None, box: Sequence[float], input_size: Sequence[int], size: tuple[int, int]
) -> Box:
    """A box ``(x0, y0, x1, y1)`` in the model input's pixels (``input_size`` = (H, W)) in the pixels of the
    ``size`` = (width, height) photo that ``transform`` made the input from."""
    left, top, right, bottom = crop_box(transform, *size)
    scale_x, scale_y = (right - left) / input_size[1], (bottom - top) / input_size[0]
    x0, y0, x1, y1 = (float(v) for v in box)
    return (left + x0 * scale_x, top + y0 * scale_y, left + x1 * scale_x, top + y1 * scale_y)


def mask_for_model(model: Model, mask: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
    """A mask put through the model's own resize/crop, bool ``(1, H, W)`` at the input resolution.

    The mask is drawn as a white-on-black image, transformed like a photo, and
    thresholded halfway between what black and white become.
    """
    picture = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
    if picture.size != image_size:
        picture = picture.resize(image_size, Image.Resampling.NEAREST)
    black = model.transform(Image.new("RGB", picture.size, (0, 0, 0)))[0]
    white = model.transform(Image.new("RGB", picture.size, (255, 255, 255)))[0]
    drawn = model.transform(picture)[0]
    return ((drawn - black) / (white - black) > 0.5).unsqueeze(0)


def mask_at_input(model: Model, mask: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
    """A bool ``(H, W)`` mask of an image of ``image_size`` (W, H) seen through the model's resize/crop.

    A mask already at the input's size under a transform that keeps the whole
    picture is taken as it is, without going through the transform.
    """
    height, width = model.input_size
    if mask.shape == (height, width) and crop_box(model.transform, width, height) == (0.0, 0.0, width, height):
        return torch.from_numpy(np.ascontiguousarray(mask))  # already what the model sees (plain resize, same size)
    if mask.shape[::-1] != tuple(image_size):
        drawn = Image.fromarray(mask.astype(np.uint8) * 255).resize(image_size, Image.Resampling.NEAREST)
        mask = np.asarray(drawn) > 127
    return mask_for_model(model, mask, image_size)[0]


def within_aspect(image: Image.Image, transform: Preprocess) -> Image.Image:
    """For a torchvision weights preset (short side to 256, centre crop 224): the centre of a long strip only.

    The preset would resize a 1x3000 strip to 256x768000 (0.6 GB) to keep its
    middle 224 pixels; cutting the long side to :data:`MAX_ASPECT` times the
    short one first keeps that middle (the crop is under one short side long)
    at a bounded cost. convlens's own transforms cap the resize themselves.
    """
    if not hasattr(transform, "resize_size"):
        return image
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= MAX_ASPECT * short:
        return image
    keep = MAX_ASPECT * short
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return image.crop(box)
