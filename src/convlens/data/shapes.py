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
  ``workers=N`` (:func:`shapes_dataset`, :func:`write_shapes`) spreads the
  samples over N processes and changes nothing in them.

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

import functools
import json
import math
import multiprocessing
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConvlensError, did_you_mean
from ..fileio import atomic_path, write_text
from ..progress import Progress

#: In alphabetical order, the order class folders are read in: a model trained on
#: :func:`write_shapes` output predicts index ``k`` for ``SHAPE_CLASSES[k]`` (= ``sample.label``).
SHAPE_CLASSES: tuple[str, ...] = ("circle", "cross", "hexagon", "ring", "square", "star", "stripes", "triangle")
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

Outline = list[tuple[float, float]]


def _regular(corners: int, inner: float | None = None) -> Outline:
    """Unit polygon (radius 1) with ``corners`` points; with ``inner``, a star alternating radii."""
    if inner is None:
        return [(math.cos(2 * math.pi * k / corners), math.sin(2 * math.pi * k / corners)) for k in range(corners)]
    radii = [1.0 if k % 2 == 0 else inner for k in range(2 * corners)]
    return [(r * math.cos(math.pi * k / corners), r * math.sin(math.pi * k / corners)) for k, r in enumerate(radii)]


def _cross(a: float) -> Outline:
    """A plus sign of half-width ``a`` inside the unit square."""
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


_SQUARE = [(x * 1.25 / math.sqrt(2), y * 1.25 / math.sqrt(2)) for x, y in _regular(4)]  # side about the diameter
_FIXED_OUTLINES = {"square": _SQUARE, "stripes": _SQUARE, "triangle": _regular(3), "hexagon": _regular(6)}


def _outline(class_name: str, rng: np.random.Generator) -> Outline | None:
    """The unit outline of a polygonal class, or ``None`` for the round ones."""
    if class_name in _FIXED_OUTLINES:
        return _FIXED_OUTLINES[class_name]
    if class_name == "star":
        return _regular(5, inner=rng.uniform(0.38, 0.5))
    if class_name == "cross":
        return _cross(rng.uniform(0.25, 0.38))
    return None


def _object_mask(
    class_name: str, size: int, centre: tuple[float, float], radius: float, rng: np.random.Generator
) -> Image.Image:
    """Mode ``"1"`` ``(size, size)`` mask of one object, drawn without anti-aliasing."""
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    outline = _outline(class_name, rng)
    if outline is not None:
        angle = rng.uniform(0, 2 * math.pi)
        cos, sin = radius * math.cos(angle), radius * math.sin(angle)
        draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline], fill=1)
    else:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
        if class_name == "ring":
            hole = radius * rng.uniform(0.45, 0.65)
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    return canvas


# -- colours and background ---------------------------------------------------


def _contrasting_colour(rng: np.random.Generator, against: Sequence[float], distance: float = 110.0) -> tuple[int, ...]:
    """A random colour at least ``distance`` (RGB, Euclidean) from ``against``, or the farthest of 16 tries."""
    values = rng.bytes(48)
    candidates = [tuple(values[k : k + 3]) for k in range(0, 48, 3)]
    gaps = [math.dist(c, against) for c in candidates]
    far = next((c for c, gap in zip(candidates, gaps) if gap >= distance), None)
    return far if far is not None else candidates[gaps.index(max(gaps))]


_RAMP = np.linspace(-0.5, 0.5, 5, dtype=np.float32)


@functools.lru_cache(maxsize=16)
def _upsampler(size: int, coarse: int = 5) -> np.ndarray:
    """``(size, coarse)`` float32 weights that resize a length-``coarse`` signal to ``size`` samples, bicubic.

    Pillow's bicubic resize is separable, so ``W @ grid @ W.T`` is the resized
    grid; the weights come from resizing each unit vector once.
    """
    columns = [
        np.asarray(Image.fromarray(np.eye(1, coarse, k, dtype=np.float32)).resize((size, 1), Image.Resampling.BICUBIC))
        for k in range(coarse)
    ]
    weights = np.concatenate(columns, axis=0).T.copy()
    weights.setflags(write=False)  # cached and shared by every call
    return weights


