"""TCAV: Testing with Concept Activation Vectors (Kim, Wattenberg, Gilmer, Cai, Wexler, Viegas & Sayres,
ICML 2018, arXiv:1711.11279).

For a layer ``l`` with flattened activations ``f_l(x)``, a concept ``C`` and a class ``k``:

1. The CAV ``v_C``: the unit normal of a linear classifier that separates ``f_l`` of
   ``C``'s images from ``f_l`` of a random set's (:func:`fit_cav`: L2-regularised
   logistic regression, pointing towards the concept; its accuracy is measured on a
   held-out third, split with a seed, as captum's default classifier does).
2. The conceptual sensitivity of an input ``x`` of class ``k``:
   ``S(x) = grad_{f_l} h_k(f_l(x)) . v_C``, the directional derivative of the class
   logit ``h_k`` (pre-softmax) along the CAV.
3. ``TCAV_{C,k,l} = |{x in X_k : S(x) > 0}| / |X_k|``.
4. The test: the score is computed for ``n_runs`` CAVs, each against another random
   set, and compared with the scores of random-vs-random CAVs (random set ``i``
   against random set ``i + 1``, cyclically) by a two-sided t-test
   (``scipy.stats.ttest_ind``, equal variances, as the authors' code does); the
   concept is significant when ``p < alpha`` (``alpha / tests`` with Bonferroni's
   correction, ``tests`` = classes x concepts x layers).

Where this departs from the paper: the CAV is a logistic regression solved exactly by Newton's
method (the paper and captum run SGD, whose answer depends on the order of its samples; the
direction of a separable problem differs a little, the sign of ``S`` rarely); a constant pair of
score lists (every run 1.0, every random run 1.0) gives ``p = 1``, where the t statistic is undefined.

Example::

    result = cl.tcav(model, "circle", {"round": "concepts/round"}, ["features.relu3"],
                     random="random/", inputs="data/circle")
    result.row("circle", "round", "features.relu3").score        # 0.93
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture import LayerRef, capture, resolve_layers
from ..errors import ConvlensError
from ..models import Model, as_model
from .sources import Images, ImageSet, concept_sets, image_set, input_sets, random_sets

ALPHA = 0.05
TEST_SHARE = 0.33
L2 = 0.01


def _flat_outputs(
    model: Model, images: ImageSet | Images, layers: list[str], batch_size: int
) -> dict[str, torch.Tensor]:
    """``{layer: (N, F) float32}`` activations of ``images``, flattened channels-first, on the CPU."""
    images = images if isinstance(images, ImageSet) else image_set("images", images, minimum=1, what="image set")
    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    with capture(model, layers, stop=True) as rec, torch.no_grad():
        for chunk in images.chunks(batch_size):
            x, _ = model.as_batch(chunk)
            rec.forward(x)
            _check_ran(rec, layers)
            for layer in layers:
                parts[layer].append(rec.outputs[layer].flatten(1).float().cpu())
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


def _check_ran(rec, layers: list[str]) -> None:
    missing = [layer for layer in layers if layer not in rec.outputs]
    if missing:
        raise ConvlensError(f"layer {missing[0]!r} has no output in the forward pass; choose a layer the model uses")


def concept_activations(
    model: Model | torch.nn.Module, images: Images, layer: LayerRef, batch_size: int = 32
) -> torch.Tensor:
    """The flattened activations ``(N, C*h*w)`` of ``layer`` for ``images`` (a folder, images or a tensor batch)."""
    model = as_model(model)
    (name,) = resolve_layers(model, [layer])
    return _flat_outputs(model, images, [name], batch_size)[name]


@dataclass
class CAV:
    """A concept activation vector: the unit normal ``vector`` (F,) and its classifier's held-out ``accuracy``."""

    vector: torch.Tensor
    accuracy: float


