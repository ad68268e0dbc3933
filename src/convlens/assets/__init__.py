"""Files shipped inside convlens: the demo model trained on the shapes dataset.

``shapes_model.pt`` was trained by ``convlens train`` on ``convlens shapes``
data (docs/training.md gives the exact commands); ``shapes_model.json`` is its
validation evaluation. ``convlens.load_model("shapes")`` loads it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConvlensError

ASSETS = Path(__file__).resolve().parent


def demo_model_path() -> Path:
    """Path of the bundled shapes classifier (a convlens checkpoint)."""
    path = ASSETS / "shapes_model.pt"
    if not path.is_file():
        raise ConvlensError(
            f"the bundled shapes model is missing from this installation ({path}); "
            "reinstall convlens, or train one with `convlens train`"
        )
    return path


def demo_metrics_path() -> Path:
    """Path of the bundled model's evaluation JSON (accuracy, per-class scores, history)."""
    return ASSETS / "shapes_model.json"
