"""Several methods over many images, batch by batch: :func:`explain_many`, which writes nothing.

``convlens explain`` and the explorer both call it: the command writes the
results to disk, the explorer draws them in the page. Each batch is settled
once, by one forward pass (:func:`~convlens.heatmaps.engine.check_request`), and
every method then runs on that plan, so a bad layer or target fails in seconds,
before any slow method. The cheap methods run first, so a method-specific error
(CAM on a model without a GAP head) comes before the slow ones.

Example::

    import convlens as cl
    model = cl.load_model("resnet18", weights="none")
    found = cl.explain_many(model, [cl.sample_image()] * 3, ["gradcam", "saliency"], batch_size=2)
    found.maps("gradcam").shape   # torch.Size([3, 224, 224])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConvlensError
from ..models import as_model
from ..progress import Step, Steps
from ..targets import TargetSpec
from .engine import Explanation, Plan, check_request, explain
from .registry import get_method


@dataclass
class BatchedExplanations:
    """What :func:`explain_many` computed: one :class:`Explanation` per method and batch.

    Attributes:
        methods: the methods that ran, in the order asked.
        results: per method, one :class:`Explanation` per batch (``batches[k]`` lists its images).
        batches: the image indices of each batch.
        layers: the layers the layer-reading methods used (``auto`` resolved); empty when none reads one.
        predicted: the predicted class name of each image, from the settling pass.
        skipped: method -> why it does not apply (only with ``skip_inapplicable=True``).
        every_class: the target was ``"all"``: every map is ``(K, H, W)``, one per class.
    """

    methods: list[str]
    results: dict[str, list[Explanation]]
    batches: list[range]
    layers: list[str]
    predicted: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    every_class: bool = False

    def at(self, method: str, image: int) -> tuple[Explanation, int]:
        """The batch's :class:`Explanation` holding image ``image`` for ``method``, and the image's row in it."""
        for number, indices in enumerate(self.batches):
            if image in indices:
                return self.results[method][number], image - indices.start
        raise IndexError(f"no image {image}: {self.batches[-1].stop if self.batches else 0} were explained")

    def maps(self, method: str) -> torch.Tensor:
        """Every image's map for ``method``, batches joined: ``(N, H, W)`` (``(N, K, H, W)`` for every class)."""
        return torch.cat([result.maps for result in self.results[method]])


def explain_many(
    model,
    images,
    methods: Sequence[str],
    *,
    layer: str | nn.Module | Sequence = "auto",
    targets: TargetSpec | list = None,
    batch_size: int = 8,
    options: Mapping[str, dict] | None = None,
    skip_inapplicable: bool = False,
    max_classes: int | None = None,
    progress: Callable[[Step], None] | None = None,
) -> BatchedExplanations:
    """Run every method in ``methods`` over ``images``, ``batch_size`` images per pass; nothing is written.

    Args:
        model: a :class:`convlens.Model`, a bare ``nn.Module`` or a Keras model.
        images: images (paths, PIL, arrays) or a preprocessed batch; sliced into batches.
        methods: names in :data:`~convlens.heatmaps.METHODS`; repeats and aliases run once.
        layer: as for :func:`~convlens.heatmaps.explain`: ``"auto"``, a name or module, or a list.
        targets: as ``explain``'s ``target`` (``None`` top-1, a class, ``"all"``, a callable), or a
            list with one target per image, split with the batches.
        batch_size: images per pass.
        options: per method name, its own options (``{"smoothgrad": {"n_samples": 8}}``).
        skip_inapplicable: a method that does not apply (a :class:`ConvlensError` from its check or its
            computation) is left out and its reason kept in ``skipped``, instead of failing the call.
        max_classes: with ``targets="all"``, refuse a model with more classes, before any method runs.
        progress: gets a :class:`~convlens.progress.Step` as each (method, batch) begins, and one per
            ``progress(done, total)`` report of the slower methods (``part``/``parts``).

    Raises:
        ConvlensError: an unknown method, a bad layer or target; without ``skip_inapplicable``, a method
            that does not apply.
    """
    names = list(dict.fromkeys(get_method(name).name for name in methods))
    loaded = as_model(model)
    batches = [range(start, min(start + batch_size, len(images))) for start in range(0, len(images), batch_size)]
    skipped: dict[str, str] = {}
    plans = [
        _plan_batch(
            loaded,
            images[rows.start : rows.stop],
            names,
            layer,
            _batch_targets(targets, rows),
            skip_inapplicable,
            skipped,
        )
        for rows in batches
    ]
    every_class = isinstance(targets, str) and targets == "all"
    if every_class and max_classes is not None:
        _check_class_count(plans, max_classes)
    results = _run_methods(
        plans, [name for name in names if name not in skipped], options or {}, skip_inapplicable, skipped, progress
    )
    return BatchedExplanations(
        methods=[name for name in names if name not in skipped],
        results=results,
        batches=batches,
        layers=_chosen_layers(plans),
        predicted=_predicted(plans, batches),
        skipped=skipped,
        every_class=every_class,
    )


