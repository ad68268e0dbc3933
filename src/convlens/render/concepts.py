"""The TCAV figure: per layer, each (class, concept) score beside the random CAVs' (a matplotlib ``Figure``)."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def tcav_figure(result, layer: str) -> Figure:
    """Bars of the mean TCAV score (± std over runs) per class and concept at ``layer``, the random mean as a line.

    A concept that fails the t-test is drawn pale and marked ``n.s.``.
    """
    rows = [row for row in result.rows if row.layer == layer]
    figure = Figure(figsize=(max(4.0, 0.55 * len(rows) + 1.5), 3.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(rows)))
    colours = ["tab:blue" if row.significant else "lightgray" for row in rows]
    axes.bar(positions, [row.score for row in rows], yerr=[row.std for row in rows], color=colours, capsize=3)
    for x, row in zip(positions, rows):
        axes.hlines(row.random_score, x - 0.4, x + 0.4, colors="tab:red", linestyles="dashed",
                    label="random CAVs" if x == 0 else None)
        if not row.significant:
            axes.text(x, min(1.0, row.score + row.std) + 0.03, "n.s.", ha="center", fontsize=8)
    axes.set_xticks(positions, [f"{row.class_}\n{row.concept}" for row in rows], fontsize=8)
    axes.set_ylim(0, 1.12)
    axes.set_ylabel("TCAV score")
    axes.set_title(f"TCAV at {layer} ({result.runs} runs)", fontsize=10)
    if rows:
        axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    return figure
