"""Where TCAV's image sets come from: concept folders, dissection masks, random sets, the class's inputs.

An :class:`ImageSet` is a named list of images (paths, PIL images, arrays) or a
preprocessed tensor batch; nothing is read until the model runs on it.

* Concepts (:func:`concept_sets`): a mapping ``{name: images or folder}``, a folder
  of concept folders ``CONCEPTS/<concept>/*.png``, or a data folder with concept
  masks as Network Dissection reads them (``DATA/masks/<concept>/<image>.png``, or
  ``<stem>.mask.png`` beside each image of a class folder: :mod:`convlens.atlas.data`).
  From masks, a concept's images are the *whole* images where its mask has a
  pixel: the simpler choice, and the one that keeps concept and random images at
  the same scale (a crop to the mask's box would be upsampled, and the CAV could
  learn "zoomed in" instead of the concept).
* Random sets (:func:`random_sets`): a list of folders (or image lists), a folder
  of random folders ``RANDOM/<set>/*.png``, or a flat pool folder from which the
  sets are drawn with a seed.

Every concept and every random set needs :data:`MIN_IMAGES` images, and there must be
:data:`MIN_RANDOM_SETS` random sets: with fewer the t-test of :func:`convlens.concepts.tcav`
has too little to stand on (Kim et al. 2018 use 500 random runs; 10 is the floor).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.folders import image_files, is_image_file
from ..data.shapes import mask_path
from ..errors import ConvlensError
from ..images import ImageLike

#: The fewest images a concept or a random set may have.
MIN_IMAGES = 10
#: The fewest random sets (and runs) of the statistical test.
MIN_RANDOM_SETS = 10

Images = str | os.PathLike | torch.Tensor | Sequence[ImageLike]


@dataclass
class ImageSet:
    """Named images: a list of anything :meth:`convlens.Model.as_batch` reads, or a tensor batch."""

    name: str
    items: list | torch.Tensor
    where: str = ""  # what they came from, for messages

    def __len__(self) -> int:
        return len(self.items)

    def chunks(self, size: int):
        """The images ``size`` at a time (a tensor's rows, or a list's items)."""
        for start in range(0, len(self.items), size):
            yield self.items[start : start + size]


def _folder_images(folder: Path) -> list[Path]:
    return image_files(folder)


def image_set(name: str, images: Images, *, minimum: int = MIN_IMAGES, what: str = "concept") -> ImageSet:
    """``images`` (a folder, a tensor batch, or a list of images) as an :class:`ImageSet` of at least ``minimum``."""
    items: Sequence[ImageLike] | torch.Tensor
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise ConvlensError(f"{what} folder not found: {folder}")
        items, where = _folder_images(folder), str(folder)
    elif isinstance(images, torch.Tensor):
        items, where = (images.unsqueeze(0) if images.ndim == 3 else images), "a tensor batch"
    else:
        items, where = list(images), "the images given"
    if len(items) < minimum:
        raise ConvlensError(
            f"{what} {name!r} has {len(items)} image(s) ({where}); TCAV needs at least {minimum} per {what}: add images"
        )
    return ImageSet(name, items, where)


def _has_masks(folder: Path) -> bool:
    """A data folder with concept masks: ``masks/`` inside, or images with ``<stem>.mask.png`` beside them."""
    if (folder / "masks").is_dir():
        return True
    return any(mask_path(path).is_file() for path in _folder_images(folder)[:64])


def masked_concepts(data: str | os.PathLike, masks: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """``{concept: images where its mask has a pixel}`` of a data folder, as Network Dissection reads its masks."""
    from ..atlas.data import folder_source

    source = folder_source(data, masks)
    found: dict[str, list[Path]] = {concept: [] for concept in source.concepts}
    for index, path in enumerate(source.paths):
        for concept, mask in source.concept_masks(index).items():
            if mask.any():
                found.setdefault(concept, []).append(path)
    if not found:
        raise ConvlensError(
            f"{data} has no concept masks (masks/<concept>/<image>.png); pass a folder of concept folders instead"
        )
    return found


def concept_sets(
    concepts: Mapping[str, Images] | str | os.PathLike, *, masks: str | os.PathLike | None = None
) -> list[ImageSet]:
    """The concepts' image sets (see the module docstring), each of at least :data:`MIN_IMAGES` images."""
    if isinstance(concepts, Mapping):
        if not concepts:
            raise ConvlensError("no concepts given: pass at least one concept's images")
        return [image_set(str(name), images) for name, images in concepts.items()]
    folder = Path(concepts)
    if not folder.is_dir():
        raise ConvlensError(f"concepts folder not found: {folder}")
    if masks is not None or _has_masks(folder):
        found = masked_concepts(folder, masks)
        return [image_set(name, paths) for name, paths in sorted(found.items())]
    subfolders = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subfolders:
        raise ConvlensError(f"{folder} holds no concept folders (CONCEPTS/<concept>/*.png) and no masks/ folder")
    return [image_set(d.name, d) for d in subfolders]


