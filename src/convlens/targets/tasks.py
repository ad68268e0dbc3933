"""Targets for models that are not classifiers: segmentation, detection and embeddings.

Each is settled once, on the pass over the clean batch (``settle(output, labels=, select=,
model=) -> (target, class_indices)``), and the settled target then scores any pass over
the same images (masked, noisy or perturbed copies) by what it fixed on the clean one:

* :class:`Region` ``(class_, mask=None)``: the class's logits summed over a mask, by default
  the pixels where that class wins (argmax over classes) in the clean prediction, as
  pytorch-grad-cam's ``SemanticSegmentationTarget``. For a dense output ``(N, K, H, W)``.
* :class:`Box` ``(index)`` or ``(label, iou_with=(x0, y0, x1, y1))``: the score of one
  detection of a detector that returns a list of ``{"boxes", "labels", "scores"}`` (torchvision's
  Faster R-CNN, RetinaNet, FCOS, SSD). On another pass the detection is found again as the one of
  the same label overlapping the clean one most (IoU above ``iou_threshold``; none: score 0);
  ``regression=True`` adds that IoU, as pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` does.
  Box coordinates are in the model input's pixels.
* :class:`Similarity` ``(reference)``: the cosine similarity of each image's embedding to a
  reference's: an image (run through the model without gradients) or a vector.

A settled target has ``rows(rows)``: the same target for a batch made of those images' rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConvlensError, did_you_mean
from .core import OutputKey, describe_outputs, select_output

if TYPE_CHECKING:
    from ..models.model import Model

BACKGROUND = "__background__"


def is_dense(scores: Any) -> bool:
    """Whether a class-score tensor is a dense map ``(N, K, H, W)`` with more than one pixel (segmentation)."""
    return isinstance(scores, torch.Tensor) and scores.ndim == 4 and scores.shape[-1] * scores.shape[-2] > 1


def detections(output: Any) -> list[Mapping[str, Any]] | None:
    """A detector's output, one ``{"boxes", "labels", "scores"}`` per image, or ``None`` if it is not one."""
    if (
        isinstance(output, (list, tuple))
        and output
        and all(isinstance(d, Mapping) and {"boxes", "labels", "scores"} <= set(d) for d in output)
    ):
        return list(output)
    return None


def output_task(output: Any, select: OutputKey = None) -> str:
    """``"detect"`` (a list of detections), ``"segment"`` (a dense class map) or ``"classify"``."""
    if detections(output) is not None:
        return "detect"
    try:
        return "segment" if is_dense(select_output(output, select)) else "classify"
    except ConvlensError:
        return "classify"


def _class_index(spec: Any, count: int, labels: list[str] | None) -> int:
    if isinstance(spec, torch.Tensor):
        spec = spec.item()
    if isinstance(spec, str) and spec.lstrip("-").isdigit():
        spec = int(spec)
    if isinstance(spec, str):
        if labels is None:
            raise ConvlensError(f"class {spec!r} is a name but the model has no labels; pass a class index")
        if spec not in labels:
            raise ConvlensError(f"unknown class {spec!r}{did_you_mean(spec, labels)}")
        return labels.index(spec)
    if isinstance(spec, bool) or not isinstance(spec, (int, np.integer)):
        raise ConvlensError(f"class {spec!r} is not a class index or name")
    if not 0 <= int(spec) < count:
        raise ConvlensError(f"class {spec} is out of range: the model has {count} classes (0..{count - 1})")
    return int(spec)


def _per_image(spec: Any, count: int, what: str) -> list[Any]:
    if isinstance(spec, (list, tuple)):
        if len(spec) != count:
            raise ConvlensError(f"{len(spec)} {what} given for {count} images; give one per image or one for all")
        return list(spec)
    return [spec] * count


# -- segmentation -------------------------------------------------------------------------------------


def read_mask(mask: Any, size: tuple[int, int]) -> torch.Tensor:
    """A mask (a path to an image, a PIL image, an array or tensor ``(H, W)``; nonzero is inside) as a
    boolean ``(h, w)`` at ``size``, resized nearest-neighbour."""
    if isinstance(mask, (str, Path)):
        path = Path(mask)
        if not path.is_file():
            raise ConvlensError(f"mask file not found: {path}")
        try:
            mask = Image.open(path)
            mask.load()
        except Exception as err:
            raise ConvlensError(f"cannot read mask {path}: {err}") from None
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    values = (mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask))).detach().cpu()
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise ConvlensError(f"a mask is one (H, W) picture, got shape {tuple(values.shape)}")
    inside = (values != 0).float()
    if tuple(inside.shape) != tuple(size):
        inside = F.interpolate(inside[None, None], size=size, mode="nearest")[0, 0]
    return inside > 0


