"""Whole datasets: scan a model over many images once, dataset examples, Network Dissection, Ray.

    atlas = convlens.scan(model, "data/", layers=["layer3"], out="atlas.sqlite")
    convlens.atlas.dataset_examples("atlas.sqlite", "layer3", units=[0, 5])
    result = convlens.dissect(model, shapes=2000, seed=1, layers=["layer3"], out="dissect/")

Modules: data (sources), accumulators (mergeable statistics), store (SQLite),
scan (the streamed pass), examples, dissect, ray_engine (``engine="ray"``).
"""

from .data import DataSource, open_data
from .scan import Atlas, open_atlas, scan

__all__ = ["Atlas", "DataSource", "open_atlas", "open_data", "scan"]
