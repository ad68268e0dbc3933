"""Network Dissection (Bau, Zhou, Khosla, Oliva & Torralba, CVPR 2017, arXiv:1704.05796).

As in the paper, for every unit ``c`` of a layer:

1. ``T_c``: the top 0.5 % quantile of the unit's activations over the whole
   dataset (every image, every position), so ``P(a_c > T_c) = 0.005``. Here it
   comes from the scan's quantile sketch: the threshold is the lower edge of
   the sketch bucket holding the 0.995-quantile, i.e. the region keeps that
   bucket and above (the sketch is accurate to 0.78 %; the paper's own code
   also estimates the quantile with a sketch).
2. For every image ``x``: the activation map ``A_c(x)`` is upsampled
   bilinearly to the mask's size (the model's input) and thresholded,
   ``L_c(x) = S_c(x) >= T_c``.
3. For every concept ``k`` with mask ``M_k(x)``: ``IoU_{c,k} = sum_x |L_c(x) & M_k(x)| /
   sum_x |L_c(x) | M_k(x)|``, the sums running over the whole dataset (an image
   without concept ``k`` has an empty ``M_k(x)``, so a unit that fires on it
   pays in the union).
4. The unit is a detector of the concept with the highest IoU when that IoU
   exceeds 0.04; a layer's *unique detectors* are the distinct concepts its
   detectors cover.

Concepts come from masks (:mod:`convlens.atlas.data`): the shapes dataset's
object mask is the concept of the image's class (one concept per class);
``masks/<concept>/<image>.png`` gives any others. Every image must have at
least one mask, since an unannotated image would count as showing nothing.

Example::

    result = cl.dissect(cl.load_model("shapes"), shapes=2000, seed=1, layers=["features.relu4"], out="dissect/")
    result.unique_detectors        # {"features.relu4": 8}
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..capture import LayerRef
from ..data.shapes import mask_path
from ..engines import Engine, resolve_engine
from ..errors import ConvlensError
from ..fileio import save_image, write_text
from ..models import Model, as_model
from ..progress import Progress
from .accumulators import MANTISSA_BITS, ConceptOverlap
from .data import DataSource, open_data
from .scan import (
    CHECKED,
    Accumulator,
    Atlas,
    Part,
    PerLayerJob,
    check_options,
    execute,
    plan_scan,
    run_scan,
    split_parts,
)
from .store import AtlasStore
from .storefile import writer_lock

QUANTILE = 0.995
MIN_IOU = 0.04
STORE_NAME = "atlas.sqlite"


@dataclass
class DissectJob(PerLayerJob):
    """The second pass: thresholded, upsampled maps against concept masks, per layer."""

    layers: list[str]
    thresholds: dict[str, np.ndarray]
    concepts: list[str]
    name: str = "dissect"
    accumulator: ClassVar[type[Accumulator]] = ConceptOverlap

    def new_state(self) -> dict[str, ConceptOverlap]:
        return {layer: ConceptOverlap(len(self.thresholds[layer]), len(self.concepts)) for layer in self.layers}

    def update(
        self,
        state: dict,
        outputs: dict[str, torch.Tensor],
        indices: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
    ) -> None:
        height, width = masks.shape[-2:]
        for layer in self.layers:
            maps = outputs[layer].float()
            threshold = torch.as_tensor(self.thresholds[layer], dtype=torch.float32, device=maps.device)
            # upsampled maps of a wide layer at full size are large: a few images at a time
            step = max(1, (1 << 25) // max(1, maps.shape[1] * height * width))
            for start in range(0, maps.shape[0], step):
                upsampled = F.interpolate(
                    maps[start : start + step], size=(height, width), mode="bilinear", align_corners=False
                )
                state[layer].update(upsampled >= threshold[None, :, None, None], masks[start : start + step])


@dataclass
class Dissection:
    """Per layer and unit: threshold, best concept, its IoU, and the label (or ``None``)."""

    atlas: Atlas
    concepts: list[str]
    thresholds: dict[str, np.ndarray]
    iou: dict[str, np.ndarray]  # layer -> (C, K)
    min_iou: float = MIN_IOU
    files: list[Path] = field(default_factory=list)

    def labels(self, layer: str) -> list[str | None]:
        """Each unit's concept when its best IoU exceeds ``min_iou``, else ``None``."""
        iou = self.iou[layer]
        best = iou.argmax(axis=1)
        return [self.concepts[b] if iou[c, b] > self.min_iou else None for c, b in enumerate(best)]

    def detectors(self, layer: str) -> list[tuple[int, str, float]]:
        """``(unit, concept, IoU)`` of every detector of ``layer``, best IoU first."""
        iou = self.iou[layer]
        found = [(c, label, float(iou[c].max())) for c, label in enumerate(self.labels(layer)) if label]
        return sorted(found, key=lambda row: (-row[2], row[0]))

    @property
    def unique_detectors(self) -> dict[str, int]:
        return {layer: len({label for label in self.labels(layer) if label}) for layer in self.iou}

    def table(self) -> list[tuple[str, int, float, str | None, float]]:
        """Rows ``(layer, unit, threshold, label, IoU)``."""
        return [
            (layer, c, float(self.thresholds[layer][c]), label, float(self.iou[layer][c].max(initial=0.0)))
            for layer in self.iou
            for c, label in enumerate(self.labels(layer))
        ]


