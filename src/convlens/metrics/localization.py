"""Does the heatmap point at the object? Pointing game, energy-based pointing game, IoU.

Ground truth is a mask ``(N, H, W)`` (nonzero = object); boxes convert with
:func:`boxes_to_masks`. A mask of another size than the heatmaps (a full-size
mask beside maps at the model's input resolution) is resized to the maps'
size by nearest neighbour, so it stays a mask; that is right when the picture
was resized the same way, whole. For a model that crops its input, put the
mask through the model's own preprocessing first, as ``convlens evaluate``
does (:func:`convlens.models.transforms.mask_for_model`). An image whose mask
is empty gets NaN (there is nothing to point at), which the summaries skip.

* Pointing game (Zhang, Bargal, Lin, Brandt, Shen & Sclaroff, "Top-down Neural
  Attention by Excitation Backprop", ECCV 2016, arXiv:1608.00507): a hit when
  the map's maximum lies within ``tolerance`` pixels (Euclidean) of the object;
  accuracy = hits / (hits + misses). The paper uses a 15-pixel tolerance on
  full-size PASCAL/COCO images, which is our default; on small inputs (a
  64-pixel shapes image) that is a large slack, so pass ``tolerance=0`` for the
  strict game, or :func:`scaled_tolerance` for the paper's 15 px taken as a
  share of a 224-pixel input (4.3 px at 64 px). When several pixels share the
  maximum, it is a hit if any of them is within reach (Quantus's rule); a flat
  map points nowhere and is a miss.
  The paper scored PASCAL VOC against boxes and COCO against masks;
  :func:`region_boxes` turns a mask into the boxes of its connected regions,
  so both protocols run from one mask (``convlens evaluate``'s ``pointing_box``
  is the strict game against those boxes: a map peaking in a ring's hole
  points at the ring's box, not at its mask).
* Energy-based pointing game (Wang et al., "Score-CAM", CVPRW 2020,
  arXiv:1910.01279): the share of the (min-max normalised) map's energy that
  falls inside the object, ``sum(map * mask) / sum(map)``; a flat map scores 0.
  Score-CAM uses boxes; masks give the same formula.
* IoU: the map, min-max normalised, is thresholded at ``threshold`` (pixels
  ``>= threshold`` are "on") and compared with the object mask.

Example::

    hits = pointing_game(maps, masks, tolerance=15)   # (N,) of 0.0 / 1.0
    share = energy_pointing_game(maps, masks)         # (N,) in [0, 1]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConvlensError
from .base import as_maps, normalize_maps


def as_masks(masks, maps: torch.Tensor) -> torch.Tensor:
    """Ground-truth masks as bool ``(N, H, W)`` at the resolution of ``maps`` ``(N, H, W)``.

    Masks of any size are accepted and resized to the maps' by nearest neighbour
    (see the module docstring); their number must match the maps'.
    """
    if not isinstance(masks, torch.Tensor):
        raise ConvlensError(f"expected the masks as a torch.Tensor (N, H, W), got {type(masks).__name__}")
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3 or masks.shape[0] != maps.shape[0]:
        raise ConvlensError(
            f"expected {maps.shape[0]} mask(s) (N, H, W) for heatmaps of shape {tuple(maps.shape)}, "
            f"got a tensor of shape {tuple(masks.shape)}"
        )
    masks = masks.to(maps.device) != 0
    if masks.shape[-2:] != maps.shape[-2:]:
        # "nearest-exact" samples the mask at each map pixel's centre, as PIL's NEAREST does for
        # `convlens evaluate`; plain "nearest" samples the top-left corner, half a pixel off.
        resized = F.interpolate(masks.unsqueeze(1).float(), size=tuple(maps.shape[-2:]), mode="nearest-exact")
        masks = resized[:, 0] > 0.5
    return masks


def _maps_and_masks(maps, masks) -> tuple[torch.Tensor, torch.Tensor]:
    maps = getattr(maps, "maps", maps)
    n = maps.shape[0] if isinstance(maps, torch.Tensor) and maps.ndim == 3 else 1
    size = tuple(maps.shape[-2:]) if isinstance(maps, torch.Tensor) else (0, 0)
    maps = as_maps(maps, n, size)
    return maps, as_masks(masks, maps)


def boxes_to_masks(boxes, size: tuple[int, int]) -> torch.Tensor:
    """Boxes ``(N, 4)`` as ``x0, y0, x1, y1`` in pixels (x1, y1 exclusive) -> bool masks ``(N, H, W)``."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    height, width = size
    rows = torch.arange(height).view(1, -1, 1)
    cols = torch.arange(width).view(1, 1, -1)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)