class Region:
    """Segmentation target: class ``class_``'s logits summed over ``mask`` (see the module docstring).

    ``class_``: an index or name (a list: one per image), or ``None``: each image's class that
    wins the most pixels (``__background__`` only when nothing else wins any). ``mask``: ``None``
    (the pixels where the class wins in the clean prediction), or a picture/array/tensor ``(H, W)``
    (nonzero is inside), resized nearest to the output's size; a list gives one per image.
    """

    def __init__(self, class_: Any = None, mask: Any = None, select: OutputKey = None):
        self.class_, self.mask, self.select = class_, mask, select
        self._classes: list[int] | None = None
        self._masks: torch.Tensor | None = None

    def settle(
        self, output: Any, labels: list[str] | None = None, select: OutputKey = None, model: Model | None = None
    ) -> tuple[Region, list[int]]:
        chosen = self.select if self.select is not None else select
        scores = select_output(output, chosen).detach()
        if not is_dense(scores):
            raise ConvlensError(
                f"a region target is for segmentation models, whose output is (N, classes, H, W); "
                f"this model's class scores have shape {tuple(scores.shape)}: pass a class instead"
            )
        n, count, h, w = scores.shape
        winners = scores.argmax(1)
        classes = [
            self._default_class(winners[i], count, labels) if spec is None else _class_index(spec, count, labels)
            for i, spec in enumerate(_per_image(self.class_, n, "classes"))
        ]
        if self.mask is None:
            masks = torch.stack([winners[i] == k for i, k in enumerate(classes)])
        else:
            masks = torch.stack([read_mask(m, (h, w)).to(scores.device) for m in _per_image(self.mask, n, "masks")])
        for i, (k, inside) in enumerate(zip(classes, masks)):
            if not inside.any():
                name = labels[k] if labels and k < len(labels) else f"class {k}"
                why = "the mask given holds no pixel" if self.mask is not None else f"{name} wins no pixel"
                raise ConvlensError(f"the region of {name} is empty in image {i}: {why}; pass another class or a mask")
        settled = Region(classes, self.mask, chosen)
        settled._classes, settled._masks = classes, masks
        return settled, classes

    @staticmethod
    def _default_class(winners: torch.Tensor, count: int, labels: list[str] | None) -> int:
        shares = torch.bincount(winners.flatten(), minlength=count)
        if labels and labels[0] == BACKGROUND and shares[1:].sum() > 0:
            shares[0] = 0
        return int(shares.argmax())

    def _settled(self) -> tuple[list[int], torch.Tensor]:
        """The class and mask of each image, fixed by :meth:`settle`."""
        if self._classes is None or self._masks is None:
            raise RuntimeError("this Region is not settled yet: call settle(output) first")
        return self._classes, self._masks

    def rows(self, rows: Sequence[int]) -> Region:
        """The settled target for a batch of these images' rows."""
        classes, masks = self._settled()
        settled = Region([classes[i] for i in rows], self.mask, self.select)
        settled._classes, settled._masks = settled.class_, masks[list(rows)]
        return settled

    def __call__(self, output: Any) -> torch.Tensor:
        target = self if self._masks is not None else self.settle(output, select=self.select)[0]
        scores = select_output(output, target.select)
        n = scores.shape[0]
        classes, masks = target._settled()
        index = torch.as_tensor(classes[:n], device=scores.device)
        picked = scores.gather(1, index.view(-1, 1, 1, 1).expand(n, 1, *scores.shape[2:])).squeeze(1)
        return (picked * masks[:n].to(picked)).sum(dim=(1, 2))

    def __repr__(self) -> str:
        return f"Region({self._classes if self._classes is not None else self.class_!r})"


# -- embeddings -----------------------------------------------------------------------------------------


