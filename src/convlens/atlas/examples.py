"""Dataset examples: the images where a unit fires most (Zeiler & Fergus 2014, arXiv:1311.2901;
Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017; OpenAI Microscope).

For a unit of a scanned layer, its top-k images come from the atlas (the scan
kept each image's maximum and where it was). Each is shown

* whole, with the unit's map overlaid (jet, scaled by the unit's largest
  activation over the dataset, so tiles of one unit compare), and
* as a crop around the maximum: the input pixels that reach the unit at that
  position, found as the support of the gradient of the unit's value there
  with respect to the input (the receptive field as that image uses it; never
  larger than the theoretical receptive field),

beside the unit's filter pattern (:func:`convlens.filter_patterns`).

Example::

    examples = dataset_examples("atlas.sqlite", "features.relu4", [0, 5], model=cl.load_model("shapes"))
    examples_figure(examples[0]).save("unit0.png")
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..capture import capture
from ..errors import ConvlensError
from ..fileio import save_image
from ..models import Model, as_model, load_model
from ..models.transforms import crop_box, input_box_in_picture, mask_at_input
from ..render.overlay import overlay_heatmap
from .data import DataSource
from .scan import Atlas, open_atlas

TILE = 128


@dataclass
class UnitExamples:
    """One unit's dataset examples: ``whole``/``crops`` PIL images, best first, and its filter pattern."""

    layer: str
    unit: int
    keys: list[str]
    values: list[float]
    whole: list[Image.Image]
    crops: list[Image.Image]
    pattern: Image.Image | None


def model_view(model: Model, picture: Image.Image) -> Image.Image:
    """The part of ``picture`` the model sees (its crop box), resized to the model's input size."""
    left, top, right, bottom = crop_box(model.transform, *picture.size)
    height, width = model.input_size
    return (
        picture.convert("RGB")
        .crop((int(round(left)), int(round(top)), int(round(right)), int(round(bottom))))
        .resize((width, height), Image.Resampling.BILINEAR)
    )


#: ``(x0, y0, x1, y1)`` in pixels, exclusive ends
Box = tuple[int, int, int, int]


@overload
def unit_maps(
    model: Model, pictures: Sequence[Image.Image], layer: str, unit: int, positions: None = None
) -> tuple[torch.Tensor, None]: ...
@overload
def unit_maps(
    model: Model, pictures: Sequence[Image.Image], layer: str, unit: int, positions: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, list[Box | None]]: ...
def unit_maps(
    model: Model,
    pictures: Sequence[Image.Image],
    layer: str,
    unit: int,
    positions: Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, list[Box | None] | None]:
    """The unit's maps ``(n, h, w)`` on ``pictures``; with ``positions`` also each one's input box.

    The box ``(x0, y0, x1, y1)`` (input pixels, exclusive ends) bounds the pixels whose gradient of
    the unit's value at ``positions[i]`` is nonzero; ``None`` when that gradient vanishes.
    """
    x = torch.stack([model.transform(p) for p in pictures]).to(device=model.device, dtype=model.dtype)
    if positions is None:
        with capture(model, [layer], stop=True) as rec, torch.no_grad():
            rec.forward(x)
        return rec.outputs[layer][:, unit].float().cpu(), None
    x.requires_grad_(True)
    with capture(model, [layer], stop=True, graph=True) as rec:
        rec.forward(x)
        maps = rec.outputs[layer]
        rows = torch.arange(len(pictures))
        ys = torch.tensor([p[0] for p in positions])
        xs = torch.tensor([p[1] for p in positions])
        # images are independent in eval mode, so one gradient of the sum gives every image's own
        (gradient,) = torch.autograd.grad(maps[rows, unit, ys, xs].sum(), x)
    support = gradient.abs().sum(dim=1) > 0
    boxes: list[Box | None] = []
    for reached in support:
        ys_, xs_ = torch.nonzero(reached, as_tuple=True)
        boxes.append(
            None if ys_.numel() == 0 else (int(xs_.min()), int(ys_.min()), int(xs_.max()) + 1, int(ys_.max()) + 1)
        )
    return maps[:, unit].detach().float().cpu(), boxes


def _to_picture_box(model: Model, box: Box, size: tuple[int, int]) -> Box:
    """An input-pixel box in the original picture's pixels (through the model's resize and crop)."""
    x0, y0, x1, y1 = input_box_in_picture(model.transform, box, model.input_size, size)
    return int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))


def _fallback_box(model: Model, shape: tuple[int, int], position: tuple[int, int]) -> tuple[int, int, int, int]:
    """Two map cells around the maximum, in input pixels, when the gradient says nothing (a flat unit)."""
    height, width = model.input_size
    cell_y, cell_x = height / shape[0], width / shape[1]
    y, x = position
    return (
        max(0, int((x - 0.5) * cell_x)),
        max(0, int((y - 0.5) * cell_y)),
        min(width, int((x + 1.5) * cell_x)),
        min(height, int((y + 1.5) * cell_y)),
    )


