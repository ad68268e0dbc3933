"""Every heatmap method by name, in one visible place.

``METHODS`` is a plain mapping: a method is a function and a :class:`Method`
record here. To add your own, ``METHODS["mine"] = Method("mine", "cam", compute)``
(``pixel_level=True`` for a sparse per-pixel map, which is then drawn on its own);
the suite's tests are parametrised over this mapping, so a method is tested the
moment it is listed.
"""

from __future__ import annotations

from ..errors import ConvlensError, did_you_mean
from .attribution import deconvolution, gradient_shap, input_x_gradient, occlusion, smoothgrad_sq, vargrad
from .base import Method
from .cam import class_activation_map, eigencam, gradcam, gradcam_plusplus, hirescam, layercam, xgradcam
from .cam_variants import (
    eigengradcam,
    fem,
    finercam,
    fullgrad,
    gradcam_elementwise,
    kpcacam,
    shapleycam,
    smoothgradcam_plusplus,
)
from .deeplift import deeplift, deeplift_shap
from .gradients import guided_backprop, guided_gradcam, integrated_gradients, saliency, smoothgrad
from .lrp import lrp, lrp_alpha_beta, lrp_epsilon_gamma_box
from .perturbation import ablationcam, scorecam
from .scorecam_variants import iscam, sscam
from .superpixels import feature_ablation, kernel_shap, lime, shapley_sampling

METHODS: dict[str, Method] = {
    "cam": Method("cam", "cam", class_activation_map, all_classes=True),
    "gradcam": Method("gradcam", "cam", gradcam, multi_layer=True, all_classes=True),
    "gradcam++": Method("gradcam++", "cam", gradcam_plusplus, multi_layer=True, all_classes=True),
    "xgradcam": Method("xgradcam", "cam", xgradcam, multi_layer=True, all_classes=True),
    "hirescam": Method("hirescam", "cam", hirescam, multi_layer=True, all_classes=True),
    "layercam": Method("layercam", "cam", layercam, multi_layer=True, all_classes=True),
    "eigencam": Method("eigencam", "cam", eigencam, multi_layer=True),
    "eigengradcam": Method("eigengradcam", "cam", eigengradcam, multi_layer=True),
    "gradcam_elementwise": Method(
        "gradcam_elementwise", "cam", gradcam_elementwise, multi_layer=True, all_classes=True
    ),
    "fullgrad": Method("fullgrad", "cam", fullgrad, uses_layer=False),  # a sum of upsampled layer maps: blended
    "kpcacam": Method("kpcacam", "cam", kpcacam, multi_layer=True),
    "fem": Method("fem", "cam", fem, multi_layer=True),
    "shapleycam": Method("shapleycam", "cam", shapleycam, multi_layer=True),
    "finercam": Method("finercam", "cam", finercam, multi_layer=True),
    "smoothgradcam++": Method("smoothgradcam++", "cam", smoothgradcam_plusplus, multi_layer=True),
    "scorecam": Method("scorecam", "perturbation", scorecam),
    "ablationcam": Method("ablationcam", "perturbation", ablationcam),
    "sscam": Method("sscam", "perturbation", sscam),
    "iscam": Method("iscam", "perturbation", iscam),
    "saliency": Method("saliency", "gradient", saliency, uses_layer=False, pixel_level=True),
    "smoothgrad": Method("smoothgrad", "gradient", smoothgrad, uses_layer=False, pixel_level=True),
    "integrated_gradients": Method(
        "integrated_gradients", "gradient", integrated_gradients, uses_layer=False, pixel_level=True
    ),
    "guided_backprop": Method("guided_backprop", "gradient", guided_backprop, uses_layer=False, pixel_level=True),
    "guided_gradcam": Method("guided_gradcam", "gradient", guided_gradcam, pixel_level=True),
    "input_x_gradient": Method("input_x_gradient", "gradient", input_x_gradient, uses_layer=False, pixel_level=True),
    "deconvolution": Method("deconvolution", "gradient", deconvolution, uses_layer=False, pixel_level=True),
    "smoothgrad_sq": Method("smoothgrad_sq", "gradient", smoothgrad_sq, uses_layer=False, pixel_level=True),
    "vargrad": Method("vargrad", "gradient", vargrad, uses_layer=False, pixel_level=True),
    "gradient_shap": Method("gradient_shap", "gradient", gradient_shap, uses_layer=False, pixel_level=True),
    "occlusion": Method("occlusion", "perturbation", occlusion, uses_layer=False),
    "feature_ablation": Method("feature_ablation", "perturbation", feature_ablation, uses_layer=False),
    "shapley_sampling": Method("shapley_sampling", "perturbation", shapley_sampling, uses_layer=False),
    "deeplift": Method("deeplift", "gradient", deeplift, uses_layer=False, pixel_level=True),
    "deeplift_shap": Method("deeplift_shap", "gradient", deeplift_shap, uses_layer=False, pixel_level=True),
    "lime": Method("lime", "perturbation", lime, uses_layer=False),
    "kernel_shap": Method("kernel_shap", "perturbation", kernel_shap, uses_layer=False),
    "lrp": Method("lrp", "gradient", lrp, uses_layer=False, pixel_level=True),
    "lrp_epsilon_gamma_box": Method(
        "lrp_epsilon_gamma_box", "gradient", lrp_epsilon_gamma_box, uses_layer=False, pixel_level=True
    ),
    "lrp_alpha_beta": Method("lrp_alpha_beta", "gradient", lrp_alpha_beta, uses_layer=False, pixel_level=True),
}


def get_method(name: str) -> Method:
    key = name.strip().lower().replace("_", "").replace("-", "")
    aliases = {m.replace("_", "").replace("-", ""): m for m in METHODS}
    aliases.update(
        {
            "gradcampp": "gradcam++",
            "gradcamplusplus": "gradcam++",
            "ig": "integrated_gradients",
            "vanilla": "saliency",
            "gradient": "saliency",
        }
    )
    if key not in aliases:
        raise ConvlensError(f"unknown method {name!r}{did_you_mean(name, METHODS)} (choose from {', '.join(METHODS)})")
    return METHODS[aliases[key]]


def style_for(method: str | Method) -> str:
    """How a method's maps are drawn by default (a style of :data:`convlens.render.overlay.STYLES`).

    ``"map"`` (the map alone) for pixel-level methods, whose sparse maps vanish when
    blended over the photo; ``"blend"`` for the rest. ``method`` is a registered
    name or a :class:`Method`. It lives beside the registry, which knows each
    method's kind, so that rendering needs nothing from the heatmap package.
    """
    return "map" if (get_method(method) if isinstance(method, str) else method).pixel_level else "blend"
