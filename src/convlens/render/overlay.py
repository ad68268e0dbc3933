"""Heatmaps people look at: colour-mapped, blended over the original photo, side by side.

The heatmap covers what the model saw. For a resize-then-centre-crop
preprocessing (torchvision's ImageNet transform) that is a box inside the
original photo: :func:`crop_box` finds it, the map is resized to that box at
the original's full resolution, and outside it the photo shows unchanged.
For a plain resize (Keras models, ``plain_transform``) or an unknown
transform, the box is the whole image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ..errors import ConvlensError, did_you_mean
from ..fileio import atomic_path

Box = tuple[float, float, float, float]  # left, top, right, bottom in original pixels


def check_style(colormap: str, alpha: float) -> None:
    """A one-line error for an unknown colormap or an opacity outside [0, 1]."""
    if colormap not in colormaps:
        raise ConvlensError(f"unknown colormap {colormap!r}{did_you_mean(colormap, list(colormaps))}")
    if not 0.0 <= alpha <= 1.0:
        raise ConvlensError(f"alpha (the heatmap's opacity) must be between 0 and 1, got {alpha}")


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """``(H, W)`` values in [0, 1] -> ``(H, W, 3)`` uint8 RGB through a matplotlib colormap."""
    check_style(colormap, 0.0)
    rgba = colormaps[colormap](np.clip(heatmap, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _sizes(transform) -> tuple[int | Sequence[int] | None, Sequence[int] | None]:
    """``(resize, crop)`` of a torchvision transform, ``(None, None)`` when it does not crop."""
    if hasattr(transform, "resize_size") and hasattr(transform, "crop_size"):  # weights.transforms()
        return transform.resize_size, transform.crop_size
    resize = crop = None
    for step in getattr(transform, "transforms", []):
        name = type(step).__name__
        if name == "Resize":
            resize = step.size
        elif name == "CenterCrop":
            crop = step.size
    return resize, crop


def crop_box(transform, width: int, height: int) -> Box:
    """The region of a ``width`` x ``height`` original that ``transform`` turns into the model input."""
    resize, crop = _sizes(transform)
    if crop is None:
        return (0.0, 0.0, float(width), float(height))
    crop_h, crop_w = (crop[0], crop[-1]) if isinstance(crop, (list, tuple)) else (crop, crop)
    if resize is None:
        scale_x = scale_y = 1.0
    elif isinstance(resize, (list, tuple)) and len(resize) == 2:
        scale_x, scale_y = resize[1] / width, resize[0] / height
    else:  # a single size: the short side becomes that size, the aspect ratio is kept
        short = resize[0] if isinstance(resize, (list, tuple)) else resize
        scale_x = scale_y = short / min(width, height)
    resized_w, resized_h = width * scale_x, height * scale_y
    left = (resized_w - crop_w) / 2
    top = (resized_h - crop_h) / 2
    return (max(0.0, left / scale_x), max(0.0, top / scale_y),
            min(float(width), (left + crop_w) / scale_x), min(float(height), (top + crop_h) / scale_y))


def overlay_heatmap(image: Image.Image, heatmap: torch.Tensor | np.ndarray, *, transform=None,
                    colormap: str = "jet", alpha: float = 0.4) -> Image.Image:
    """Blend one ``(H, W)`` heatmap in [0, 1] over ``image`` at the image's full resolution."""
    check_style(colormap, alpha)
    values = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    image = image.convert("RGB")
    left, top, right, bottom = crop_box(transform, *image.size)
    box = (int(round(left)), int(round(top)), int(round(right)), int(round(bottom)))
    box_w, box_h = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    resized = np.asarray(Image.fromarray(values.astype(np.float32)).resize((box_w, box_h), Image.BILINEAR))
    photo = np.asarray(image, dtype=np.float32)
    region = photo[box[1]:box[1] + box_h, box[0]:box[0] + box_w]
    colours = colorize(resized, colormap)[: region.shape[0], : region.shape[1]].astype(np.float32)
    blended = photo.copy()
    blended[box[1]:box[1] + region.shape[0], box[0]:box[0] + region.shape[1]] = (1 - alpha) * region + alpha * colours
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def overlay_heatmaps(images: Sequence[Image.Image], maps: torch.Tensor, *, transform=None, colormap: str = "jet",
                     alpha: float = 0.4) -> list[Image.Image]:
    """:func:`overlay_heatmap` for each image and its map ``maps[i]``."""
    return [overlay_heatmap(image, heatmap, transform=transform, colormap=colormap, alpha=alpha)
            for image, heatmap in zip(images, maps)]


def comparison_figure(image: Image.Image, panels: Sequence[tuple[str, Image.Image]], *,
                      panel_inches: float = 3.0) -> Figure:
    """The original and one overlay per method in a row, each titled (``"gradcam — tabby cat"``)."""
    columns = 1 + len(panels)
    aspect = image.size[1] / image.size[0]
    figure = Figure(figsize=(panel_inches * columns, panel_inches * aspect + 0.4), dpi=100)
    FigureCanvasAgg(figure)
    for column, (title, picture) in enumerate([("original", image), *panels]):
        axis = figure.add_subplot(1, columns, column + 1)
        axis.imshow(np.asarray(picture))
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Write a figure as PNG atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
