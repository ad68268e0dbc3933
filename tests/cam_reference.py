"""pytorch-grad-cam as the reference for the CAM family, shared by the reference tests and the model zoo.

Like is compared with like. pytorch-grad-cam min-max normalises at the layer's
resolution and then resizes with OpenCV, while convlens upsamples and then
normalises (the extremes of a bilinear upsampling are not the layer's), so the
comparison is made at the layer's resolution: the peer's target size is set to
the layer's, and convlens's ``raw`` gets the same ReLU + min-max. Differences
by design, switched to the peer's behaviour through the method's options:
Eigen-CAM (no sign correction: ``sign_correction=False``), Score-CAM
(``UpsamplingBilinear2d`` aligns corners: ``align_corners=True``). pytorch-grad-
cam has no CAM (Zhou et al.); on a GAP + linear model CAM is Grad-CAM times
``h * w``, so CAM is compared with its GradCAM. FullGrad reads every bias layer,
so it is compared at the input's resolution (``raw`` is there already); FinerCAM
is compared on the peer's default target, the top-1 class, which is convlens's too.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from pytorch_grad_cam import (FEM, KPCA_CAM, AblationCAM, EigenCAM, EigenGradCAM, FinerCAM, FullGrad, GradCAM,
                              GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, ShapleyCAM, XGradCAM)

TOLERANCE = 1e-3

#: method -> (pytorch-grad-cam class, convlens options that select the peer's variant)
CAM_PEERS = {
    "cam": (GradCAM, {}),
    "gradcam": (GradCAM, {}),
    "gradcam++": (GradCAMPlusPlus, {}),
    "xgradcam": (XGradCAM, {}),
    "hirescam": (HiResCAM, {}),
    "layercam": (LayerCAM, {}),
    "eigencam": (EigenCAM, {"sign_correction": False}),
    "scorecam": (ScoreCAM, {"align_corners": True}),
    "ablationcam": (AblationCAM, {}),
    "eigengradcam": (EigenGradCAM, {"sign_correction": False}),
    "gradcam_elementwise": (GradCAMElementWise, {}),
    "fullgrad": (FullGrad, {"biases": "exact"}),
    "kpcacam": (KPCA_CAM, {}),
    "fem": (FEM, {}),
    "shapleycam": (ShapleyCAM, {}),
    "finercam": (FinerCAM, {}),
}
#: the peer explains its own default target (the top-1 class against its three nearest), not a Logit
DEFAULT_TARGET = {"finercam"}
#: the peer reads every bias layer, not the one given; compared at the input's resolution
WHOLE_MODEL = {"fullgrad"}


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """ReLU, then per-map min-max to [0, 1]; a constant map becomes zeros (as both libraries return it)."""
    maps = torch.as_tensor(maps).float().clamp(min=0)
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return scaled.view_as(maps)


def peer_cam(method, module, layer_module, x, targets, layer_size, reshape=None) -> torch.Tensor:
    """pytorch-grad-cam's map for ``method`` at the layer's resolution ``layer_size`` (h, w)."""
    peer_class, _ = CAM_PEERS[method]
    kwargs = {"batch_size": 64} if method == "ablationcam" else {}
    peer = peer_class(module, [] if method in WHOLE_MODEL else [layer_module], reshape_transform=reshape, **kwargs)
    base = getattr(peer, "base_cam", peer)  # FinerCAM wraps a GradCAM
    base.batch_size = 64
    base.get_target_width_height = lambda tensor: layer_size[::-1]  # compare at the layer's resolution
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the peer's ShapleyCAM differentiates twice; fused attention cannot
            return torch.as_tensor(peer(x, None if method in DEFAULT_TARGET else targets))
    finally:
        # ShapleyCAM keeps graph-attached gradients, views under a reshape, which its release() cannot detach_()
        base.activations_and_grads.activations, base.activations_and_grads.gradients = [], []
        base.activations_and_grads.release()


def difference(method, raw, theirs) -> float:
    """Max abs difference after the same ReLU + min-max; Eigen-CAM up to the SVD's arbitrary sign."""
    gap = (minmax(raw) - theirs).abs().max()
    if method in ("eigencam", "eigengradcam"):  # LAPACK builds may return either sign of a singular vector
        gap = min(gap, (minmax(-raw) - theirs).abs().max())
    return float(gap)


class Logit:
    """A pytorch-grad-cam target: class ``index`` of a row; for a single sigmoid output, its logit."""

    def __init__(self, index: int, sigmoid: bool = False):
        self.index, self.sigmoid = index, sigmoid

    def __call__(self, row):
        return torch.logit(row[0].double()).float() if self.sigmoid else row[self.index]


#: torch-cam's noise variants: method -> (torchcam.methods class name, convlens options that select torch-cam's
#: reading); both sides draw the same noise: convlens from ``seed``, torch-cam after ``torch.manual_seed(seed)``
TORCHCAM_PEERS = {
    "smoothgradcam++": ("SmoothGradCAMpp", {"like_torchcam": True, "n_samples": 4, "stdev": 0.3}),
    "sscam": ("SSCAM", {"n_samples": 2, "stdev": 2.0}),
    "iscam": ("ISCAM", {"n_samples": 3}),
}


def torchcam_cam(method, module, layer_name, x, class_indices, seed) -> torch.Tensor:
    """torch-cam's map for ``method`` at the layer's resolution (min-max normalised, as it returns it)."""
    import torchcam.methods

    peer_class = getattr(torchcam.methods, TORCHCAM_PEERS[method][0])
    options = {k: v for k, v in TORCHCAM_PEERS[method][1].items() if k in ("n_samples", "stdev")}
    if method in ("sscam", "iscam"):
        options["batch_size"] = 64
    renamed = {"n_samples": "num_samples", "stdev": "std", "batch_size": "batch_size"}
    with peer_class(module, layer_name, input_shape=tuple(x.shape[1:]),
                    **{renamed[k]: v for k, v in options.items()}) as extractor:
        scores = module(x)
        torch.manual_seed(seed)
        return extractor(list(class_indices), scores)[0].detach()
