"""Embedding pictures in one self-contained HTML file: PNG bytes as data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def data_uri(image: Image.Image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URI (no file, no network)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def outline(image: Image.Image, mask: np.ndarray, color=(255, 255, 255), width: int = 2) -> Image.Image:
    """Draw the boundary of a boolean ``mask`` (resized to the image) on a copy of ``image``."""
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
    inside = np.asarray(mask_image) > 127
    edge = np.zeros_like(inside)
    for _ in range(width):
        grown = inside.copy()
        grown[1:] |= inside[:-1]
        grown[:-1] |= inside[1:]
        grown[:, 1:] |= inside[:, :-1]
        grown[:, :-1] |= inside[:, 1:]
        edge |= grown & ~inside
        inside = grown
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[edge] = color
    return Image.fromarray(pixels)
