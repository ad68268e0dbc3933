"""``scan``: one streamed pass of a dataset through a model, keeping mergeable statistics per channel.

The images are read (or generated) by a torch ``DataLoader`` with ``workers``
processes, in batches of ``batch_size``, and each batch goes through the model
inside ``capture(model, layers, stop=True)``: the forward pass ends after the
last requested layer, so nothing after it ever runs. Each layer's maps update a
:class:`~convlens.atlas.accumulators.LayerStats` (top-k images with the position
of their maximum, mean/std/max/fraction positive, a quantile sketch, per-class
means and class selectivity).

The dataset is cut into *parts* of ``part_size`` images. With ``out`` given,
each finished part is merged into the running totals and committed to the
SQLite store in one transaction (:mod:`convlens.atlas.store`); a scan started
again on the same store skips the committed parts, so an interrupted scan
resumes from its last committed part. ``engine="ray"`` (:mod:`convlens.engines`) runs the parts on Ray
Data actors (:mod:`convlens.atlas.ray_engine`) and merges them the same way.

Example::

    import convlens as cl
    atlas = cl.scan(cl.load_model("shapes"), shapes=200, layers=["features.relu3"], k=8)
    atlas.stats["features.relu3"].top_image[5]      # the 8 images where unit 5 fires most
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import numpy as np
import torch

from ..capture import LayerRef, capture, resolve_layers
from ..engines import Engine, resolve_engine
from ..errors import ConvlensError, ConvlensWarning, first_line
from ..models import Model, as_model
from ..models.transforms import mask_at_input
from ..progress import Progress
from .accumulators import MANTISSA_BITS, LayerStats, SketchGrid
from .data import DataSource, from_spec, open_data
from .store import AtlasStore, model_fingerprint
from .storefile import writer_lock

Part = tuple[int, int, int]  # (part number, first image, stop image)


# -- jobs: what a pass computes per batch ------------------------------------------------


class Accumulator(Protocol):
    """The class of a per-layer job's accumulator, as a job uses it: one reads its stored arrays back."""

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Self: ...


class PerLayerJob:
    """A pass whose state is one mergeable accumulator per layer: merging and storing it is the same for all."""

    accumulator: ClassVar[type[Accumulator]]
    layers: list[str]

    @staticmethod
    def merge(total: dict, partial: dict) -> dict:
        for layer, accumulated in partial.items():
            total[layer].merge(accumulated)
        return total

    @staticmethod
    def to_arrays(state: dict) -> dict[str, np.ndarray]:
        return {
            f"{layer}/{name}": array
            for layer, accumulated in state.items()
            for name, array in accumulated.to_arrays().items()
        }

    def from_arrays(self, arrays: dict[str, np.ndarray]) -> dict:
        return {
            layer: self.accumulator.from_arrays(
                {name.split("/", 1)[1]: array for name, array in arrays.items() if name.split("/", 1)[0] == layer}
            )
            for layer in self.layers
        }


@dataclass
class ScanJob(PerLayerJob):
    """The scan's per-layer statistics; ``shapes`` maps each layer to its ``(C, h, w)``."""

    layers: list[str]
    shapes: dict[str, tuple[int, int, int]]
    k: int
    classes: int
    grid: SketchGrid
    name: str = "scan"
    concepts: list[str] = field(default_factory=list)  # scan needs no masks
    accumulator: ClassVar[type[Accumulator]] = LayerStats

    def new_state(self) -> dict[str, LayerStats]:
        return {layer: LayerStats(*self.shapes[layer], self.k, self.classes, self.grid) for layer in self.layers}

    def update(
        self,
        state: dict,
        outputs: dict[str, torch.Tensor],
        indices: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None,
    ) -> None:
        for layer in self.layers:
            state[layer].update(outputs[layer], indices, labels)


# -- reading images ---------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    """Item ``i``: ``(i, model input (C, H, W), label, readable, concept masks (K, H, W) at the input's geometry)``."""

    def __init__(self, model: Model, source: DataSource, concepts: Sequence[str] = ()):
        self.model, self.source, self.concepts = model, source, list(concepts)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        height, width = self.model.input_size
        masks = torch.zeros(len(self.concepts), height, width, dtype=torch.bool)
        try:  # masks only when a concept is asked for: a generated image is then drawn once for both
            picture, found = self.source.image_and_masks(index) if self.concepts else (self.source.image(index), {})
        except ConvlensError:
            return index, torch.zeros(3, height, width), self.source.labels[index], False, masks
        x = self.model.transform(picture)
        for concept, mask in found.items():
            if concept in self.concepts:
                masks[self.concepts.index(concept)] = mask_at_input(self.model, mask, picture.size)
        return index, x, self.source.labels[index], True, masks


