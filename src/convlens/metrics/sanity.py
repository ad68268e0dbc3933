"""Sanity checks for saliency maps (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim,
"Sanity Checks for Saliency Maps", NeurIPS 2018, arXiv:1810.03292).

A heatmap that explains the model must change when the model's weights are
destroyed. Starting from the top (the output layer) and going down:

* cascading randomisation: layer after layer is randomised *cumulatively*;
* independent randomisation: one layer at a time is randomised, the rest trained.

After each step the map of the randomised model (for the same input and target
class as the trained model's map) is compared with the trained model's map by

* Spearman rank correlation of the absolute maps and of the signed maps
  (maps that are non-negative, as ``Explanation.maps`` are, give equal values;
  pass an ``explain_fn`` returning signed attributions to tell them apart);
* SSIM of the two maps, each min-max normalised to [0, 1] (Gaussian window
  sigma 1.5, 11 taps, K1 = 0.01, K2 = 0.03, averaged over the positions where
  the window fits inside the map: skimage's ``structural_similarity`` with
  ``gaussian_weights=True, use_sample_covariance=False, data_range=1``).

Similarity that stays high while the weights are random means the method does
not depend on the model (the paper's finding for guided backprop).

Randomising a layer redraws each of its parameter tensors from a Gaussian with
that tensor's own mean and standard deviation (the paper re-initialises from a
truncated normal; keeping the scale avoids blank maps from exploding or
vanishing activations). A constant tensor (an untrained BatchNorm scale) uses
``|value|`` as its spread, or 0.01 when zero. Layer ``k`` draws from a generator
seeded with ``seed + k``, so it gets the same weights in both modes. Buffers
(BatchNorm running statistics) are kept. All of this happens on deep copies;
the caller's model is never touched.

The data-randomisation test compares the maps of the model with those of a
model of the same architecture trained on shuffled labels (:func:`data_randomization`).

Example (``explain_fn`` is any ``(model, x, targets) -> maps (N, H, W)``; ``targets`` are
the class indices ``(N,)`` the trained model's maps explain)::

    def my_explainer(model, x, targets):
        return convlens.explain(model, x, method="saliency", target=targets.tolist()).maps

    result = parameter_randomization(model, x, explain_fn=my_explainer, mode="cascading")
    for row in result.rows():
        print(row["layer"], row["spearman_abs"], row["ssim"])
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import capture
from ..errors import ConvlensError, did_you_mean
from ..kernels import gaussian_kernel
from ..models import Model
from .base import (
    ClassTargets,
    ExplainFn,
    Targets,
    as_batch,
    as_maps,
    as_model,
    as_targets,
    heatmap_explainer,
    normalize_maps,
)

#: A method fails the sanity check when its maps keep this Spearman rank correlation (of the absolute
#: maps) with the trained model's after every weight is randomised: such a map does not depend on the model.
#: The report's verdict and ``benchmarks/shapes_figures.py`` both use it.
SANITY_THRESHOLD = 0.5

MODES = ("cascading", "independent")


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties sharing their mean rank (SciPy's ``rankdata``), float64."""
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(values.detach().cpu().numpy(), method="average", axis=-1)).to(values.device)


