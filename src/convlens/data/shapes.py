"""A procedural shapes dataset whose every image comes with its ground truth.

Each image holds one object class out of :data:`SHAPE_CLASSES` (sometimes two
objects of that class) at a random size, rotation, colour and position, on a
cluttered background: a colour gradient, low-frequency colour blotches, pixel
noise and thin distractor strokes. Objects are drawn last and never touch each
other, so the object mask is exactly the set of pixels the objects cover; it is
what lets convlens measure whether a heatmap points at the object.

Conventions:

* ``image``: ``(H, W, 3)`` uint8 RGB; ``mask``: ``(H, W)`` bool, the union of the objects.
* ``boxes``: one ``(x0, y0, x1, y1)`` per object, the tight box of its pixels
  with ``x1``/``y1`` exclusive (``mask[y0:y1, x0:x1]`` holds the whole object).
* Sample ``i`` of :func:`shapes_dataset` is drawn from ``numpy.random.default_rng([seed, i])``,
  so it depends on ``(seed, i)`` only, never on how many samples are asked for;
  its class is ``i % len(classes)``, so every class appears equally often.

On disk (:func:`write_shapes`) the images go in the usual class-folder layout,
``DIR/<split>/<class>/00000.png``, each mask beside its image as
``00000.mask.png`` (white = object); ``DIR/<split>/annotations.json`` lists
every image's class and boxes. :func:`read_mask` finds the mask of any image.

Example:
    >>> sample = generate_shape(0, size=64)
    >>> sample.image.shape, sample.mask.shape, sample.class_name in SHAPE_CLASSES
    ((64, 64, 3), (64, 64), True)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from ..errors import ConvlensError, did_you_mean
from ..fileio import atomic_path, write_text

#: In alphabetical order, the order class folders are read in: a model trained on
#: :func:`write_shapes` output predicts index ``k`` for ``SHAPE_CLASSES[k]`` (= ``sample.label``).
SHAPE_CLASSES: tuple[str, ...] = (
    "circle", "cross", "hexagon", "ring", "square", "star", "stripes", "triangle",
)
MASK_SUFFIX = ".mask.png"
Box = tuple[int, int, int, int]


@dataclass
class ShapeSample:
    """One generated image with its ground truth (see the module docstring for conventions)."""

    image: np.ndarray
    mask: np.ndarray
    boxes: list[Box]
    label: int
    class_name: str
    object_masks: list[np.ndarray] = field(default_factory=list, repr=False)


# -- outlines -----------------------------------------------------------------

def _regular(corners: int, inner: float | None = None) -> np.ndarray:
    """Unit polygon (radius 1) with ``corners`` points; with ``inner``, a star alternating radii."""
    if inner is None:
        angles = np.arange(corners) * (2 * np.pi / corners)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    angles = np.arange(2 * corners) * (np.pi / corners)
    radii = np.where(np.arange(2 * corners) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(arm: float) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
                     (-1, a), (-1, -a), (-a, -a)], dtype=float)


def _outline(class_name: str, rng: np.random.Generator) -> np.ndarray | None:
    """The unit outline of a polygonal class, or ``None`` for the round ones."""
    if class_name in ("square", "stripes"):
        return _regular(4) / np.sqrt(2) * 1.25  # a square whose side is about the diameter
    if class_name == "triangle":
        return _regular(3)
    if class_name == "hexagon":
        return _regular(6)
    if class_name == "star":
        return _regular(5, inner=rng.uniform(0.38, 0.5))
    if class_name == "cross":
        return _cross(rng.uniform(0.25, 0.38))
    return None


def _object_mask(class_name: str, size: int, centre: np.ndarray, radius: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Bool ``(size, size)`` mask of one object, drawn without anti-aliasing."""
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    outline = _outline(class_name, rng)
    if outline is not None:
        angle = rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = outline @ rotation.T * radius + centre
        draw.polygon([tuple(p) for p in points], fill=1)
    else:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
        if class_name == "ring":
            hole = radius * rng.uniform(0.45, 0.65)
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    return np.array(canvas, dtype=bool)


# -- colours and background ---------------------------------------------------

def _contrasting_colour(rng: np.random.Generator, against: np.ndarray, distance: float = 110.0) -> np.ndarray:
    """A random colour at least ``distance`` (RGB, Euclidean) from ``against``, or the farthest of 16 tries."""
    candidates = rng.integers(0, 256, size=(16, 3)).astype(np.float32)
    gaps = np.linalg.norm(candidates - against, axis=1)
    far = np.flatnonzero(gaps >= distance)
    return candidates[far[0] if far.size else int(gaps.argmax())]


