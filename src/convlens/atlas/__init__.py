"""Whole datasets: scan a model over many images once, dataset examples, Network Dissection, Ray.

    atlas = convlens.scan(model, "data/", layers=["layer3"], out="atlas.sqlite")
    convlens.atlas.write_examples("atlas.sqlite", "layer3", units=[0, 5], out_dir="examples/")
    result = convlens.dissect(model, shapes=2000, seed=1, layers=["layer3"], out="dissection/")

Modules: data (sources), accumulators (mergeable statistics), store (SQLite),
scan (the streamed pass), examples, dissect, ray_engine (the parts on Ray actors, for ``engine="ray"``:
see :mod:`convlens.engines`).
"""

from .data import DataSource, open_data
from .dissect import Dissection, dissect
from .examples import UnitExamples, dataset_examples, examples_figure, write_examples
from .scan import Atlas, open_atlas, scan

__all__ = [
    "Atlas",
    "DataSource",
    "Dissection",
    "UnitExamples",
    "dataset_examples",
    "dissect",
    "examples_figure",
    "open_atlas",
    "open_data",
    "scan",
    "write_examples",
]