def part_batches(parts: Sequence[Part], batch_size: int) -> tuple[list[list[int]], list[int]]:
    """Batches of image indices that never cross a part, and the part of each batch."""
    batches, owners = [], []
    for number, first, stop in parts:
        for start in range(first, stop, batch_size):
            batches.append(list(range(start, min(start + batch_size, stop))))
            owners.append(number)
    return batches, owners


def run_parts(
    model: Model,
    source: DataSource,
    job,
    parts: Sequence[Part],
    *,
    batch_size: int,
    workers: int,
    on_part: Callable[[Part, dict], None],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run ``job`` over ``parts`` in this process; ``on_part(part, state)`` after each. Returns images skipped."""
    if not parts:
        return 0
    batches, owners = part_batches(parts, batch_size)
    loader = torch.utils.data.DataLoader(
        _Images(model, source, job.concepts), batch_sampler=batches, num_workers=workers, persistent_workers=False
    )
    by_number = {p[0]: p for p in parts}
    remaining = {number: owners.count(number) for number in by_number}
    states: dict[int, dict] = {}
    skipped = 0
    with capture(model, job.layers, stop=True) as rec, torch.inference_mode():
        for owner, (indices, x, labels, readable, masks) in zip(owners, loader):
            skipped += int((~readable).sum())
            state = states.setdefault(owner, job.new_state())
            if readable.any():
                indices, x, labels, masks = indices[readable], x[readable], labels[readable], masks[readable]
                outputs = forward_layers(model, rec, x, job.layers)
                job.update(state, outputs, indices, labels, masks.to(model.device))
            if progress is not None:
                progress(len(indices))
            remaining[owner] -= 1
            if remaining[owner] == 0:
                on_part(by_number[owner], states.pop(owner))
    return skipped


def forward_layers(model: Model, rec, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """The recorded maps of ``layers`` for channels-first ``x``; a layer that is not spatial is an error."""
    try:
        rec.forward(x.to(device=model.device, dtype=model.dtype))
    except RuntimeError as err:
        raise ConvlensError(f"the model cannot run on these images ({first_line(err)}); check --input-size") from None
    return rec.spatial_outputs(layers)


def _channels_height_width(spatial: torch.Tensor) -> tuple[int, int, int]:
    """``(C, h, w)`` of a recorded ``(N, C, h, w)`` map."""
    channels, height, width = spatial.shape[1:]
    return int(channels), int(height), int(width)


def probe_shapes(model: Model, source: DataSource, layers: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """``(C, h, w)`` of each layer on the first readable image; checks that every layer is spatial."""
    first_error = None
    for index in range(len(source)):  # a folder may start with many unreadable files: they are skipped later
        try:
            picture = source.image(index)
        except ConvlensError as err:
            first_error = first_error or err
            continue
        x = model.transform(picture).unsqueeze(0)
        with capture(model, layers, stop=True) as rec, torch.inference_mode():
            outputs = forward_layers(model, rec, x, layers)
        return {name: _channels_height_width(outputs[name]) for name in layers}
    raise ConvlensError(f"none of the {len(source)} images of the dataset can be read (first: {first_error})")


# -- the atlas -----------------------------------------------------------------------------


@dataclass
class Atlas:
    """A scan's results: per layer a :class:`LayerStats`, the images, and the store's metadata."""

    stats: dict[str, LayerStats]
    keys: list[str]
    labels: list[int]
    classes: list[str]
    meta: dict[str, str]
    path: Path | None = None
    skipped: int = 0

    @property
    def layers(self) -> list[str]:
        return list(self.stats)

    def merge(self, other: Atlas) -> Atlas:
        """Combine the scans of two sets of images of one dataset (same model, layers and settings)."""
        for key in ("model_fingerprint", "layers", "data_fingerprint", "k", "sketch_bits"):
            if self.meta.get(key) != other.meta.get(key):
                raise ConvlensError(f"cannot merge atlases with different {key.replace('_', ' ')}")
        merged = {
            name: LayerStats.from_arrays(stats.to_arrays()).merge(other.stats[name])
            for name, stats in self.stats.items()
        }
        return Atlas(merged, self.keys, self.labels, self.classes, dict(self.meta), None, self.skipped + other.skipped)

    def source(self) -> DataSource:
        """The data source the atlas was scanned from, opened again."""
        return from_spec(data_spec(self.meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Atlas:
        with AtlasStore.open(path) as store, store.reading():
            keys, labels = store.images()
            stats = {layer: store.load_stats(layer) for layer in store.layer_names()}
            return cls(stats, keys, labels, store.classes(), store.meta(), Path(path))


def open_atlas(path: str | os.PathLike) -> Atlas:
    """Read an atlas store written by :func:`scan` (``convlens scan``)."""
    return Atlas.load(path)


def data_spec(meta: dict[str, str]) -> dict[str, Any]:
    """The data source's spec from the store's ``data.*`` metadata."""
    spec: dict[str, Any] = {key[5:]: value for key, value in meta.items() if key.startswith("data.")}
    for name in ("count", "seed", "size"):
        if name in spec:
            spec[name] = int(spec[name])
    if "classes" in spec:
        spec["classes"] = spec["classes"].split(",") if spec["classes"] else None
    return spec


def scan_meta(
    model: Model,
    source: DataSource,
    layers: Sequence[str],
    k: int,
    sketch_bits: int,
    part_size: int,
    model_source: str | None = None,
) -> dict[str, str]:
    """The store's metadata: fingerprints of model, layers and data, the settings, and how to reopen both."""
    meta = {
        "model": model.name,
        "model_source": model_source or model.name,
        "model_fingerprint": model_fingerprint(model.module),
        "input_size": "x".join(map(str, model.input_size)),
        "layers": ",".join(layers),
        "data_fingerprint": source.fingerprint(),
        "k": str(k),
        "sketch_bits": str(sketch_bits),
        "part_size": str(part_size),
    }
    for key, value in source.spec.items():
        meta[f"data.{key}"] = ",".join(value) if isinstance(value, list) else ("" if value is None else str(value))
    return meta


CHECKED = (
    ("model_fingerprint", "the model with weights fingerprint"),
    ("layers", "layers"),
    ("data_fingerprint", "the data with fingerprint"),
    ("input_size", "input size"),
    ("k", "top-k"),
    ("sketch_bits", "sketch bits"),
    ("part_size", "part size"),
)


def split_parts(count: int, part_size: int) -> list[Part]:
    return [(number, first, min(first + part_size, count)) for number, first in enumerate(range(0, count, part_size))]


def check_options(batch_size: int, workers: int, part_size: int, k: int) -> None:
    if batch_size < 1:
        raise ConvlensError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConvlensError(f"--workers must be 0 or more, got {workers}")
    if part_size < 1:
        raise ConvlensError(f"the part size must be at least 1, got {part_size}")
    if k < 1:
        raise ConvlensError(f"--top must be at least 1, got {k}")


def scan(
    model: Model | torch.nn.Module,
    data: str | os.PathLike | DataSource | None = None,
    layers: Sequence[LayerRef] | None = None,
    *,
    out: str | os.PathLike | None = None,
    shapes: int | None = None,
    seed: int = 0,
    size: int | None = None,
    masks: str | os.PathLike | None = None,
    k: int = 16,
    batch_size: int = 64,
    workers: int = 0,
    part_size: int = 1024,
    indices: range | None = None,
    sketch_bits: int = MANTISSA_BITS,
    engine: str | Engine = "local",
    ray_address: str | None = None,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    model_source: str | None = None,
    follow_links: bool = False,
    progress: Progress | None = None,
) -> Atlas:
    """Scan ``data`` (or ``shapes`` generated images) once through ``model`` and keep per-channel statistics.

    Args:
        model: a :class:`convlens.Model` or ``nn.Module``.
        data: a class-folder tree, a flat folder, a text/CSV list of image paths, or a :class:`DataSource`.
        layers: spatial layers to record (default: every convolution and pooling layer up to the last spatial one).
        out: the SQLite store to write, committed part by part; an existing one is resumed.
        shapes, seed, size: generate ``shapes`` images with ``seed`` at ``size`` px (default: the model's input).
        k: top images kept per channel.
        batch_size, workers: images per forward pass, and DataLoader processes reading them.
        part_size: images per committed part (the unit of resume and of work on Ray).
        indices: scan only these images of the dataset (a range); ``a.merge(b)`` combines such scans.
        sketch_bits: mantissa bits of the quantile sketch (6: relative error 1/129).
        engine: ``"local"`` or ``"ray"`` (with ``ray_address``, ``concurrency``, ``num_gpus``), or an engine
            from :func:`convlens.engines.resolve_engine`.
        model_source: how ``convlens examples`` should load the model again (the CLI passes its MODEL).
        follow_links: read symbolic links in a DATA folder that lead outside it (default: left out, one warning).
        progress: ``progress(done, total)`` in images.
    """
    engine = resolve_engine(engine, ray_address, concurrency, num_gpus)
    plan = plan_scan(
        model,
        data,
        layers,
        shapes=shapes,
        seed=seed,
        size=size,
        masks=masks,
        k=k,
        batch_size=batch_size,
        workers=workers,
        part_size=part_size,
        indices=indices,
        sketch_bits=sketch_bits,
        engine=engine,
        model_source=model_source,
        follow_links=follow_links,
    )
    with writer_lock(out):
        return run_scan(plan, out, batch_size=batch_size, workers=workers, progress=progress)


@dataclass
class ScanPlan:
    """A checked scan, before anything is written: the model, the data, the job, its parts, the store's meta
    and the engine it runs on (connected)."""

    model: Model
    source: DataSource
    job: ScanJob
    parts: list[Part]
    meta: dict[str, str]
    engine: Engine


def plan_scan(
    model: Model | torch.nn.Module,
    data,
    layers: Sequence[LayerRef] | None,
    *,
    shapes: int | None,
    seed: int,
    size: int | None,
    masks,
    k: int,
    batch_size: int,
    workers: int,
    part_size: int,
    indices: range | None,
    sketch_bits: int,
    engine: Engine,
    model_source: str | None,
    follow_links: bool = False,
) -> ScanPlan:
    """Every check of :func:`scan` (options, data, layers, Ray address), nothing written."""
    from ..inside.activations import default_layers

    model = as_model(model)
    check_options(batch_size, workers, part_size, k)
    source = open_data(
        data, shapes=shapes, seed=seed, size=size or model.input_size[0], masks=masks, follow_links=follow_links
    )
    if len(source) == 0:
        raise ConvlensError("the dataset is empty")
    names = list(resolve_layers(model, list(layers))) if layers else default_layers(model)
    if not names:
        raise ConvlensError("no layers given; name at least one spatial layer")
    shapes_of = probe_shapes(model, source, names)
    job = ScanJob(names, shapes_of, k, len(source.classes), SketchGrid(sketch_bits))
    span = indices if indices is not None else range(len(source))
    if span.step != 1 or span.start < 0 or span.stop > len(source) or len(span) == 0:
        raise ConvlensError(f"indices must be a non-empty range within the {len(source)} images")
    parts = [
        (number, max(first, span.start), min(stop, span.stop))
        for number, first, stop in split_parts(len(source), part_size)
        if first < span.stop and stop > span.start
    ]
    meta = scan_meta(model, source, names, k, sketch_bits, part_size, model_source)
    engine.connect()  # an unreachable Ray address fails here, before anything is written
    return ScanPlan(model, source, job, parts, meta, engine)


def run_scan(
    plan: ScanPlan, out: str | os.PathLike | None, *, batch_size: int, workers: int, progress: Progress | None
) -> Atlas:
    """Run a planned scan, committing to ``out`` part by part; the caller holds the store's writer lock."""
    source, job, parts = plan.source, plan.job, plan.parts
    total = job.new_state()
    store = None
    if out is not None:
        store = AtlasStore.create_or_resume(out, plan.meta, checked=CHECKED)
    try:
        if store is not None:
            store.write_images(source.keys, source.labels, source.classes)
            done = store.done_parts("scan")
            if done:
                with store.reading():
                    total = {name: store.load_stats(name) for name in job.layers}
            parts = [p for p in parts if p[0] not in done]
        execute(
            plan.model,
            source,
            job,
            parts,
            total,
            store,
            batch_size=batch_size,
            workers=workers,
            engine=plan.engine,
            progress=progress,
        )
    finally:
        if store is not None:
            store.close()
    # counted from the totals, so a resumed scan also counts the images its earlier runs skipped
    skipped = sum(stop - first for _, first, stop in plan.parts) - total[job.layers[0]].images
    if skipped:
        warnings.warn(f"skipped {skipped} unreadable image(s) of {len(source)}", ConvlensWarning, stacklevel=3)
    return Atlas(total, source.keys, source.labels, source.classes, plan.meta, Path(out) if out else None, skipped)


def execute(
    model: Model,
    source: DataSource,
    job,
    parts: list[Part],
    total: dict,
    store: AtlasStore | None,
    *,
    batch_size: int,
    workers: int,
    engine: Engine,
    progress: Progress | None,
    commit: Callable[[AtlasStore, dict, Part], None] | None = None,
) -> int:
    """Run ``job`` over ``parts`` on the engine, merging each finished part into ``total`` and committing it."""
    todo = sum(stop - first for _, first, stop in parts)
    done = [0]

    def advance(count: int) -> None:
        done[0] += count
        if progress is not None:
            progress(done[0], todo)

    def on_part(part: Part, state: dict) -> None:
        job.merge(total, state)
        if store is not None:
            (commit or (lambda s, t, p: s.commit_scan(t, p)))(store, total, part)

    if engine.distributed:  # a Literal tag: type checkers know the engine is then a RayEngine
        from .ray_engine import ray_parts

        return ray_parts(engine, model, source, job, parts, batch_size=batch_size, on_part=on_part, progress=advance)
    return run_parts(
        model, source, job, parts, batch_size=batch_size, workers=workers, on_part=on_part, progress=advance
    )
