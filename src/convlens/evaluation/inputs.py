"""Which images an evaluation scores: the images of a folder, their masks, and the ``--limit`` sample."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.folders import IMAGE_SUFFIXES, image_files
from ..data.shapes import load_mask, mask_path
from ..errors import ConvlensError


def find_mask(image_path: Path) -> np.ndarray | None:
    """The object mask of an image, bool ``(H, W)``, or ``None``.

    Looks, in this order, for ``<stem>.mask.png`` beside the image, then
    ``masks/<stem>.png`` in the image's folder, then ``../masks/<stem>.png`` (a
    ``masks/`` folder next to an ``images/`` folder), read by :func:`convlens.data.shapes.load_mask`.
    """
    image_path = Path(image_path)
    stem = image_path.name[: -len(image_path.suffix)] if image_path.suffix else image_path.name
    for candidate in (
        mask_path(image_path),
        image_path.parent / "masks" / f"{stem}.png",
        image_path.parent.parent / "masks" / f"{stem}.png",
    ):
        if candidate.is_file() and candidate != image_path:
            return load_mask(candidate)
    return None


def list_images(data: str | os.PathLike) -> list[Path]:
    """Image files of a folder (recursively, sorted), masks excluded; or the one file given."""
    data = Path(data)
    if data.is_file():
        return [data]
    if not data.is_dir():
        raise ConvlensError(f"data not found: {data} (pass a folder of images)")
    images = image_files(data)
    if not images:
        raise ConvlensError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {data}")
    return images


def sample_images(images: Sequence[Path], root: str | os.PathLike, limit: int | None, seed: int = 0) -> list[Path]:
    """``limit`` of ``images``, drawn evenly across classes and seeded; all of them when ``limit`` is ``None``
    or not smaller.

    An image's class is its folder under ``root`` (a flat folder is one class).
    The classes take turns, in an order drawn from ``seed``, each giving the
    next image of its own seeded shuffle, so the counts per class differ by at
    most one (unless a class runs out of images). Taking the first files in
    sorted order instead would fill the sample from the first classes only.
    The same images and seed give the same files, returned in sorted order.
    """
    import random

    images = sorted(images)
    if limit is None or limit >= len(images):
        return images
    root = Path(root)
    classes: dict[str, list[Path]] = {}
    for path in images:
        classes.setdefault(_class_of(root, path), []).append(path)
    rng = random.Random(seed)
    order = sorted(classes)
    rng.shuffle(order)
    for name in order:
        rng.shuffle(classes[name])
    chosen: list[Path] = []
    turn = 0
    while len(chosen) < limit:
        for name in order:
            if turn < len(classes[name]) and len(chosen) < limit:
                chosen.append(classes[name][turn])
        turn += 1
    return sorted(chosen)


def describe_sample(images: Sequence[Path], root: str | os.PathLike, available: int, seed: int) -> str:
    """``"a sample of 16 of 40 images, stratified by class folder (4 classes: 4 each), seed 0"``."""
    from collections import Counter

    counts = Counter(_class_of(Path(root), path) for path in images)
    low, high = min(counts.values()), max(counts.values())
    each = f"{low} each" if low == high else f"{low}-{high} each"
    return (
        f"a sample of {len(images)} of {available} images, stratified by class folder "
        f"({len(counts)} class{'es' if len(counts) != 1 else ''}: {each}), seed {seed}"
    )


def _class_of(root: Path, path: Path) -> str:
    return path.parent.relative_to(root).as_posix() if root.is_dir() else "."


def choose_images(root: Path, limit: int | None, seed: int) -> tuple[list[Path], str]:
    """The run's images (all, or the ``limit`` sample) and how they were sampled (empty for all)."""
    if limit is not None and limit < 1:
        raise ConvlensError(f"--limit must be at least 1, got {limit}")
    available = list_images(root)
    images = sample_images(available, root, limit, seed)
    return images, describe_sample(images, root, len(available), seed) if len(images) < len(available) else ""
