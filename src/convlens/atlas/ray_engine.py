"""``engine="ray"``: the same scan, dissection and evaluation on Ray Data (``pip install 'convlens[ray]'``).

The image list becomes a Ray dataset (one row per image: its index and its
part; one block and one Ray batch per part). ``map_batches`` runs a callable class, :class:`PartWorker`, on a pool of
``concurrency`` actors, each holding ``num_gpus`` GPUs (default: one when the
driver sees CUDA, else none) and loading the model once, in its constructor.
An actor reads or generates its part's images by index (no image travels
through the object store), runs the truncated forward pass in batches of
``batch_size`` and returns the part's *partial* accumulators, serialised as
compressed NumPy arrays (no pickles). The
driver is the aggregation step: it merges the partial states of each part and,
when a part is complete, merges it into the totals and commits it to the same
SQLite store as the local engine, so resume and the store format do not depend
on the engine. Counts and top-k images are identical to the local engine's;
means and spreads agree to float64 rounding (the merge order differs).

``ray_address`` (or the ``RAY_ADDRESS`` environment variable) connects to an
existing cluster; without one, Ray starts on this machine. An address where
nothing listens, or where something other than Ray answers (told apart by an
HTTP/2 client preface: Ray's head is a gRPC server), is a one-line error within
``CONNECT_TIMEOUT_S`` (Ray itself would retry for minutes), before Ray starts
or prints anything. An actor whose worker dies is restarted and its part run
again, up to ``RETRIES`` times; past that the run stops on one line, and the
store keeps every part committed, so the same command resumes it. This module
is imported only for ``engine="ray"``.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import ConvlensError, first_line

CONNECT_TIMEOUT_S = 3.0
#: times a Ray actor is restarted, and a part retried, after its worker dies (Ray Data's default: forever);
#: passed as actor options, which Ray Data 2.60 names no parameter for (it warns they go in 2.64)
RETRIES = 3
#: test hook: a file whose text is a part number; the worker that runs that part deletes it and SIGKILLs itself
#: (with ``<part> always``, it kills itself on every try and keeps the file)
TEST_KILL_WORKER = "CONVLENS_TEST_KILL_WORKER"


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConvlensError("the Ray engine needs Ray: pip install 'convlens[ray]' (ray[data]==2.60.0)") from None
    return ray


def _host_port(address: str) -> tuple[str, int]:
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConvlensError(f"a Ray address looks like HOST:PORT or ray://HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


#: the HTTP/2 client preface and an empty SETTINGS frame (RFC 9113, sections 3.4 and 6.5)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _probe(address: str) -> str | None:
    """Why ``address`` is not a Ray cluster, or ``None`` when it answers as one, within ``CONNECT_TIMEOUT_S``.

    Ray's head (the GCS, and the Ray Client server of ``ray://``) is a gRPC server, so it answers an
    HTTP/2 client preface with its own SETTINGS frame. Anything else (nothing listening, a web
    server, a silent port) is told apart here, before ``ray.init`` would retry it for minutes.
    """
    host, port = _host_port(address)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as connection:
            connection.sendall(_H2_PREFACE)
            header = b""
            while len(header) < 9:
                connection.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = connection.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
    except socket.timeout:
        return f"something accepts connections there but says nothing within {CONNECT_TIMEOUT_S:.0f} s"
    except OSError as err:
        return f"nothing answers there ({err.strerror or err})"
    if len(header) == 9 and header[3] == 0x04:  # a SETTINGS frame: an HTTP/2 (gRPC) server
        return None
    if header.startswith((b"HTTP/", b"<")):  # a status line, or the bare HTML page of an HTTP/0.9-style error
        return "a web server answers there, not Ray"
    return "something answers there, but not as Ray's gRPC server"


def check_address(address: str | None = None) -> str | None:
    """The cluster address to use (``address``, else ``RAY_ADDRESS``, else ``None``: Ray starts here), once it
    answers as Ray; otherwise a one-line error within ``CONNECT_TIMEOUT_S``. Starts nothing."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    problem = _probe(address) if address not in (None, "auto", "local") else None
    if problem is not None:
        raise ConvlensError(f"cannot reach the Ray cluster at {address!r}: {problem}; check --ray-address / "
                            "RAY_ADDRESS (the head node's HOST:PORT, 6379 by default, or ray://HOST:10001), "
                            "or leave it out to run Ray on this machine")
    return address