def _split(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled (train, test) split of ``range(count)`` with about :data:`TEST_SHARE` held out (at least one)."""
    order = rng.permutation(count)
    test = max(1, int(round(TEST_SHARE * count)))
    return order[test:], order[:test]


def _logistic(z: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta, b)`` minimising ``mean(softplus(-y (z beta + b))) + l2/2 |beta|^2``: Newton's method, line-searched.

    The objective is strictly convex in ``beta`` (the penalty) and the Hessian is formed
    whole (``z`` has one column per singular direction of the data: a few dozen), so a
    handful of steps reach the one minimum to float64 precision, whatever the start.
    """
    count, width = z.shape
    params = torch.zeros(width + 1, dtype=torch.float64)
    design = torch.cat([z, torch.ones(count, 1, dtype=torch.float64)], 1)
    ridge = torch.full((width + 1,), l2, dtype=torch.float64)
    ridge[-1] = 1e-12  # the bias is not penalised; this only keeps the Hessian invertible

    def objective(p: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-y * (design @ p)).mean() + 0.5 * l2 * p[:-1].square().sum()

    value = objective(params)
    for _ in range(steps):
        margin = design @ params
        gradient = design.T @ (-y * torch.sigmoid(-y * margin)) / count + ridge * params
        gradient[-1] -= 1e-12 * params[-1]
        if gradient.abs().max() < 1e-10:
            break
        curvature = torch.sigmoid(margin) * torch.sigmoid(-margin)
        hessian = (design.T * curvature) @ design / count + torch.diag(ridge)
        step = torch.linalg.solve(hessian, gradient)
        size = 1.0
        while size > 1e-8:
            candidate = params - size * step
            new_value = objective(candidate)
            if new_value <= value - 1e-4 * size * float(gradient @ step):
                break
            size /= 2
        else:
            break  # no step lowers the objective: at the minimum to precision
        params, value = candidate, new_value
    return params[:-1], params[-1]


def fit_cav(concept_acts: torch.Tensor, other_acts: torch.Tensor, seed: int | Sequence[int] = 0) -> CAV:
    """The CAV of a concept against other images: L2-regularised logistic regression, unit normal to the concept.

    Each side is split in train and held-out parts (a third, seeded), so both sides
    are in both; the classifier minimises ``mean(log(1 + exp(-y (w.f + b)))) + L2/2 |w|^2``
    (``y`` = +1 for the concept, -1 for the others; features centred and scaled to a mean
    norm of 1), a strictly convex problem with one answer. Returns ``w / |w|`` and the
    held-out accuracy.
    """
    rng = np.random.default_rng(seed)
    features = [concept_acts.detach().double().cpu().flatten(1), other_acts.detach().double().cpu().flatten(1)]
    splits = [_split(len(side), rng) for side in features]
    train = torch.cat([side[torch.as_tensor(part[0])] for side, part in zip(features, splits)])
    test = torch.cat([side[torch.as_tensor(part[1])] for side, part in zip(features, splits)])
    train_y = torch.cat([torch.ones(len(splits[0][0])), -torch.ones(len(splits[1][0]))]).double()
    test_y = torch.cat([torch.ones(len(splits[0][1])), -torch.ones(len(splits[1][1]))]).double()
    centre = train.mean(0)
    scale = (train - centre).norm(dim=1).mean()
    if not torch.isfinite(scale) or scale <= 1e-12:
        raise ConvlensError(
            "the concept and the other images have identical activations at this layer; "
            "no CAV separates them: choose another layer or other images"
        )
    x = (train - centre) / scale
    # The L2 optimum lies in the span of the training rows (representer theorem): with x = U S V^T,
    # w = V beta, and the problem has one unknown per singular direction instead of one per feature.
    u, singular, vh = torch.linalg.svd(x, full_matrices=False)
    keep = singular > singular.max() * 1e-10
    beta, bias = _logistic(u[:, keep] * singular[keep], train_y, L2)
    w = vh[keep].T @ beta
    norm = w.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ConvlensError(
            "the concept and the other images have identical activations at this layer; "
            "no CAV separates them: choose another layer or other images"
        )
    predicted = torch.sign((test - centre) / scale @ w + bias)
    accuracy = float((predicted == test_y).double().mean())
    return CAV((w / norm).float(), accuracy)


def _class_gradients(
    model: Model, images: ImageSet, class_, layers: list[str], batch_size: int
) -> tuple[dict[str, torch.Tensor], int]:
    """``{layer: (N, F)}`` gradients of class ``class_``'s logit at each layer's output, and the class index."""
    from ..targets import ClassLogits, resolve_targets

    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    index: int | None = None
    with capture(model, layers, graph=True, rewrite=model.logit_rewrites()) as rec:
        for chunk in images.chunks(batch_size):
            x, _ = model.as_batch(chunk)
            output = rec.forward(x)
            _check_ran(rec, layers)
            score_fn, indices = resolve_targets(class_, output, model.labels, model.select)
            if not isinstance(score_fn, ClassLogits):
                raise ConvlensError("TCAV explains a classifier's class logit; this model's output is not class scores")
            index = indices[0]
            score = score_fn(output).sum()
            if not score.requires_grad:
                raise ConvlensError(
                    f"the class logit does not depend on layer {layers[0]!r}"
                    f"{' (nor the others)' if len(layers) > 1 else ''}; choose a layer before it"
                )
            grads = torch.autograd.grad(score, [rec.outputs[layer] for layer in layers], allow_unused=True)
            for layer, grad in zip(layers, grads):
                if grad is None:
                    raise ConvlensError(f"the class logit does not depend on layer {layer!r}; choose a layer before it")
                parts[layer].append(grad.flatten(1).float().cpu())
    if index is None:
        raise ConvlensError("TCAV has no input images to take the class gradients of")
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}, int(index)


