"""``convlens report``: one self-contained HTML file (pictures embedded, opens offline).

With no arguments it runs on the bundled shapes model, a few generated shapes images
(with their ground-truth masks) and a few real photographs shipped with scikit-image.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ConvlensError
from ..fileio import write_text
from ..images import ImageLike, load_image
from ..models import Model, load_model, summarize
from ..progress import Step, Steps
from .context import Context, ReportImage
from .sections import SECTIONS
from .templating import ENVIRONMENT

__all__ = ["ReportImage", "build_report", "default_evaluation_images", "default_images"]


def default_images(shapes: int = 4, seed: int = 2026) -> list[ReportImage]:
    """Generated shapes images with their masks, then two scikit-image photographs (a cat, a coffee cup).

    The seed differs from the one the bundled model was trained on (0), so these are unseen images.
    """
    from PIL import Image

    from ..data.shapes import shape_sample
    from ..images import sample_image

    generated = [shape_sample(i, seed=seed) for i in range(shapes)]
    return [
        ReportImage(f"{s.class_name} #{i}", Image.fromarray(s.image), s.mask, s.class_name)
        for i, s in enumerate(generated)
    ] + [
        ReportImage(name, sample_image(name), label=label) for name, label in (("chelsea", "cat"), ("coffee", "coffee"))
    ]


def default_evaluation_images(count: int = 12, seed: int = 2027) -> list[tuple]:
    """``(name, image, mask)`` of further unseen shapes images for the evaluation table."""
    from PIL import Image

    from ..data.shapes import shape_sample

    samples = [shape_sample(i, seed=seed) for i in range(count)]
    return [(f"{s.class_name} e{i}", Image.fromarray(s.image), s.mask) for i, s in enumerate(samples)]


def _as_report_image(image: ImageLike | ReportImage) -> ReportImage:
    if isinstance(image, ReportImage):
        return image
    name = Path(image).name if isinstance(image, (str, os.PathLike)) else "image"
    return ReportImage(name, load_image(image))


def _prepared(model: Model, target):
    from ..evaluation.runner import prepare_target

    return prepare_target(model, target)


def build_report(
    model: Model | str | None = None,
    images: Sequence[ImageLike | ReportImage] | None = None,
    out: str | os.PathLike = "convlens-report.html",
    *,
    progress: Callable[[Step], None] | None = None,
    **options,
) -> Path:
    """Write the HTML report for ``model`` on ``images`` and return its path.

    ``targets`` (an option): what the heatmaps and the evaluation explain, one for every image: a class,
    or a :class:`~convlens.targets.Region`, :class:`~convlens.targets.Box` or
    :class:`~convlens.targets.Similarity` (default: each image's top class, a segmenter's winning region,
    a detector's top box); it is tried on the images before any section runs.

    ``progress`` receives a :class:`convlens.progress.Step` as each section begins
    (``step.total`` is the number of sections, known from the first call) and at each
    sub-step of the long sections (heatmap methods, filter layers, each scored
    (method, image) pair of the evaluation), whose count the section announces
    before its first one; ``str(step)`` reads ``[3/9] heatmaps: gradcam (2/4)``.

    Example:
        >>> path = build_report(cl.load_model("resnet18", weights="none"), out="/tmp/r.html")  # doctest: +SKIP
    """
    start = time.perf_counter()
    reported = [_as_report_image(image) for image in images] if images else default_images()
    if not images:  # the default run also scores heatmaps on more masked images than it shows
        options.setdefault("evaluation_images", default_evaluation_images())
    from .tcav_section import check_tcav_options

    check_tcav_options(options)
    loaded = model if isinstance(model, Model) else load_model(model or "shapes")
    summary = summarize(loaded)
    if not summary.spatial_layers:
        raise ConvlensError(f"{loaded.name} has no layer with a spatial output; the report needs a CNN")
    if options.get("targets") is not None:  # what the model cannot explain is one line now, not a page of gaps
        from ..metrics.base import as_targets

        options["targets"] = _prepared(loaded, options["targets"])
        as_targets(loaded, loaded.preprocess([item.image for item in reported]), options["targets"])
    steps = Steps(len(SECTIONS), progress)
    ctx = Context(loaded, summary, reported, options, steps)
    sections = []
    for build in SECTIONS:
        steps.begin(build.__name__.removesuffix("_section"))
        section = build(ctx)
        if section is not None:  # a section with nothing to show for this model is left out
            sections.append(section)
    from .. import __version__

    html = ENVIRONMENT.get_template("report.html.j2").render(
        model=loaded,
        summary=summary,
        images=reported,
        sections=sections,
        version=__version__,
        generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        seconds=time.perf_counter() - start,
    )
    return write_text(out, html)