def _check_units(atlas: Atlas, layer: str, units: Sequence[int]) -> None:
    if layer not in atlas.stats:
        raise ConvlensError(f"layer {layer!r} is not in the atlas (its layers: {', '.join(atlas.layers)})")
    channels = atlas.stats[layer].channels
    if not units:
        raise ConvlensError("no units given; pass at least one unit index, e.g. --units 0,5")
    bad = [u for u in units if not 0 <= u < channels]
    if bad:
        raise ConvlensError(f"unit {bad[0]} is out of range: layer {layer!r} has {channels} units (0-{channels - 1})")


def open_scanned_model(atlas: Atlas, model: Model | torch.nn.Module | str | None = None, **load_options) -> Model:
    """The model that wrote ``atlas`` (loaded again from its source when not given); another model is refused."""
    from .store import model_fingerprint

    if model is None or isinstance(model, str):
        height, width = (int(side) for side in atlas.meta["input_size"].split("x"))
        size = (height, width)
        model = load_model(model or atlas.meta["model_source"], input_size=size, **load_options)
    model = as_model(model)
    if model_fingerprint(model.module) != atlas.meta["model_fingerprint"]:
        raise ConvlensError(
            f"this model is not the one that wrote the atlas ({atlas.meta['model']!r}, weights "
            f"fingerprint {atlas.meta['model_fingerprint']}); pass that model"
        )
    return model


