"""The explorer's window on an atlas: a unit's top dataset examples, dissection label and IoU, class selectivity.

An atlas is the SQLite store ``convlens scan`` / ``convlens dissect`` write
(:mod:`convlens.atlas.store`); a dissection folder holding ``atlas.sqlite`` is
taken too. It must have been written by the server's model (the weights
fingerprint is checked once, when the server starts). Example images are drawn
with :func:`convlens.atlas.examples.dataset_examples`, whole with the unit's map
overlaid and cropped to where the unit fires.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConvlensError
from ..models import Model

if TYPE_CHECKING:
    from ..atlas.data import DataSource
    from ..atlas.examples import UnitExamples

#: Units whose example images are kept drawn (each costs one small forward and backward pass to draw).
KEPT_UNITS = 32


def store_path(path: str | os.PathLike) -> Path:
    """The store itself, or ``atlas.sqlite`` inside a dissection folder."""
    from ..atlas.dissect import STORE_NAME

    path = Path(path)
    if path.is_dir():
        inside = path / STORE_NAME
        if not inside.is_file():
            raise ConvlensError(f"{path} is a folder without {STORE_NAME}; pass an atlas file or a dissection folder")
        return inside
    return path


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class AtlasView:
    """Read once at start: the scan's statistics, the dissection table and each unit's selectivity."""

    def __init__(self, path: str | os.PathLike, model: Model):
        from ..atlas.examples import open_scanned_model
        from ..atlas.scan import open_atlas
        from ..atlas.store import AtlasStore

        self.path = store_path(path)
        self.atlas = open_atlas(self.path)
        self.model = open_scanned_model(self.atlas, model)  # another model's atlas is refused on one line
        with AtlasStore.open(self.path) as store:
            self.labels = {(layer, unit): (label, iou) for layer, unit, _, label, iou in store.dissection()}
            self.selectivity = {
                (layer, unit): _number(value)
                for layer, unit, value in store.db.execute("SELECT layer, unit, selectivity FROM units")
            }
        self._drawn: OrderedDict[tuple[str, int], UnitExamples] = OrderedDict()
        self._source: DataSource | None = None

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "layers": self.atlas.layers,
            "images": len(self.atlas.keys),
            "dissected": bool(self.labels),
        }

    def unit(self, layer: str, unit: int) -> dict | None:
        """The atlas's rows for ``layer``/``unit``, or ``None`` when the layer was not scanned."""
        if layer not in self.atlas.stats:
            return None
        stats = self.atlas.stats[layer]
        label, iou = self.labels.get((layer, unit), (None, None))
        top = [
            {
                "rank": rank,
                "key": self.atlas.keys[int(stats.top_image[unit, rank])],
                "value": float(stats.top_value[unit, rank]),
            }
            for rank in range(stats.k)
            if stats.top_image[unit, rank] >= 0
        ]
        classes = []
        means = stats.class_means
        for index, name in enumerate(self.atlas.classes):
            if index < means.shape[0] and stats.class_images[index] > 0:
                classes.append({"class": name, "mean": _number(float(means[index, unit]))})
        return {
            "label": label,
            "iou": _number(iou),
            "dissected": (layer, unit) in self.labels,
            "selectivity": self.selectivity.get((layer, unit)),
            "top": top,
            "class_means": classes,
        }

    def example(self, layer: str, unit: int, rank: int, kind: str = "whole"):
        """One top image of a unit as a PIL image: ``whole`` (map overlaid) or ``crop`` (where it fires most)."""
        from ..atlas.examples import dataset_examples

        if layer not in self.atlas.stats:
            raise ConvlensError(f"layer {layer!r} is not in the atlas (its layers: {', '.join(self.atlas.layers)})")
        if kind not in ("whole", "crop"):
            raise ConvlensError(f"kind must be 'whole' or 'crop', got {kind!r}")
        key = (layer, unit)
        if key not in self._drawn:
            if self._source is None:
                self._source = self.atlas.source()
            self._drawn[key] = dataset_examples(
                self.atlas, layer, [unit], model=self.model, pattern_steps=0, source=self._source
            )[0]
            while len(self._drawn) > KEPT_UNITS:
                self._drawn.popitem(last=False)
        examples = self._drawn[key]
        pictures = examples.whole if kind == "whole" else examples.crops
        if not 0 <= rank < len(pictures):
            from .views import NotFound

            raise NotFound(f"unit {unit} of {layer!r} has {len(pictures)} top images; rank {rank} is not one")
        return pictures[rank]