def spearman(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps ``(N, H, W)``, ``(N,)``; 0 when one map is flat."""
    a = _average_ranks(first.flatten(1).double())
    b = _average_ranks(second.flatten(1).double())
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    rho = (a * b).sum(1) / denominator.clamp_min(1e-300)
    return torch.where(denominator > 0, rho, torch.zeros_like(rho)).float()


def ssim(first: torch.Tensor, second: torch.Tensor, *, sigma: float = 1.5, taps: int = 11) -> torch.Tensor:
    """Structural similarity of each pair of min-max normalised maps ``(N, H, W)``, ``(N,)``."""
    if min(first.shape[-2:]) < taps:
        raise ConvlensError(f"SSIM needs maps of at least {taps}x{taps} pixels, got {tuple(first.shape[-2:])}")
    a = normalize_maps(first.double()).unsqueeze(1)
    b = normalize_maps(second.double()).unsqueeze(1)
    kernel = gaussian_kernel(sigma, taps // 2, dtype=torch.float64)
    window = (kernel.view(-1, 1) * kernel.view(1, -1)).view(1, 1, taps, taps).to(a.device)

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    mean_a, mean_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mean_a**2
    var_b = local_mean(b * b) - mean_b**2
    covariance = local_mean(a * b) - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    index = (2 * mean_a * mean_b + c1) * (2 * covariance + c2) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return index.mean(dim=(1, 2, 3)).float()


def similarity(first: torch.Tensor, second: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three comparisons of the paper, each ``(N,)``: ``spearman_abs``, ``spearman``, ``ssim``."""
    return {
        "spearman_abs": spearman(first.abs(), second.abs()),
        "spearman": spearman(first, second),
        "ssim": ssim(first, second),
    }


@dataclass
class Randomization:
    """Similarity of the trained model's maps with those after each randomisation step.

    ``layers[k]`` is the layer randomised at step ``k`` (top first); each metric
    tensor is ``(L, N)``: step by image. ``maps`` holds the randomised models'
    maps ``(L, N, H, W)``; ``original`` the trained model's ``(N, H, W)``.
    """

    mode: str
    layers: list[str]
    original: torch.Tensor
    maps: torch.Tensor
    spearman_abs: torch.Tensor
    spearman: torch.Tensor
    ssim: torch.Tensor

    def rows(self) -> list[dict]:
        """One row per step: the layer and the image-mean of each similarity."""
        return [
            {
                "mode": self.mode,
                "layer": layer,
                "spearman_abs": float(self.spearman_abs[k].mean()),
                "spearman": float(self.spearman[k].mean()),
                "ssim": float(self.ssim[k].mean()),
            }
            for k, layer in enumerate(self.layers)
        ]


def parametrized_layers(model: Model | nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the layers holding parameters of their own, in the order a forward pass finishes them."""
    model = as_model(model)
    table = {name: m for name, m in model.named_layers().items() if any(True for _ in m.parameters(recurse=False))}
    order: list[str] = []
    by_module = {m: name for name, m in table.items()}

    def record(module, inputs, output):
        name = by_module[module]
        if name in order:
            order.remove(name)
        order.append(name)
        return output

    with capture(model, rewrite=dict.fromkeys(table.values(), record)) as rec, torch.no_grad():
        rec.forward(as_batch(model, x)[:1])
    return order


def randomize_layer(module: nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter of ``module`` from a Gaussian with the tensor's own mean and spread."""
    with torch.no_grad():
        for parameter in module.parameters():
            values = parameter.detach().double()
            mean = values.mean()
            spread = values.std() if values.numel() > 1 else values.abs().mean()
            if not torch.isfinite(spread) or spread == 0:
                spread = values.abs().mean() if values.abs().mean() > 0 else torch.tensor(0.01, dtype=torch.float64)
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_((noise * spread + mean).to(parameter))


def _copy(model: Model) -> Model:
    if model.keras_model is not None:
        raise ConvlensError("sanity checks randomise PyTorch parameters; Keras models are not supported")
    return dataclasses.replace(model, module=copy.deepcopy(model.module))


def _explain(explain_fn: ExplainFn, model: Model, x: torch.Tensor, targets: ClassTargets) -> torch.Tensor:
    maps = explain_fn(model, x, targets)
    internal = as_batch(model, x)
    return as_maps(maps, internal.shape[0], tuple(internal.shape[-2:]))


def parameter_randomization(
    model,
    x: torch.Tensor,
    targets: Targets = None,
    *,
    explain_fn: ExplainFn | None = None,
    method: str = "gradcam",
    mode: str = "cascading",
    layers: list[str] | None = None,
    seed: int = 0,
    progress=None,
) -> Randomization:
    """Model-parameter randomisation test (Adebayo et al. 2018), cascading or independent.

    Args:
        explain_fn: ``explain_fn(model, x, targets) -> maps (N, H, W)``; default
            ``convlens.explain(..., method=method)``.
        mode: ``"cascading"`` or ``"independent"``.
        layers: layer names to randomise, top first (a block name randomises all
            its parameters); default every layer with parameters, output layer first.
        seed: layer ``k`` is randomised with ``torch.Generator().manual_seed(seed + k)``.
        progress: optional ``progress(done, total)`` callback.
    """
    if mode not in MODES:
        raise ConvlensError(f"unknown randomisation mode {mode!r}; choose 'cascading' or 'independent'")
    model = as_model(model)
    explain_fn = explain_fn or heatmap_explainer(method)
    settled = as_targets(model, as_batch(model, x), targets)
    table = model.named_layers()
    if layers is None:
        layers = list(reversed(parametrized_layers(model, x)))
    for name in layers:
        if name not in table:
            raise ConvlensError(f"unknown layer {name!r}{did_you_mean(name, table)}")
    if not layers:
        raise ConvlensError("the model has no layer with parameters to randomise")
    original = _explain(explain_fn, _copy(model), x, settled)  # a copy even here: explain_fn is the caller's
    randomized_maps = []
    cascade = _copy(model) if mode == "cascading" else None
    for step, name in enumerate(layers):
        current = cascade if cascade is not None else _copy(model)
        randomize_layer(current.named_layers()[name], torch.Generator().manual_seed(seed + step))
        randomized_maps.append(_explain(explain_fn, current, x, settled))
        if progress is not None:
            progress(step + 1, len(layers))
    maps = torch.stack(randomized_maps)
    scores = [similarity(original, step_maps) for step_maps in maps]
    return Randomization(
        mode,
        list(layers),
        original,
        maps,
        *(torch.stack([s[key] for s in scores]) for key in ("spearman_abs", "spearman", "ssim")),
    )


def data_randomization(
    model,
    random_label_model,
    x: torch.Tensor,
    targets: Targets = None,
    *,
    explain_fn: ExplainFn | None = None,
    method: str = "gradcam",
) -> dict[str, torch.Tensor]:
    """Data-randomisation test (Adebayo et al. 2018): maps of ``model`` vs a model trained on shuffled labels.

    Both explain the same targets (default: ``model``'s top class). Returns
    ``spearman_abs``, ``spearman`` and ``ssim``, each ``(N,)``; high values mean
    the method ignores what the model learned from the labels.
    """
    model, random_label_model = as_model(model), as_model(random_label_model)
    explain_fn = explain_fn or heatmap_explainer(method)
    settled = as_targets(model, as_batch(model, x), targets)
    return similarity(_explain(explain_fn, model, x, settled), _explain(explain_fn, random_label_model, x, settled))