def _background(rng: np.random.Generator, size: int, clutter: bool) -> tuple[Image.Image, np.ndarray]:
    """RGB ``(size, size)`` background (gradient, blotches, noise, strokes) and its mean colour.

    The gradient and the blotches are mixed on a coarse 5x5 grid and resized
    with two small matrix products per colour plane (a linear ramp survives
    bicubic resizing); grey pixel noise is added to the planes before they are
    merged into the Pillow image the strokes are drawn on.
    """
    low, high = np.frombuffer(rng.bytes(6), np.uint8).astype(np.float32).reshape(2, 3)
    if not clutter:
        return Image.new("RGB", (size, size), tuple(int(c) for c in low)), low
    angle, mix, noise_level, strokes = rng.random(4, dtype=np.float32)
    t = 0.5 + np.cos(2 * np.pi * angle) * _RAMP[None, :] + np.sin(2 * np.pi * angle) * _RAMP[:, None]
    t = np.minimum(np.maximum(t, 0, out=t), 1, out=t)  # np.clip, without its Python-level overhead
    coarse = low[:, None, None] + t * (high - low)[:, None, None]  # (3, 5, 5), one plane per channel
    blotches = rng.random(coarse.shape, dtype=np.float32) * 255  # distractor texture
    coarse += (0.15 + 0.35 * mix) * (blotches - coarse)
    mean = coarse.reshape(3, 25).sum(axis=1) / 25
    weights = _upsampler(size)
    planes = weights @ coarse @ weights.T  # (3, size, size)
    # grey pixel noise, uniform over the integers in [-amplitude, amplitude], drawn from random bytes
    # through a lookup table (+ 0.5: the cast to uint8 below then rounds to the nearest level)
    amplitude = 4 + int(noise_level * 27)
    levels = np.floor(np.arange(256, dtype=np.float32) * ((2 * amplitude + 1) / 256)) - amplitude + 0.5
    planes += levels.take(np.frombuffer(rng.bytes(size * size), np.uint8)).reshape(size, size)
    channels = np.minimum(np.maximum(planes, 0, out=planes), 255, out=planes).astype(np.uint8)
    canvas = Image.merge(
        "RGB", [Image.frombuffer("L", (size, size), channel, "raw", "L", 0, 1) for channel in channels]
    )
    draw = ImageDraw.Draw(canvas)
    # thin strokes, straight lines and open arcs: colour, end points, width, kind, arc start and extent
    widest = max(2, size // 48)
    for r, g, b, x0, y0, x1, y1, width, kind, start, extent in rng.random((2 + int(strokes * 5), 11)).tolist():
        colour, width = (int(r * 256), int(g * 256), int(b * 256)), 1 + int(width * widest)
        x0, y0, x1, y1 = x0 * size, y0 * size, x1 * size, y1 * size
        if kind < 0.6:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1]
            draw.arc(box, start * 360, start * 360 + 40 + extent * 160, fill=colour, width=width)
    return canvas, mean


def _paint(
    canvas: Image.Image,
    class_name: str,
    obj: Image.Image,
    background_mean: np.ndarray,
    rng: np.random.Generator,
    radius: float,
) -> None:
    """Fill the object ``obj`` on ``canvas``: one flat colour, or two-colour stripes for ``stripes``."""
    colour = _contrasting_colour(rng, background_mean.tolist())
    canvas.paste(colour, mask=obj)
    if class_name != "stripes":
        return
    second = _contrasting_colour(rng, colour, distance=90.0)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(0.3, 0.5) * radius  # at least about five stripes across the patch
    line = np.arange(canvas.width, dtype=np.float32)
    phase = line[None, :] * (np.cos(angle) / period) + line[:, None] * (np.sin(angle) / period)
    odd = (np.floor(phase).astype(np.int32) & 1).astype(bool) & np.array(obj, dtype=bool)
    canvas.paste(second, mask=Image.fromarray(odd))


# -- samples ------------------------------------------------------------------


