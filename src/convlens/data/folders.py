"""Reading a folder of images in class-folder layout, and splitting it for training.

Layout: ``DATA/<class>/*.png`` (any depth below the class folder; PNG, JPEG,
BMP, GIF, TIFF, WebP). Class names are the folder names, sorted. Files ending
in ``.mask.png`` are ground-truth masks (see :mod:`convlens.data.shapes`) and
are never read as images. When ``DATA`` holds a ``train`` folder of class
folders, that is the training set, and a ``val`` (or ``valid``/``validation``)
folder beside it, if any, is the validation set.

Unreadable images are skipped with a warning that gives their count; an empty
folder, or one with fewer than two classes of readable images, is an error.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from ..errors import ConvlensError, ConvlensWarning
from ..images import load_image
from ..progress import Progress
from .shapes import is_mask_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VALIDATION_NAMES = ("val", "valid", "validation")


@dataclass
class LabelledImages:
    """Images in memory: ``images`` uint8 ``(N, 3, H, W)``, ``labels`` int64 ``(N,)``, ``classes`` by index."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[Path] | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledImages:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        paths = [self.paths[i] for i in index.tolist()] if self.paths is not None else None
        return LabelledImages(self.images[index], self.labels[index], self.classes, paths)

    @classmethod
    def from_dataset(cls, dataset, classes: Sequence[str], size: int | None = None) -> LabelledImages:
        """Materialise a torch dataset of ``(image (3, H, W) in [0, 1] or uint8, label)`` pairs."""
        images, labels = [], []
        for index in range(len(dataset)):
            image, label = dataset[index]
            image = torch.as_tensor(image)
            if image.is_floating_point():
                image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
            if size is not None and tuple(image.shape[-2:]) != (size, size):
                image = v2.functional.resize(image, [size, size], antialias=True)
            images.append(image)
            labels.append(int(label))
        if not images:
            raise ConvlensError("the dataset is empty; a classifier needs images of at least two classes")
        return cls(torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(classes))


