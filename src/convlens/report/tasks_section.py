"""The report on a segmentation model or a detector: what it predicts, said in its own terms.

A segmentation model's predictions are the classes that win the most pixels; the section
:func:`segmentation_section` shows each image's predicted mask (every class in its colour)
beside Grad-CAM of its top classes, each explained as a region (:class:`convlens.targets.Region`).
A detector's predictions are its first detections with their scores and boxes.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from markupsafe import Markup
from PIL import Image

from ..errors import ConvlensError
from .context import Context, Section, cell
from .templating import PARTS

#: Classes explained per image of a segmentation model, by their share of the pixels.
TOP_CLASSES = 3


def describe_prediction(p) -> str:
    """One prediction of any kind, as a table cell: a class probability, a pixel share or a detection."""
    if hasattr(p, "share"):
        return f"{p.label} ({p.share:.1%} of pixels)"
    if hasattr(p, "box"):
        return f"{p.label} ({p.score:.2f}) at {', '.join(f'{v:g}' for v in p.box)}"
    return f"{p.label} ({p.probability:.1%})"


def mask_picture(winners: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The predicted class of every pixel, one colour per class (tab20), resized to ``size`` (width, height)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    tab20 = cast(ListedColormap, colormaps["tab20"])  # tab20 is a list of 20 colours
    colours = (np.asarray(tab20.colors) * 255).astype(np.uint8)
    picture = Image.fromarray(colours[winners % len(colours)])
    return picture.resize(size, Image.Resampling.NEAREST)


def segmentation_section(ctx: Context) -> Section | None:
    """Each image's predicted mask beside Grad-CAM of its top classes (a region target each)."""
    import torch

    from ..heatmaps import explain
    from ..targets import Region, is_dense
    from ..targets.core import select_output

    pictures = [item.image for item in ctx.images]
    x = ctx.model.preprocess(pictures)
    with torch.inference_mode():
        output = ctx.model(x)
    try:
        scores = select_output(output, ctx.model.select)
    except ConvlensError:
        return None
    if not is_dense(scores):
        return None
    winners = scores.argmax(1).cpu()
    blocks, layer = [], ctx.summary.auto_layer
    ctx.expect(len(pictures))
    for i, item in enumerate(ctx.images):
        ctx.step(item.name)
        counts = torch.bincount(winners[i].flatten(), minlength=scores.shape[1])
        top = [int(k) for k in counts.argsort(descending=True)[:TOP_CLASSES] if counts[k] > 0]
        legend = ", ".join(f"{ctx.model.label(k)} {float(counts[k]) / counts.sum():.0%}" for k in top)
        panels = [cell(mask_picture(winners[i].numpy(), item.image.size), f"predicted mask: {legend}")]
        for k in top:
            result = explain(ctx.model, x[i : i + 1], method="gradcam", layer=layer, target=Region(k))
            panels.append(cell(result.overlay([item.image])[0], f"gradcam — {ctx.model.label(k)}"))
        blocks.append({"original": cell(item.image, item.name), "about": f"top classes: {legend}", "panels": panels})
    note = (
        f"Each image's predicted class per pixel (one colour per class), then Grad-CAM at {layer} for its "
        f"{TOP_CLASSES} largest classes, each explained as a region: the class's logits summed over the "
        "pixels where it wins (pytorch-grad-cam's SemanticSegmentationTarget)."
    )
    return Section("segmentation", "What it segments", Markup(PARTS.heatmaps(blocks)), note)


__all__ = ["describe_prediction", "mask_picture", "segmentation_section"]
