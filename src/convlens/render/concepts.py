"""The TCAV figure: per layer, each (class, concept) score beside the random CAVs' (a matplotlib ``Figure``)."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def tcav_figure(result, layer: str) -> Figure:
    """Bars of the mean TCAV score (± std over runs) per class and concept at ``layer``, the random mean as a line.

    A concept that fails the t-test is drawn pale and marked ``n.s.`` at its foot.
    """
    rows = [row for row in result.rows if row.layer == layer]
    figure = Figure(figsize=(max(4.0, 0.55 * len(rows) + 1.5), 3.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(rows)))
    colours = ["tab:blue" if row.significant else "lightgray" for row in rows]
    axes.bar(positions, [row.score for row in rows], yerr=[row.std for row in rows], color=colours, capsize=3)
    for x, row in zip(positions, rows):
        axes.hlines(
            row.random_score,
            x - 0.4,
            x + 0.4,
            colors="tab:red",
            linestyles="dashed",
            label="random CAVs" if x == 0 else "",
        )  # an empty label stays out of the legend
        if not row.significant:
            axes.text(x, 0.02, "n.s.", ha="center", va="bottom", fontsize=8)
    axes.set_xticks(positions, [f"{row.class_}\n{row.concept}" for row in rows], fontsize=8)
    axes.set_ylim(0, 1.3)  # room for the legend above the bars
    axes.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    axes.set_xlabel("class / concept", fontsize=8)
    axes.set_ylabel("TCAV score")
    axes.set_title(f"TCAV at {layer} ({result.runs} runs)", fontsize=10)
    if rows:
        axes.legend(loc="upper center", fontsize=8, frameon=False)
    figure.tight_layout()
    return figure
