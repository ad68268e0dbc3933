"""Where a scan's images come from: a class-folder tree, a flat folder, a list file, or generated shapes.

A :class:`DataSource` is an indexed list of images. Image ``i`` has a stable
``key`` (its path relative to the data root, or ``shapes/<seed>/<i>``), a
label (``-1`` when unknown) and, for Network Dissection, concept masks. Only
the index travels between processes (DataLoader workers, Ray actors): each
reads or generates its own images, so nothing is written to disk and the
generated shapes need no files.

Kinds (:func:`open_data`):

* ``shapes``: :func:`convlens.data.shape_sample` ``(i, seed, size)``; the label
  is the shape class and the object mask is the one concept of the image
  (one concept per class).
* a folder of class folders ``DATA/<class>/*.png``: labels from the folders;
* a flat folder of images (no labels);
* a text or CSV file listing image paths (relative to the file's folder), one per
  line, optionally followed by ``,<class name>``.

Concept masks of files: ``MASKS/<concept>/<key without suffix>.png`` (any nonzero
pixel is the concept; ``MASKS`` defaults to ``DATA/masks``), and a mask written
beside an image as ``<stem>.mask.png`` (:func:`convlens.data.write_shapes`) is
the concept named by the image's class folder. An image with no file for a
concept does not show it.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.folders import IMAGE_SUFFIXES, is_image_file, walk_files
from ..data.shapes import SHAPE_CLASSES, check_classes, mask_path, shape_sample
from ..errors import ConvlensError
from ..images import load_image

LIST_SUFFIXES = (".txt", ".csv", ".lst")


@dataclass
class DataSource:
    """An indexed list of images; see the module docstring.

    ``spec`` is enough to open the same source again (:func:`from_spec`): it is
    what the atlas store keeps, so ``convlens examples`` finds the images.
    """

    spec: dict
    keys: list[str]
    labels: list[int]
    classes: list[str]
    paths: list[Path] = field(default_factory=list)
    masks_dir: Path | None = None
    concepts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image (generated or read)."""
        if self.kind == "shapes":
            return Image.fromarray(self._sample(index).image)
        return load_image(self.paths[index])

    def _sample(self, index: int):
        return shape_sample(index, self.spec["seed"], self.spec["size"], self.spec.get("classes"))

    def image_and_masks(self, index: int) -> tuple[Image.Image, dict[str, np.ndarray]]:
        """:meth:`image` and :meth:`concept_masks` of image ``index``, a generated one drawn once."""
        if self.kind == "shapes":
            sample = self._sample(index)
            return Image.fromarray(sample.image), {sample.class_name: sample.mask}
        return self.image(index), self.concept_masks(index)

    def concept_masks(self, index: int) -> dict[str, np.ndarray]:
        """``{concept: bool (H, W) mask}`` of image ``index`` at the image's size; only concepts it shows."""
        if self.kind == "shapes":
            sample = self._sample(index)
            return {sample.class_name: sample.mask}
        masks = {}
        path = self.paths[index]
        beside = mask_path(path)
        if beside.is_file() and self.labels[index] >= 0:
            masks[self.classes[self.labels[index]]] = _read_binary(beside)
        if self.masks_dir is not None:
            stem = str(Path(self.keys[index]).with_suffix(""))
            for concept in self.concepts:
                candidate = self.masks_dir / concept / f"{stem}.png"
                if candidate.is_file():
                    masks[concept] = _read_binary(candidate)
        return masks

    def fingerprint(self) -> str:
        """A hash of what the source is: its kind and settings and every image's key and label.

        Folder locations are left out, so a dataset moved elsewhere is still the same data.
        """
        digest = hashlib.sha256(
            repr(sorted((k, v) for k, v in self.spec.items() if k not in ("root", "masks"))).encode()
        )
        for key, label in zip(self.keys, self.labels):
            digest.update(f"{key}\t{label}\n".encode())
        return digest.hexdigest()[:16]


