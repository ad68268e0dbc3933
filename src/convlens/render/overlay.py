"""Heatmaps people look at: colour-mapped, blended over the original photo, side by side.

The heatmap covers what the model saw. For a resize-then-centre-crop
preprocessing (torchvision's ImageNet transform) that is a box inside the
original photo: :func:`~convlens.models.transforms.crop_box` finds it, the map
is resized to that box, and outside it the photo shows unchanged. For a plain resize (Keras models,
``plain_transform``) or an unknown transform, the box is the whole image.

Memory is bounded: overlays and figures are drawn at the photo's resolution
but at most :data:`MAX_SIDE` (2048) pixels on the longest side (the
``max_side`` keyword). A bigger photo is scaled down first and the crop box
with it, so an 8000x8000 photo costs about what a 2048x2048 one does, and the
blending works in uint8 and float32 on the crop box only. The maps themselves
(``.npy``, ``Explanation.maps``) are never scaled: the cap is for what is drawn.

Two styles (:data:`STYLES`), chosen per method by :func:`convlens.heatmaps.style_for`:

* ``"blend"``: the colour-mapped map over the photo at a fixed opacity (``jet``
  at 0.4 by default). For the CAM family and the perturbation methods, whose maps
  are smooth and cover whole objects.
* ``"map"``: the map alone on black (``inferno`` by default), divided by its
  99th percentile so its top 1 % of pixels show at full brightness. For the
  pixel-level gradient maps (``Method.pixel_level``: saliency, SmoothGrad,
  Integrated Gradients, guided backprop, Guided Grad-CAM): they are sparse, a few
  bright pixels in a dark field, and blended at 0.4 over a photo they all but
  vanish. Simonyan et al. 2013 (arXiv:1312.6034), Smilkov et al. 2017
  (arXiv:1706.03825) and Sundararajan et al. 2017 (arXiv:1703.01365) show them
  this way; the two SmoothGrad and IG papers clip at the 99th percentile too.

:func:`colorbar_css` and the ``legends`` of :func:`comparison_figure` draw the
colour bar that says what low and high mean.
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
from ..models.transforms import input_box_in_picture, scaled_crop_box

#: Longest side, in pixels, of the overlays and figures drawn from a photo; bigger photos are scaled down.
MAX_SIDE = 2048

#: The drawing styles and the colormap each uses when none is given (see the module docstring).
STYLES: dict[str, str] = {"blend": "jet", "map": "inferno"}

#: In the ``"map"`` style, the percentile of the map drawn at full brightness (values above it saturate).
SATURATION_PERCENTILE = 99.0


def check_style(colormap: str | None, alpha: float, style: str = "blend") -> None:
    """A one-line error for an unknown colormap or style, or an opacity outside [0, 1]."""
    if style not in STYLES:
        raise ConvlensError(
            f"unknown heatmap style {style!r}{did_you_mean(style, list(STYLES))} (choose from {', '.join(STYLES)})"
        )
    if colormap is not None and colormap not in colormaps:
        raise ConvlensError(f"unknown colormap {colormap!r}{did_you_mean(colormap, list(colormaps))}")
    if not 0.0 <= alpha <= 1.0:
        raise ConvlensError(f"alpha (the heatmap's opacity) must be between 0 and 1, got {alpha}")


def describe_style(style: str, colormap: str | None = None, alpha: float = 0.4) -> str:
    """How a style draws a map, in words for a caption or a note."""
    colormap = colormap or STYLES[style]
    if style == "map":
        return (
            f"the map alone on black ({colormap}), its top {100 - SATURATION_PERCENTILE:g} % of pixels at "
            "full brightness"
        )
    return f"{colormap} over the photo at opacity {alpha:g}"


def saturate(values: np.ndarray, percentile: float = SATURATION_PERCENTILE) -> np.ndarray:
    """``values`` divided by their ``percentile``-th percentile and clipped to [0, 1], float32.

    A map whose percentile is 0 (mostly zeros: a flat map, or one with fewer bright
    pixels than the percentile leaves out) is divided by its maximum instead, so
    it is never blown up into noise nor divided by zero.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    top = float(np.percentile(values, percentile)) if values.size else 0.0
    if top <= 0.0:
        top = float(values.max()) if values.size else 0.0
    if top <= 0.0:
        return np.zeros_like(values)
    return np.clip(values / top, 0.0, 1.0)


