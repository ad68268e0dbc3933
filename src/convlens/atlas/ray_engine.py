"""``engine="ray"``: the same scan, dissection and evaluation on Ray Data (``pip install 'convlens[ray]'``).

The image list becomes a Ray dataset (one row per image: its index and its
part). ``map_batches`` runs a callable class, :class:`PartWorker`, on a pool of
``concurrency`` actors, each holding ``num_gpus`` GPUs (default: one when the
driver sees CUDA, else none) and loading the model once, in its constructor.
An actor reads or generates its batch's images by index (no image travels
through the object store), runs the truncated forward pass and returns the
batch's *partial* accumulators, serialised as NumPy arrays (no pickles). The
driver is the aggregation step: it merges the partial states of each part and,
when a part is complete, merges it into the totals and commits it to the same
SQLite store as the local engine, so resume and the store format do not depend
on the engine. Counts and top-k images are identical to the local engine's;
means and spreads agree to float64 rounding (the merge order differs).

``ray_address`` (or the ``RAY_ADDRESS`` environment variable) connects to an
existing cluster; without one, Ray starts on this machine. An address that
does not answer is a one-line error after a few seconds (Ray itself would
retry for minutes). This module is imported only for ``engine="ray"``.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import ConvlensError, first_line

CONNECT_TIMEOUT_S = 5.0


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConvlensError("the Ray engine needs Ray: pip install 'convlens[ray]' (ray[data]==2.60.0)") from None
    return ray


def _reachable(address: str) -> bool:
    """Whether ``host:port`` (optionally ``ray://host:port``) accepts a TCP connection within a few seconds."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConvlensError(f"a Ray address looks like HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def connect(address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start Ray here; no-op when connected."""
    ray = _ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "auto", "local") and not _reachable(address):
        raise ConvlensError(f"cannot reach the Ray cluster at {address!r} (no answer within "
                            f"{CONNECT_TIMEOUT_S:.0f} s); check --ray-address / RAY_ADDRESS, or leave it out "
                            "to run Ray on this machine")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
        raise ConvlensError(f"cannot connect to the Ray cluster at {address!r}: {first_line(err)}") from None


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as ``.npz`` bytes (``allow_pickle=False`` on reading: plain numbers only)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name.replace("/", "|"): array for name, array in arrays.items()})
    return buffer.getvalue()


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as loaded:
        return {name.replace("|", "/"): loaded[name] for name in loaded.files}


def _default_gpus(num_gpus: float | None) -> float:
    return (1.0 if torch.cuda.is_available() else 0.0) if num_gpus is None else float(num_gpus)


def _default_concurrency(ray, concurrency: int | None, gpus: float) -> int:
    if concurrency is not None:
        if concurrency < 1:
            raise ConvlensError(f"--concurrency must be at least 1, got {concurrency}")
        return concurrency
    resources = ray.cluster_resources()
    if gpus > 0:
        return max(1, int(resources.get("GPU", 1) // gpus))
    return max(1, int(resources.get("CPU", 1)))


class PartWorker:
    """A Ray Data actor: loads the model once, then turns batches of image indices into partial accumulators."""

    def __init__(self, model, source, job, batch_size: int, num_gpus: float):
        from ..models import Model

        ray = _ray()
        if isinstance(model, list):  # an ObjectRef, wrapped so Ray Data does not try to resolve it for us
            model = ray.get(model[0])
        self.model: Model = model
        if num_gpus > 0 and torch.cuda.is_available():
            self.model.to("cuda")
        self.source, self.job, self.batch_size = source, job, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..capture import capture
        from .scan import _Images, forward_layers

        images = _Images(self.model, self.source, self.job.concepts)
        parts, blobs, counts, skipped = [], [], [], []
        indices, owners = batch["index"].astype(np.int64), batch["part"].astype(np.int64)
        with capture(self.model, self.job.layers, stop=True) as rec, torch.inference_mode():
            for part in np.unique(owners):
                members = indices[owners == part]
                state, missing = self.job.new_state(), 0
                for start in range(0, len(members), self.batch_size):
                    items = [images[int(i)] for i in members[start:start + self.batch_size]]
                    readable = [item for item in items if item[3]]
                    missing += len(items) - len(readable)
                    if not readable:
                        continue
                    x = torch.stack([item[1] for item in readable])
                    masks = torch.stack([item[4] for item in readable]).to(self.model.device)
                    outputs = forward_layers(self.model, rec, x, self.job.layers)
                    self.job.update(state, outputs, torch.tensor([item[0] for item in readable]),
                                    torch.tensor([item[2] for item in readable]), masks)
                parts.append(part)
                blobs.append(pack(self.job.to_arrays(state)))
                counts.append(len(members))
                skipped.append(missing)
        return {"part": np.array(parts, dtype=np.int64), "state": np.array(blobs, dtype=object),
                "images": np.array(counts, dtype=np.int64), "skipped": np.array(skipped, dtype=np.int64)}


def ray_parts(model, source, job, parts: Sequence[tuple[int, int, int]], *, batch_size: int,
              on_part: Callable, progress: Callable[[int], None] | None = None, concurrency: int | None = None,
              num_gpus: float | None = None) -> int:
    """Run ``job`` over ``parts`` on Ray Data; ``on_part(part, state)`` as each part completes. Returns images skipped."""
    if not parts:
        return 0
    ray = _ray()
    connect(None)
    gpus = _default_gpus(num_gpus)
    actors = _default_concurrency(ray, concurrency, gpus)
    rows = [{"index": i, "part": number} for number, first, stop in parts for i in range(first, stop)]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size + 1, 4 * actors)))
    model_ref = ray.put(model)
    results = dataset.map_batches(
        PartWorker, fn_constructor_kwargs={"model": [model_ref], "source": source, "job": job,
                                           "batch_size": batch_size, "num_gpus": gpus},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, batch_format="numpy")
    by_number = {p[0]: p for p in parts}
    waiting = {number: stop - first for number, first, stop in parts}
    pending: dict[int, dict] = {}
    skipped = 0
    for row in results.iter_rows():  # the aggregation step, on the driver
        number = int(row["part"])
        state = job.from_arrays(unpack(row["state"]))
        pending[number] = job.merge(pending[number], state) if number in pending else state
        waiting[number] -= int(row["images"])
        skipped += int(row["skipped"])
        if progress is not None:
            progress(int(row["images"]))
        if waiting[number] == 0:
            on_part(by_number[number], pending.pop(number))
    return skipped