def resolve_data_dirs(root: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(training folder, validation folder or None)`` for a data folder (see the module docstring)."""
    root = Path(root)
    if not root.exists():
        raise ConvlensError(f"data folder not found: {root}")
    if not root.is_dir():
        raise ConvlensError(f"{root} is not a folder; pass a folder with one subfolder of images per class")
    train = root / "train"
    if train.is_dir() and any(child.is_dir() for child in train.iterdir()):
        for name in VALIDATION_NAMES:
            if (root / name).is_dir():
                return train, root / name
        return train, None
    return root, None


def walk_files(
    root: str | os.PathLike, *, follow_links: bool = False, prune: Callable[[tuple[str, ...]], bool] | None = None
) -> list[Path]:
    """Every file under ``root`` (hidden files and folders left out), sorted, without reading any.

    A symbolic link whose target lies outside ``root`` is left out unless ``follow_links``
    (one warning gives their count); a link to a file inside is read; a link to a folder
    is walked only with ``follow_links``. A link that leads back into a folder being walked
    (a loop) is a one-line error. ``prune(relative parts)`` leaves a folder out.
    """
    root = Path(root)
    inside = root.resolve()
    files: list[Path] = []
    outside: list[Path] = []

    def loop(path: Path) -> ConvlensError:
        return ConvlensError(
            f"symlink loop: {path} leads back into a folder it is in; remove the link (or the loop) and run again"
        )

    def visit(folder: Path, relative: tuple[str, ...], seen: frozenset) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            raise ConvlensError(f"cannot list the folder {folder}: {err.strerror}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path, parts = folder / entry.name, (*relative, entry.name)
            if entry.is_symlink():
                try:
                    target = Path(os.path.realpath(path, strict=True))
                except OSError as err:
                    if err.errno == errno.ELOOP:
                        raise loop(path) from None
                    continue  # a dangling link: nothing to read
                if not follow_links and not target.is_relative_to(inside):
                    outside.append(path)
                elif target.is_dir():
                    if follow_links and not (prune and prune(parts)):
                        key = _identity(target)
                        if key in seen:
                            raise loop(path)
                        visit(path, parts, seen | {key})
                else:
                    files.append(path)
            elif entry.is_dir(follow_symlinks=False):
                if not (prune and prune(parts)):
                    visit(path, parts, seen | {_identity(path)})
            elif entry.is_file(follow_symlinks=False):
                files.append(path)

    if not root.is_dir():
        raise ConvlensError(f"data folder not found: {root}")
    visit(root, (), frozenset({_identity(root)}))
    if outside:
        warnings.warn(
            f"left out {len(outside)} symlink(s) under {root} that lead outside it (first: {outside[0]}); "
            "to read them, pass --follow-links (scan, dissect) or follow_links=True",
            ConvlensWarning,
            stacklevel=3,
        )
    return sorted(files)


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def is_image_file(path: Path) -> bool:
    """An image by its name: an image suffix and not a mask (``*.mask.png``)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not is_mask_file(path)


def image_files(folder: str | os.PathLike, *, follow_links: bool = False) -> list[Path]:
    """The image files under ``folder``, recursively and sorted: the one image lister of convlens.

    Masks (``*.mask.png`` and anything inside a ``masks/`` folder) and hidden files and folders are
    left out; symbolic links as :func:`walk_files` says.
    """
    return [
        path
        for path in walk_files(folder, follow_links=follow_links, prune=lambda parts: parts[-1] == "masks")
        if is_image_file(path)
    ]


def scan_class_folders(
    root: str | os.PathLike, classes: Sequence[str] | None = None, *, follow_links: bool = False
) -> tuple[list[Path], list[int], list[str]]:
    """``(paths, labels, class names)`` of a class-folder tree, without reading the images.

    ``classes`` fixes the class names and their order (a validation folder must
    use the training folder's classes).
    """
    root = Path(root)
    if not root.is_dir():
        raise ConvlensError(f"data folder not found: {root}")
    found = walk_files(root, follow_links=follow_links, prune=lambda parts: len(parts) > 1 and parts[-1] == "masks")
    folders: dict[str, list[Path]] = {}
    for path in found:
        parts = path.relative_to(root).parts
        if len(parts) > 1 and is_image_file(path):
            folders.setdefault(parts[0], []).append(path)
    folders = dict(sorted(folders.items()))
    if classes is None:
        if not folders:
            loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            hint = "it holds images but no class folders; " if loose else ""
            raise ConvlensError(
                f"no images found in class folders under {root}: {hint}"
                "put each class's images in its own subfolder (DATA/<class>/*.png)"
            )
        if len(folders) < 2:
            raise ConvlensError(
                f"{root} holds only one class ({next(iter(folders))!r}); "
                "a classifier needs at least two class folders with images"
            )
        classes = list(folders)
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise ConvlensError(f"{root} has class folder {unknown[0]!r}, which the training data does not have")
    paths, labels = [], []
    for index, name in enumerate(classes):
        paths += folders.get(name, [])
        labels += [index] * len(folders.get(name, []))
    if not paths:
        raise ConvlensError(f"no images found in class folders under {root}")
    return paths, labels, list(classes)


def load_class_folders(
    root: str | os.PathLike,
    size: int,
    classes: Sequence[str] | None = None,
    progress: Progress | None = None,
    *,
    follow_links: bool = False,
) -> LabelledImages:
    """Read every image of a class-folder tree, resized to ``size`` x ``size``, into memory.

    The resize is the one :func:`convlens.models.transforms.plain_transform`
    applies at prediction time, so a trained model sees the same pixels then.
    Unreadable images are skipped with one warning giving their count.
    """
    paths, labels, classes = scan_class_folders(root, classes, follow_links=follow_links)
    resize = v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True)])
    images, kept_paths, kept_labels, skipped = [], [], [], []
    for done, (path, label) in enumerate(zip(paths, labels), 1):
        try:
            images.append(resize(load_image(path)))
        except ConvlensError:
            skipped.append(path)
        else:
            kept_paths.append(path)
            kept_labels.append(label)
        if progress is not None:
            progress(done, len(paths))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) under {root} (first: {skipped[0]})", stacklevel=2)
    return LabelledImages(
        torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8),
        torch.tensor(kept_labels, dtype=torch.int64),
        classes,
        kept_paths,
        len(skipped),
    )


def check_trainable(data: LabelledImages, where: str) -> None:
    """A training set needs readable images of at least two classes."""
    present = sorted(set(data.labels.tolist()))
    if not present:
        raise ConvlensError(f"no readable images in {where}")
    if len(present) < 2:
        raise ConvlensError(
            f"{where} has readable images of only one class ({data.classes[present[0]]!r}); "
            "a classifier needs at least two"
        )


def stratified_split(
    labels: Sequence[int] | torch.Tensor, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(train indices, validation indices)`` with each class split in the same proportion.

    Each class with at least two images puts ``round(n * val_fraction)`` of them
    (at least one) into validation, chosen by ``numpy.random.default_rng(seed)``.
    """
    if not 0 < val_fraction < 1:
        raise ConvlensError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    label_array = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(label_array):
        members = rng.permutation(np.flatnonzero(label_array == label))
        take = min(len(members) - 1, max(1, int(round(len(members) * val_fraction)))) if len(members) > 1 else 0
        val.append(members[:take])
        train.append(members[take:])
    train_idx, val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    if val_idx.size == 0:
        raise ConvlensError("too few images for a validation split: give each class at least two images")
    return train_idx, val_idx