def colorbar_css(colormap: str, stops: int = 16) -> str:
    """A CSS ``linear-gradient``, left (0, low) to right (1, high), through ``colormap``: a colour bar, no picture."""
    colours = colorize(np.linspace(0.0, 1.0, stops), colormap)
    return (
        "linear-gradient(to right, "
        + ", ".join("#{:02x}{:02x}{:02x}".format(*tuple(int(c) for c in rgb)) for rgb in colours)
        + ")"
    )


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
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def overlay_heatmap(
    image: Image.Image,
    heatmap: torch.Tensor | np.ndarray,
    *,
    transform=None,
    colormap: str | None = None,
    alpha: float = 0.4,
    style: str = "blend",
    max_side: int | None = MAX_SIDE,
) -> Image.Image:
    """Draw one ``(H, W)`` heatmap in [0, 1] for ``image``, at most ``max_side`` pixels on the longest side.

    ``style="blend"`` blends it over the photo at opacity ``alpha``; ``style="map"``
    draws it alone on black, saturated at its 99th percentile (``alpha`` unused);
    ``colormap`` defaults to the style's own (:data:`STYLES`). Either way the map
    covers the part of the photo the model saw (:func:`~convlens.models.transforms.crop_box`).

    A photo within ``max_side`` keeps its resolution; a bigger one is scaled
    down first (see the module docstring); ``max_side=None`` draws at full
    resolution whatever the size.
    """
    check_style(colormap, alpha, style)
    colormap = colormap or STYLES[style]
    values = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if style == "map":  # the percentile of the map itself, before resizing blurs its peaks
        values = saturate(values)
    drawn = bounded(image, max_side)
    box = scaled_crop_box(transform, image.size, drawn.size)  # the part of the photo the model saw, as drawn
    box_w, box_h = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    resized = np.asarray(Image.fromarray(values.astype(np.float32)).resize((box_w, box_h), Image.Resampling.BILINEAR))
    if style == "map":
        canvas = np.zeros((drawn.height, drawn.width, 3), dtype=np.uint8)
        region = canvas[box[1] : box[1] + box_h, box[0] : box[0] + box_w]
        region[...] = colorize(resized, colormap)[: region.shape[0], : region.shape[1]]
        return Image.fromarray(canvas)
    blended = np.array(drawn, dtype=np.uint8)  # a copy: the caller's image is never changed
    region = blended[box[1] : box[1] + box_h, box[0] : box[0] + box_w]
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


def draw_box(
    drawn: Image.Image,
    box: Sequence[float],
    *,
    original_size: tuple[int, int],
    input_size: Sequence[int],
    transform=None,
    colour: str = "white",
) -> Image.Image:
    """``drawn`` (an overlay of a ``original_size`` = (width, height) photo) with ``box`` ``(x0, y0, x1, y1)``,
    given in the model input's pixels (``input_size`` = (H, W)), drawn as a rectangle where it lies on the photo."""
    from PIL import ImageDraw

    x0, y0, x1, y1 = input_box_in_picture(transform, box, input_size, original_size)
    sx, sy = drawn.width / original_size[0], drawn.height / original_size[1]
    picture = drawn.copy()
    width = max(2, round(max(picture.size) / 200))
    ImageDraw.Draw(picture).rectangle((x0 * sx, y0 * sy, x1 * sx, y1 * sy), outline=colour, width=width)
    return picture


def overlay_heatmaps(
    images: Sequence[Image.Image],
    maps: torch.Tensor,
    *,
    transform=None,
    colormap: str | None = None,
    alpha: float = 0.4,
    style: str = "blend",
    max_side: int | None = MAX_SIDE,
) -> list[Image.Image]:
    """:func:`overlay_heatmap` for each image and its map ``maps[i]``."""
    return [
        overlay_heatmap(
            image, heatmap, transform=transform, colormap=colormap, alpha=alpha, style=style, max_side=max_side
        )
        for image, heatmap in zip(images, maps)
    ]


def comparison_figure(
    image: Image.Image,
    panels: Sequence[tuple[str, Image.Image]],
    *,
    panel_inches: float = 3.0,
    max_side: int | None = MAX_SIDE,
    columns: int | None = None,
    legends: Sequence[tuple[str, str]] = (),
    title: str | None = None,
) -> Figure:
    """The original and one overlay per method, each titled (``"gradcam — tabby cat"``).

    One row, or rows of ``columns`` pictures. Every picture is handed to
    matplotlib at most ``max_side`` pixels on its longest side: the panels are
    a few hundred pixels wide, and matplotlib resamples what it is given in float.
    ``legends``: ``(colormap, what it shows)`` pairs, one horizontal colour bar
    each under the pictures, from "low" to "high" attribution. ``title``: a line
    above everything.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    count = 1 + len(panels)
    columns = min(columns or count, count)
    rows = -(-count // columns)
    # within 1:4 and 4:1: a 1x3000 strip made a figure 9000 inches tall (134 s to draw); imshow keeps the
    # picture's own aspect inside its panel either way
    aspect = min(max(image.size[1] / image.size[0], 0.25), 4.0)
    height = (panel_inches * aspect + 0.4) * rows + 0.8 * len(legends) + (0.35 if title else 0.0)
    # constrained layout makes room for the title and the colour bars (tight_layout does not know about them)
    figure = Figure(figsize=(panel_inches * columns, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    pictures = []
    for index, (caption, picture) in enumerate([("original", image), *panels]):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.imshow(np.asarray(bounded(picture, max_side)))
        axis.set_title(caption, fontsize=9)
        axis.axis("off")
        pictures.append(axis)
    if title:
        figure.suptitle(title, fontsize=10)
    for colormap, label in reversed(legends):  # each bar goes nearest the pictures: the first one last
        bar = figure.colorbar(
            ScalarMappable(Normalize(0, 1), colormaps[colormap]),
            ax=pictures,
            location="bottom",
            ticks=[0, 1],
            fraction=0.6 / height,
            shrink=min(1.0, 4.0 / (panel_inches * columns)),
            aspect=30,
        )
        bar.ax.set_xticklabels(["low", "high"], fontsize=8)
        bar.set_label(f"attribution: {label}", fontsize=8, labelpad=1)
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
