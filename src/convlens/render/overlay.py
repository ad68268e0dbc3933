"""Heatmaps people look at: colour-mapped, blended over the original photo, side by side.

The heatmap covers what the model saw. For a resize-then-centre-crop
preprocessing (torchvision's ImageNet transform) that is a box inside the
original photo: :func:`crop_box` finds it, the map is resized to that box, and
outside it the photo shows unchanged. For a plain resize (Keras models,
``plain_transform``) or an unknown transform, the box is the whole image.

Memory is bounded: overlays and figures are drawn at the photo's resolution
but at most :data:`MAX_SIDE` (2048) pixels on the longest side (the
``max_side`` keyword). A bigger photo is scaled down first and the crop box
with it, so an 8000x8000 photo costs about what a 2048x2048 one does, and the
blending works in uint8 and float32 on the crop box only. The maps themselves
(``.npy``, ``Explanation.maps``) are never scaled: the cap is for what is drawn.
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

#: Longest side, in pixels, of the overlays and figures drawn from a photo; bigger photos are scaled down.
MAX_SIDE = 2048


def check_style(colormap: str, alpha: float) -> None:
    """A one-line error for an unknown colormap or an opacity outside [0, 1]."""
    if colormap not in colormaps:
        raise ConvlensError(f"unknown colormap {colormap!r}{did_you_mean(colormap, list(colormaps))}")
    if not 0.0 <= alpha <= 1.0:
        raise ConvlensError(f"alpha (the heatmap's opacity) must be between 0 and 1, got {alpha}")


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Values in [0, 1] of any shape ``(..., )`` -> ``(..., 3)`` uint8 RGB through a matplotlib colormap.

    The one colour mapper of convlens (heatmap overlays and activation grids).

    The colours are those of ``colormaps[colormap](heatmap)``, looked up in the
    colormap's own table: calling the colormap would build a float64 RGBA
    copy, 32 bytes a pixel.
    """
    check_style(colormap, 0.0)
    cmap = colormaps[colormap]
    table = (cmap(np.arange(cmap.N))[:, :3] * 255).round().astype(np.uint8)
    # matplotlib's own quantisation: index int(x * N), with x == 1 in the last entry
    values = np.nan_to_num(np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0), copy=False)
    index = (values * cmap.N).astype(np.intp)
    np.minimum(index, cmap.N - 1, out=index)
    return table[index]


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


def bounded(image: Image.Image, max_side: int | None = MAX_SIDE) -> Image.Image:
    """``image`` in RGB, scaled down (aspect ratio kept) so its longest side is at most ``max_side``.

    ``max_side=None`` keeps the full resolution. An image that already fits is
    returned as it is (converted to RGB if it is not).
    """
    if max_side is not None and max_side < 1:
        raise ConvlensError(f"max_side must be at least 1 pixel, got {max_side}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if max_side is None or max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: Pillow first shrinks by whole factors (fast, no big intermediate), then resamples
    return image.resize(size, Image.BILINEAR, reducing_gap=3.0)


def overlay_heatmap(image: Image.Image, heatmap: torch.Tensor | np.ndarray, *, transform=None,
                    colormap: str = "jet", alpha: float = 0.4, max_side: int | None = MAX_SIDE) -> Image.Image:
    """Blend one ``(H, W)`` heatmap in [0, 1] over ``image``, at most ``max_side`` pixels on the longest side.

    A photo within ``max_side`` keeps its resolution; a bigger one is scaled
    down first (see the module docstring); ``max_side=None`` draws at full
    resolution whatever the size.
    """
    check_style(colormap, alpha)
    values = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    left, top, right, bottom = crop_box(transform, *image.size)  # in the original's pixels
    drawn = bounded(image, max_side)
    scale_x, scale_y = drawn.width / image.width, drawn.height / image.height
    box = (int(round(left * scale_x)), int(round(top * scale_y)),
           int(round(right * scale_x)), int(round(bottom * scale_y)))
    box_w, box_h = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    resized = np.asarray(Image.fromarray(values.astype(np.float32)).resize((box_w, box_h), Image.BILINEAR))
    blended = np.array(drawn, dtype=np.uint8)  # a copy: the caller's image is never changed
    region = blended[box[1]:box[1] + box_h, box[0]:box[0] + box_w]
    colours = colorize(resized, colormap)[: region.shape[0], : region.shape[1]]
    # float32 on the crop box only, in place: the rest of the photo stays as it is
    mixed = region.astype(np.float32)
    mixed *= 1 - alpha
    tinted = colours.astype(np.float32)
    tinted *= alpha
    mixed += tinted
    del tinted
    region[...] = np.clip(np.round(mixed, out=mixed), 0, 255, out=mixed)
    return Image.fromarray(blended)


def overlay_heatmaps(images: Sequence[Image.Image], maps: torch.Tensor, *, transform=None, colormap: str = "jet",
                     alpha: float = 0.4, max_side: int | None = MAX_SIDE) -> list[Image.Image]:
    """:func:`overlay_heatmap` for each image and its map ``maps[i]``."""
    return [overlay_heatmap(image, heatmap, transform=transform, colormap=colormap, alpha=alpha, max_side=max_side)
            for image, heatmap in zip(images, maps)]


def comparison_figure(image: Image.Image, panels: Sequence[tuple[str, Image.Image]], *,
                      panel_inches: float = 3.0, max_side: int | None = MAX_SIDE, columns: int | None = None) -> Figure:
    """The original and one overlay per method, each titled (``"gradcam — tabby cat"``).

    One row, or rows of ``columns`` pictures. Every picture is handed to
    matplotlib at most ``max_side`` pixels on its longest side: the panels are
    a few hundred pixels wide, and matplotlib resamples what it is given in float.
    """
    count = 1 + len(panels)
    columns = min(columns or count, count)
    rows = -(-count // columns)
    aspect = image.size[1] / image.size[0]
    figure = Figure(figsize=(panel_inches * columns, (panel_inches * aspect + 0.4) * rows), dpi=100)
    FigureCanvasAgg(figure)
    for index, (title, picture) in enumerate([("original", image), *panels]):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.imshow(np.asarray(bounded(picture, max_side)))
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    return figure


def figure_image(figure: Figure) -> Image.Image:
    """A figure as an RGB PIL image, drawn in memory (no file)."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Write a figure as PNG atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