def sensitivities(gradients: torch.Tensor, cav: CAV | torch.Tensor) -> torch.Tensor:
    """``S(x) = grad . v`` per input: ``(N, F) @ (F,)``."""
    vector = cav.vector if isinstance(cav, CAV) else cav
    return gradients.float() @ vector.float().to(gradients.device)


def p_value(scores: Sequence[float], random_scores: Sequence[float]) -> float:
    """Two-sided t-test (``scipy.stats.ttest_ind``) of the concept's scores against the random ones.

    1 when the test is undefined.
    """
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # identical values: scipy warns of precision loss, then answers nan or 0
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(ttest_ind(scores, random_scores).pvalue)
    return 1.0 if not np.isfinite(value) else value


@dataclass
class TCAVRow:
    """One (class, concept, layer): the mean TCAV score over runs and its test against random CAVs."""

    class_: str  # the class's label (its index when the model has no labels)
    concept: str
    layer: str
    score: float
    std: float
    random_score: float
    random_std: float
    p_value: float
    significant: bool
    accuracy: float  # the CAVs' mean held-out accuracy
    scores: list[float] = field(repr=False, default_factory=list)  # per run
    random_scores: list[float] = field(repr=False, default_factory=list)
    magnitudes: list[float] = field(repr=False, default_factory=list)  # mean S(x) per run
    class_index: int = -1

    COLUMNS = (
        "class",
        "concept",
        "layer",
        "tcav",
        "std",
        "random",
        "random_std",
        "p_value",
        "significant",
        "cav_accuracy",
    )

    def values(self) -> tuple:
        return (
            self.class_,
            self.concept,
            self.layer,
            self.score,
            self.std,
            self.random_score,
            self.random_std,
            self.p_value,
            self.significant,
            self.accuracy,
        )


@dataclass
class TCAVResult:
    """Every (class, concept, layer) row, the CAVs per (concept, layer) and run, and the test's settings."""

    rows: list[TCAVRow]
    cavs: dict[tuple[str, str], list[CAV]]  # (concept, layer) -> one per run
    random_cavs: dict[str, list[CAV]]  # layer -> random i vs random i+1
    alpha: float
    threshold: float  # alpha, divided by the number of tests with Bonferroni's correction
    runs: int

    def row(self, class_, concept: str, layer: str) -> TCAVRow:
        for row in self.rows:
            if str(class_) in (row.class_, str(row.class_index)) and row.concept == concept and row.layer == layer:
                return row
        raise KeyError((class_, concept, layer))

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(row.layer for row in self.rows))

    def table(self) -> list[tuple]:
        """Rows ``(class, concept, layer, tcav, std, random, random_std, p_value, significant, cav_accuracy)``."""
        return [row.values() for row in self.rows]

    def markdown(self) -> str:
        """The table as Markdown, numbers rounded for reading (the CSV keeps them whole)."""
        head = "| class | concept | layer | TCAV | ± std | random | p | significant | CAV accuracy |"
        lines = [head, "|" + "---|" * 9]
        lines.extend(
            f"| {r.class_} | {r.concept} | {r.layer} | {r.score:.3f} | {r.std:.3f} | "
            f"{r.random_score:.3f} | {r.p_value:.3g} | {'yes' if r.significant else 'no'} | "
            f"{r.accuracy:.2f} |"
            for r in self.rows
        )
        return "\n".join(lines) + "\n"