def _place(rng: np.random.Generator, size: int, count: int) -> list[tuple[tuple[float, float], float]]:
    """Centres and radii for ``count`` objects fully inside the image, not touching each other."""
    low, high = (0.16, 0.3) if count == 1 else (0.12, 0.19)
    for _ in range(50):
        placed: list[tuple[tuple[float, float], float]] = []
        for u, v, w in rng.random((count, 3)).tolist():
            radius = (low + (high - low) * u) * size
            margin = radius * 1.05 + 1
            centre = (margin + (size - 2 * margin) * v, margin + (size - 2 * margin) * w)
            if all(math.dist(centre, c) > (radius + r) * 1.1 + 2 for c, r in placed):
                placed.append((centre, radius))
        if len(placed) == count:
            return placed
    return [((size / 2, size / 2), low * size)]


def _rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def generate_shape(
    rng_or_seed,
    size: int = 128,
    *,
    class_index: int | None = None,
    classes: Sequence[str] = SHAPE_CLASSES,
    two_objects: float = 0.25,
    clutter: bool = True,
) -> ShapeSample:
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
    canvas, background_mean = _background(rng, size, clutter)
    count = 2 if rng.random() < two_objects else 1
    object_masks, boxes = [], []
    for centre, radius in _place(rng, size, count):
        obj = _object_mask(class_name, size, centre, radius, rng)
        _paint(canvas, class_name, obj, background_mean, rng, radius)
        object_masks.append(np.array(obj, dtype=bool))
        box = obj.getbbox()  # (x0, y0, x1, y1), x1 and y1 exclusive
        if box is None:
            raise RuntimeError(f"a {class_name} of radius {radius} was drawn without a pixel")
        boxes.append(box)
    union = object_masks[0] if count == 1 else np.logical_or(*object_masks)
    return ShapeSample(
        image=np.array(canvas),
        mask=union,
        boxes=boxes,
        label=class_index,
        class_name=class_name,
        object_masks=object_masks,
    )


def check_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    """``classes`` as a tuple after checking each name (``None``: all of :data:`SHAPE_CLASSES`)."""
    if classes is None:
        return SHAPE_CLASSES
    classes = tuple(classes)
    for name in classes:
        if name not in SHAPE_CLASSES:
            raise ConvlensError(
                f"unknown shape class {name!r}{did_you_mean(name, SHAPE_CLASSES)}; "
                f"choose from {', '.join(SHAPE_CLASSES)}"
            )
    if len(set(classes)) < 2:
        raise ConvlensError("a shapes dataset needs at least two different classes")
    return classes


def shape_sample(index: int, seed: int = 0, size: int = 128, classes: Sequence[str] | None = None) -> ShapeSample:
    """Sample ``index`` of the dataset with ``seed``: class ``index % len(classes)``."""
    classes = check_classes(classes)
    return generate_shape(np.random.default_rng([seed, index]), size, class_index=index % len(classes), classes=classes)


def shapes_dataset(
    n: int, seed: int = 0, size: int = 128, classes: Sequence[str] | None = None, *, workers: int = 1
) -> Iterator[ShapeSample]:
    """Yield ``n`` samples, balanced over ``classes``; deterministic given ``seed``.

    ``workers > 1`` draws them in that many processes (the same samples, in the same order).
    """
    classes = check_classes(classes)
    for samples in _ordered_map(partial(_draw, seed=seed, size=size, classes=classes), _chunks(n, 64), workers):
        yield from samples


def _draw(indices: range, *, seed: int, size: int, classes: tuple[str, ...]) -> list[ShapeSample]:
    return [shape_sample(index, seed, size, classes) for index in indices]