def _read_binary(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as opened:
            return np.asarray(opened.convert("L")) > 0
    except OSError as err:
        raise ConvlensError(f"cannot read mask {path}: {err}") from None


def shapes_source(count: int, seed: int = 0, size: int = 64, classes: Sequence[str] | None = None) -> DataSource:
    """``count`` generated shapes images (nothing written): sample ``i`` of :func:`convlens.data.shapes_dataset`."""
    if count < 1:
        raise ConvlensError(f"the dataset is empty: ask for at least one shapes image, got {count}")
    classes = list(check_classes(classes))
    spec = {
        "kind": "shapes",
        "count": int(count),
        "seed": int(seed),
        "size": int(size),
        "classes": None if tuple(classes) == SHAPE_CLASSES else classes,
    }
    keys = [f"shapes/{seed}/{i}" for i in range(count)]
    return DataSource(spec, keys, [i % len(classes) for i in range(count)], classes, concepts=list(classes))


def _concepts(masks_dir: Path | None, paths: list[Path], classes: list[str]) -> list[str]:
    """The classes when images have masks beside them (one concept per class), then ``masks_dir``'s folders."""
    beside = list(classes) if classes and any(mask_path(p).is_file() for p in paths) else []
    folders = (
        sorted(d.name for d in masks_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        if masks_dir is not None and masks_dir.is_dir()
        else []
    )
    return beside + [name for name in folders if name not in beside]


def folder_source(
    root: str | os.PathLike, masks: str | os.PathLike | None = None, *, follow_links: bool = False
) -> DataSource:
    """A folder: class folders give labels; images directly in it (and no class folders) are unlabelled.

    Symbolic links that lead outside ``root`` are left out unless ``follow_links``
    (:func:`convlens.data.folders.walk_files`)."""
    root = Path(root)
    if not root.is_dir():
        raise ConvlensError(f"data folder not found: {root}")
    masks_dir = Path(masks) if masks is not None else root / "masks"
    skip = masks_dir.resolve() if masks_dir.is_dir() else None
    found = [
        path
        for path in walk_files(
            root,
            follow_links=follow_links,
            prune=lambda parts: skip is not None and root.joinpath(*parts).resolve() == skip,
        )
        if is_image_file(path)
    ]
    loose = [path for path in found if path.parent == root]
    folders: dict[str, list[Path]] = {}
    for path in found:
        if path.parent != root:
            folders.setdefault(path.relative_to(root).parts[0], []).append(path)
    if loose or not folders:  # a flat folder: every image below it, no labels
        paths, labels, classes = found, None, []
    else:
        classes = sorted(folders)
        paths = [p for name in classes for p in folders[name]]
        labels = [i for i, name in enumerate(classes) for _ in folders[name]]
    if not paths:
        raise ConvlensError(f"the dataset is empty: no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    keys = [p.relative_to(root).as_posix() for p in paths]
    spec: dict[str, str | bool] = {"kind": "folder", "root": str(root.resolve()), "masks": str(masks_dir.resolve())}
    if follow_links:  # only when set, so stores scanned before the option keep their fingerprint
        spec["follow_links"] = True
    return DataSource(
        spec, keys, labels or [-1] * len(paths), classes, paths, masks_dir, _concepts(masks_dir, paths, classes)
    )


def list_source(list_file: str | os.PathLike, masks: str | os.PathLike | None = None) -> DataSource:
    """A text/CSV file of image paths (relative to its folder), each optionally followed by ``,class``."""
    list_file = Path(list_file)
    base = list_file.parent
    rows = []
    with open(list_file, newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            cells = [cell.strip() for cell in row]
            if not cells or not cells[0] or cells[0].startswith("#"):
                continue
            rows.append((cells[0], cells[1] if len(cells) > 1 and cells[1] else None))
    if rows and rows[0][0].lower() in ("path", "image", "file", "filename"):
        rows = rows[1:]  # a CSV header
    if not rows:
        raise ConvlensError(f"the dataset is empty: {list_file} lists no image paths")
    paths = [(base / path) if not Path(path).is_absolute() else Path(path) for path, _ in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConvlensError(f"{len(missing)} image(s) listed in {list_file} do not exist (first: {missing[0]})")
    names = [name for _, name in rows]
    if any(name is not None for name in names) and None in names:
        raise ConvlensError(f"{list_file}: give a class for every image or for none")
    # a class for every image or for none (checked above)
    classes = sorted({name for name in names if name is not None}) if names[0] is not None else []
    labels = [classes.index(name) for name in names if name is not None] if classes else [-1] * len(rows)
    masks_dir = Path(masks) if masks is not None else base / "masks"
    spec = {"kind": "list", "root": str(list_file.resolve()), "masks": str(masks_dir.resolve())}
    return DataSource(
        spec, [path for path, _ in rows], labels, classes, paths, masks_dir, _concepts(masks_dir, paths, classes)
    )


def open_data(
    data: str | os.PathLike | DataSource | None = None,
    *,
    shapes: int | None = None,
    seed: int = 0,
    size: int = 64,
    masks: str | os.PathLike | None = None,
    follow_links: bool = False,
) -> DataSource:
    """The :class:`DataSource` for a path (folder or list file), or ``shapes`` generated images.

    Example::

        source = open_data(shapes=200, seed=3)          # no files written
        source = open_data("data/val")                  # class folders
    """
    if isinstance(data, DataSource):
        return data
    if shapes is not None:
        if data is not None:
            raise ConvlensError("give either a DATA path or --shapes N, not both")
        return shapes_source(shapes, seed, size)
    if data is None:
        raise ConvlensError("no data given: pass a folder, a list file of image paths, or --shapes N")
    path = Path(data)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return list_source(path, masks)
    if path.is_file():
        raise ConvlensError(f"{path} is neither a folder of images nor a list file ({', '.join(LIST_SUFFIXES)})")
    if not path.exists():
        raise ConvlensError(f"data not found: {path}")
    return folder_source(path, masks, follow_links=follow_links)


def from_spec(spec: dict) -> DataSource:
    """Open the source a store was scanned from again (same kind, settings and order)."""
    if spec["kind"] == "shapes":
        return shapes_source(spec["count"], spec["seed"], spec["size"], spec.get("classes"))
    if spec["kind"] == "list":
        return list_source(spec["root"], spec.get("masks"))
    return folder_source(spec["root"], spec.get("masks"), follow_links=spec.get("follow_links") in (True, "True"))