def connect(address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start Ray here; no-op when connected."""
    ray = _ray()
    if ray.is_initialized():
        return
    address = check_address(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
        raise ConvlensError(f"cannot connect to the Ray cluster at {address!r}: {first_line(err)}") from None


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
        _test_kill_worker(owners)
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


def _test_kill_worker(owners: np.ndarray) -> None:
    """The test hook :data:`TEST_KILL_WORKER`: SIGKILL this worker when it runs the named part."""
    hook = os.environ.get(TEST_KILL_WORKER)
    if not hook:
        return
    try:
        words = open(hook, encoding="utf-8").read().split()
    except FileNotFoundError:
        return
    if words and int(words[0]) in owners.tolist():
        if words[1:] != ["always"]:
            try:
                os.unlink(hook)  # only the worker that removes it dies: a retry runs
            except FileNotFoundError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def ray_parts(model, source, job, parts: Sequence[tuple[int, int, int]], *, batch_size: int,
              on_part: Callable, progress: Callable[[int], None] | None = None, concurrency: int | None = None,
              num_gpus: float | None = None) -> int:
    """Run ``job`` over ``parts`` on Ray Data; ``on_part(part, state)`` as each part completes.

    Returns the number of images that could not be read (skipped)."""
    if not parts:
        return 0
    ray = _ray()
    connect(None)
    gpus = _default_gpus(num_gpus)
    actors = _default_concurrency(ray, concurrency, gpus)
    rows = [{"index": i, "part": number} for number, first, stop in parts for i in range(first, stop)]
    # one Ray batch per part (blocks cut at part boundaries): an actor call returns one partial state,
    # the largest message of the run, per part rather than per forward batch
    part_size = max(stop - first for _, first, stop in parts)
    dataset = ray.data.from_items(rows, override_num_blocks=len(parts))
    model_ref = ray.put(model)
    results = dataset.map_batches(
        PartWorker, fn_constructor_kwargs={"model": [model_ref], "source": source, "job": job,
                                           "batch_size": batch_size, "num_gpus": gpus},
        batch_size=part_size, compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, batch_format="numpy",
        max_restarts=RETRIES, max_task_retries=RETRIES)
    by_number = {p[0]: p for p in parts}
    waiting = {number: stop - first for number, first, stop in parts}
    pending: dict[int, dict] = {}
    skipped = 0
    try:
        for row in results.iter_rows():  # the aggregation step, on the driver
            skipped += _aggregate(job, row, pending, waiting, by_number, on_part, progress)
    except ConvlensError:
        raise
    except Exception as err:  # a Ray error: a worker that died on every try, a task that raised
        raise ConvlensError(f"the Ray job stopped: {first_line(err)} (after up to {RETRIES} retries of a part); "
                            "the store keeps every part committed so far: run the same command again to "
                            "resume") from None
    return skipped


def _aggregate(job, row: dict, pending: dict, waiting: dict, by_number: dict, on_part: Callable,
               progress: Callable[[int], None] | None) -> int:
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


# -- evaluate on Ray ---------------------------------------------------------------------

class _Pending(Exception):
    """Raised by a placeholder explainer: :func:`evaluate_ray` only wants ``evaluate``'s checks and settings file."""


def _pending(model, x, targets):
    raise _Pending


class EvaluateWorker:
    """A Ray Data actor scoring images with ``score_image``: the model is loaded once per actor."""

    def __init__(self, model, methods, metrics: Sequence[str], batch_size: int, find_mask, num_gpus: float,
                 targets=None):
        from ..evaluation.runner import resolve_methods

        ray = _ray()
        self.model = ray.get(model[0]) if isinstance(model, list) else model
        if num_gpus > 0 and torch.cuda.is_available():
            self.model.to("cuda")
        self.explainers = resolve_methods(methods)
        self.metrics, self.batch_size, self.find_mask, self.targets = list(metrics), batch_size, find_mask, targets

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json
        from pathlib import Path

        from ..images import load_image
        from ..evaluation.runner import score_image

        lines = []
        for path, key, todo in zip(batch["path"], batch["key"], batch["todo"]):
            explainers = {name: self.explainers[name] for name in str(todo).split("\n")}
            records = score_image(self.model, load_image(str(path)), self.find_mask(Path(str(path))), explainers,
                                  self.metrics, name=str(key), batch_size=self.batch_size, targets=self.targets)
            lines.append("".join(json.dumps(record) + "\n" for record in records))
        return {"records": np.array(lines, dtype=object)}


def evaluate_ray(model, data, *, methods, metrics: Sequence[str], out_dir, batch_size: int = 64,
                 limit: int | None = None, seed: int = 0, find_mask: Callable | None = None,
                 progress: Callable | None = None,
                 restart: bool = False, ray_address: str | None = None, concurrency: int | None = None,
                 num_gpus: float | None = None, targets=None):
    """:func:`convlens.evaluation.evaluate` with the (image, method) pairs scored on Ray actors.

    The outputs, the journal and resuming are ``evaluate``'s own: ``evaluate`` checks the inputs and
    the run's fingerprint first (its explainers are placeholders that stop it at the first pair to
    score), the actors score every pair the journal lacks, the driver appends their records to the
    journal under the same run id, and ``evaluate`` runs again to find every pair done and write
    the table and summaries.
    """
    import json
    from pathlib import Path

    from ..evaluation import resume, runner
    from ..models import as_model

    model = as_model(model)
    connect(ray_address)
    names = list(methods) if not isinstance(methods, dict) else list(methods.keys())
    find_mask = find_mask or runner.find_mask
    options = dict(metrics=metrics, out_dir=out_dir, batch_size=batch_size, limit=limit, seed=seed, find_mask=find_mask,
                   targets=targets)
    try:
        return runner.evaluate(model, data, methods={name: _pending for name in names}, restart=restart, **options)
    except _Pending:
        pass
    runner.resolve_methods(methods)  # unknown names are an error before any actor starts
    root = Path(data)
    images = runner.sample_images(runner.list_images(root), root, limit, seed)  # evaluate's own sample
    keys = [path.name if root.is_file() else path.relative_to(root).as_posix() for path in images]  # evaluate's keys
    masks = [find_mask(path) for path in images]
    fingerprint = resume.run_fingerprint(model, names, metrics, list(zip(keys, images)), masks, limit, seed, targets)
    journal = resume.Journal(Path(out_dir) / "journal.jsonl", resume.run_id(fingerprint))
    done = journal.done()
    rows = []
    for path, key in zip(images, keys):
        todo = [name for name in names if (key, name) not in done]
        if todo:
            rows.append({"path": str(path), "key": key, "todo": "\n".join(todo)})
    ray = _ray()
    gpus = _default_gpus(num_gpus)
    actors = _default_concurrency(ray, concurrency, gpus)
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * actors)))
    results = dataset.map_batches(
        EvaluateWorker, fn_constructor_kwargs={"model": [ray.put(model)], "methods": methods, "metrics": list(metrics),
                                               "batch_size": batch_size, "find_mask": find_mask, "num_gpus": gpus,
                                               "targets": runner.prepare_target(model, targets)},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, batch_format="numpy",
        max_restarts=RETRIES, max_task_retries=RETRIES)
    total = len(images) * len(names)
    finished = total - sum(len(row["todo"].split("\n")) for row in rows)
    try:
        for row in results.iter_rows():
            for line in str(row["records"]).splitlines():
                journal.append(json.loads(line))
                finished += 1
                if progress is not None:
                    progress(finished, total)
    except ConvlensError:
        raise
    except Exception as err:  # as in ray_parts: the journal keeps every record appended so far
        raise ConvlensError(f"the Ray job stopped: {first_line(err)} (after up to {RETRIES} retries of an image); "
                            "the journal keeps every pair scored so far: run the same command again to "
                            "resume") from None
    return runner.evaluate(model, data, methods=methods, **options)
