"""The newer CAMs: principal components, element-wise products, second derivatives, the whole network's biases.

Each is checked against its pytorch-grad-cam namesake (``tests/test_cam_variants.py``,
``tests/cam_reference.py``). They reuse the CAM family's one forward-and-gradient
pass (:func:`~convlens.heatmaps.cam.layer_gradients`) and its weighted channel sum;
what is new here is the formula. Every ``raw`` map is signed (the engine applies
the ReLU), except FullGrad's, which is a sum of magnitudes at the input's resolution.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConvlensError, first_line
from ..targets import ClassLogits, class_logits, select_output
from .base import RawMaps, Request, upsample
from .cam import layer_gradients, principal_projection, weighted_channel_sum


def eigengradcam(request: Request, *, sign_correction: bool = True) -> RawMaps:
    """Eigen-Grad-CAM: the first principal component of activations times gradients.

    Eigen-CAM (Muhammad & Yeasin 2020, arXiv:2008.00299) applied to the class-specific
    ``G * A`` instead of ``A``, as pytorch-grad-cam's ``EigenGradCAM`` defines it:
    with ``G * A`` reshaped to ``(h*w, C)`` and centred, ``M = (G * A) v_1``.
    ``sign_correction`` as in :func:`~convlens.heatmaps.cam.eigencam` (the reference
    leaves the SVD's sign as it comes: ``sign_correction=False``).
    """
    acts, grads = layer_gradients(request)
    return RawMaps([principal_projection(grad * act, sign_correction) for act, grad in zip(acts, grads)])


def gradcam_elementwise(request: Request) -> RawMaps:
    """Grad-CAM element-wise: ``M = sum_k ReLU(G_k * A_k)``, the ReLU before the channel sum.

    pytorch-grad-cam's ``GradCAMElementWise`` (no paper of its own): HiResCAM
    (Draelos & Carin 2020, arXiv:2011.08891) with each channel's negative
    evidence dropped before it can cancel another's positive evidence.
    """
    # ReLU(G * A) = (G where G * A > 0) * A: a weighting, so target="all" and several layers come for free.
    return weighted_channel_sum(request, lambda act, grad: grad * (grad * act > 0))


def fem(request: Request, *, k: float = 2.0) -> RawMaps:
    """FEM: each channel weighted by the share of its pixels above its own ``mean + k * std`` (no gradients).

    Fuad et al. 2020, "Features understanding in 3D CNNs for actions recognition
    in video", IPTA 2020 (hal-02963298): ``w_k = mean_ij [A_kij > mu_k + k sigma_k]``
    with the population standard deviation, ``M = sum_k w_k A_k``. Class-agnostic:
    the target only names the class in titles.
    """
    if not k == k or abs(k) == float("inf"):
        raise ConvlensError(f"fem's k must be a finite number of standard deviations, got {k}")
    maps = []
    for act in _activations(request):
        mean = act.mean(dim=(2, 3), keepdim=True)
        std = act.std(dim=(2, 3), keepdim=True, correction=0)
        weights = (act > mean + k * std).float().mean(dim=(2, 3), keepdim=True)
        maps.append((weights * act).sum(dim=1))
    return RawMaps(maps)


def kpcacam(
    request: Request,
    *,
    kernel: str = "sigmoid",
    gamma: float | None = None,
    coef0: float = 1.0,
    degree: int = 3,
    max_positions: int = 4096,
) -> RawMaps:
    """KPCA-CAM: the activations projected on their first kernel principal component (no gradients).

    Karmani et al. 2024, "KPCA-CAM: Visual Explainability of Deep Computer Vision
    Models using Kernel PCA", arXiv:2410.00267. With the pixels' C-vectors centred,
    ``K_ij = k(a_i, a_j)``, ``K`` double-centred and ``(lambda_1, u_1)`` its top
    eigenpair, ``M = sqrt(lambda_1) u_1``: scikit-learn's ``KernelPCA(n_components=1)
    .fit_transform``, which pytorch-grad-cam's ``KPCA_CAM`` calls, written in torch
    (float64). Kernels as scikit-learn's: ``sigmoid`` ``tanh(gamma <a, b> + coef0)``
    (the default, as the reference's), ``rbf`` ``exp(-gamma |a - b|^2)``,
    ``poly`` ``(gamma <a, b> + coef0)^degree``, ``linear``, ``cosine``; ``gamma``
    defaults to ``1 / C``. The sign is scikit-learn's: the largest-magnitude pixel
    positive. The kernel is ``(h*w)^2`` float64 numbers: a layer with more than
    ``max_positions`` positions (default 4096, 64x64: a 134 MB kernel) is refused.
    """
    if kernel not in _KERNELS:
        raise ConvlensError(f"unknown kpcacam kernel {kernel!r}; choose from {', '.join(_KERNELS)}")
    if gamma is not None and not gamma > 0:
        raise ConvlensError(f"kpcacam's gamma must be positive, got {gamma}")
    maps = []
    for name, act in zip(request.layers, _activations(request)):
        n, c, h, w = act.shape
        if h * w > max_positions:
            raise ConvlensError(
                f"kpcacam's kernel matrix is (h*w)^2 and layer {name!r} has {h}x{w} = {h * w} "
                f"positions, more than max_positions={max_positions}; choose a later layer "
                "or a smaller input (or raise max_positions)"
            )
        points = torch.nan_to_num(act.double(), nan=0.0).flatten(2).transpose(1, 2)  # (N, h*w, C)
        points = points - points.mean(dim=1, keepdim=True)
        gram = _KERNELS[kernel](points, 1.0 / c if gamma is None else gamma, coef0, degree)
        size = gram.shape[-1]
        centring = torch.eye(size, dtype=gram.dtype, device=gram.device) - 1.0 / size
        eigenvalues, eigenvectors = torch.linalg.eigh(centring @ gram @ centring)
        top = eigenvectors[..., -1] * eigenvalues[..., -1:].clamp(min=0).sqrt()
        maps.append(_largest_positive(top).float().view(n, h, w))
    return RawMaps(maps)


def _dot(points: torch.Tensor) -> torch.Tensor:
    return points @ points.transpose(1, 2)


def _squared_distances(points: torch.Tensor) -> torch.Tensor:
    norms = points.pow(2).sum(-1)
    return (norms.unsqueeze(-1) + norms.unsqueeze(-2) - 2 * _dot(points)).clamp(min=0)


def _cosine(points: torch.Tensor) -> torch.Tensor:
    norms = points.norm(dim=-1, keepdim=True)
    unit = points / torch.where(norms > 0, norms, torch.ones_like(norms))
    return _dot(unit)


_KERNELS = {
    "sigmoid": lambda p, gamma, coef0, degree: torch.tanh(gamma * _dot(p) + coef0),
    "rbf": lambda p, gamma, coef0, degree: torch.exp(-gamma * _squared_distances(p)),
    "poly": lambda p, gamma, coef0, degree: (gamma * _dot(p) + coef0) ** degree,
    "linear": lambda p, gamma, coef0, degree: _dot(p),
    "cosine": lambda p, gamma, coef0, degree: _cosine(p),
}


def _largest_positive(rows: torch.Tensor) -> torch.Tensor:
    """Each row of ``(N, P)`` signed so that its largest-magnitude entry is positive (scikit-learn's ``svd_flip``)."""
    index = rows.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(rows.gather(1, index))
    return rows * torch.where(sign == 0, torch.ones_like(sign), sign)


def _activations(request: Request) -> list[torch.Tensor]:
    """One pass without gradients: each layer's ``(N, C, h, w)`` output in float32; the target is settled on it."""
    with torch.inference_mode(), request.capture() as rec:
        output = rec.forward(request.x)
        request.score(output, clean=True)
        return [request.layer_output(rec, name).float() for name in request.layers]


def shapleycam(request: Request) -> RawMaps:
    """ShapleyCAM: Grad-CAM whose weights add a second-order term, ``w_k = mean_ij (G - H A / 2)_kij``.

    Cai 2025, "CAMs as Shapley Value-based Explainers", arXiv:2501.06261: the
    second-order Taylor expansion of the score at the activations gives
    ``w = mean_ij (dS/dA - 1/2 (d^2S/dA^2) A)``, the Hessian-vector product taken by
    double backpropagation. Where the network after the layer is piecewise linear
    (ReLU, max pooling, logits) the Hessian is zero and ShapleyCAM is Grad-CAM.
    As pytorch-grad-cam's ``ShapleyCAM`` with the logit as the target. Attention
    runs in PyTorch's math kernel here: the fused CPU kernels have no second derivative.
    """
    with request.capture(graph=True) as rec:
        with sdpa_kernel(SDPBackend.MATH):
            output = rec.forward(request.x)
        scores = request.score(output, clean=True)
        acts = [request.layer_output(rec, name) for name in request.layers]
        grads = torch.autograd.grad(scores.sum(), acts, allow_unused=True, create_graph=True)
        maps = []
        for name, act, grad in zip(request.layers, acts, grads):
            if grad is None:
                raise ConvlensError(f"the target does not depend on layer {name!r}; choose a layer before the output")
            hessian_term = None
            if grad.requires_grad:  # a gradient that does not depend on the activations has a zero Hessian
                try:
                    (hessian_term,) = torch.autograd.grad(
                        grad, act, grad_outputs=act.detach(), retain_graph=True, allow_unused=True
                    )
                except RuntimeError as err:  # an operation without a second derivative (torchvision's roi_align)
                    if "double backward" not in str(err) and "not implemented" not in str(err):
                        raise
                    raise ConvlensError(
                        f"shapleycam needs second derivatives and this model has an operation "
                        f"without one ({first_line(err)}); use gradcam or hirescam"
                    ) from None
            weights = grad.detach().float()
            if hessian_term is not None:
                weights = weights - 0.5 * hessian_term.float()
            maps.append((weights.mean(dim=(2, 3), keepdim=True) * act.detach().float()).sum(dim=1))
    return RawMaps(maps)


class FinerScore:
    """FinerCAM's target: the class logit minus its most similar classes', weighted by their probabilities.

    ``S = sum_j p_j (z_c - alpha z_j) / (sum_j p_j + 1e-9)`` over the ``similar``
    classes ``j`` whose logits are nearest ``z_c``, ``p = softmax(z)`` (differentiated too).
    """

    def __init__(self, classes: ClassLogits, alpha: float, similar: int):
        self.classes, self.alpha, self.similar = classes, alpha, similar

    def __call__(self, output) -> torch.Tensor:
        logits = class_logits(select_output(output, self.classes.select))
        index = torch.as_tensor(self.classes.class_indices[: logits.shape[0]], device=logits.device).view(-1, 1)
        target = logits.gather(1, index)
        distance = (logits.detach() - target.detach()).abs().scatter(1, index, float("-inf"))  # c itself comes first
        count = min(self.similar, logits.shape[1] - 1)
        nearest = distance.argsort(dim=1, stable=True)[:, 1 : 1 + count]
        weights = logits.softmax(dim=1).gather(1, nearest)
        difference = target - self.alpha * logits.gather(1, nearest)
        return (weights * difference).sum(1) / (weights.sum(1) + 1e-9)


def finercam(request: Request, *, alpha: float = 1.0, similar: int = 3) -> RawMaps:
    """Finer-CAM: Grad-CAM of the target class against the classes the model confuses it with.

    Zhang et al. 2025, "Finer-CAM: Spotting the Difference Reveals Finer Details
    for Visual Explanation", arXiv:2501.11309: Grad-CAM of
    ``S = sum_j p_j (z_c - alpha z_j) / sum_j p_j`` over the ``similar`` classes whose
    logits are nearest the target's (``p = softmax(z)``), as pytorch-grad-cam's
    ``FinerCAM`` with its default comparison of the three nearest classes.
    ``alpha=0`` is Grad-CAM of ``z_c``; larger ``alpha`` keeps only what tells ``c`` apart.
    """
    if similar < 1 or not alpha == alpha:
        raise ConvlensError(
            f"finercam needs similar >= 1 classes to compare with and a finite alpha, "
            f"got similar={similar}, alpha={alpha}"
        )
    request.settle_on_clean_batch()
    if not isinstance(request.score_fn, ClassLogits):
        raise ConvlensError(
            f"finercam compares a class with its nearest classes and cannot serve a "
            f"{type(request.score_fn).__name__} target; pass a class index or name"
        )
    finer = Request(
        request.model,
        request.x,
        request.layers,
        FinerScore(request.score_fn, alpha, similar),
        request.class_indices,
        request.progress,
        request.target,
    )
    return weighted_channel_sum(finer, lambda act, grad: grad.mean(dim=(2, 3), keepdim=True))


# -- FullGrad ----------------------------------------------------------------------------------------------


def bias_layers(model, biases: str = "all") -> dict[str, torch.Tensor]:
    """The layers whose bias FullGrad reads, by name, each with its bias ``(C,)`` added at that output.

    ``biases="all"``: every ``nn.Conv2d`` (subclasses too: they add the bias last) and
    ``nn.BatchNorm2d`` with a bias, a BatchNorm's folded into an affine map:
    ``beta - mu gamma / sqrt(var + eps)``; a BatchNorm that applies its activation
    inside (timm's ``BatchNormAct2d``) is read before the activation, at its ``drop``
    submodule's output. ``"exact"``: only modules whose type is exactly ``nn.Conv2d``
    or ``nn.BatchNorm2d``, as pytorch-grad-cam's ``FullGrad`` does. Other biases
    (GroupNorm, LayerNorm, a Linear layer applied per pixel) are not read.
    """
    found, seen = {}, set()
    layers = model.named_layers()
    for name, module in layers.items():
        bias = getattr(module, "bias", None)
        if id(module) in seen or not isinstance(bias, torch.Tensor):
            continue
        exact = type(module) in (nn.Conv2d, nn.BatchNorm2d)
        if biases == "exact" and not exact:
            continue
        if isinstance(module, nn.Conv2d):
            found[name] = bias.detach()
        elif isinstance(module, nn.BatchNorm2d) and module.running_mean is not None and module.running_var is not None:
            scale = module.weight.detach() / torch.sqrt(module.running_var + module.eps)
            folded = bias.detach() - module.running_mean * scale
            if exact:
                found[name] = folded
            elif isinstance(getattr(module, "act", None), nn.Module) and f"{name}.drop" in layers:
                found[f"{name}.drop"] = folded  # timm: batch_norm -> drop -> act; the drop's output is pre-activation
            else:
                continue  # a subclass whose output is not the affine map's: its bias-gradient cannot be read
        else:
            continue
        seen.add(id(module))
    return found


def _rescaled_sum(magnitudes: torch.Tensor, per_channel: bool, eps: float) -> torch.Tensor:
    """``(N, C, h, w)`` magnitudes min-max rescaled (each channel, or the whole layer) and summed over C."""
    dims = (2, 3) if per_channel else (1, 2, 3)
    low = magnitudes.amin(dim=dims, keepdim=True)
    shifted = magnitudes - low
    return (shifted / (shifted.amax(dim=dims, keepdim=True) + eps)).sum(dim=1)


def fullgrad(request: Request, *, rescale: str = "channel", biases: str = "all", eps: float = 1e-7) -> RawMaps:
    """FullGrad: input-gradient times input plus the bias-gradients of every convolution, each rescaled.

    Srinivas & Fleuret 2019, "Full-Gradient Representation for Neural Network
    Visualization", arXiv:1905.00780, eq. 9:
    ``S = psi(|dS/dx * x|) + sum_l sum_c psi(|b_lc * dS/dz_lc|)`` where ``z_l`` is the
    output of conv or BatchNorm layer ``l`` (``biases``: see :func:`bias_layers`) and ``psi``
    min-max rescales (denominator ``+ eps``) and upsamples bilinearly to the input.
    ``rescale="channel"`` rescales each channel (and each input colour) on its own,
    as eq. 9 and pytorch-grad-cam's ``FullGrad`` do; ``"layer"`` rescales each
    layer's channels together, as the authors' released code does (it also aligns
    corners when upsampling; convlens does not). One forward and one backward pass
    to the input; no layer is chosen (``layer`` is ignored). ``raw`` is the sum at
    the input's resolution. A model without such biases gets the input term alone
    (for a bias-free ReLU network that is the whole decomposition).
    """
    if rescale not in ("channel", "layer"):
        raise ConvlensError(f"fullgrad's rescale is 'channel' or 'layer', got {rescale!r}")
    if not eps >= 0:
        raise ConvlensError(f"fullgrad's eps must be >= 0, got {eps}")
    if biases not in ("all", "exact"):
        raise ConvlensError(f"fullgrad's biases is 'all' or 'exact', got {biases!r}")
    if request.model.layout == "channels_last":
        raise ConvlensError(
            "fullgrad reads the biases of torch Conv2d and BatchNorm2d layers, which a Keras model "
            "does not have; use input_x_gradient or a CAM method"
        )
    found = bias_layers(request.model, biases)
    per_channel = rescale == "channel"
    size = tuple(request.x.shape[-2:])
    x = request.x.detach().clone().requires_grad_()
    with request.capture(list(found), graph=True) as rec:
        output = rec.forward(x)
        scores = request.score(output, clean=True)
        names = [name for name in found if name in rec.outputs and rec.outputs[name].ndim == 4]
        # Gradients to the input and to the layers' outputs only, from one backward pass: no parameter gradients.
        grads = torch.autograd.grad(scores.sum(), [x] + [rec.outputs[name] for name in names], allow_unused=True)
    total = _rescaled_sum((grads[0] * x.detach()).float().abs(), per_channel, eps)
    for name, grad in zip(names, grads[1:]):
        if grad is not None:
            bias = found[name].float().to(grad.device).view(1, -1, 1, 1)
            total = total + upsample(_rescaled_sum((grad.float() * bias).abs(), per_channel, eps), size)
    return RawMaps([total])


# -- torch-cam's noise variants ----------------------------------------------------------------------------


def smoothgradcam_plusplus(
    request: Request,
    *,
    n_samples: int = 4,
    stdev: float = 0.3,
    seed: int = 0,
    eps: float = 1e-8,
    like_torchcam: bool = False,
) -> RawMaps:
    """Smooth Grad-CAM++: Grad-CAM++'s pixel coefficients from gradients averaged over noisy inputs.

    Omeiza et al. 2019, "Smooth Grad-CAM++: An Enhanced Inference Level Visualization
    Technique for Deep Convolutional Neural Network Models", arXiv:1908.01224, in
    torch-cam's reading (``SmoothGradCAMpp``): with ``G_m`` the gradient at the layer for
    the input plus noise ``e_m ~ N(0, stdev^2)`` (``stdev`` absolute, on the preprocessed
    input), ``D2 = mean_m G_m^2``, ``D3 = mean_m G_m^3``,
    ``alpha = D2 / (2 D2 + sum_ab A_ab D3_ab + eps)``, ``w_k = sum_ij alpha ReLU(mean_m G_m)``,
    ``M = sum_k w_k A_k`` with ``A`` the clean activations. torch-cam 0.5.0 weights the
    *last* noisy pass's gradient and activations instead of the mean gradient and the
    clean activations: ``like_torchcam=True`` does the same. The noise comes from a
    ``torch.Generator`` seeded with ``seed``, drawn sample by sample for the whole batch
    (torch-cam's order: ``torch.manual_seed(seed)`` before its call gives the same draws).
    """
    if n_samples < 1 or not stdev >= 0:
        raise ConvlensError(
            f"smoothgradcam++ needs n_samples >= 1 and stdev >= 0, got n_samples={n_samples}, stdev={stdev}"
        )
    clean_acts, _ = layer_gradients(request)
    generator = torch.Generator().manual_seed(seed)
    square: list[torch.Tensor] = []
    cube: list[torch.Tensor] = []
    mean: list[torch.Tensor] = []
    for _ in range(n_samples):
        noise = torch.randn(request.x.shape, generator=generator).to(request.x.device) * stdev
        noisy = Request(
            request.model,
            (request.x.float() + noise).to(request.x.dtype),
            request.layers,
            request.score_fn,
            request.class_indices,
            request.progress,
            request.target,
        )
        last_acts, last_grads = layer_gradients(noisy)
        if not square:
            square, cube, mean = ([torch.zeros_like(g) for g in last_grads] for _ in range(3))
        for layer, grad in enumerate(last_grads):
            square[layer] += grad.pow(2) / n_samples
            cube[layer] += grad.pow(3) / n_samples
            mean[layer] += grad / n_samples
    maps = []
    for layer, act in enumerate(clean_acts):
        alpha = square[layer] / (2 * square[layer] + (cube[layer] * act).sum(dim=(2, 3), keepdim=True) + eps)
        grad, read = (last_grads[layer], last_acts[layer]) if like_torchcam else (mean[layer], act)
        weights = (alpha * grad.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
        maps.append((weights * read).sum(dim=1))
    return RawMaps(maps)
