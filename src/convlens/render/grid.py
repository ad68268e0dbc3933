"""Grids of channels and of filter patterns, and one channel on its own, as PIL images.

Display contract for activation grids (after Chollet, *Deep Learning with
Python*, 2017, §5.4.1): each channel is standardised on its own (zero mean,
unit standard deviation), mapped to ``64 * z + 128``, clipped to 0-255 and
drawn with a colormap (viridis by default). A dead channel (constant output)
is drawn blank, in the background colour, and never divides by zero. Tiles are
enlarged by whole-pixel repetition until the shorter side is at least
``min_tile`` pixels, and rows wrap after ``per_row`` channels.

Example::

    maps = cl.activations(model, cl.sample_image(), ["layer1"])["layer1"][0]
    activation_grid(maps, "layer1").save("layer1.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import ConvlensError
from .overlay import check_style, colorize

BACKGROUND = (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def standardize(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(C, H, W)`` float -> ``(C, H, W)`` uint8 display values and a ``(C,)`` mask of live channels."""
    maps = maps.astype(np.float64)
    mean = maps.mean(axis=(1, 2), keepdims=True)
    std = maps.std(axis=(1, 2), keepdims=True)
    live = maps.max(axis=(1, 2)) > maps.min(axis=(1, 2))
    z = np.divide(maps - mean, std, out=np.zeros_like(maps), where=std > 0)
    return np.clip(64.0 * z + 128.0, 0, 255).astype(np.uint8), live


def _with_title(body: Image.Image, title: str | None, size: int) -> Image.Image:
    if not title:
        return body
    font = _font(size)
    height = size + 8
    canvas = Image.new("RGB", (body.width, body.height + height), BACKGROUND)
    canvas.paste(body, (0, height))
    ImageDraw.Draw(canvas).text((4, 4), title, fill=(0, 0, 0), font=font)
    return canvas


def _mosaic(tiles: np.ndarray, per_row: int, margin: int, label_height: int = 0) -> tuple[np.ndarray, list]:
    """Place ``(N, h, w, 3)`` uint8 tiles on a white canvas; returns it and each tile's top-left corner."""
    count, h, w = tiles.shape[:3]
    cols = max(1, min(per_row, count))
    rows = math.ceil(count / cols)
    canvas = np.full(
        (rows * (h + margin + label_height) + margin, cols * (w + margin) + margin, 3), BACKGROUND, dtype=np.uint8
    )
    corners = []
    for i in range(count):
        top = margin + (i // cols) * (h + margin + label_height)
        left = margin + (i % cols) * (w + margin)
        canvas[top : top + h, left : left + w] = tiles[i]
        corners.append((left, top))
    return canvas, corners


def activation_grid(
    maps: torch.Tensor,
    title: str | None = None,
    *,
    per_row: int = 16,
    cmap: str = "viridis",
    min_tile: int = 24,
    margin: int = 1,
) -> Image.Image:
    """Every channel of one image's ``(C, H, W)`` activations, tiled, standardised and colour-mapped."""
    if maps.ndim != 3:
        raise ConvlensError(f"expected one image's activations (C, H, W), got shape {tuple(maps.shape)}")
    if per_row < 1:
        raise ConvlensError(f"channels per row must be at least 1, got {per_row}")
    values, live = standardize(maps.detach().float().cpu().numpy())
    tiles = colorize(values / np.float32(255), cmap)  # (C, H, W, 3): display values 0..255 on the colormap
    tiles[~live] = BACKGROUND
    scale = max(1, math.ceil(min_tile / min(values.shape[1:])))
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    canvas, _ = _mosaic(tiles, per_row, margin)
    return _with_title(Image.fromarray(canvas), title, 14)


def filter_grid(
    images: torch.Tensor, labels: Sequence[str], title: str | None = None, *, per_row: int = 8, margin: int = 6
) -> Image.Image:
    """RGB ``(N, 3, S, S)`` images in ``[0, 1]`` with a margin between them and a label under each."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConvlensError(f"expected RGB images (N, 3, S, S), got shape {tuple(images.shape)}")
    tiles = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    label_size = max(9, min(14, tiles.shape[1] // 6))
    canvas, corners = _mosaic(tiles, per_row, margin, label_height=label_size + 4)
    image = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(image), _font(label_size)
    for (left, top), label in zip(corners, labels):
        draw.text((left, top + tiles.shape[1] + 2), str(label), fill=(0, 0, 0), font=font)
    return _with_title(image, title, 14)


def channel_image(
    channel: torch.Tensor, title: str | None = None, *, cmap: str = "viridis", min_size: int = 480
) -> Image.Image:
    """One ``(H, W)`` channel at full size, as ``matplotlib.pyplot.matshow`` draws it, with a colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if channel.ndim != 2:
        raise ConvlensError(f"expected one channel (H, W), got shape {tuple(channel.shape)}")
    check_style(cmap, 0.0)
    data = channel.detach().float().cpu().numpy()
    height, width = data.shape
    dpi = 100
    side = max(min_size, width, height) / dpi
    figure = Figure(figsize=(side * 1.15, side * height / width + 0.6), dpi=dpi)
    axes = figure.add_subplot()
    low, high = float(data.min()), float(data.max())
    shown = axes.matshow(data, cmap=cmap, vmin=low, vmax=high if high > low else low + 1)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04)
    if title:
        axes.set_title(title)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def to_pil(image: torch.Tensor) -> Image.Image:
    """One RGB ``(3, H, W)`` tensor in ``[0, 1]`` as a PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
