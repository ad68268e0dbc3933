"""Long jobs of the explorer (filter patterns, the trust view): one worker thread, progress, cancel, a disk cache.

A job is a function ``compute(progress) -> bytes | dict`` with a key (a JSON-able dict
that names everything the result depends on, the model's weights fingerprint
included). Its result is written to ``CACHE/<kind>-<sha256 of the key>.<png|json>``
atomically, so the same request later, by this server or the next one on the same
weights, is answered from the file. ``progress(done, total)`` updates the job and
raises :class:`Cancelled` once the job is cancelled, so the computation stops at its
next step (the optimisation loop of a filter pattern calls it once a step).

Jobs run one at a time on a copy of the model (``Explorer.job_model``), so the page
stays quick while a pattern is optimised.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConvlensError, first_line
from ..fileio import atomic_path
from ..progress import Progress

log = logging.getLogger(__name__)

#: Finished jobs remembered (their results stay in the cache folder).
KEPT_JOBS = 64


class Cancelled(Exception):
    """Raised inside a job's computation by its progress callback once the job is cancelled."""


@dataclass
class Job:
    id: str
    kind: str
    path: Path
    state: str = "queued"  # queued, running, done, error, cancelled
    done: int = 0
    total: int = 0
    message: str = ""
    cached: bool = False
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    changed: int = 0  # bumped on every change
    guard: threading.Lock = field(default_factory=threading.Lock, repr=False)  # a snapshot sees whole updates

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error", "cancelled")

    def snapshot(self) -> dict:
        with self.guard:
            return {
                "id": self.id,
                "kind": self.kind,
                "state": self.state,
                "done": self.done,
                "total": self.total,
                "message": self.message,
                "cached": self.cached,
            }

    def result(self):
        if self.state != "done":
            from .views import NotFound

            raise NotFound(f"job {self.id} has no result ({self.state}{': ' + self.message if self.message else ''})")
        data = self.path.read_bytes()
        return json.loads(data) if self.path.suffix == ".json" else data


class JobRunner:
    """Runs jobs one at a time in a worker thread; finished results are files in ``cache``."""

    def __init__(self, cache: str | Path):
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convlens-job")

    def submit(self, kind: str, key: dict, compute: Callable[[Progress], bytes | dict], suffix: str = "png") -> Job:
        """A job for ``key``: answered from the cache when its file exists, the running one if it is running."""
        digest = hashlib.sha256(json.dumps({"kind": kind, **key}, sort_keys=True).encode()).hexdigest()[:32]
        path = self.cache / f"{kind}-{digest}.{suffix}"
        with self._lock:
            for job in self.jobs.values():
                if job.path == path and not job.finished:
                    return job
            job = Job(f"{kind}-{next(self._ids)}", kind, path)
            self.jobs[job.id] = job
            while len(self.jobs) > KEPT_JOBS:
                oldest = next((j for j in self.jobs.values() if j.finished), None)
                if oldest is None:
                    break
                del self.jobs[oldest.id]
        if path.is_file():
            self._update(job, state="done", cached=True, message="from the cache")
            return job
        self._executor.submit(self._run, job, compute)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self.jobs.get(job_id)
        if job is None:
            from .views import NotFound

            raise NotFound(f"no job {job_id!r} (finished jobs are forgotten after {KEPT_JOBS} more)")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel.set()
        if job.state == "queued":
            self._update(job, state="cancelled", message="cancelled before it started")
        return job

    def close(self) -> None:
        with self._lock:
            for job in self.jobs.values():
                job.cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _update(job: Job, **values) -> None:
        with job.guard:
            for name, value in values.items():
                setattr(job, name, value)
            job.changed += 1

    def _run(self, job: Job, compute: Callable) -> None:
        if job.cancel.is_set():
            self._update(job, state="cancelled", message="cancelled before it started")
            return
        self._update(job, state="running")

        def progress(done: int, total: int) -> None:
            if job.cancel.is_set():
                raise Cancelled()
            self._update(job, done=int(done), total=int(total))

        try:
            result = compute(progress)
            with atomic_path(job.path) as tmp:  # a half-written result never lands in the cache
                tmp.write_bytes(result if isinstance(result, bytes) else json.dumps(result).encode())
        except Cancelled:
            self._update(job, state="cancelled", message="cancelled")
        except ConvlensError as err:
            self._update(job, state="error", message=str(err))
        except Exception as err:
            log.exception("job %s failed", job.id)
            self._update(job, state="error", message=f"{type(err).__name__}: {first_line(err)}")
        else:
            self._update(job, state="done", done=max(job.done, job.total), message="")


# -- the jobs ---------------------------------------------------------------------------------------------
#: Steps and size of the filter patterns the unit page computes (the report's are 96 steps).
PATTERN_STEPS = 128
PATTERN_SIDE = 128