def _batch_targets(targets, rows: range):
    """The targets of one batch: its slice of a per-image list, or the one target for all."""
    return [targets[i] for i in rows] if isinstance(targets, list) else targets


def _plan_key(name: str) -> tuple:
    """What the settling pass checks of a method: whether it reads a layer, and whether several; a method
    that takes one layer is checked on its own, since the error for several names it."""
    method = get_method(name)
    return method.uses_layer, method.multi_layer, name if method.uses_layer and not method.multi_layer else ""


def _plan_batch(
    loaded, inputs, names: list[str], layer, target, skip: bool, skipped: dict[str, str]
) -> dict[str, Plan]:
    """Method -> the plan it runs on for one batch.

    Failing fast, one pass settles every method. Skipping, the methods are settled in groups that the
    checks treat alike (:func:`_plan_key`), so a group that does not apply is skipped with its reason
    and the others still run.
    """
    if not skip:
        plan = check_request(loaded, inputs, names, layer, target)
        return dict.fromkeys(names, plan)
    groups: dict[tuple, list[str]] = {}
    for name in names:
        if name not in skipped:
            groups.setdefault(_plan_key(name), []).append(name)
    plans = {}
    for group in groups.values():
        try:
            plans.update(dict.fromkeys(group, check_request(loaded, inputs, group, layer, target)))
        except ConvlensError as err:
            skipped.update(dict.fromkeys(group, str(err)))
    return plans


def _check_class_count(plans: list[dict[str, Plan]], max_classes: int) -> None:
    count = next((len(plan.class_indices) for batch in plans for plan in batch.values()), 0)
    if count > max_classes:
        raise ConvlensError(
            f"target 'all' gives one map per class and this model has {count} classes "
            f"(at most {max_classes}); name the classes instead, e.g. 3"
        )


def _run_methods(
    plans: list[dict[str, Plan]],
    names: list[str],
    options: Mapping[str, dict],
    skip: bool,
    skipped: dict[str, str],
    progress: Callable[[Step], None] | None,
) -> dict[str, list[Explanation]]:
    """Each method on each batch's plan, the cheap kinds first; a method that fails while skipping is dropped."""
    order = sorted(names, key=lambda name: get_method(name).kind == "perturbation")
    steps = Steps(len(order) * len(plans), progress)
    results: dict[str, list[Explanation]] = {name: [] for name in names}
    for name in order:
        for number, batch in enumerate(plans, 1):
            steps.begin(name if len(plans) == 1 else f"{name}, batch {number}/{len(plans)}")
            try:
                results[name].append(
                    explain(
                        batch[name].model,
                        method=name,
                        plan=batch[name],
                        progress=_sub_steps(steps, progress),
                        **options.get(name, {}),
                    )
                )
            except ConvlensError as err:
                if not skip:
                    raise
                skipped[name] = str(err)
                del results[name]
                break
    return {name: results[name] for name in names if name in results}


def _sub_steps(steps: Steps, progress: Callable[[Step], None] | None):
    """A method's ``progress(done, total)``, sent on as sub-steps of the current step."""
    if progress is None:
        return None
    return lambda done, total: progress(Step(steps.index, steps.total, steps.name, done, total))


def _chosen_layers(plans: list[dict[str, Plan]]) -> list[str]:
    return next((plan.layers for batch in plans for plan in batch.values() if plan.layers), [])


def _predicted(plans: list[dict[str, Plan]], batches: list[range]) -> list[str]:
    """Each image's predicted class, from any plan of its batch (they share the clean pass); ``""`` in a
    batch where no method applied."""
    return [
        label
        for batch, rows in zip(plans, batches, strict=True)
        for label in (next(iter(batch.values())).top1() if batch else [""] * len(rows))
    ]