class Similarity:
    """Embedding target: cosine similarity of each image's embedding to ``reference``'s.

    ``reference``: an image (a path, PIL image, array ``(H, W[, C])`` or tensor ``(C, H, W)``/``(N, C, H, W)``),
    embedded by the model itself without gradients, or an embedding: a 1-D vector, or ``(N, D)``
    one per image, or a ``.npy`` file holding one. The model's output (``select`` picks it from several)
    is flattened per image.
    """

    def __init__(self, reference: Any, select: OutputKey = None):
        if isinstance(reference, (str, Path)) and str(reference).lower().endswith(".npy"):
            reference = read_vector(reference)
        self.reference, self.select = reference, select
        self._vectors: torch.Tensor | None = None

    def _is_vector(self) -> bool:
        ref = self.reference
        return (isinstance(ref, torch.Tensor) and ref.ndim <= 2) or (isinstance(ref, np.ndarray) and ref.ndim == 1)

    def prepare(self, model: Model, select: OutputKey = None) -> Similarity:
        """The same target with a reference image embedded by ``model``: call it before any capture of the
        model is open (the reference's pass must not run through another caller's hooks)."""
        if self._is_vector() or self._vectors is not None:
            return self
        chosen = self.select if self.select is not None else select
        return Similarity(embed(model, self.reference, chosen), chosen)

    def settle(
        self, output: Any, labels: list[str] | None = None, select: OutputKey = None, model: Model | None = None
    ) -> tuple[Similarity, list[int]]:
        chosen = self.select if self.select is not None else select
        embedding = select_output(output, chosen).detach().flatten(1)
        if self._vectors is not None:  # settled already (the same images again): keep its reference
            vectors = self._vectors
        elif self._is_vector():
            vectors = torch.as_tensor(self.reference).detach()
            vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
        else:
            if model is None:
                raise ConvlensError(
                    "a similarity target with a reference image needs the model to embed it; "
                    "pass the reference's embedding instead"
                )
            vectors = embed(model, self.reference, chosen)
        n, size = embedding.shape
        if vectors.shape[1] != size:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else describe_outputs(output)
            raise ConvlensError(
                f"the reference embedding has {vectors.shape[1]} values and the model's output has "
                f"{size} per image ({shape}); pass a reference image for this model or a vector "
                "of its output's size"
            )
        if vectors.shape[0] not in (1, n):
            raise ConvlensError(f"{vectors.shape[0]} references given for {n} images; give one, or one per image")
        settled = Similarity(self.reference, chosen)
        settled._vectors = vectors.to(embedding).expand(n, size)
        return settled, [-1] * n

    def rows(self, rows: Sequence[int]) -> Similarity:
        if self._vectors is None:
            raise RuntimeError("this Similarity is not settled yet: call settle(output) first")
        settled = Similarity(self.reference, self.select)
        settled._vectors = self._vectors[list(rows)]
        return settled

    def __call__(self, output: Any) -> torch.Tensor:
        if self._vectors is None:
            return self.settle(output)[0](output)
        embedding = select_output(output, self.select).flatten(1)
        return F.cosine_similarity(embedding, self._vectors[: embedding.shape[0]].to(embedding), dim=1)

    def __repr__(self) -> str:
        return "Similarity()"


def read_vector(path: str | Path) -> torch.Tensor:
    """A reference embedding saved with ``numpy.save``: a vector ``(D,)`` or one per image ``(N, D)``."""
    path = Path(path)
    if not path.is_file():
        raise ConvlensError(f"reference file not found: {path}")
    try:
        values = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ConvlensError(f"cannot read the reference embedding {path}: {str(err).splitlines()[0]}") from None
    if values.ndim not in (1, 2) or values.size == 0 or not np.issubdtype(values.dtype, np.number):
        raise ConvlensError(
            f"a reference embedding is a vector (D,) or (N, D) of numbers; {path} holds "
            f"{values.dtype} of shape {values.shape}"
        )
    return torch.from_numpy(values.astype(np.float32))


def embed(model: Model, images: Any, select: OutputKey = None) -> torch.Tensor:
    """``(N, D)``: the model's flattened output for ``images``, without gradients (logit rewrites applied)."""
    from ..capture import capture

    x, _ = model.as_batch(images)
    with torch.inference_mode(), capture(model, rewrite=model.logit_rewrites()) as rec:
        output = rec.forward(x)
    return select_output(output, select).detach().flatten(1).float()


# -- detection -------------------------------------------------------------------------------------------


def describe_detections(found: Mapping[str, Any], labels: list[str] | None, limit: int = 3) -> str:
    """``"cat 0.91, dog 0.40"``: the first detections of one image."""
    names = [labels[k] if labels and 0 <= k < len(labels) else f"class {k}" for k in found["labels"].tolist()]
    text = ", ".join(f"{name} {score:.2f}" for name, score in zip(names, found["scores"].tolist()))
    return text if len(names) <= limit else ", ".join(text.split(", ")[:limit]) + ", ..."