def _chunks(n: int, chunk: int) -> list[range]:
    return [range(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _ordered_map(function: Callable, chunks: list, workers: int) -> Iterator:
    """``map(function, chunks)``, in ``workers`` processes when that is more than one, at most ``2 * workers`` ahead."""
    if workers <= 1 or len(chunks) <= 1:
        yield from map(function, chunks)
        return
    methods = multiprocessing.get_all_start_methods()  # fork: the workers need not import anything again
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(function, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# -- on disk ------------------------------------------------------------------


def mask_path(image_path: str | os.PathLike) -> Path:
    """Where the mask of ``image_path`` lives: ``00000.png`` -> ``00000.mask.png``."""
    path = Path(image_path)
    return path.with_name(path.name[: -len(path.suffix)] + MASK_SUFFIX if path.suffix else path.name + MASK_SUFFIX)


def is_mask_file(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith(MASK_SUFFIX)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image as bool ``(H, W)``: the one mask reader of convlens.

    A pixel is object when it is above half the mask's largest value, so 0/255
    masks, 0/1 masks and anti-aliased edges all read as drawn.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # as load_image: refused, not decoded
            with Image.open(path) as opened:
                values = np.asarray(opened.convert("L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ConvlensError(f"cannot read mask {path}: {' '.join(str(err).split())}") from None  # Pillow's, one line
    top = int(values.max(initial=0))
    return values > top / 2 if top > 0 else np.zeros(values.shape, dtype=bool)


def read_mask(image_path: str | os.PathLike) -> np.ndarray | None:
    """The ``(H, W)`` bool object mask stored beside ``image_path``, or ``None`` if it has none."""
    path = mask_path(image_path)
    return load_mask(path) if path.is_file() else None


def write_shapes(
    out_dir: str | os.PathLike,
    n_per_class: int,
    seed: int = 0,
    *,
    size: int = 128,
    split: str | None = "train",
    classes: Sequence[str] | None = None,
    progress: Progress | None = None,
    workers: int = 1,
) -> Path:
    """Write ``n_per_class`` images per class to ``out_dir/<split>/<class>/NNNNN.png`` with masks beside.

    ``split=None`` writes the class folders directly into ``out_dir``. Every
    file is written atomically; ``annotations.json`` (class and boxes per image)
    is written last. ``progress(done, total)`` is called as images are written;
    ``workers > 1`` draws and writes them in that many processes (same files).
    Returns the folder holding the class folders.
    """
    classes = check_classes(classes)
    if n_per_class < 1:
        raise ConvlensError(f"--per-class must be at least 1, got {n_per_class}")
    if size < 24:
        raise ConvlensError(f"shape images must be at least 24 pixels wide, got {size}")
    if workers < 1:
        raise ConvlensError(f"--workers must be at least 1, got {workers}")
    root = Path(out_dir) / split if split else Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ConvlensError(f"{root} exists and is not a folder")
    total = n_per_class * len(classes)
    annotations: dict[str, dict] = {}
    write = partial(_write_samples, root=root, seed=seed, size=size, classes=classes)
    for written in _ordered_map(write, _chunks(total, 32), workers):
        annotations.update(written)
        if progress is not None:
            progress(len(annotations), total)
    write_text(
        root / "annotations.json",
        json.dumps(
            {
                "classes": list(classes),
                "seed": seed,
                "size": size,
                "box_format": "x0,y0,x1,y1 (x1,y1 exclusive)",
                "images": annotations,
            },
            indent=1,
        ),
    )
    return root


def _write_samples(indices: range, *, root: Path, seed: int, size: int, classes: tuple[str, ...]) -> dict[str, dict]:
    """Draw and write samples ``indices`` (image and mask, each atomically); their annotations by relative path."""
    annotations = {}
    for index in indices:
        sample = shape_sample(index, seed, size, classes)
        relative = f"{sample.class_name}/{index // len(classes):05d}.png"
        image_path = root / relative
        with atomic_path(image_path) as tmp:
            Image.fromarray(sample.image).save(tmp, format="PNG", compress_level=1)  # 3x faster, lossless
        with atomic_path(mask_path(image_path)) as tmp:
            Image.fromarray(sample.mask).save(tmp, format="PNG")
        annotations[relative] = {
            "label": sample.label,
            "class": sample.class_name,
            "boxes": [list(b) for b in sample.boxes],
        }
    return annotations


class ShapesTorchDataset:
    """A ``torch.utils.data.Dataset`` generating samples in memory: ``(image (3, H, W) float in [0, 1], label)``.

    Item ``i`` is :func:`shape_sample` ``(i, seed, size, classes)``; ``transform``
    (PIL image -> tensor) replaces the default scaling when given.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        size: int = 128,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
    ):
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
