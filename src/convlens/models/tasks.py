"""Segmentation and detection networks: how they are fed, where ``auto`` looks, what ``predict`` says.

torchvision's segmentation models (DeepLabV3, FCN, LR-ASPP) return ``{"out": (N, K, H, W)}``
(plus ``"aux"`` when built with it; ``out`` is then chosen): they take an ImageNet-normalised
picture, resized whole to the input size (no crop, so a mask drawn on the picture fits the output).

torchvision's detectors (Faster R-CNN, RetinaNet, FCOS, SSD) take pictures in ``[0, 1]`` and
normalise and resize them themselves (their ``transform``); in eval mode they return one
``{"boxes", "labels", "scores"}`` per image. convlens resizes the picture to the input size and
sets the detector's own resize to that same size, so it resizes nothing more and boxes, layer
maps and heatmaps are all in the input's pixels. SSD runs at its one fixed size.

``auto`` is the last spatial layer inside the network's ``backbone`` (the features, before the
heads): the layer the tutorials of pytorch-grad-cam explain.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..targets import OutputKey, detections, is_dense, select_output
from ..targets.tasks import BACKGROUND

if TYPE_CHECKING:
    from .model import Model

#: ``label(index) -> name``: a class's name (:meth:`Model.label`).
LabelOf = Callable[[int], str]


@dataclass
class PixelShare:
    """One class of a segmentation: the share of the picture's pixels where it wins."""

    index: int
    label: str
    share: float


@dataclass
class Detection:
    """One detection: its class, its score and its box ``(x0, y0, x1, y1)`` in the input's pixels."""

    index: int
    label: str
    score: float
    box: tuple[float, float, float, float]


def is_detector(module: nn.Module) -> bool:
    """A torchvision-style detector: it normalises and resizes its own input (``GeneralizedRCNNTransform``)."""
    return type(getattr(module, "transform", None)).__name__ == "GeneralizedRCNNTransform"


def is_segmenter(module: nn.Module) -> bool:
    """A torchvision segmentation model (``backbone`` + ``classifier`` returning ``{"out": ...}``)."""
    return any(cls.__name__ == "_SimpleSegmentationModel" for cls in type(module).__mro__) or (
        type(module).__name__ == "LRASPP"
    )


def task_of(module: nn.Module) -> str | None:
    """``"detect"``, ``"segment"`` or ``None`` (anything else) by the module's kind."""
    return "detect" if is_detector(module) else "segment" if is_segmenter(module) else None


def detector_size(module: nn.Module) -> tuple[tuple[int, int], bool]:
    """The input size a detector runs at by default (its own resize's short side), and whether it is fixed."""
    transform: Any = module.transform  # torchvision's GeneralizedRCNNTransform (untyped)
    if transform.fixed_size is not None:
        height, width = (int(v) for v in transform.fixed_size)
        return (height, width), True
    side = int(transform.min_size[-1])
    return (side, side), False


def set_detector_size(module: nn.Module, size: Sequence[int]) -> None:
    """Make the detector's own resize leave a ``size`` input as it is (scale factor 1)."""
    transform: Any = module.transform  # torchvision's GeneralizedRCNNTransform (untyped)
    if transform.fixed_size is None:
        transform.min_size = (int(min(size)),)
        transform.max_size = int(max(size))


def task_info(module: nn.Module, task: str) -> dict[str, Any]:
    """The ``Model.info`` entries of a task model: where ``auto`` looks, whether the size is fixed."""
    info: dict[str, Any] = {"task": task, "auto_within": "backbone"}
    transform: Any = getattr(module, "transform", None)  # a detector's GeneralizedRCNNTransform (untyped)
    if task == "detect" and transform.fixed_size is not None:
        info["fixed_input_size"] = True
    return info


def pixel_shares(scores: torch.Tensor, label: LabelOf, top_k: int) -> list[list[PixelShare]]:
    """Per image, the ``top_k`` classes that win the most pixels of a dense output, with their shares."""
    winners = scores.argmax(1).flatten(1)
    count = scores.shape[1]
    result = []
    for row in winners:
        shares = torch.bincount(row, minlength=count).float() / row.numel()
        values, indices = shares.topk(max(1, min(top_k, count)))
        result.append([PixelShare(int(i), label(int(i)), float(v)) for v, i in zip(values, indices) if v > 0])
    return result


