"""A scan's and a dissection's parts on Ray Data actors (``engine="ray"``, :mod:`convlens.engines.ray`).

The image list becomes a Ray dataset (one row per image: its index and its
part; one block and one Ray batch per part). ``map_batches`` runs a callable class, :class:`PartWorker`, on the
engine's actor pool; each actor loads the model once (:class:`~convlens.engines.ray.ModelWorker`).
An actor reads or generates its part's images by index (no image travels
through the object store), runs the truncated forward pass in batches of
``batch_size`` and returns the part's *partial* accumulators, serialised as
compressed NumPy arrays (no pickles). The
driver is the aggregation step: it merges the partial states of each part and,
when a part is complete, merges it into the totals and commits it to the same
SQLite store as the local engine, so resume and the store format do not depend
on the engine. Counts and top-k images are identical to the local engine's;
means and spreads agree to float64 rounding (the merge order differs). A part
whose worker dies is retried (:data:`~convlens.engines.ray.RETRIES`); past that
the run stops on one line, and the store keeps every part committed, so the
same command resumes it. This module is imported only for ``engine="ray"``.
"""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..engines.ray import ModelWorker, RayEngine

#: test hook: a file whose text is a part number; the worker that runs that part deletes it and SIGKILLs itself
#: (with ``<part> always``, it kills itself on every try and keeps the file)
TEST_KILL_WORKER = "CONVLENS_TEST_KILL_WORKER"


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as compressed ``.npz`` bytes (``allow_pickle=False`` on reading: plain numbers only)."""
    buffer = io.BytesIO()
    # compressed: a unit's values fill a few hundred of the sketch's thousands of buckets
    # numpy's stub types **kwds as if they could fill its allow_pickle flag: names here never are "allow_pickle"
    np.savez_compressed(buffer, **{name.replace("/", "|"): array for name, array in arrays.items()})  # type: ignore[arg-type]
    return buffer.getvalue()


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as loaded:
        return {name.replace("|", "/"): loaded[name] for name in loaded.files}


class PartWorker(ModelWorker):
    """A Ray Data actor: the model loaded once, then batches of image indices turned into partial accumulators."""

    def __init__(self, model, num_gpus: float, source, job, batch_size: int):
        super().__init__(model, num_gpus)
        self.source, self.job, self.batch_size = source, job, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..capture import capture
        from .scan import _Images, forward_layers

        images = _Images(self.model, self.source, self.job.concepts)
        parts, blobs, counts, skipped = [], [], [], []
        indices, owners = batch["index"].astype(np.int64), batch["part"].astype(np.int64)
        _test_kill_worker(owners)
        with capture(self.model, self.job.layers, stop=True) as rec, torch.inference_mode():
            for part in np.unique(owners):
                members = indices[owners == part]
                state, missing = self.job.new_state(), 0
                for start in range(0, len(members), self.batch_size):
                    items = [images[int(i)] for i in members[start : start + self.batch_size]]
                    readable = [item for item in items if item[3]]
                    missing += len(items) - len(readable)
                    if not readable:
                        continue
                    x = torch.stack([item[1] for item in readable])
                    masks = torch.stack([item[4] for item in readable]).to(self.model.device)
                    outputs = forward_layers(self.model, rec, x, self.job.layers)
                    self.job.update(
                        state,
                        outputs,
                        torch.tensor([item[0] for item in readable]),
                        torch.tensor([item[2] for item in readable]),
                        masks,
                    )
                parts.append(part)
                blobs.append(pack(self.job.to_arrays(state)))
                counts.append(len(members))
                skipped.append(missing)
        return {
            "part": np.array(parts, dtype=np.int64),
            "state": np.array(blobs, dtype=object),
            "images": np.array(counts, dtype=np.int64),
            "skipped": np.array(skipped, dtype=np.int64),
        }


def _test_kill_worker(owners: np.ndarray) -> None:
    """The test hook :data:`TEST_KILL_WORKER`: SIGKILL this worker when it runs the named part."""
    hook = os.environ.get(TEST_KILL_WORKER)
    if not hook:
        return
    try:
        with open(hook, encoding="utf-8") as file:
            words = file.read().split()
    except FileNotFoundError:
        return
    if words and int(words[0]) in owners.tolist():
        if words[1:] != ["always"]:
            try:
                os.unlink(hook)  # only the worker that removes it dies: a retry runs
            except FileNotFoundError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def ray_parts(
    engine: RayEngine,
    model,
    source,
    job,
    parts: Sequence[tuple[int, int, int]],
    *,
    batch_size: int,
    on_part: Callable,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run ``job`` over ``parts`` on the engine's actors; ``on_part(part, state)`` as each part completes.

    Returns the number of images that could not be read (skipped)."""
    if not parts:
        return 0
    rows = [{"index": i, "part": number} for number, first, stop in parts for i in range(first, stop)]
    # one Ray batch per part (blocks cut at part boundaries): an actor call returns one partial state,
    # the largest message of the run, per part rather than per forward batch
    part_size = max(stop - first for _, first, stop in parts)
    results = engine.map_batches(
        rows,
        PartWorker,
        {"source": source, "job": job, "batch_size": batch_size},
        model=model,
        batch_size=part_size,
        blocks=len(parts),
        retried="a part",
        kept="the store keeps every part committed so far",
    )
    by_number = {p[0]: p for p in parts}
    waiting = {number: stop - first for number, first, stop in parts}
    pending: dict[int, dict] = {}
    skipped = 0
    for row in results:  # the aggregation step, on the driver
        skipped += _aggregate(job, row, pending, waiting, by_number, on_part, progress)
    return skipped


def _aggregate(
    job,
    row: dict,
    pending: dict,
    waiting: dict,
    by_number: dict,
    on_part: Callable,
    progress: Callable[[int], None] | None,
) -> int:
    """Merge one actor's partial state into its part; commit the part when it is complete. Returns images skipped."""
    number = int(row["part"])
    state = job.from_arrays(unpack(row["state"]))
    pending[number] = job.merge(pending[number], state) if number in pending else state
    waiting[number] -= int(row["images"])
    if progress is not None:
        progress(int(row["images"]))
    if waiting[number] == 0:
        on_part(by_number[number], pending.pop(number))
    return int(row["skipped"])
