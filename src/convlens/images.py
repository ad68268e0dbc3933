"""Reading images from whatever a user has: paths, PIL images, NumPy arrays, tensors.

Everything becomes an 8-bit RGB ``PIL.Image``: grayscale, RGBA (composited on
white), palette, CMYK and 16-bit images are converted, never rejected. A file
over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about
89 million pixels) is refused with a :class:`ConvlensError` before it is decoded.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConvlensError

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = 65535 if array.max(initial=0) > 255 else 255
        return (array.astype(np.float64) * (255.0 / top)).round().astype(np.uint8)
    array = np.nan_to_num(array.astype(np.float64))
    if array.max(initial=0) > 1.0 + 1e-6:
        return np.clip(array, 0, 255).round().astype(np.uint8)
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ConvlensError(
            f"cannot read an image from an array of shape {tuple(array.shape)}; pass (H, W), (H, W, 3) or (H, W, 4)"
        )
    return _rgb(Image.fromarray(_to_uint8(array)))


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _from_array(np.asarray(image))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _missing_image(path: Path) -> str:
    """Why ``path`` (for which ``exists()`` is False) does not lead to a file, in one line.

    ``Path.exists`` also says False for a symbolic link loop and a dangling link;
    calling those "not found" sends the user looking for a file that is there.
    """
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"image path {path} is a symbolic link loop and cannot be resolved; point it at the image file"
        if path.is_symlink():
            return f"image {path} is a broken symbolic link (to {os.readlink(path)}); point it at the image file"
    return f"image not found: {path}"


def load_image(image: ImageLike) -> Image.Image:
    """Return ``image`` as an RGB PIL image; a bad file raises :class:`ConvlensError`."""
    if isinstance(image, Image.Image):
        return _rgb(image)
    if isinstance(image, torch.Tensor):
        return _from_array(image.detach().float().cpu().numpy())
    if isinstance(image, np.ndarray):
        return _from_array(image)
    path = Path(image)
    if not path.exists():
        raise ConvlensError(_missing_image(path))
    if path.is_dir():
        raise ConvlensError(f"{path} is a folder; pass image files")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; such a photo still costs
            # gigabytes to decode, so it is refused like the ones Pillow itself refuses.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                ImageOps.exif_transpose(opened, in_place=True)  # in place: one full-size copy fewer
                return _rgb(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ConvlensError(_too_large(path, err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ConvlensError(f"cannot read image {path}: {err}; is it a complete PNG/JPEG file?") from None


def _too_large(path: Path, err: Exception) -> str:
    """The one-line refusal of a decompression bomb: its size, the limit and what to do."""
    found = re.search(r"\((\d+) pixels\)", str(err))  # Pillow names the size only in its message
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return (
        f"image {path} is too large: {size}, the limit is {Image.MAX_IMAGE_PIXELS:,} (Pillow's guard against "
        "decompression bombs); scale it down first (a model sees a few hundred pixels a side), or, "
        "if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS"
    )


def load_images(images: ImageLike | Sequence[ImageLike]) -> list[Image.Image]:
    """Load one image or a list of them; an empty list raises :class:`ConvlensError`."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
        images = [images]
    images = list(images) if isinstance(images, Iterable) else [images]
    if not images:
        raise ConvlensError("no images given; pass at least one image path")
    return [load_image(image) for image in images]


def sample_image(name: str = "chelsea") -> Image.Image:
    """A real photograph shipped inside scikit-image (``chelsea``, ``coffee``, ``astronaut``...)."""
    from skimage import data

    loader = getattr(data, name, None)
    if loader is None:
        raise ConvlensError(f"unknown sample image {name!r}; try 'chelsea', 'coffee' or 'astronaut'")
    return load_image(loader())
