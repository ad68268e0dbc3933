"""``evaluate`` with its (image, method) pairs scored on Ray Data actors (``engine="ray"``, :mod:`convlens.engines`).

The run is :func:`~convlens.evaluation.runner.evaluate`'s own: planned once on the driver
(:func:`~convlens.evaluation.runner.plan_evaluation`: the checks, the fingerprint, the journal
and the pairs it lacks), each image still to score sent to an actor as one row (its path, its
name, its methods), the records the actors return appended to the journal by the driver, and
the table and summaries written by :func:`~convlens.evaluation.runner.finish_evaluation`. So the
outputs, the journal and resuming do not depend on the engine. Each actor loads the model once
(:class:`~convlens.engines.ray.ModelWorker`) and reads its images and masks itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..engines import RayEngine
from ..engines.ray import ModelWorker
from ..metrics.base import ExplainFn
from . import runner


class EvaluateWorker(ModelWorker):
    """A Ray Data actor scoring images with :func:`~convlens.evaluation.runner.score_image`."""

    def __init__(
        self, model, num_gpus: float, methods, metrics: Sequence[str], batch_size: int, find_mask, targets=None
    ):
        super().__init__(model, num_gpus)
        self.explainers = runner.resolve_methods(methods)
        self.metrics, self.batch_size, self.find_mask, self.targets = list(metrics), batch_size, find_mask, targets

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..images import load_image

        lines = []
        for path, key, todo in zip(batch["path"], batch["key"], batch["todo"], strict=True):
            explainers = {name: self.explainers[name] for name in str(todo).split("\n")}
            records = runner.score_image(
                self.model,
                load_image(str(path)),
                self.find_mask(Path(str(path))),
                explainers,
                self.metrics,
                name=str(key),
                batch_size=self.batch_size,
                targets=self.targets,
            )
            lines.append("".join(json.dumps(record) + "\n" for record in records))
        return {"records": np.array(lines, dtype=object)}


def evaluate_ray(
    model,
    data,
    *,
    methods: Sequence[str] | Mapping[str, ExplainFn],
    metrics: Sequence[str],
    out_dir,
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    find_mask: Callable | None = None,
    progress: Callable | None = None,
    restart: bool = False,
    ray_address: str | None = None,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    targets=None,
    engine: RayEngine | None = None,
) -> runner.Evaluation:
    """:func:`convlens.evaluation.evaluate` with the (image, method) pairs scored on Ray actors (the module
    docstring says how); the options after ``restart`` are the Ray engine's, or ``engine`` gives it whole."""
    engine = engine or RayEngine(ray_address=ray_address, concurrency=concurrency, num_gpus=num_gpus)
    engine.connect()  # an unreachable address fails here, before anything is written
    find_mask = find_mask or runner.find_mask
    plan = runner.plan_evaluation(
        model,
        data,
        methods=methods,
        metrics=metrics,
        out_dir=out_dir,
        batch_size=batch_size,
        limit=limit,
        seed=seed,
        find_mask=find_mask,
        restart=restart,
        targets=targets,
    )
    if plan.todo:
        _score_on_actors(engine, plan, methods, find_mask, progress)
    return runner.finish_evaluation(plan)


def _score_on_actors(
    engine: RayEngine, plan: runner.EvaluationPlan, methods, find_mask: Callable, progress: Callable | None
) -> None:
    """Score ``plan.todo`` on the engine's actors, one image per call, journaling each record as it comes."""
    rows = [{"path": str(path), "key": plan.keys[path], "todo": "\n".join(left)} for path, left in plan.todo]
    worker_options = {
        "methods": methods,
        "metrics": plan.metrics,
        "batch_size": plan.batch_size,
        "find_mask": find_mask,
        "targets": plan.target,
    }
    results = engine.map_batches(
        rows,
        EvaluateWorker,
        worker_options,
        model=plan.model,
        batch_size=1,
        blocks=max(1, min(len(rows), 4 * engine.actors())),
        retried="an image",
        kept="the journal keeps every pair scored so far",
    )
    for row in results:
        for line in str(row["records"]).splitlines():
            plan.record(json.loads(line), progress)
