"""The evaluation summary as Markdown, HTML (Jinja2) and curve plots (matplotlib, Agg); written atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..fileio import atomic_path, write_text
from ..metrics.stats import MeanCI

_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>convlens evaluate</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; } .best { font-weight: bold; }
</style></head><body>
<h1>Heatmap evaluation</h1>
<p>{{ images }} images{% if sample %} ({{ sample }}){% endif %}. Mean ± half-width of the 95 % t-interval (n images);
&uarr; higher is better, &darr; lower is better; the best mean per metric is bold.</p>
<table><tr><th>method</th>{% for name, metric in metrics.items() %}<th title="{{ metric.paper }}">{{ name }}
{{ "↑" if metric.higher_is_better else "↓" }}</th>{% endfor %}</tr>
{% for row in rows %}<tr><td>{{ row[0] }}</td>
{% for name, cell in zip(metrics, row[1:]) -%}
<td class="{{ 'best' if row[0] in best[name] else '' }}">{{ cell }}</td>
{%- endfor %}
</tr>{% endfor %}</table>
{% for plot in plots %}<h2>{{ plot.stem }} curves</h2>
<img src="{{ plot.name }}" alt="{{ plot.stem }} curves">{% endfor %}
</body></html>
"""


def best_methods(
    summary: Mapping[str, Mapping[str, MeanCI]], metrics: Mapping, digits: int = 3
) -> dict[str, list[str]]:
    """Per metric, the methods with the best mean in the metric's direction (``higher_is_better``).

    Means are compared as shown, rounded to ``digits``: methods that tie in the
    table are all best (in method order); a metric no method scored has none.
    """
    best = {}
    for name, metric in metrics.items():
        scored = {method: round(ci.mean, digits) for method, cells in summary.items() if (ci := cells[name]).n}
        top = (max if metric.higher_is_better else min)(scored.values(), default=None)
        best[name] = [method for method, mean in scored.items() if mean == top]
    return best


def _cell(ci: MeanCI) -> str:
    return f"{ci.format()} ({ci.n})" if ci.n else "-"


def summary_table(summary: Mapping[str, Mapping[str, MeanCI]], metrics: Mapping) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (one per method) of the summary: ``mean ± half-width (n)`` per metric.

    ``metrics`` maps names to :class:`~convlens.metrics.Metric`; the header carries ↑/↓
    for higher/lower is better. The HTML report renders these with its own table macro.
    """
    headers = ["method"] + [f"{n} {'↑' if m.higher_is_better else '↓'}" for n, m in metrics.items()]
    return headers, [[method] + [_cell(cells[n]) for n in metrics] for method, cells in summary.items()]


def write_summary(
    out_dir: Path,
    summary: Mapping[str, Mapping[str, MeanCI]],
    metrics: Mapping,
    rows: list[dict],
    images: int,
    sample: str = "",
) -> list[Path]:
    """Write ``summary.md``, ``summary.html`` and the mean deletion/insertion curves; return the paths.

    ``sample`` says how the images were chosen when they are a sample (``evaluate --limit``).
    """
    from jinja2 import Template

    best = best_methods(summary, metrics)
    headers, table_rows = summary_table(summary, metrics)
    counted = f"{images} images ({sample})" if sample else f"{images} images"
    lines = [
        f"{counted}; mean ± half-width of the 95 % t-interval (n images); "
        "↑ higher is better, ↓ lower is better; best in bold.",
        "",
        "| " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for method, *cells in table_rows:
        shown = [f"**{cell}**" if method in best[n] else cell for n, cell in zip(metrics, cells)]
        lines.append(f"| {method} | " + " | ".join(shown) + " |")
    files = [write_text(out_dir / "summary.md", "\n".join(lines) + "\n")]
    plots = [
        p
        for p in (_plot_curves(out_dir, name, rows) for name in ("deletion", "insertion") if name in metrics)
        if p is not None
    ]
    html = Template(_HTML, autoescape=True).render(
        images=images, sample=sample, metrics=metrics, rows=table_rows, best=best, plots=plots, zip=zip
    )
    files.append(write_text(out_dir / "summary.html", html))
    return files + plots


def _plot_curves(out_dir: Path, name: str, rows: list[dict]) -> Path | None:
    """Mean curve per method (images share one resolution, so their curves share fractions)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # a Figure object: no pyplot state, no process-wide backend switch

    curves: dict[str, list] = {}
    for row in rows:
        if name in row.get("curves", {}):
            curves.setdefault(row["method"], []).append(row["curves"][name])
    if not curves:
        return None
    figure = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for method, items in sorted(curves.items()):
        fractions = np.asarray(items[0]["fractions"])
        scores = np.mean([item["scores"] for item in items if len(item["scores"]) == len(fractions)], axis=0)
        area = float(np.trapezoid(scores, fractions))
        axes.plot(fractions, scores, label=f"{method} (AUC {area:.3f})")
    axes.set_xlabel("fraction of pixels " + ("removed" if name == "deletion" else "inserted"))
    axes.set_ylabel("target probability")
    axes.set_title(f"{name} (mean over images)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = out_dir / f"{name}.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path
