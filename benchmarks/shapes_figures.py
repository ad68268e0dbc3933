"""The evaluation figures of docs/metrics.md on the bundled shapes model: localisation, faithfulness, sanity checks.

Needs the heatmap engine (``convlens.explain``), a trained model and a folder of
shapes images with masks (``NAME.mask.png`` beside each image, or a ``masks/``
folder; see ``convlens.evaluation.find_mask``). Prints Markdown tables to paste
into docs/metrics.md and leaves the full ``convlens evaluate`` output in ``--out``.

    python benchmarks/shapes_figures.py --model shapes.pt --data shapes/test --out out/shapes-eval

1. ``evaluate`` (resumable) with the pointing game (15 px and strict), the
   energy-based pointing game, IoU, deletion, insertion, Average Drop and
   Increase in Confidence, for every method given.
2. Cascading parameter randomisation (Adebayo et al. 2018) on ``--sanity-images``
   images per method: the Spearman rank correlation of |map| and the SSIM
   between the trained model's map and the map after randomising every layer
   from the top down. A method "passes" when the fully randomised model's map
   no longer ranks pixels like the trained one (mean Spearman below 0.5);
   guided backprop is the method the paper found to fail.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from convlens.metrics.sanity import SANITY_THRESHOLD

LOCALISATION = ["pointing", "pointing_scaled", "pointing_strict", "pointing_box", "energy_pointing", "iou"]
FAITHFULNESS = ["deletion", "insertion", "drop", "increase"]
DEFAULT_METHODS = "gradcam,scorecam,layercam,gradcam++,eigencam,saliency,guided_backprop"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the bundled shapes model (a convlens checkpoint)")
    parser.add_argument("--data", required=True, help="a folder of shapes images with masks")
    parser.add_argument("--out", default="out/shapes-eval")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--sanity-images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--metrics", default=",".join(LOCALISATION + FAITHFULNESS))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    import convlens as cl
    from convlens.evaluation import EXPLAINERS, evaluate
    from convlens.metrics import METRICS, parameter_randomization
    from convlens import METHODS
    from convlens.evaluation.runner import list_images, resolve_methods

    known = set(METHODS) | set(EXPLAINERS)
    methods = [m for m in args.methods.split(",") if m in known]
    skipped = [m for m in args.methods.split(",") if m not in known]
    if skipped:
        print(f"(skipping methods this build does not have: {', '.join(skipped)})")
    explainers = resolve_methods(methods)
    names = args.metrics.split(",")
    model = cl.load_model(args.model)
    result = evaluate(model, args.data, methods=explainers, metrics=names, out_dir=args.out,
                      batch_size=args.batch_size, limit=args.limit)
    images = len({row["image"] for row in result.rows})
    print(f"\n### Localisation and faithfulness on {images} shapes images "
          "(mean ± 95 % CI half-width; pointing = 15 px tolerance, scaled = 15 px per 224 px of input, "
          "strict = 0 px, box = 0 px against boxes)\n")
    print("| method | " + " | ".join(f"{n} {'↑' if METRICS[n].higher_is_better else '↓'}" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for method in methods:
        print(f"| {method} | " + " | ".join(result.summary[method][n].format() for n in names) + " |")
    if "pointing_strict" in names:
        per_class_pointing(result.rows, methods)

    paths = list_images(args.data)[: args.sanity_images]
    x = model.preprocess(paths)
    print(f"\n### Sanity check: cascading randomisation, {len(paths)} images "
          "(similarity of the trained model's map with the fully randomised model's)\n")
    print("| method | Spearman abs, top layer random | mean over the cascade | all layers random | SSIM, all random "
          "| verdict |")
    print("|---|---:|---:|---:|---:|---|")
    for method in methods:
        randomized = parameter_randomization(model, x, explain_fn=explainers[method], mode="cascading")
        rows = randomized.rows()
        verdict = "passes (map depends on the weights)" if rows[-1]["spearman_abs"] < SANITY_THRESHOLD else \
            "FAILS (map survives randomisation)"
        cascade = sum(row["spearman_abs"] for row in rows) / len(rows)
        print(f"| {method} | {rows[0]['spearman_abs']:.3f} | {cascade:.3f} | {rows[-1]['spearman_abs']:.3f} | "
              f"{rows[-1]['ssim']:.3f} | {verdict} |")
    print(f"\nfull tables and curves: {Path(args.out) / 'summary.html'}")


def per_class_pointing(rows: list[dict], methods: list[str]) -> None:
    """The strict pointing game per class (an image's class is its folder's name)."""
    classes = sorted({row["image"].split("/")[0] for row in rows})
    print("\n### Strict pointing game per class\n")
    print("| method | " + " | ".join(classes) + " |")
    print("|---|" + "---:|" * len(classes))
    for method in methods:
        hits = {name: [] for name in classes}
        for row in rows:
            value = row["values"].get("pointing_strict")
            if row["method"] == method and value is not None:
                hits[row["image"].split("/")[0]].append(value)
        print(f"| {method} | " + " | ".join(f"{sum(v) / len(v):.2f}" if v else "-" for v in hits.values()) + " |")


if __name__ == "__main__":
    main()