def region_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Each mask with every connected region (8-connected) replaced by its bounding box, bool ``(N, H, W)``."""
    from skimage.measure import label, regionprops

    masks = masks.reshape(-1, *masks.shape[-2:]) != 0  # (H, W) and (N, 1, H, W) too
    boxes = torch.zeros_like(masks)
    for index, mask in enumerate(masks.cpu().numpy()):
        for region in regionprops(label(mask, connectivity=2)):
            top, left, bottom, right = region.bbox
            boxes[index, top:bottom, left:right] = True
    return boxes


def _empty_to_nan(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return torch.where(masks.flatten(1).any(1), values, torch.full_like(values, float("nan")))


def reach(masks: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Pixels within ``tolerance`` (Euclidean) of a mask pixel: the masks dilated by a disk, bool ``(N, H, W)``."""
    radius = int(tolerance)
    if radius == 0:
        return masks
    offsets = torch.arange(-radius, radius + 1, device=masks.device, dtype=torch.float32)
    disk = (offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2 <= tolerance**2).float()
    spread = F.conv2d(masks.float().unsqueeze(1), disk.view(1, 1, *disk.shape), padding=radius)
    return spread[:, 0] > 0.5


def pointing_game(maps, masks, *, tolerance: float = 15.0) -> torch.Tensor:
    """Per-image hit (1.0) or miss (0.0) of the map's maximum within ``tolerance`` px of the mask, ``(N,)``."""
    if tolerance < 0:
        raise ConvlensError(f"tolerance must be >= 0 pixels, got {tolerance}")
    maps, masks = _maps_and_masks(maps, masks)
    flat = maps.flatten(1)
    peak, low = flat.max(1, keepdim=True).values, flat.min(1, keepdim=True).values
    at_peak = (flat == peak) & (peak > low)
    hits = (at_peak & reach(masks, tolerance).flatten(1)).any(1).float()
    return _empty_to_nan(hits, masks)


def scaled_tolerance(maps, tolerance: float = 15.0, reference: int = 224) -> float:
    """``tolerance`` pixels at a ``reference``-pixel input, scaled to the maps' shorter side."""
    maps = getattr(maps, "maps", maps)
    return tolerance * min(maps.shape[-2:]) / reference


def energy_pointing_game(maps, masks) -> torch.Tensor:
    """Share of each normalised map's energy inside the mask, ``sum(map * mask) / sum(map)``, ``(N,)``."""
    maps, masks = _maps_and_masks(maps, masks)
    energy = normalize_maps(maps).flatten(1)
    total = energy.sum(1)
    inside = (energy * masks.flatten(1)).sum(1)
    return _empty_to_nan(torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total)), masks)


def iou(maps, masks, *, threshold: float = 0.5) -> torch.Tensor:
    """IoU of ``normalised map >= threshold`` with the mask, ``(N,)``; a flat map is all "off"."""
    if not 0 <= threshold <= 1:
        raise ConvlensError(f"IoU threshold must lie in [0, 1] (maps are min-max normalised), got {threshold}")
    maps, masks = _maps_and_masks(maps, masks)
    flat = maps.flatten(1)
    varies = (flat.max(1).values > flat.min(1).values).view(-1, 1)
    on = (normalize_maps(maps).flatten(1) >= threshold) & varies
    truth = masks.flatten(1)
    union = (on | truth).sum(1).float()
    inter = (on & truth).sum(1).float()
    return _empty_to_nan(inter / union.clamp_min(1), masks)
