"""Concepts a network uses: TCAV (Kim et al. 2018) with concept images from folders or dissection masks.

    result = convlens.tcav(model, "circle", "concepts/", ["features.relu3"], random="random/", inputs="data/circle")
    print(result.markdown())

Modules: sources (concept, random and input image sets), tcav (CAVs, scores, the t-test).
"""

from .sources import MIN_IMAGES, MIN_RANDOM_SETS, ImageSet, concept_sets, random_sets
from .tcav import CAV, TCAVResult, TCAVRow, concept_activations, fit_cav, tcav

__all__ = [
    "CAV",
    "MIN_IMAGES",
    "MIN_RANDOM_SETS",
    "ImageSet",
    "TCAVResult",
    "TCAVRow",
    "concept_activations",
    "concept_sets",
    "fit_cav",
    "random_sets",
    "tcav",
]