def detection_rows(found: list[Mapping[str, Any]], label: LabelOf, top_k: int) -> list[list[Detection]]:
    """Per image, the first ``top_k`` detections (the detector's order: by score)."""
    return [
        [
            Detection(int(k), label(int(k)), float(s), _rounded_box(box))
            for box, k, s in zip(d["boxes"][:top_k], d["labels"][:top_k].tolist(), d["scores"][:top_k].tolist())
        ]
        for d in found
    ]


def _rounded_box(box: torch.Tensor) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (round(float(v), 1) for v in box)
    return x0, y0, x1, y1


def task_predictions(output: Any, select: OutputKey, label: LabelOf, top_k: int) -> list[list[Any]] | None:
    """What ``predict`` says for a detector (its detections) or a segmenter (pixel shares); ``None`` otherwise."""
    found = detections(output)
    if found is not None:
        return detection_rows(found, label, top_k)
    scores = select_output(output, select)
    if is_dense(scores):
        return pixel_shares(scores, label, top_k)
    return None


def task_names() -> list[str]:
    """torchvision's segmentation and detection model names (keypoint and mask R-CNN included)."""
    import torchvision

    models = torchvision.models
    return sorted(models.list_models(module=models.segmentation) + models.list_models(module=models.detection))


def load_task_model(
    name: str, weights: str | os.PathLike[str] | None, labels: list[str] | None, input_size: Sequence[int] | None = None
) -> Model:
    """A torchvision segmentation model or detector by name; ``weights`` as :func:`convlens.load_model` takes it.

    With ``"none"`` (or a weights file) the backbone is random too (``weights_backbone=None``): nothing
    is downloaded. The class names are the weights' categories (VOC for segmentation, COCO for detection).
    """
    from pathlib import Path

    import torchvision

    from ..errors import ConvlensError, first_line
    from .loading import _load_state_dict, _read_state_dict
    from .model import Model
    from .transforms import IMAGENET_MEAN, IMAGENET_STD, make_transform

    default = torchvision.models.get_model_weights(name).DEFAULT
    detect = name in torchvision.models.list_models(module=torchvision.models.detection)
    extra: dict[str, int] = {}
    if detect and input_size is not None:
        extra = {"min_size": int(min(input_size)), "max_size": int(max(input_size))}
    try:
        if weights == "default":
            module = torchvision.models.get_model(name, weights=default, **extra)
        else:
            module = torchvision.models.get_model(name, weights=None, weights_backbone=None, **extra)
    except (OSError, RuntimeError) as err:
        raise ConvlensError(
            f"cannot download the default weights of {name} ({first_line(err)}); pass a local "
            "weights file with --weights PATH, or --weights none for random weights"
        ) from None
    if weights not in (None, "none", "default"):
        _load_state_dict(module, _read_state_dict(Path(weights)), Path(weights), name)
    task = "detect" if detect else "segment"
    size: tuple[int, ...]
    spec: dict[str, Any]
    if detect:
        size, _ = detector_size(module)
        spec = {"mean": None, "std": None, "crop": None, "source": "detector, which normalises itself"}
    else:
        side = int(getattr(default.transforms(), "resize_size", [520])[0])
        size = tuple(input_size) if input_size is not None else (side, side)
        spec = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop": None, "source": f"torchvision {default}"}
    transform, described = make_transform(size, **spec)
    height, width = size
    return Model(
        module=module,
        name=name,
        transform=transform,
        input_size=(height, width),
        labels=labels or list(default.meta.get("categories") or []) or None,
        output="logits",
        info={"weights": str(weights), "transform": spec, **task_info(module, task)},
        select="out" if task == "segment" else None,
        preprocessing=described,
    )


__all__ = [
    "BACKGROUND",
    "Detection",
    "PixelShare",
    "detector_size",
    "is_detector",
    "is_segmenter",
    "load_task_model",
    "pixel_shares",
    "set_detector_size",
    "task_info",
    "task_names",
    "task_of",
    "task_predictions",
]