def pattern_job(explorer, layer: str, unit: int, steps: int = PATTERN_STEPS) -> tuple[dict, Callable]:
    """The key and computation of a unit's filter pattern (:func:`convlens.filter_patterns`), as a PNG."""
    from ..inside.inputs import fixed_input_size

    explorer.check_layer(layer)
    explorer.check_unit(layer, unit, explorer._channels(layer))
    if not 1 <= steps <= 2048:
        raise ConvlensError(f"steps must be between 1 and 2048, got {steps}")
    size = fixed_input_size(explorer.model) or min(PATTERN_SIDE, max(explorer.model.input_size))
    key = {"model": explorer.fingerprint, "layer": layer, "unit": unit, "steps": steps, "size": size, "seed": 0}

    def compute(progress):
        from ..inside import filter_patterns
        from ..render.grid import to_pil
        from .views import png_bytes

        with explorer.job_lock:
            patterns = filter_patterns(
                explorer.job_model, layer, filters=[unit], size=size, steps=steps, seed=0, progress=progress
            )
        return png_bytes(to_pil(patterns.images[0]))

    return key, compute


def heatmap_job(explorer, image: str, method: str, layer: str, target: str, opacity: float) -> tuple[dict, Callable]:
    """A slow method's heatmap (Score-CAM, Ablation-CAM) in the background: ``{"png": data URI, "info": ...}``."""
    import base64

    chosen, picture = explorer.check_heatmap(image, method, layer, opacity)
    content = hashlib.sha256(picture.image.tobytes()).hexdigest()[:16]
    key = {
        "model": explorer.fingerprint,
        "image": content,
        "method": chosen.name,
        "layer": layer,
        "target": target,
        "opacity": opacity,
    }

    def compute(progress):
        data, info = explorer.heatmap(image, chosen.name, layer, target, opacity, progress=progress, job=True)
        return {"png": "data:image/png;base64," + base64.b64encode(data).decode("ascii"), "info": info}

    return key, compute


#: The trust view's methods and metrics: the report's defaults (``convlens.report.evaluation_section``).
def trust_job(explorer, image: str) -> tuple[dict, Callable]:
    """The key and computation of the trust view of one image: the report's metrics table, sanity check, verdict."""
    from ..report.evaluation_section import DEFAULT_METHODS, DEFAULT_METRICS

    picture = explorer.picture(image)
    content = hashlib.sha256(picture.image.tobytes()).hexdigest()[:16]
    applicable = {m["name"] for m in explorer.methods() if m["applies"]}
    methods = [m for m in DEFAULT_METHODS if m in applicable]
    key = {"model": explorer.fingerprint, "image": content, "mask": picture.mask is not None, "methods": methods}

    def compute(progress):
        from .trust import trust_table

        with explorer.job_lock:
            return trust_table(explorer.job_model, picture, methods, DEFAULT_METRICS, progress)

    return key, compute


#: Generated shapes images a dissection job labels units with when the explorer has no data of its own.
DISSECT_SHAPES = 200


def dissect_job(explorer, layers: str = "", shapes: int = DISSECT_SHAPES) -> tuple[dict, Callable]:
    """Network Dissection of ``layers`` (comma-separated; default the auto layer) as a background job.

    On the explorer's ``--data`` folder when it has concept masks (a shapes folder), else on
    ``shapes`` generated shapes images; written once per request under the explorer's cache and
    then used as the explorer's atlas. The result is ``{"folder": ..., "layers": [...]}``.
    """
    names = [explorer.check_layer(name.strip()) for name in layers.split(",") if name.strip()] or [
        explorer.summary.auto
    ]
    if not 8 <= shapes <= 5000:
        raise ConvlensError(f"shapes must be between 8 and 5000, got {shapes}")
    folder_masks = explorer.data is not None and (
        (explorer.data / "masks").is_dir() or next(explorer.data.rglob("*.mask.png"), None) is not None
    )
    data = explorer.data if folder_masks else None
    key = {
        "model": explorer.fingerprint,
        "layers": names,
        "data": str(data) if data else None,
        "shapes": None if data else shapes,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = explorer.cache / f"dissection-{digest}"

    def compute(progress):
        from ..atlas.dissect import STORE_NAME, dissect
        from ..fileio import staged_folder

        if not (folder / STORE_NAME).is_file():
            with explorer.job_lock, staged_folder(folder) as stage:
                dissect(
                    explorer.job_model,
                    data,
                    names,
                    shapes=None if data else shapes,
                    k=8,
                    out=stage,
                    figures=False,
                    progress=progress,
                )
        explorer.use_atlas(folder)
        return {"folder": str(folder), "layers": names}

    return key, compute