def check_masks(source: DataSource) -> None:
    """Every image needs at least one concept mask; say which do not, in one line."""
    if not source.concepts:
        raise ConvlensError(
            "no concept masks found: dissect needs <image>.mask.png beside class-folder images or "
            f"masks/<concept>/<image>.png (looked in {source.masks_dir})"
        )
    if source.kind == "shapes":
        return
    missing = []
    masks_dir = source.masks_dir
    for index, path in enumerate(source.paths):
        stem = str(Path(source.keys[index]).with_suffix(""))
        beside = mask_path(path).is_file() and source.labels[index] >= 0
        in_folders = masks_dir is not None and any((masks_dir / c / f"{stem}.png").is_file() for c in source.concepts)
        if not beside and not in_folders:
            missing.append(source.keys[index])
    if missing:
        raise ConvlensError(
            f"{len(missing)} of {len(source)} images have no concept mask (first: {missing[0]}); "
            "dissect needs masks for every image (masks/<concept>/<image>.png)"
        )


def dissect(
    model: Model | torch.nn.Module,
    data: str | os.PathLike | DataSource | None = None,
    layers: Sequence[LayerRef] | None = None,
    *,
    out: str | os.PathLike | None = None,
    shapes: int | None = None,
    seed: int = 0,
    size: int | None = None,
    masks: str | os.PathLike | None = None,
    quantile: float = QUANTILE,
    min_iou: float = MIN_IOU,
    k: int = 16,
    batch_size: int = 64,
    workers: int = 0,
    part_size: int = 1024,
    engine: str | Engine = "local",
    ray_address: str | None = None,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    model_source: str | None = None,
    figures: bool = True,
    follow_links: bool = False,
    progress: Progress | None = None,
) -> Dissection:
    """Label the units of ``layers`` with concepts (see the module docstring); resumable with ``out``.

    Args:
        model, data, layers, shapes, seed, size, masks, k, batch_size, workers, part_size, engine,
            ray_address, concurrency, num_gpus, model_source, follow_links: as for :func:`convlens.scan`.
        out: a folder: ``atlas.sqlite`` (scan and dissection tables), ``dissection.csv``,
            ``summary.md`` and, with ``figures``, ``figures/<layer>-unit<c>.png`` per detector.
        quantile: the activation quantile that sets each unit's threshold (paper: 0.995).
        min_iou: IoU a unit's best concept must exceed for the unit to be a detector (paper: 0.04).
        progress: ``progress(done, total)`` in images over both passes (``total`` is twice the images).
    """
    model = as_model(model)
    engine = resolve_engine(engine, ray_address, concurrency, num_gpus)
    check_options(batch_size, workers, part_size, k)
    if not 0 < quantile < 1:
        raise ConvlensError(f"the quantile must be between 0 and 1, got {quantile}")
    source = open_data(
        data, shapes=shapes, seed=seed, size=size or model.input_size[0], masks=masks, follow_links=follow_links
    )
    check_masks(source)
    store_path = Path(out) / STORE_NAME if out is not None else None
    total_images = 2 * len(source)
    first_pass = (lambda done, total: progress(done, total_images)) if progress else None
    plan = plan_scan(
        model,
        source,
        layers,
        shapes=None,
        seed=seed,
        size=size,
        masks=masks,
        k=k,
        batch_size=batch_size,
        workers=workers,
        part_size=part_size,
        indices=None,
        sketch_bits=MANTISSA_BITS,
        engine=engine,
        model_source=model_source,
    )
    with writer_lock(store_path):  # both passes and the outputs: one writer of this folder at a time
        atlas = run_scan(plan, store_path, batch_size=batch_size, workers=workers, progress=first_pass)
        thresholds = {layer: stats.threshold(quantile) for layer, stats in atlas.stats.items()}
        job = DissectJob(atlas.layers, thresholds, list(source.concepts))
        total = job.new_state()
        parts = split_parts(len(source), part_size)
        store = None
        if store_path is not None:
            store = AtlasStore.create_or_resume(store_path, plan.meta, checked=CHECKED)
        second_pass = (lambda done, total: progress(len(source) + done, total_images)) if progress else None

        def commit(s: AtlasStore, state: dict, part: Part) -> None:
            s.commit_dissection(state, thresholds, job.concepts, part, min_iou)

        try:
            if store is not None:
                done = store.done_parts("dissect")
                if done:
                    with store.reading():
                        total = {layer: _stored_overlap(store, layer) for layer in atlas.layers}
                parts = [p for p in parts if p[0] not in done]
            execute(
                model,
                source,
                job,
                parts,
                total,
                store,
                batch_size=batch_size,
                workers=workers,
                engine=engine,
                progress=second_pass,
                commit=commit,
            )
        finally:
            if store is not None:
                store.close()
        result = Dissection(
            atlas, job.concepts, thresholds, {layer: total[layer].iou for layer in atlas.layers}, min_iou
        )
        if out is not None:
            result.files = write_outputs(result, Path(out), model, source, figures)
    return result


