"""``convlens evaluate``: score heatmap methods with faithfulness and localisation metrics."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..fileio import check_output_dir
from . import app
from .common import (
    BATCH_MAX,
    GPUS_MAX,
    SEED_MAX,
    WORKERS_MAX,
    ModelArg,
    ModelOptions,
    grouped,
    named_list,
    parse_one_target,
)

if TYPE_CHECKING:
    pass


@app.command()
@grouped
def evaluate(
    model: ModelArg,
    data: Annotated[
        Path,
        typer.Argument(help="A folder of images; masks as NAME.mask.png or in a masks/ folder.", show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (resumable: run again to continue).")],
    methods: Annotated[
        str, typer.Option("--methods", "--method", help="Comma-separated heatmap methods, e.g. gradcam,scorecam.")
    ] = "gradcam",
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics",
            "--metric",
            help="Comma-separated metrics: deletion, insertion, drop, increase, road, road_morf, "
            "road_lerf, pointing, pointing_scaled, pointing_strict, pointing_box, "
            "energy_pointing, iou.",
        ),
    ] = "deletion,insertion,drop,increase",
    target: Annotated[
        str,
        typer.Option(
            "--targets",
            "--target",
            help="What each image is scored for: top1, a class index or name; "
            "region:CLASS[:MASK.png] (segmentation), box:INDEX or box:LABEL@x0,y0,x1,y1 "
            "(detection, input pixels), similar:REF.png or REF.npy (embeddings).",
        ),
    ] = "top1",
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=1, help="Only N images, sampled evenly across class folders (a flat folder is one class)."
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of the --limit sample: the same seed, the same images."),
    ] = 0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=BATCH_MAX, help="Perturbed images per forward pass.")
    ] = 64,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            help="Discard the run already in --out and start over (without it, a run with other settings is refused).",
        ),
    ] = False,
    engine: Annotated[str, typer.Option("--engine", help="local, or ray (Ray Data actors score images).")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster HOST:PORT.")] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, max=WORKERS_MAX, help="Ray actors.")
    ] = None,
    num_gpus: Annotated[
        float | None, typer.Option("--num-gpus", min=0, max=GPUS_MAX, help="GPUs per Ray actor.")
    ] = None,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Run every method on every image and write a CSV table, a Markdown/HTML summary and curve plots.

    A segmenter, a detector or an embedding model is scored on its own target (--targets region:,
    box:, similar:): the region's logits, the detection's score, the cosine similarity.

    Example: convlens evaluate shapes data/val --methods gradcam,scorecam --metrics deletion,pointing --out eval
    """
    from ..engines import resolve_engine
    from ..evaluation.runner import evaluate as run_evaluation
    from ..progress import ProgressDisplay

    chosen = resolve_engine(engine, ray_address, concurrency, num_gpus)
    chosen.check()  # an unreachable Ray address is one line before the model loads
    check_output_dir(out)  # before the model loads: a bad --out must not cost anything
    method_names = named_list(methods, "--methods", "gradcam,scorecam")
    metric_names = named_list(metrics, "--metrics", "deletion,pointing")
    targets = parse_one_target(target)
    loaded = opts.open(model)
    shown = ProgressDisplay("evaluate", unit="pair")  # silent until the first pair: input errors stay one line

    def warn(message, *_, **__) -> None:  # at once, on one line: a damaged journal is news before the long run
        typer.echo(f"convlens: warning: {message}", err=True)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = warn
            result = run_evaluation(
                loaded,
                data,
                methods=method_names,
                metrics=metric_names,
                out_dir=out,
                batch_size=batch_size,
                limit=limit,
                seed=seed,
                progress=shown,
                restart=restart,
                targets=targets,
                engine=chosen,
            )
    finally:
        shown.close()
    typer.echo((out / "summary.md").read_text(encoding="utf-8"))
    typer.echo("wrote " + ", ".join(str(path) for path in result.files))
