"""``evaluate``: every heatmap method on every image of a folder, scored by every chosen metric.

Outputs in ``out_dir``:

* ``journal.jsonl``: one line per finished (image, method) pair, appended and
  flushed to disk as soon as the pair is done. It is the run's memory: a run
  started again on the same ``out_dir`` skips the pairs it finds there, so an
  interrupted run continues where it stopped. Damaged lines (half-written when
  the process was killed, garbled, NUL bytes left by a crash) are dropped with
  a warning that counts them, and their pairs are recomputed.
* ``results.csv``: one row per (image, method), rewritten atomically (temporary
  file, then rename) after each image, so it is always a complete table.
* ``summary.md`` and ``summary.html``: per method and metric, the mean with its
  95 % t-interval and the number of images.
* ``deletion.png`` / ``insertion.png``: the mean curve of each method.
* ``run.json``: the run's fingerprint (:func:`~convlens.evaluation.resume.run_fingerprint`): the model's
  weights and preprocessing, the methods, the metrics, the images (names,
  sizes, modification times, masks) and the options. Resuming with anything
  different is refused with a line saying what differs; ``restart=True``
  (``--restart``) discards the old run instead. Every journal line carries the
  fingerprint's digest, so a damaged ``run.json`` is rewritten and only the
  lines of this very run are kept.

Each image is explained for the model's top class, or for ``targets`` (one for every image: a class,
or a :class:`~convlens.targets.Region`, :class:`~convlens.targets.Box` or :class:`~convlens.targets.Similarity`,
settled on each clean image and scored on its perturbed copies by :class:`~convlens.metrics.base.TargetRows`;
the target is part of the run's fingerprint). Ground-truth masks for the
localisation metrics come from ``find_mask(image_path)`` (:func:`find_mask` by
default); an image without a mask gets NaN for those metrics.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.folders import IMAGE_SUFFIXES, image_files
from ..data.shapes import load_mask, mask_path
from ..errors import ConvlensError, did_you_mean
from ..fileio import check_output_dir, write_text
from ..images import ImageLike, load_image
from ..heatmaps import METHODS
from ..metrics import METRICS
from ..metrics.base import ExplainFn, as_batch, as_model, as_targets, heatmap_explainer
from ..metrics.faithfulness import Curve
from ..metrics.stats import MeanCI, mean_ci
from ..models import Model
from .resume import Journal, check_settings, clear_run, run_fingerprint, run_id
from .summary import write_summary

#: Explainers by method name, consulted before ``convlens.METHODS``: register your own here.
EXPLAINERS: dict[str, ExplainFn] = {}

Progress = Callable[[int, int], None]


def find_mask(image_path: Path) -> np.ndarray | None:
    """The object mask of an image, bool ``(H, W)``, or ``None``.

    Looks, in this order, for ``<stem>.mask.png`` beside the image, then
    ``masks/<stem>.png`` in the image's folder, then ``../masks/<stem>.png`` (a
    ``masks/`` folder next to an ``images/`` folder), read by :func:`convlens.data.shapes.load_mask`.
    """
    image_path = Path(image_path)
    stem = image_path.name[: -len(image_path.suffix)] if image_path.suffix else image_path.name
    for candidate in (mask_path(image_path), image_path.parent / "masks" / f"{stem}.png",
                      image_path.parent.parent / "masks" / f"{stem}.png"):
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


def sample_images(images: Sequence[Path], root: str | os.PathLike, limit: int | None,
                  seed: int = 0) -> list[Path]:
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
    chosen, turn = [], 0
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
    return (f"a sample of {len(images)} of {available} images, stratified by class folder "
            f"({len(counts)} class{'es' if len(counts) != 1 else ''}: {each}), seed {seed}")


def _class_of(root: Path, path: Path) -> str:
    return path.parent.relative_to(root).as_posix() if root.is_dir() else "."


def resolve_methods(methods: Sequence[str] | Mapping[str, ExplainFn]) -> dict[str, ExplainFn]:
    """Method names -> explain functions: :data:`EXPLAINERS` first, then ``convlens.METHODS``."""
    if isinstance(methods, Mapping):
        return dict(methods)
    engine = sorted(METHODS)
    resolved = {}
    for name in methods:
        if name in EXPLAINERS:
            resolved[name] = EXPLAINERS[name]
        elif name in engine:
            resolved[name] = heatmap_explainer(name)
        else:
            known = list(EXPLAINERS) + engine
            hint = "" if engine else " (the heatmap engine convlens.explain is not in this build)"
            raise ConvlensError(f"unknown method {name!r}{did_you_mean(name, known)}{hint}")
    if not resolved:
        raise ConvlensError("no methods given; pass at least one, e.g. gradcam")
    return resolved


def mask_for_model(model: Model, mask: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
    """A mask put through the model's own resize/crop, bool ``(1, H, W)`` at the input resolution.

    The mask is drawn as a white-on-black image, transformed like a photo, and
    thresholded halfway between what black and white become.
    """
    picture = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
    if picture.size != image_size:
        picture = picture.resize(image_size, Image.Resampling.NEAREST)
    black = model.transform(Image.new("RGB", picture.size, (0, 0, 0)))[0]
    white = model.transform(Image.new("RGB", picture.size, (255, 255, 255)))[0]
    drawn = model.transform(picture)[0]
    return ((drawn - black) / (white - black) > 0.5).unsqueeze(0)


@dataclass
class Evaluation:
    """What :func:`evaluate` wrote: the rows, the summary and the files."""

    rows: list[dict]
    summary: dict[str, dict[str, MeanCI]]  # method -> metric -> mean with CI
    out_dir: Path
    files: list[Path]
    sample: str = ""  # how the images were sampled (--limit), empty when all were used


def evaluate(model, data, *, methods: Sequence[str] | Mapping[str, ExplainFn], metrics: Sequence[str],
             out_dir: str | os.PathLike, batch_size: int = 64, limit: int | None = None, seed: int = 0,
             find_mask: Callable[[Path], np.ndarray | None] = find_mask,
             progress: Progress | None = None, restart: bool = False, targets=None) -> Evaluation:
    """Score every method's heatmaps on every image of ``data`` with every metric; resumable.

    Args:
        model: a :class:`convlens.Model` (or ``nn.Module``).
        data: a folder of images (masks beside them, see :func:`find_mask`) or one image.
        methods: method names (:data:`EXPLAINERS`, then ``convlens.METHODS``) or a
            mapping ``name -> explain_fn(model, x, targets) -> maps (N, H, W)``.
        metrics: names from :data:`convlens.metrics.METRICS`.
        out_dir: where the journal, table, summaries and plots go (see the module docstring).
        batch_size: perturbed images per forward pass.
        limit: only ``limit`` images, sampled evenly across class folders (:func:`sample_images`);
            ``summary.md`` says so.
        seed: the seed of that sample (the same seed, the same images).
        progress: ``progress(done, total)`` after each (image, method) pair.
        restart: discard what ``out_dir`` holds from an earlier run (its journal,
            table, summaries, plots) and start over, instead of continuing it.
            Without it, an ``out_dir`` made with other settings is refused.
        targets: what each image is explained and scored for: ``None`` (its top class; a segmenter's
            winning region, a detector's top box), a class index or name, or a ``Region``, ``Box`` or
            ``Similarity`` (see the module docstring). It is tried on the first image before anything is written.

    Example::

        evaluate(model, "shapes/", methods=["gradcam", "scorecam"], metrics=["deletion", "pointing"],
                 out_dir="eval/")
    """

    check_output_dir(out_dir, option="out_dir")
    model = as_model(model)
    _check_metrics(metrics)
    explainers = resolve_methods(methods)
    if limit is not None and limit < 1:
        raise ConvlensError(f"--limit must be at least 1, got {limit}")
    root = Path(data)
    available = list_images(root)
    images = sample_images(available, root, limit, seed)
    sample = describe_sample(images, root, len(available), seed) if len(images) < len(available) else ""
    masks = {path: find_mask(path) for path in images}
    if any(METRICS[m].needs_masks for m in metrics) and all(mask is None for mask in masks.values()):
        raise ConvlensError(f"no masks found for the images in {root} (expected <name>.mask.png beside each "
                            "image or a masks/ folder); drop the localisation metrics or add masks")
    fingerprint = run_fingerprint(model, list(explainers), metrics, [(_key(root, p), p) for p in images],
                                  [masks[p] for p in images], limit, seed, targets)
    target = prepare_target(model, targets)
    if target is not None:  # a target the model cannot serve is one line now, before run.json ties the folder to it
        _settle(model, model.preprocess([load_image(images[0])]), target, _key(root, images[0]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if restart:
        clear_run(out_dir)
    settings_intact = check_settings(out_dir, fingerprint)
    journal = Journal(out_dir / "journal.jsonl", run_id(fingerprint))
    lost = [f"{journal.dropped} damaged journal line(s)"] if journal.dropped else []
    lost += [f"{journal.foreign} line(s) of another run"] if journal.foreign else []
    if not settings_intact or lost:
        warnings.warn(f"{out_dir}: " + ("run.json was damaged and is rewritten; " if not settings_intact else "")
                      + (f"dropped {' and '.join(lost)}, to be recomputed; " if lost else "")
                      + f"kept {len(journal.records)} finished (image, method) pair(s)", UserWarning, stacklevel=2)
    done, total = journal.done(), len(images) * len(explainers)
    finished = sum((_key(root, p), m) in done for p in images for m in explainers)
    for path in images:
        key = _key(root, path)
        todo = {m: fn for m, fn in explainers.items() if (key, m) not in done}
        if not todo:
            continue
        for record in score_image(model, load_image(path), masks[path], todo, metrics, name=key,
                                  batch_size=batch_size, targets=target):
            journal.append(record)
            finished += 1
            if progress is not None:
                progress(finished, total)
        _write_table(out_dir, journal.records, metrics)
    return _finish(out_dir, journal.records, metrics, list(explainers), images, root, sample)


def evaluate_images(model, images: Sequence[tuple[str, ImageLike, np.ndarray | None]], *,
                    methods: Sequence[str] | Mapping[str, ExplainFn], metrics: Sequence[str],
                    batch_size: int = 64, progress: Progress | None = None, targets=None
                    ) -> tuple[list[dict], dict[str, dict[str, MeanCI]]]:
    """:func:`evaluate` in memory, for the report: ``(name, image, mask or None)`` triples in,
    ``(rows, summary)`` out, nothing written. Rows hold ``values`` and ``curves`` per (image, method),
    image by image; ``progress(done, total)`` is called after each of them."""
    model = as_model(model)
    _check_metrics(metrics)
    explainers = resolve_methods(methods)
    target = prepare_target(model, targets)
    rows, total = [], len(images) * len(explainers)
    for name, image, mask in images:
        for record in score_image(model, load_image(image), mask, explainers, metrics, name=name,
                                  batch_size=batch_size, targets=target):
            rows.append(record)
            if progress is not None:
                progress(len(rows), total)
    return rows, summarize_rows(rows, list(explainers), metrics)


def score_image(model: Model, picture: Image.Image, mask: np.ndarray | None, explainers: Mapping[str, ExplainFn],
                metrics: Sequence[str], *, name: str, batch_size: int = 64, targets=None) -> Iterator[dict]:
    """Explain one image (for ``targets``: by default the model's top class) with each method and score the
    maps; one record per method."""

    x = model.preprocess([picture])
    targets = _settle(model, x, targets, name)
    truth = None if mask is None else mask_for_model(model, mask, picture.size)
    for method, explain_fn in explainers.items():
        maps = explain_fn(model, x, targets)  # a tensor or an Explanation: both are accepted
        record: dict[str, Any] = {"image": name, "method": method, "target": int(targets[0]), "values": {},
                                  "curves": {}}
        for metric_name in metrics:
            metric = METRICS[metric_name]
            if metric.needs_masks and truth is None:
                record["values"][metric_name] = None
                continue
            result = metric.compute(model, x, maps, targets, truth, batch_size)
            if isinstance(result, Curve):
                record["curves"][metric_name] = {"fractions": result.fractions.tolist(),
                                                 "scores": result.scores[0].tolist()}
                result = result.auc
            value = float(result[0])
            record["values"][metric_name] = None if np.isnan(value) else value
        yield record


def prepare_target(model: Model, targets):
    """The target with a similarity's reference image embedded once, not again for every image."""
    prepare = getattr(targets, "prepare", None)
    return targets if prepare is None else prepare(model, model.select)


def _settle(model: Model, x: torch.Tensor, targets, name: str):
    """The target settled on one image's clean pass; what it cannot serve there is one line naming the image."""
    try:
        return as_targets(model, as_batch(model, x), targets)
    except ConvlensError as err:
        raise ConvlensError(f"{name}: {err}") from None


def summarize_rows(rows: list[dict], methods: Sequence[str], metrics: Sequence[str]) -> dict[str, dict[str, MeanCI]]:
    """Mean and 95 % CI per method and metric over the rows (missing values skipped)."""
    return {method: {name: mean_ci(r["values"].get(name) for r in rows if r["method"] == method)
                     for name in metrics} for method in methods}


def _check_metrics(metrics: Sequence[str]) -> None:

    for name in metrics:
        if name not in METRICS:
            raise ConvlensError(f"unknown metric {name!r}{did_you_mean(name, METRICS)}; "
                                f"choose from {', '.join(METRICS)}")
    if not metrics:
        raise ConvlensError("no metrics given; pass at least one, e.g. deletion")


def _key(root: Path, path: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def _latest(records: list[dict]) -> list[dict]:
    latest = {(r["image"], r["method"]): r for r in records}
    return list(latest.values())


def _write_table(out_dir: Path, records: list[dict], metrics: Sequence[str]) -> Path:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "method", "target", *metrics])
    for r in sorted(_latest(records), key=lambda r: (r["image"], r["method"])):
        writer.writerow([r["image"], r["method"], r["target"],
                         *("" if r["values"].get(m) is None else repr(r["values"][m]) for m in metrics)])
    return write_text(out_dir / "results.csv", buffer.getvalue())


def _finish(out_dir, records, metrics, methods, images, root, sample: str = "") -> Evaluation:

    keys = {_key(root, p) for p in images}
    rows = [r for r in _latest(records) if r["method"] in methods and r["image"] in keys]
    summary = summarize_rows(rows, methods, metrics)
    files = [_write_table(out_dir, records, metrics)]
    files += write_summary(out_dir, summary, {m: METRICS[m] for m in metrics}, rows, len(keys), sample)
    return Evaluation(rows, summary, out_dir, files, sample)


__all__ = ["EXPLAINERS", "Evaluation", "evaluate", "evaluate_images", "find_mask", "list_images", "mask_for_model",
           "prepare_target", "sample_images", "score_image", "summarize_rows"]