def _background(rng: np.random.Generator, size: int, clutter: bool) -> tuple[np.ndarray, np.ndarray]:
    """Uint8 ``(size, size, 3)`` background (gradient, blotches, noise, strokes) and its mean colour.

    The gradient and the blotches are mixed on a coarse 5x5 grid and upsampled
    once: a linear ramp survives bicubic upsampling, and the whole background
    then costs one resize instead of several full-resolution passes.
    """
    low, high = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    if not clutter:
        return np.broadcast_to(low.astype(np.uint8), (size, size, 3)).copy(), low
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, 5, dtype=np.float32)
    t = np.clip(0.5 + np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None], 0, 1)
    coarse = low + t[..., None] * (high - low)
    blotches = rng.uniform(0, 255, size=coarse.shape).astype(np.float32)  # distractor texture
    coarse += rng.uniform(0.15, 0.5) * (blotches - coarse)
    mean = coarse.reshape(-1, 3).mean(axis=0)
    smooth = Image.fromarray(coarse.round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
    # uniform grey pixel noise in [-amplitude, amplitude], added (and clipped) by Pillow in C:
    # ImageChops.add computes (smooth + noise) + offset with integer clipping
    amplitude = int(rng.integers(4, 31))
    noise = rng.integers(-amplitude, amplitude + 1, (size, size), dtype=np.int16)
    noise = Image.fromarray((noise + amplitude).astype(np.uint8)).convert("RGB")
    canvas = ImageChops.add(smooth, noise, scale=1.0, offset=-amplitude)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):  # thin strokes: straight lines and open arcs
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        width = int(rng.integers(1, max(2, size // 48) + 1))
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        if rng.random() < 0.6:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1]
            start = rng.uniform(0, 360)
            draw.arc(box, start, start + rng.uniform(40, 200), fill=colour, width=width)
    return np.array(canvas), mean


def _fill(class_name: str, obj: np.ndarray, background_mean: np.ndarray, rng: np.random.Generator,
          radius: float) -> np.ndarray:
    """Per-pixel colours of one object: flat, or two-colour stripes for ``stripes``."""
    colour = _contrasting_colour(rng, background_mean)
    if class_name != "stripes":
        return np.broadcast_to(colour, (int(obj.sum()), 3))
    second = _contrasting_colour(rng, colour, distance=90.0)
    ys, xs = np.nonzero(obj)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.3, 0.5) * radius  # at least about five stripes across the patch
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
    return np.where((np.floor(phase) % 2 == 0)[:, None], colour, second)


# -- samples ------------------------------------------------------------------

def _place(rng: np.random.Generator, size: int, count: int) -> list[tuple[np.ndarray, float]]:
    """Centres and radii for ``count`` objects fully inside the image, not touching each other."""
    low, high = (0.16, 0.3) if count == 1 else (0.12, 0.19)
    for _ in range(50):
        placed: list[tuple[np.ndarray, float]] = []
        for _ in range(count):
            radius = rng.uniform(low, high) * size
            margin = radius * 1.05 + 1
            centre = rng.uniform(margin, size - margin, size=2)
            if all(np.linalg.norm(centre - c) > (radius + r) * 1.1 + 2 for c, r in placed):
                placed.append((centre, radius))
        if len(placed) == count:
            return placed
    return placed[:1] if placed else [(np.full(2, size / 2), low * size)]


def _box(obj: np.ndarray) -> Box:
    """Tight ``(x0, y0, x1, y1)`` box of a non-empty mask, ``x1``/``y1`` exclusive."""
    rows, cols = np.flatnonzero(obj.any(axis=1)), np.flatnonzero(obj.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def generate_shape(rng_or_seed, size: int = 128, *, class_index: int | None = None,
                   classes: Sequence[str] = SHAPE_CLASSES, two_objects: float = 0.25,
                   clutter: bool = True) -> ShapeSample:
    """Draw one image of one class with its mask and boxes.

    Args:
        rng_or_seed: a ``numpy.random.Generator`` or anything ``default_rng`` takes.
        size: height and width in pixels (at least 24).
        class_index: index into ``classes``; random when ``None``.
        classes: class names to draw from, each one of :data:`SHAPE_CLASSES`.
        two_objects: probability of drawing two objects of the class.
        clutter: ``False`` draws the objects on a flat colour (useful for tests).
    """
    if size < 24:
        raise ConvlensError(f"shape images must be at least 24 pixels wide, got {size}")
    rng = _rng(rng_or_seed)
    if class_index is None:
        class_index = int(rng.integers(len(classes)))
    class_name = classes[class_index]
    image, background_mean = _background(rng, size, clutter)
    count = 2 if rng.random() < two_objects else 1
    union = np.zeros((size, size), dtype=bool)
    object_masks, boxes = [], []
    for centre, radius in _place(rng, size, count):
        obj = _object_mask(class_name, size, centre, radius, rng)
        image[obj] = _fill(class_name, obj, background_mean, rng, radius)
        boxes.append(_box(obj))
        object_masks.append(obj)
        union |= obj
    return ShapeSample(image=image, mask=union, boxes=boxes,
                       label=class_index, class_name=class_name, object_masks=object_masks)


def check_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    """``classes`` as a tuple after checking each name (``None``: all of :data:`SHAPE_CLASSES`)."""
    if classes is None:
        return SHAPE_CLASSES
    classes = tuple(classes)
    for name in classes:
        if name not in SHAPE_CLASSES:
            raise ConvlensError(f"unknown shape class {name!r}{did_you_mean(name, SHAPE_CLASSES)}; "
                                f"choose from {', '.join(SHAPE_CLASSES)}")
    if len(set(classes)) < 2:
        raise ConvlensError("a shapes dataset needs at least two different classes")
    return classes


def shape_sample(index: int, seed: int = 0, size: int = 128,
                 classes: Sequence[str] | None = None) -> ShapeSample:
    """Sample ``index`` of the dataset with ``seed``: class ``index % len(classes)``."""
    classes = check_classes(classes)
    return generate_shape(np.random.default_rng([seed, index]), size,
                          class_index=index % len(classes), classes=classes)


def shapes_dataset(n: int, seed: int = 0, size: int = 128,
                   classes: Sequence[str] | None = None) -> Iterator[ShapeSample]:
    """Yield ``n`` samples, balanced over ``classes``; deterministic given ``seed``."""
    classes = check_classes(classes)
    for index in range(n):
        yield shape_sample(index, seed, size, classes)


# -- on disk ------------------------------------------------------------------

def mask_path(image_path: str | os.PathLike) -> Path:
    """Where the mask of ``image_path`` lives: ``00000.png`` -> ``00000.mask.png``."""
    path = Path(image_path)
    return path.with_name(path.name[: -len(path.suffix)] + MASK_SUFFIX if path.suffix else path.name + MASK_SUFFIX)


def is_mask_file(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith(MASK_SUFFIX)


def read_mask(image_path: str | os.PathLike) -> np.ndarray | None:
    """The ``(H, W)`` bool object mask stored beside ``image_path``, or ``None`` if it has none."""
    path = mask_path(image_path)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as opened:
            return np.asarray(opened.convert("L")) > 127
    except OSError as err:
        raise ConvlensError(f"cannot read mask {path}: {err}") from None


def write_shapes(out_dir: str | os.PathLike, n_per_class: int, seed: int = 0, *, size: int = 128,
                 split: str | None = "train", classes: Sequence[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``n_per_class`` images per class to ``out_dir/<split>/<class>/NNNNN.png`` with masks beside.

    ``split=None`` writes the class folders directly into ``out_dir``. Every
    file is written atomically; ``annotations.json`` (class and boxes per image)
    is written last. ``progress(done, total)`` is called after each image.
    Returns the folder holding the class folders.
    """
    classes = check_classes(classes)
    if n_per_class < 1:
        raise ConvlensError(f"--per-class must be at least 1, got {n_per_class}")
    if size < 24:
        raise ConvlensError(f"shape images must be at least 24 pixels wide, got {size}")
    root = Path(out_dir) / split if split else Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ConvlensError(f"{root} exists and is not a folder")
    total = n_per_class * len(classes)
    annotations = {}
    for index in range(total):
        sample = shape_sample(index, seed, size, classes)
        relative = f"{sample.class_name}/{index // len(classes):05d}.png"
        image_path = root / relative
        with atomic_path(image_path) as tmp:
            Image.fromarray(sample.image).save(tmp, format="PNG", compress_level=1)  # 3x faster, lossless
        with atomic_path(mask_path(image_path)) as tmp:
            Image.fromarray(sample.mask).save(tmp, format="PNG")
        annotations[relative] = {"label": sample.label, "class": sample.class_name,
                                 "boxes": [list(b) for b in sample.boxes]}
        if progress is not None:
            progress(index + 1, total)
    write_text(root / "annotations.json", json.dumps(
        {"classes": list(classes), "seed": seed, "size": size, "box_format": "x0,y0,x1,y1 (x1,y1 exclusive)",
         "images": annotations}, indent=1))
    return root


class ShapesTorchDataset:
    """A ``torch.utils.data.Dataset`` generating samples in memory: ``(image (3, H, W) float in [0, 1], label)``.

    Item ``i`` is :func:`shape_sample` ``(i, seed, size, classes)``; ``transform``
    (PIL image -> tensor) replaces the default scaling when given.
    """

    def __init__(self, n: int, seed: int = 0, size: int = 128, classes: Sequence[str] | None = None,
                 transform: Callable | None = None):
        self.n, self.seed, self.size = n, seed, size
        self.classes = check_classes(classes)
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        import torch

        if not 0 <= index < self.n:
            raise IndexError(index)
        sample = shape_sample(index, self.seed, self.size, self.classes)
        if self.transform is not None:
            return self.transform(Image.fromarray(sample.image)), sample.label
        return torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255.0, sample.label