def _stored_overlap(store: AtlasStore, layer: str) -> ConceptOverlap:
    """The dissection sums of ``layer`` in a store whose dissection pass has begun; none there is a damaged store."""
    overlap = store.load_overlap(layer)
    if overlap is None:
        raise ConvlensError(
            f"the atlas store has dissection parts done but no sums for layer {layer!r}; "
            "it is damaged: delete it to start again"
        )
    return overlap


def _cell(name: str) -> str:
    """A name as one Markdown table cell: its pipes escaped, its line breaks as spaces."""
    return " ".join(name.replace("|", "\\|").splitlines())


def write_outputs(result: Dissection, out: Path, model: Model, source: DataSource, figures: bool) -> list[Path]:
    """``dissection.csv``, ``summary.md`` and one figure per detector (each written atomically)."""
    from .examples import detector_figures, unit_file_name

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")  # quotes a name holding a comma, a quote or a newline
    writer.writerow(["layer", "unit", "threshold", "label", "iou"])
    writer.writerows(
        [layer, unit, repr(threshold), label or "", f"{iou:.6f}"]
        for layer, unit, threshold, label, iou in result.table()
    )
    files = [write_text(out / "dissection.csv", table.getvalue())]
    summary = ["| layer | units | detectors | unique detectors | labels (units) |", "|---|---:|---:|---:|---|"]
    for layer in result.iou:
        found = result.detectors(layer)
        counts: dict[str, int] = {}
        for _, label, _ in found:
            counts[label] = counts.get(label, 0) + 1
        labels = ", ".join(f"{_cell(name)} ({n})" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        summary.append(
            f"| {_cell(layer)} | {len(result.thresholds[layer])} | {len(found)} | "
            f"{result.unique_detectors[layer]} | {labels or '-'} |"
        )
    files.append(write_text(out / "summary.md", "\n".join(summary) + "\n"))
    if figures:
        for layer in result.iou:
            drawn = detector_figures(
                model, source, result.atlas, layer, result.detectors(layer), result.concepts, result.thresholds[layer]
            )
            files += [
                save_image(figure, out / "figures" / unit_file_name(layer, unit)) for unit, figure in drawn.items()
            ]
    return files
