"""``convlens shapes`` and ``convlens train``: make the shapes dataset, train a classifier on class folders."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConvlensError
from ..fileio import check_output_dir
from . import app
from .common import BATCH_MAX, EPOCHS_MAX, IMAGES_MAX, SEED_MAX, SIDE_MAX, WORKERS_MAX, comma_list, use_threads


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConvlensError(f"{option} must be positive integers separated by commas, e.g. 16,32,64; got {text!r}")
    return values


@app.command()
def shapes(
    out_dir: Annotated[
        Path,
        typer.Argument(help="Folder to write DIR/<split>/<class>/NNNNN.png (+ .mask.png) into.", show_default=False),
    ],
    per_class: Annotated[int, typer.Option("--per-class", min=1, max=IMAGES_MAX, help="Images per class.")] = 600,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Same seed, same images.")] = 0,
    size: Annotated[int, typer.Option("--size", min=24, max=SIDE_MAX, help="Image height and width in pixels.")] = 128,
    split: Annotated[
        str, typer.Option("--split", help="Subfolder name; '' writes the class folders into OUT_DIR.")
    ] = "train",
    classes: Annotated[str | None, typer.Option("--classes", help="Comma-separated subset of the classes.")] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=0,
            max=WORKERS_MAX,
            help="Processes drawing and writing images (0: one per CPU core); the files do not depend on it.",
        ),
    ] = 0,
) -> None:
    """Write the procedural shapes dataset (images with object masks and boxes) in class-folder layout.

    Example: convlens shapes data --per-class 600 --seed 0 && convlens shapes data --per-class 100 --seed 1 --split val
    """
    from ..data.shapes import check_classes, write_shapes

    check_output_dir(out_dir, option="OUT_DIR")
    names = check_classes(comma_list(classes) if classes else None)
    if workers < 0:
        raise ConvlensError(f"--workers must be 0 (one per CPU core) or more, got {workers}")
    from ..progress import ProgressDisplay

    with ProgressDisplay("shapes", total=per_class * len(names), unit="img", lines=10) as shown:
        root = write_shapes(
            out_dir,
            per_class,
            seed,
            size=size,
            split=split or None,
            classes=names,
            progress=shown,
            workers=workers or os.cpu_count() or 1,
        )
    typer.echo(
        f"wrote {per_class * len(names)} images of {len(names)} classes ({', '.join(names)}) with masks to {root}"
    )


@app.command()
def train(
    data_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder of class folders (DATA/<class>/*.png), or holding train/ (and val/) class folders.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for checkpoint.pt, model.pt, metrics.json and plots.", show_default=False
        ),
    ],
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, max=EPOCHS_MAX, help="Epochs (default 20; with --resume, the checkpoint's)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=BATCH_MAX, help="Images per training step.")
    ] = 64,
    lr: Annotated[
        float | None, typer.Option("--lr", min=0, help="Learning rate (default 3e-3 adam, 0.05 sgd).")
    ] = None,
    optimizer: Annotated[
        str, typer.Option("--optimizer", help="adam (AdamW) or sgd (Nesterov momentum 0.9).")
    ] = "adam",
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, step or constant.")] = "cosine",
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seeds the split, the weights and the augmentation.")
    ] = 0,
    size: Annotated[
        int,
        typer.Option(
            "--input-size",
            min=8,
            max=SIDE_MAX,
            help="Side of the model's square input: images are resized to SIZE x SIZE.",
        ),
    ] = 64,
    widths: Annotated[str, typer.Option("--widths", help="Channels per stage, comma-separated.")] = "16,32,64,128",
    convs_per_stage: Annotated[
        int,
        typer.Option(
            "--convs-per-stage",
            min=1,
            max=16,
            help="3x3 conv-BN-ReLU blocks in each stage (a 2x2 max-pool follows each).",
        ),
    ] = 1,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", min=0, max=0.9, help="Share of each class held out.")
    ] = 0.2,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random flips and crops.")] = True,
    resume: Annotated[Path | None, typer.Option("--resume", help="checkpoint.pt to continue from.")] = None,
    old_size: Annotated[
        int | None, typer.Option("--size", hidden=True, min=8, max=SIDE_MAX)
    ] = None,  # --input-size's old name
) -> None:
    """Train a compact VGG-style CNN (BN, global average pooling, linear head) and evaluate it.

    Example: convlens train data --out model --epochs 20 --input-size 64
    """
    from ..train import TrainConfig
    from ..train import train as run_training

    use_threads()
    size = size if old_size is None else old_size

    check_output_dir(out)
    config = TrainConfig(
        epochs=epochs or 20,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        schedule=schedule,
        seed=seed,
        size=size,
        widths=_int_list(widths, "--widths"),
        convs_per_stage=convs_per_stage,
        val_fraction=val_fraction,
        augment=augment,
    )
    with _warnings_printed_after(), _TrainingDisplay() as progress:  # the bars close before the warnings print
        result = run_training(
            data_dir, out, None if (resume and epochs is None) else config, resume=resume, progress=progress
        )
    typer.echo(_accuracy_line(result.metrics))
    if result.skipped:
        typer.echo(f"skipped {result.skipped} unreadable image(s)")
    typer.echo(f"model: {result.model_path}  (load with convlens.load_model)  evaluation: {out / 'metrics.json'}")


class _TrainingDisplay:
    """The ``progress(event)`` of :func:`convlens.train.train`, shown.

    Loading: a bar, or a line per quarter of each folder. Training: a bar over the epochs naming the
    batch and loss, or one line as each epoch begins; each epoch's summary goes to stdout either way.
    """

    def __init__(self):
        from ..progress import ProgressDisplay

        self.loading = ProgressDisplay("loading images", unit="img", lines=4)
        self.epochs = ProgressDisplay("train", unit="epoch")

    def __call__(self, event) -> None:
        if event.kind == "load":
            self.loading.update(event.step, event.steps)
            return
        self.loading.close()
        self.epochs.total = event.epochs
        if event.kind == "batch":
            if event.step == 1:
                self.epochs.begin(f"epoch {event.epoch}", index=event.epoch)
            self.epochs.note(f"epoch {event.epoch}: batch {event.step}/{event.steps}, loss {event.values['loss']:.3f}")
        else:
            v = event.values
            self.epochs.write(
                f"epoch {event.epoch}/{event.epochs}: loss {v['train_loss']:.4f} "
                f"acc {v['train_accuracy']:.4f} | val loss {v['val_loss']:.4f} "
                f"val acc {v['val_accuracy']:.4f} | lr {v['lr']:.2e}"
            )

    def close(self) -> None:
        self.loading.close()
        self.epochs.close()

    def __enter__(self) -> _TrainingDisplay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _warnings_printed_after():
    """The block's warnings, held back and printed on stderr as it ends, whatever happens."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            for warning in caught:
                typer.echo(f"convlens: warning: {warning.message}", err=True)


def _accuracy_line(metrics: dict) -> str:
    """The validation accuracy, with the ROC AUC (two classes) or the macro AUC (more) when known."""
    line = f"validation accuracy {metrics['accuracy']:.4f} on {metrics['val_images']} images"
    if "roc" in metrics and metrics["roc"].get("auc") is not None:
        low, high = metrics["roc"]["ci95"]
        line += f", ROC AUC {metrics['roc']['auc']:.4f} (95% CI {low:.4f}-{high:.4f})"
    elif metrics.get("macro_auc") is not None:
        line += f", macro one-vs-rest AUC {metrics['macro_auc']:.4f}"
    return line
