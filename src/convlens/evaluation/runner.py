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

from ..engines import Engine, resolve_engine
from ..errors import ConvlensError, did_you_mean
from ..fileio import check_output_dir, write_text
from ..heatmaps import METHODS
from ..images import ImageLike, load_image
from ..metrics import METRICS
from ..metrics.base import ExplainFn, as_batch, as_model, as_targets, heatmap_explainer
from ..metrics.faithfulness import Curve
from ..metrics.stats import MeanCI, mean_ci
from ..models import Model
from ..models.transforms import mask_for_model
from ..progress import Progress
from .inputs import choose_images, find_mask, list_images, sample_images
from .resume import Journal, check_settings, clear_run, run_fingerprint, run_id
from .summary import write_summary

#: Explainers by method name, consulted before ``convlens.METHODS``: register your own here.
EXPLAINERS: dict[str, ExplainFn] = {}


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


@dataclass
class Evaluation:
    """What :func:`evaluate` wrote: the rows, the summary and the files."""

    rows: list[dict]
    summary: dict[str, dict[str, MeanCI]]  # method -> metric -> mean with CI
    out_dir: Path
    files: list[Path]
    sample: str = ""  # how the images were sampled (--limit), empty when all were used


def evaluate(
    model,
    data,
    *,
    methods: Sequence[str] | Mapping[str, ExplainFn],
    metrics: Sequence[str],
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    find_mask: Callable[[Path], np.ndarray | None] = find_mask,
    progress: Progress | None = None,
    restart: bool = False,
    targets=None,
    engine: str | Engine = "local",
    ray_address: str | None = None,
    concurrency: int | None = None,
    num_gpus: float | None = None,
) -> Evaluation:
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
        engine: ``"local"`` or ``"ray"`` (with ``ray_address``, ``concurrency``, ``num_gpus``; the pairs are
            scored on Ray actors, :mod:`convlens.evaluation.ray`), or an engine from :mod:`convlens.engines`.

    Example::

        evaluate(model, "shapes/", methods=["gradcam", "scorecam"], metrics=["deletion", "pointing"],
                 out_dir="eval/")
    """
    options = {
        "methods": methods,
        "metrics": metrics,
        "out_dir": out_dir,
        "batch_size": batch_size,
        "limit": limit,
        "seed": seed,
        "find_mask": find_mask,
        "restart": restart,
        "targets": targets,
    }
    engine = resolve_engine(engine, ray_address, concurrency, num_gpus)
    if engine.distributed:  # a Literal tag: type checkers know the engine is then a RayEngine
        from .ray import evaluate_ray

        return evaluate_ray(model, data, progress=progress, engine=engine, **options)
    plan = plan_evaluation(model, data, **options)
    for path, methods_left in plan.todo:
        for record in score_image(
            plan.model,
            load_image(path),
            plan.masks[path],
            {name: plan.explainers[name] for name in methods_left},
            plan.metrics,
            name=plan.keys[path],
            batch_size=plan.batch_size,
            targets=plan.target,
        ):
            plan.record(record, progress)
        _write_table(plan.out_dir, plan.journal.records, plan.metrics)
    return finish_evaluation(plan)


@dataclass
class EvaluationPlan:
    """A checked run of :func:`evaluate` and its resume state, before any pair is scored.

    ``todo`` is the work the journal lacks, image by image: ``(image path, methods still to score)``;
    ``finished`` counts the pairs done, the journal's and those :meth:`record` adds. Any engine
    scores ``todo`` its own way, records each pair, and calls :func:`finish_evaluation`."""

    model: Model
    root: Path
    images: list[Path]
    keys: dict[Path, str]  # an image's name in the journal and the table: its path under the data folder
    masks: dict[Path, np.ndarray | None]
    explainers: dict[str, ExplainFn]
    metrics: list[str]
    target: object  # prepared once (:func:`prepare_target`); ``None``: each image's top class
    batch_size: int
    out_dir: Path
    journal: Journal
    sample: str
    todo: list[tuple[Path, list[str]]]
    finished: int

    @property
    def total(self) -> int:
        return len(self.images) * len(self.explainers)

    def record(self, record: dict, progress: Progress | None = None) -> None:
        """One scored pair into the journal, at once (it is the run's memory), then ``progress(done, total)``."""
        self.journal.append(record)
        self.finished += 1
        if progress is not None:
            progress(self.finished, self.total)


def plan_evaluation(
    model,
    data,
    *,
    methods: Sequence[str] | Mapping[str, ExplainFn],
    metrics: Sequence[str],
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    find_mask: Callable[[Path], np.ndarray | None] = find_mask,
    restart: bool = False,
    targets=None,
) -> EvaluationPlan:
    """Every check of :func:`evaluate` (same arguments), then ``out_dir`` tied to the run's fingerprint and the
    journal read: what is left to score. Nothing is scored."""
    check_output_dir(out_dir, option="out_dir")
    model = as_model(model)
    _check_metrics(metrics)
    explainers = resolve_methods(methods)
    root = Path(data)
    images, sample = choose_images(root, limit, seed)
    keys = {path: _key(root, path) for path in images}
    masks = {path: find_mask(path) for path in images}
    if any(METRICS[m].needs_masks for m in metrics) and all(mask is None for mask in masks.values()):
        raise ConvlensError(
            f"no masks found for the images in {root} (expected <name>.mask.png beside each "
            "image or a masks/ folder); drop the localisation metrics or add masks"
        )
    fingerprint = run_fingerprint(
        model,
        list(explainers),
        metrics,
        [(keys[p], p) for p in images],
        [masks[p] for p in images],
        limit,
        seed,
        targets,
    )
    target = prepare_target(model, targets)
    if target is not None:  # a target the model cannot serve is one line now, before run.json ties the folder to it
        _settle(model, model.preprocess([load_image(images[0])]), target, keys[images[0]])
    journal = _open_journal(Path(out_dir), fingerprint, restart)
    done = journal.done()
    todo = [(path, [m for m in explainers if (keys[path], m) not in done]) for path in images]
    finished = sum((keys[p], m) in done for p in images for m in explainers)
    return EvaluationPlan(
        model,
        root,
        images,
        keys,
        masks,
        explainers,
        list(metrics),
        target,
        batch_size,
        Path(out_dir),
        journal,
        sample,
        [(path, left) for path, left in todo if left],
        finished,
    )


def _open_journal(out_dir: Path, fingerprint: dict, restart: bool) -> Journal:
    """The run's journal in ``out_dir`` (emptied first on ``restart``); one warning for what was lost."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if restart:
        clear_run(out_dir)
    settings_intact = check_settings(out_dir, fingerprint)
    journal = Journal(out_dir / "journal.jsonl", run_id(fingerprint))
    lost = [f"{journal.dropped} damaged journal line(s)"] if journal.dropped else []
    lost += [f"{journal.foreign} line(s) of another run"] if journal.foreign else []
    if not settings_intact or lost:  # stacklevel: the caller of evaluate (or of the Ray engine's evaluate)
        warnings.warn(
            f"{out_dir}: "
            + ("run.json was damaged and is rewritten; " if not settings_intact else "")
            + (f"dropped {' and '.join(lost)}, to be recomputed; " if lost else "")
            + f"kept {len(journal.records)} finished (image, method) pair(s)",
            UserWarning,
            stacklevel=4,
        )
    return journal


def finish_evaluation(plan: EvaluationPlan) -> Evaluation:
    """The table, summaries and plots of a planned run from its journal, once ``plan.todo`` is scored."""
    keys = set(plan.keys.values())
    methods = list(plan.explainers)
    rows = [r for r in _latest(plan.journal.records) if r["method"] in methods and r["image"] in keys]
    summary = summarize_rows(rows, methods, plan.metrics)
    files = [_write_table(plan.out_dir, plan.journal.records, plan.metrics)]
    files += write_summary(plan.out_dir, summary, {m: METRICS[m] for m in plan.metrics}, rows, len(keys), plan.sample)
    return Evaluation(rows, summary, plan.out_dir, files, plan.sample)


def evaluate_images(
    model,
    images: Sequence[tuple[str, ImageLike, np.ndarray | None]],
    *,
    methods: Sequence[str] | Mapping[str, ExplainFn],
    metrics: Sequence[str],
    batch_size: int = 64,
    progress: Progress | None = None,
    targets=None,
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
        for record in score_image(
            model, load_image(image), mask, explainers, metrics, name=name, batch_size=batch_size, targets=target
        ):
            rows.append(record)
            if progress is not None:
                progress(len(rows), total)
    return rows, summarize_rows(rows, list(explainers), metrics)


def score_image(
    model: Model,
    picture: Image.Image,
    mask: np.ndarray | None,
    explainers: Mapping[str, ExplainFn],
    metrics: Sequence[str],
    *,
    name: str,
    batch_size: int = 64,
    targets=None,
) -> Iterator[dict]:
    """Explain one image (for ``targets``: by default the model's top class) with each method and score the
    maps; one record per method."""
    x = model.preprocess([picture])
    targets = _settle(model, x, targets, name)
    truth = None if mask is None else mask_for_model(model, mask, picture.size)
    for method, explain_fn in explainers.items():
        maps = explain_fn(model, x, targets)  # a tensor or an Explanation: both are accepted
        record: dict[str, Any] = {
            "image": name,
            "method": method,
            "target": int(targets[0]),
            "values": {},
            "curves": {},
        }
        for metric_name in metrics:
            metric = METRICS[metric_name]
            if metric.needs_masks and truth is None:
                record["values"][metric_name] = None
                continue
            result = metric.compute(model, x, maps, targets, truth, batch_size)
            if isinstance(result, Curve):
                record["curves"][metric_name] = {
                    "fractions": result.fractions.tolist(),
                    "scores": result.scores[0].tolist(),
                }
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
    return {
        method: {name: mean_ci(r["values"].get(name) for r in rows if r["method"] == method) for name in metrics}
        for method in methods
    }


def _check_metrics(metrics: Sequence[str]) -> None:
    for name in metrics:
        if name not in METRICS:
            raise ConvlensError(
                f"unknown metric {name!r}{did_you_mean(name, METRICS)}; choose from {', '.join(METRICS)}"
            )
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
        writer.writerow(
            [
                r["image"],
                r["method"],
                r["target"],
                *("" if r["values"].get(m) is None else repr(r["values"][m]) for m in metrics),
            ]
        )
    return write_text(out_dir / "results.csv", buffer.getvalue())


__all__ = [
    "EXPLAINERS",
    "Evaluation",
    "EvaluationPlan",
    "evaluate",
    "evaluate_images",
    "find_mask",
    "finish_evaluation",
    "list_images",
    "plan_evaluation",
    "prepare_target",
    "sample_images",
    "score_image",
    "summarize_rows",
]