def tcav(
    model: Model | torch.nn.Module,
    class_,
    concepts: Mapping[str, Images] | str | os.PathLike[str],
    layers: Sequence[LayerRef],
    random: Images | Sequence[Images],
    *,
    inputs: Images | Mapping,
    n_runs: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    alpha: float = ALPHA,
    bonferroni: bool = False,
    masks=None,
    random_size: int | None = None,
) -> TCAVResult:
    """TCAV scores of ``class_`` (an index or name, or a list of them) for each concept at each layer.

    Args:
        model: a :class:`convlens.Model` or an ``nn.Module``.
        class_: the class (index or label) whose logit is explained, or a list of classes.
        concepts: ``{name: folder, images or tensor batch}``, a folder of concept folders, or a
            data folder with dissection masks (``masks/<concept>/``): see :mod:`convlens.concepts.sources`.
        layers: layer names (or modules); any layer, spatial or not, flattened.
        random: random sets: a list of folders (or image lists), a folder of random folders,
            or one pool folder of images from which ``n_runs`` sets of ``random_size`` are drawn.
        inputs: the class's images: a folder (with a folder per class, or one set for every
            class), images, a tensor batch, or ``{class: images}``.
        n_runs: CAVs per concept and layer, each against another random set (at least 10).
        seed: the CAVs' train/test splits and the pool's draws.
        alpha: the test's level; ``bonferroni`` divides it by the number of tests.
        masks: the masks folder of a data folder given as ``concepts`` (default ``DATA/masks``).
    """
    model = as_model(model)
    if not 0 < alpha < 1:
        raise ConvlensError(f"alpha must lie between 0 and 1, got {alpha}")
    if batch_size < 1:
        raise ConvlensError(f"batch_size must be at least 1, got {batch_size}")
    classes = list(class_) if isinstance(class_, (list, tuple)) else [class_]
    if not classes:
        raise ConvlensError("no class given: name at least one class whose logit TCAV explains")
    names = list(resolve_layers(model, list(layers)))
    if not names:
        raise ConvlensError("no layers given: name at least one layer")
    concept_images = concept_sets(concepts, masks=masks)
    randoms = random_sets(random, n_runs, seed=seed, size=random_size)
    class_inputs = input_sets(inputs, classes, labels=model.labels)

    acts = {s.name: _flat_outputs(model, s, names, batch_size) for s in concept_images}
    random_acts = [_flat_outputs(model, s, names, batch_size) for s in randoms]
    cavs = {
        (s.name, layer): [
            fit_cav(acts[s.name][layer], random_acts[run][layer], (seed, run, 0)) for run in range(n_runs)
        ]
        for s in concept_images
        for layer in names
    }
    random_cavs = {
        layer: [
            fit_cav(random_acts[run][layer], random_acts[(run + 1) % n_runs][layer], (seed, run, 1))
            for run in range(n_runs)
        ]
        for layer in names
    }
    tests = len(classes) * len(concept_images) * len(names)
    threshold = alpha / tests if bonferroni else alpha
    rows = []
    for wanted in classes:
        grads, index = _class_gradients(model, class_inputs[wanted], wanted, names, batch_size)
        label = model.label(index) if model.labels else str(index)
        for layer in names:
            random_scores = [float((sensitivities(grads[layer], cav) > 0).float().mean()) for cav in random_cavs[layer]]
            for concept in concept_images:
                runs = cavs[(concept.name, layer)]
                s = [sensitivities(grads[layer], cav) for cav in runs]
                scores = [float((values > 0).float().mean()) for values in s]
                p = p_value(scores, random_scores)
                rows.append(
                    TCAVRow(
                        label,
                        concept.name,
                        layer,
                        float(np.mean(scores)),
                        float(np.std(scores)),
                        float(np.mean(random_scores)),
                        float(np.std(random_scores)),
                        p,
                        p < threshold,
                        float(np.mean([cav.accuracy for cav in runs])),
                        scores,
                        random_scores,
                        [float(values.mean()) for values in s],
                        index,
                    )
                )
    return TCAVResult(rows, cavs, random_cavs, alpha, threshold, n_runs)
