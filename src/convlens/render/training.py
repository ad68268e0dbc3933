"""Figures of a training run: loss and accuracy per epoch, the ROC curve, the confusion matrix.

Each function takes the numbers ``convlens train`` stores (``convlens.train.evaluate``)
and returns a matplotlib ``Figure`` (no pyplot state); ``convlens train`` writes them
as PNG files and the report embeds them.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def curves_figure(history: list[dict]) -> Figure:
    """Loss and accuracy per epoch, training and validation."""
    figure = _figure(8, 3.2)
    epochs = [h["epoch"] for h in history]
    for axes, key, title in (
        (figure.add_subplot(1, 2, 1), "loss", "loss"),
        (figure.add_subplot(1, 2, 2), "accuracy", "accuracy"),
    ):
        axes.plot(epochs, [h[f"train_{key}"] for h in history], marker=".", label="train")
        axes.plot(epochs, [h[f"val_{key}"] for h in history], marker=".", label="validation")
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return figure


def roc_figure(metrics: dict) -> Figure:
    """The validation ROC curve with its AUC and 95% interval."""
    roc = metrics["roc"]
    figure = _figure(4, 4)
    axes = figure.add_subplot(1, 1, 1)
    low, high = roc["ci95"]
    axes.plot(roc["fpr"], roc["tpr"], label=f"AUC {roc['auc']:.3f} (95% CI {low:.3f}-{high:.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel(f"true positive rate ({roc['positive_class']})")
    axes.set_title("ROC (validation)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def confusion_figure(metrics: dict) -> Figure:
    """The validation confusion matrix, counts written in the cells."""
    matrix, classes = np.asarray(metrics["confusion_matrix"]), metrics["classes"]
    side = 1.6 + 0.45 * len(classes)
    figure = _figure(side + 1, side)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(classes)), classes, fontsize=8)
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(
            col,
            row,
            str(count),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > matrix.max() / 2 else "black",
        )
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.tight_layout()
    return figure