def dataset_examples(
    atlas: Atlas | str | os.PathLike,
    layer: str,
    units: Sequence[int],
    *,
    model: Model | torch.nn.Module | str | None = None,
    k: int | None = None,
    pattern_steps: int = 128,
    pattern_size: int | None = None,
    source: DataSource | None = None,
) -> list[UnitExamples]:
    """The top-k images of each unit, whole with the map overlaid and cropped to the receptive field.

    Args:
        atlas: an :class:`Atlas` or the path of its store.
        layer, units: a scanned layer and unit indices.
        model: the scanned model (default: loaded again from the atlas's model source).
        k: images per unit (default and at most: the scan's k).
        pattern_steps: gradient-ascent steps of the filter pattern (0: no pattern).
        pattern_size: its side in pixels (default: the model's input, at most 128).
    """
    atlas = atlas if isinstance(atlas, Atlas) else open_atlas(atlas)
    units = [int(u) for u in units]
    _check_units(atlas, layer, units)
    model = open_scanned_model(atlas, model)
    source = source or atlas.source()
    stats = atlas.stats[layer]
    k = stats.k if k is None else max(1, min(k, stats.k))
    patterns = None
    if pattern_steps > 0:
        from ..inside import filter_patterns

        size = pattern_size or min(128, max(model.input_size))
        patterns = filter_patterns(model, layer, filters=units, size=size, steps=pattern_steps, seed=0)
    scale = max(float(stats.top_value[:, 0].max()), 1e-12)
    found = []
    for position, unit in enumerate(units):
        chosen = [r for r in range(k) if stats.top_image[unit, r] >= 0]
        images = [int(stats.top_image[unit, r]) for r in chosen]
        pictures = [source.image(i) for i in images]
        peaks = [(int(stats.top_y[unit, r]), int(stats.top_x[unit, r])) for r in chosen]
        whole, crops = [], []
        if pictures:
            maps, boxes = unit_maps(model, pictures, layer, unit, peaks)
            unit_scale = max(float(stats.top_value[unit, 0]), 1e-12) if stats.top_value[unit, 0] > 0 else scale
            for picture, heat, box, peak in zip(pictures, maps, boxes, peaks):
                whole.append(overlay_heatmap(picture, (heat / unit_scale).clamp(0, 1), transform=model.transform))
                box = box or _fallback_box(model, tuple(heat.shape), peak)
                crops.append(picture.convert("RGB").crop(_to_picture_box(model, box, picture.size)))
        pattern = None
        if patterns is not None:
            array = (patterns.images[position].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
            pattern = Image.fromarray(array)
        found.append(
            UnitExamples(
                layer,
                unit,
                [atlas.keys[i] for i in images],
                [float(stats.top_value[unit, r]) for r in chosen],
                whole,
                crops,
                pattern,
            )
        )
    return found


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _tile(image: Image.Image, size: int = TILE) -> Image.Image:
    """``image`` fitted into a ``size`` square (nearest-neighbour when enlarging small crops)."""
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR
    fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return canvas


def _grid(title: str, rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[str]]]) -> Image.Image:
    """Rows of captioned tiles under a title, as one PIL image."""
    font, pad, caption = _font(12), 6, 16
    columns = max(len(tiles) for _, tiles, _ in rows) if rows else 1
    label_width = 80
    width = label_width + columns * (TILE + pad) + pad
    height = 24 + len(rows) * (TILE + caption + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill=(0, 0, 0), font=font)
    for r, (name, tiles, captions) in enumerate(rows):
        top = 24 + r * (TILE + caption + pad)
        draw.text((pad, top + TILE // 2), name, fill=(60, 60, 60), font=font)
        for c, (tile, text) in enumerate(zip(tiles, captions)):
            left = label_width + c * (TILE + pad)
            canvas.paste(_tile(tile), (left, top))
            draw.text((left, top + TILE + 2), text, fill=(60, 60, 60), font=font)
    return canvas


def examples_figure(examples: UnitExamples) -> Image.Image:
    """Filter pattern, then the top images whole (map overlaid) and cropped around the maximum."""
    values = [f"{v:.3g}" for v in examples.values]
    rows = []
    if examples.pattern is not None:
        rows.append(("pattern", [examples.pattern], ["filter pattern"]))
    rows += [("top images", examples.whole, values), ("at the max", examples.crops, values)]
    return _grid(f"{examples.layer}  unit {examples.unit}", rows)


def unit_file_name(layer: str, unit: int) -> str:
    """``<layer>-unit<u>.png`` with the layer name made a plain file name: a module may be named
    ``/etc/x`` or hold a newline, which must not choose where the file goes."""
    stem = re.sub(r"[^\w.-]+", "_", layer).lstrip(".") or "layer"
    return f"{stem}-unit{unit}.png"


def write_examples(
    atlas: Atlas | str | os.PathLike, layer: str, units: Sequence[int], out_dir: str | os.PathLike, **options
) -> list[Path]:
    """One PNG per unit, ``out_dir/<layer>-unit<u>.png``, computed first and then written (each atomically)."""
    figures = [
        (unit_file_name(e.layer, e.unit), examples_figure(e)) for e in dataset_examples(atlas, layer, units, **options)
    ]
    return [save_image(figure, Path(out_dir) / name) for name, figure in figures]


def layer_maps(model: Model, pictures: Sequence[Image.Image], layer: str, batch_size: int = 64) -> torch.Tensor:
    """Every unit's map ``(n, C, h, w)`` of ``layer`` on ``pictures``, in batches (small batches are slow on CPU)."""
    chunks = []
    for start in range(0, len(pictures), batch_size):
        x = torch.stack([model.transform(p) for p in pictures[start : start + batch_size]])
        with capture(model, [layer], stop=True) as rec, torch.no_grad():
            rec.forward(x.to(device=model.device, dtype=model.dtype))
        chunks.append(rec.outputs[layer].float().cpu())
    return torch.cat(chunks)


def _outlined(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` with the boundary pixels of ``mask`` (same size) painted white."""
    from scipy.ndimage import binary_erosion

    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[mask & ~binary_erosion(mask, border_value=0)] = 255
    return Image.fromarray(pixels)


def detector_figures(
    model: Model,
    source: DataSource,
    atlas: Atlas,
    layer: str,
    detectors: Sequence[tuple[int, str, float]],
    concepts: Sequence[str],
    thresholds: np.ndarray,
    count: int = 6,
) -> dict[int, Image.Image]:
    """Per detector ``(unit, label, IoU)``: its top images with the thresholded region (tinted red) and
    the concept's mask (outlined in white). One batched forward pass for all of the layer's detectors."""
    stats = atlas.stats[layer]
    wanted = sorted({int(i) for unit, _, _ in detectors for i in stats.top_image[unit, :count] if i >= 0})
    if not wanted:
        return {}
    pictures = {i: source.image(i) for i in wanted}
    maps = dict(zip(wanted, layer_maps(model, [pictures[i] for i in wanted], layer)))
    height, width = model.input_size
    figures = {}
    for unit, label, iou in detectors:
        images = [int(i) for i in stats.top_image[unit, :count] if i >= 0]
        unit_maps_ = torch.stack([maps[i][unit] for i in images])[:, None]
        regions = F.interpolate(unit_maps_, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        inside = (regions >= float(thresholds[unit])).numpy()
        tiles = []
        for index, region in zip(images, inside):
            view = np.asarray(model_view(model, pictures[index]), dtype=np.float32)
            view[region] = 0.5 * view[region] + 0.5 * np.array([255.0, 40.0, 40.0])
            shown = Image.fromarray(view.round().astype(np.uint8))
            mask = source.concept_masks(index).get(label)
            if mask is not None:
                shown = _outlined(shown, mask_at_input(model, mask, pictures[index].size).numpy())
            tiles.append(shown)
        title = (
            f"{layer} unit {unit}: {label} (IoU {iou:.3f}); red = activation above the threshold "
            f"{float(thresholds[unit]):.3g}, white = {label} mask"
        )
        figures[unit] = _grid(title, [("top images", tiles, [atlas.keys[i][-18:] for i in images])])
    return figures
