"""Classifier evaluation: accuracy, per-class precision/recall/F1, confusion matrix, ROC and AUC.

* AUC is the Mann-Whitney statistic (Mann & Whitney 1947), the probability that
  a random positive scores above a random negative, ties counting one half:
  ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with ``R_pos`` the
  sum of the positives' ranks among all scores (tied scores share their mean rank).
* Its standard error is Hanley & McNeil's (1982, Radiology 143:29-36, eq. 2):
  ``SE = sqrt((A (1 - A) + (n_pos - 1)(Q1 - A^2) + (n_neg - 1)(Q2 - A^2)) / (n_pos n_neg))``
  with ``Q1 = A / (2 - A)`` and ``Q2 = 2 A^2 / (1 + A)``; the 95% interval is
  ``A +- 1.96 SE``, clipped to [0, 1].
* With more than two classes each class gets a one-vs-rest AUC (its probability
  as the score), and their unweighted mean is the macro AUC.

An AUC is ``None`` when one side (positives or negatives) is empty. Precision of
a class never predicted, and recall of a class absent from the labels, are 0.

NumPy here: these are numbers for a JSON file and plots, the edge of the package.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

from ..fileio import write_text

Z_95 = 1.959963984540054


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """Area under the ROC curve of binary ``labels`` (1 = positive) ranked by ``scores``."""
    positive, values = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = rankdata(values, method="average")[positive].sum()  # ties share their mean rank
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def hanley_mcneil(auc: float, n_pos: int, n_neg: int) -> tuple[float, tuple[float, float]]:
    """``(standard error, (low, high))`` of an AUC by Hanley & McNeil (1982), 95% normal interval."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    se = math.sqrt(max(variance, 0.0))
    return se, (max(0.0, auc - Z_95 * se), min(1.0, auc + Z_95 * se))


def roc_curve(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(false positive rates, true positive rates, thresholds)``, one point per distinct score plus (0, 0).

    The point at threshold ``t`` counts ``score >= t`` as positive.
    """
    positive, values = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    order = np.argsort(-values, kind="mergesort")
    positive, values = positive[order], values[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(values)), values.size - 1]
    tp = np.cumsum(positive)[last_of_tie]
    fp = np.cumsum(~positive)[last_of_tie]
    tpr = np.r_[0.0, tp / max(int(positive.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~positive).sum()), 1)]
    return fpr, tpr, np.r_[np.inf, values[last_of_tie]]


def confusion_matrix(true: npt.ArrayLike, predicted: npt.ArrayLike, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts; row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true), np.asarray(predicted)), 1)
    return matrix


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def evaluate_predictions(true: npt.ArrayLike, probabilities: npt.ArrayLike, classes: Sequence[str]) -> dict[str, Any]:
    """Every metric of the module docstring for class ``probabilities`` ``(N, K)``, as a JSON-ready dict."""
    true, probabilities = np.asarray(true), np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(true, predicted, len(classes))
    per_class = {}
    for k, name in enumerate(classes):
        hits = matrix[k, k]
        precision, recall = _ratio(hits, matrix[:, k].sum()), _ratio(hits, matrix[k].sum())
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": int(matrix[k].sum()),
        }
    metrics: dict[str, Any] = {
        "accuracy": float((predicted == true).mean()),
        "classes": list(classes),
        "per_class": per_class,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "confusion_matrix": matrix.tolist(),
    }
    if len(classes) == 2:
        positive, scores = true == 1, probabilities[:, 1]
        auc = roc_auc(positive, scores)
        roc: dict[str, Any] = {"positive_class": classes[1], "auc": auc}
        if auc is not None:
            se, (low, high) = hanley_mcneil(auc, int(positive.sum()), int((~positive).sum()))
            fpr, tpr, _ = roc_curve(positive, scores)
            roc.update(
                {
                    "se": se,
                    "ci95": [low, high],
                    "method": "Hanley & McNeil (1982)",
                    "fpr": fpr.tolist(),
                    "tpr": tpr.tolist(),
                }
            )
        metrics["roc"] = roc
    else:
        aucs = {name: roc_auc(true == k, probabilities[:, k]) for k, name in enumerate(classes)}
        defined = [a for a in aucs.values() if a is not None]
        metrics["one_vs_rest_auc"] = aucs
        metrics["macro_auc"] = float(np.mean(defined)) if defined else None
    return metrics


# -- files ----------------------------------------------------------------------


def write_evaluation(
    out_dir: str | os.PathLike[str], metrics: dict[str, Any], history: list[dict[str, Any]]
) -> dict[str, Path]:
    """Write ``metrics.json`` (metrics plus history), ``curves.png``, ``confusion.png`` and ``roc.png``."""
    out_dir = Path(out_dir)
    files = {
        "metrics": out_dir / "metrics.json",
        "curves": out_dir / "curves.png",
        "confusion": out_dir / "confusion.png",
    }
    from ..render.overlay import save_figure
    from ..render.training import confusion_figure, curves_figure, roc_figure

    write_text(files["metrics"], json.dumps({**metrics, "history": history}, indent=1))
    save_figure(curves_figure(history), files["curves"])
    save_figure(confusion_figure(metrics), files["confusion"])
    if metrics.get("roc", {}).get("auc") is not None:
        files["roc"] = out_dir / "roc.png"
        save_figure(roc_figure(metrics), files["roc"])
    return files
