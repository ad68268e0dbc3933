"""Deep Feature Factorization drawn: every concept in its own colour on the photo, then each concept alone.

The first picture colours each pixel by the concept strongest there (its colour, as
opaque as that concept is strong), as Collins et al. show their factorizations; the
others are each concept's map over the photo, titled with the classes it raises most.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from ..models.transforms import scaled_crop_box
from .overlay import bounded, comparison_figure, overlay_heatmap

#: A concept's colour: matplotlib's qualitative palette, cycled beyond ten concepts.
PALETTE = "tab10"


def concept_colours(count: int) -> np.ndarray:
    """``(count, 3)`` RGB in 0-255, one distinct colour per concept."""
    palette = colormaps[PALETTE]
    return np.array([palette(k % palette.N)[:3] for k in range(count)]) * 255.0


def concepts_image(image: Image.Image, maps: np.ndarray, *, transform=None, alpha: float = 0.6) -> Image.Image:
    """``image`` with each pixel tinted by its strongest concept of ``maps`` ``(K, H, W)`` (each in [0, 1])."""
    drawn = bounded(image)
    box = scaled_crop_box(transform, image.size, drawn.size)
    width, height = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    resized = np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))
            for m in maps
        ]
    )
    strongest = resized.argmax(axis=0)
    strength = np.clip(resized.max(axis=0), 0.0, 1.0)[..., None] * alpha
    picture = np.array(drawn, dtype=np.float32)
    region = picture[box[1] : box[1] + height, box[0] : box[0] + width]
    tint = concept_colours(len(maps))[strongest][: region.shape[0], : region.shape[1]]
    strength = strength[: region.shape[0], : region.shape[1]]
    region[...] = region * (1 - strength) + tint * strength
    return Image.fromarray(np.clip(np.round(picture), 0, 255).astype(np.uint8))


def concept_caption(index: int, top_classes: list[tuple[str, float]], shown: int = 2) -> str:
    """``"concept 1: tabby 41.0%, tiger cat 22.3%"`` (or just ``"concept 1"`` when no class could be scored)."""
    classes = ", ".join(f"{label} {share:.1%}" for label, share in top_classes[:shown])
    return f"concept {index + 1}" + (f": {classes}" if classes else "")


def factorization_figure(
    image: Image.Image,
    maps: np.ndarray,
    top_classes: list[list[tuple[str, float]]],
    *,
    transform=None,
    title: str | None = None,
) -> Figure:
    """The photo, every concept at once, and one panel per concept (``maps`` ``(K, H, W)`` for this image)."""
    panels = [("all concepts", concepts_image(image, maps, transform=transform))]
    panels += [
        (concept_caption(k, top_classes[k]), overlay_heatmap(image, maps[k], transform=transform))
        for k in range(len(maps))
    ]
    figure = comparison_figure(
        image, panels, columns=min(len(panels) + 1, 6), legends=[("jet", "concept strength")], title=title
    )
    for axis, colour in zip(figure.axes[2 : 2 + len(maps)], concept_colours(len(maps)) / 255.0):
        axis.title.set_color(tuple(colour))  # each concept's title in its colour of the "all concepts" picture
    return figure