class Box:
    """Detection target: one detection's score (see the module docstring).

    ``Box(index)``: the detector's ``index``-th detection of each image (torchvision: by score);
    ``Box(label, iou_with=(x0, y0, x1, y1))``: the detection of that class (index or name)
    that overlaps the given box most. ``regression=True`` adds the IoU of the detection with the
    clean one (pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``); ``iou_threshold``: how much a
    detection of another pass must overlap the clean one to count as it.
    """

    def __init__(
        self,
        index: int | str = 0,
        iou_with: Sequence[float] | None = None,
        *,
        regression: bool = False,
        iou_threshold: float = 0.5,
    ):
        self.index, self.iou_with = index, None if iou_with is None else [float(v) for v in iou_with]
        if self.iou_with is not None and len(self.iou_with) != 4:
            raise ConvlensError(f"a box is (x0, y0, x1, y1), got {len(self.iou_with)} numbers")
        self.regression, self.iou_threshold = regression, iou_threshold
        self._boxes: torch.Tensor | None = None
        self._labels: list[int] | None = None

    def settle(
        self, output: Any, labels: list[str] | None = None, select: OutputKey = None, model: Model | None = None
    ) -> tuple[Box, list[int]]:
        found = detections(output)
        if found is None:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else describe_outputs(output)
            raise ConvlensError(
                f"a box target is for detectors, which return boxes, labels and scores per image; "
                f"this model returns {shape}"
            )
        boxes, classes = [], []
        for i, det in enumerate(found):
            count = len(det["boxes"])
            if count == 0:
                raise ConvlensError(
                    f"the detector found nothing in image {i} (no box scored above its threshold); "
                    "nothing to explain there: try another image, or a lower score threshold"
                )
            if self.iou_with is None:
                index = self.index
                if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
                    raise ConvlensError(
                        f"box {index!r} is not a detection index; pass Box(index) or "
                        "Box(label, iou_with=(x0, y0, x1, y1))"
                    )
                if not 0 <= index < count:
                    raise ConvlensError(
                        f"box {index} is past the detections: the detector found {count} in image {i} "
                        f"(0..{count - 1}: {describe_detections(det, labels)})"
                    )
            else:
                label = _class_index(self.index, 1 << 30 if labels is None else len(labels), labels)
                same = (det["labels"] == label).nonzero().flatten()
                if len(same) == 0:
                    name = labels[label] if labels and label < len(labels) else f"class {label}"
                    raise ConvlensError(
                        f"the detector found no {name} in image {i}; it found {describe_detections(det, labels)}"
                    )
                given = torch.tensor([self.iou_with], dtype=det["boxes"].dtype, device=det["boxes"].device)
                index = int(same[_box_iou(given, det["boxes"][same].detach())[0].argmax()])
            boxes.append(det["boxes"][index].detach())
            classes.append(int(det["labels"][index]))
        settled = self._copy()
        settled._boxes, settled._labels = torch.stack(boxes), classes
        return settled, classes

    def _copy(self) -> Box:
        return Box(self.index, self.iou_with, regression=self.regression, iou_threshold=self.iou_threshold)

    def rows(self, rows: Sequence[int]) -> Box:
        boxes, labels = self._settled()
        settled = self._copy()
        settled._boxes, settled._labels = boxes[list(rows)], [labels[i] for i in rows]
        return settled

    def _settled(self) -> tuple[torch.Tensor, list[int]]:
        """The box and label of each image, fixed by :meth:`settle`."""
        if self._boxes is None or self._labels is None:
            raise RuntimeError("this Box is not settled yet: call settle(output) first")
        return self._boxes, self._labels

    @property
    def boxes(self) -> torch.Tensor | None:
        """The settled detection of each image ``(N, 4)``, ``None`` before settling."""
        return self._boxes

    def __call__(self, output: Any) -> torch.Tensor:
        if self._boxes is None:
            return self.settle(output)[0](output)
        settled_boxes, settled_labels = self._settled()
        found = detections(output)
        if found is None:
            raise ConvlensError("a box target is for detectors, which return boxes, labels and scores per image")
        scores = []
        for i, det in enumerate(found):
            zero = det["scores"].new_zeros(())
            same = det["labels"] == settled_labels[i]
            if not same.any():
                scores.append(zero)
                continue
            ious = _box_iou(settled_boxes[i : i + 1].to(det["boxes"]), det["boxes"][same])[0]
            best = int(ious.argmax())
            matched = ious[best] > self.iou_threshold
            score = det["scores"][same][best] + (ious[best] if self.regression else 0)
            scores.append(score if matched else zero)
        return torch.stack(scores)

    def __repr__(self) -> str:
        return f"Box({self.index!r}{'' if self.iou_with is None else f', iou_with={self.iou_with}'})"


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    iou: torch.Tensor = box_iou(a, b)
    return iou