def random_sets(
    random: Images | Sequence[Images], runs: int, *, seed: int = 0, size: int | None = None
) -> list[ImageSet]:
    """``runs`` random image sets: the first ``runs`` folders given, or ``runs`` draws from a pool folder.

    A folder is a pool when images lie directly in it or when ``size`` is given (then
    every image under it, class folders included, is in the pool); else each of its
    folders is one random set. A pool's sets hold ``size`` images each (default: half
    the pool, at most 50), drawn without replacement within a set, independently
    across sets (``seed``).
    """
    if runs < MIN_RANDOM_SETS:
        raise ConvlensError(f"TCAV's t-test needs at least {MIN_RANDOM_SETS} runs against random concepts, got {runs}")
    if isinstance(random, (list, tuple)):
        sets = [image_set(f"random{i}", images, what="random set") for i, images in enumerate(random)]
    else:
        folder = Path(random) if isinstance(random, (str, os.PathLike)) else None
        if folder is None:
            raise ConvlensError("random: pass a folder (of random folders, or a pool of images) or a list of folders")
        if not folder.is_dir():
            raise ConvlensError(f"random folder not found: {folder}")
        subfolders = sorted(
            d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "masks"
        )
        loose = any(p.is_file() and is_image_file(p) for p in folder.iterdir())
        if size is not None or loose or not subfolders:
            return _drawn(folder, runs, seed, size)
        sets = [image_set(d.name, d, what="random set") for d in subfolders]
    if len(sets) < runs:
        raise ConvlensError(
            f"{len(sets)} random set(s) given for {runs} runs; give at least {runs} random folders "
            "(or one pool of images to draw them from, with a set size)"
        )
    return sets[:runs]


def _drawn(pool: Path, runs: int, seed: int, size: int | None) -> list[ImageSet]:
    paths = _folder_images(pool)
    size = min(50, len(paths) // 2) if size is None else size
    if size < MIN_IMAGES or len(paths) < 2 * size:
        raise ConvlensError(
            f"the random pool {pool} has {len(paths)} image(s); drawing {runs} sets of "
            f"{max(size, MIN_IMAGES)} needs at least {2 * max(size, MIN_IMAGES)} (two sets must differ)"
        )
    rng = np.random.default_rng(seed)
    return [
        ImageSet(
            f"random{i}",
            [paths[j] for j in sorted(rng.choice(len(paths), size, replace=False))],
            f"{size} drawn from {pool}",
        )
        for i in range(runs)
    ]


def input_sets(
    inputs: Images | Mapping, classes: Sequence, *, labels: Sequence[str] | None = None
) -> dict[object, ImageSet]:
    """The inputs of each class: ``{class: images}``, a folder with a folder per class, or one set for all."""
    if isinstance(inputs, Mapping):
        missing = [c for c in classes if c not in inputs]
        if missing:
            raise ConvlensError(f"no inputs given for class {missing[0]!r}: inputs has {sorted(map(str, inputs))}")
        return {c: image_set(str(c), inputs[c], minimum=1, what="inputs of class") for c in classes}
    if isinstance(inputs, (str, os.PathLike)):
        folder = Path(inputs)
        if not folder.is_dir():
            raise ConvlensError(f"inputs folder not found: {folder}")

        def own(c) -> Path | None:
            index = int(c) if isinstance(c, int) or (isinstance(c, str) and c.isdigit()) else None
            names = [str(c)] + ([labels[index]] if index is not None and labels and index < len(labels) else [])
            return next((folder / n for n in names if (folder / n).is_dir()), None)

        owned = {c: own(c) for c in classes}
        if all(path is not None for path in owned.values()):
            return {
                c: image_set(str(c), path, minimum=1, what="inputs of class")
                for c, path in owned.items()
                if path is not None
            }
    shared = image_set("inputs", inputs, minimum=1, what="inputs")
    return dict.fromkeys(classes, shared)
