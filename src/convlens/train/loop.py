"""`train`: class folders in, a trained classifier and its evaluation out.

What a run writes into ``out_dir`` (every file atomically):

* ``checkpoint.pt``: after every epoch; weights, optimizer state, configuration,
  history. ``resume=`` continues from it.
* ``model.pt``: the final model, a convlens checkpoint that
  :func:`convlens.load_model` reads (architecture, weights, labels, input
  size, normalisation).
* ``metrics.json``, ``curves.png``, ``confusion.png`` and for two classes
  ``roc.png``: the validation-set evaluation (:mod:`convlens.train.evaluate`).

Reproducibility: the split comes from ``seed``; the weights from
``torch.manual_seed(seed)``; each epoch's shuffling and augmentation from a
generator seeded with ``(seed, epoch)``. So a run resumed from the checkpoint
of epoch k continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .. import __version__
from ..data.folders import LabelledImages, check_trainable, load_class_folders, resolve_data_dirs, stratified_split
from ..errors import ConvlensError, first_line
from ..fileio import atomic_path
from ..models.nets import ShapesNet
from ..targets import class_probabilities

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step", "constant")
#: ``adam`` is AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101): Adam with decoupled weight decay.


@dataclass
class TrainConfig:
    """Hyper-parameters of a run; stored in every checkpoint."""

    epochs: int = 20
    batch_size: int = 64
    lr: float | None = None  # None: 3e-3 for Adam, 0.05 for SGD
    optimizer: str = "adam"
    schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    size: int = 64
    val_fraction: float = 0.2
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    convs_per_stage: int = 1
    augment: bool = True

    def check(self) -> None:
        if self.epochs < 1:
            raise ConvlensError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConvlensError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ConvlensError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConvlensError(f"unknown optimizer {self.optimizer!r}; choose {' or '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConvlensError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.size < 8:
            raise ConvlensError(f"the input size (--input-size) must be at least 8 pixels, got {self.size}")
        if not self.widths or min(self.widths) < 1:
            raise ConvlensError(f"--widths must be positive channel counts, got {self.widths}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.optimizer == "adam" else 0.05)


@dataclass
class ProgressEvent:
    """What a progress callback receives: ``kind`` is ``"load"``, ``"batch"`` or ``"epoch"``."""

    kind: str
    epoch: int
    epochs: int
    step: int
    steps: int
    values: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    model_path: Path
    checkpoint_path: Path
    metrics: dict
    history: list[dict]
    skipped: int


# -- data -------------------------------------------------------------------


def _prepare_data(data, config: TrainConfig, progress) -> tuple[LabelledImages, LabelledImages, int]:
    """Training and validation sets in memory, and how many unreadable images were skipped."""
    if isinstance(data, LabelledImages):
        check_trainable(data, "the training data")
        train_idx, val_idx = stratified_split(data.labels, config.val_fraction, config.seed)
        return data.subset(train_idx), data.subset(val_idx), data.skipped
    train_dir, val_dir = resolve_data_dirs(data)

    def report(done, total):
        if progress is not None:
            progress(ProgressEvent("load", 0, config.epochs, done, total))

    everything = load_class_folders(train_dir, config.size, progress=report)
    check_trainable(everything, str(train_dir))
    if val_dir is None:
        train_idx, val_idx = stratified_split(everything.labels, config.val_fraction, config.seed)
        return everything.subset(train_idx), everything.subset(val_idx), everything.skipped
    val = load_class_folders(val_dir, config.size, classes=everything.classes, progress=report)
    if len(val) == 0:
        raise ConvlensError(f"no readable images in the validation folder {val_dir}")
    return everything, val, everything.skipped + val.skipped


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    pixels = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(1).tolist(), pixels.std(1).clamp_min(1e-3).tolist()


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random crops after reflection padding of 1/16 of the side."""
    n, channels, h, w = batch.shape
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    pad = max(1, h // 16)
    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    rows = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator) + torch.arange(h)
    cols = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator) + torch.arange(w)
    # one gather for the whole batch: sample i takes rows[i] x cols[i] of its padded image
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(channels)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def _inputs(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    # channels-last makes CPU convolutions about twice as fast (oneDNN's native layout)
    return ((images.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


# -- model and optimisation -------------------------------------------------


def _loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if output.shape[1] == 1:  # binary: one logit, the probability of class 1
        return F.binary_cross_entropy_with_logits(output[:, 0], labels.float())
    return F.cross_entropy(output, labels)


def _optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            net.parameters(),
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=True,
        )
    return torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def learning_rate_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (1-based), in closed form so a resumed run needs no schedule state.

    ``cosine``: ``lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2`` (Loshchilov & Hutter 2017,
    arXiv:1608.03983, one cycle without restarts); ``step``: divided by 10 at half and at
    three quarters of the run; ``constant``: ``lr`` throughout.
    """
    if config.schedule == "cosine":
        return config.learning_rate * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
    if config.schedule == "step":
        passed = sum(epoch > m for m in {max(1, config.epochs // 2), max(1, config.epochs * 3 // 4)})
        return config.learning_rate * 0.1**passed
    return config.learning_rate


def predict_scores(
    net: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Raw outputs of ``net`` (in eval mode, which the caller set) for uint8 images, in batches."""
    with torch.inference_mode():
        return torch.cat(
            [net(_inputs(images[i : i + batch_size], mean, std)) for i in range(0, len(images), batch_size)]
        )


def _run_epoch(net, optimizer, train: LabelledImages, config: TrainConfig, mean, std, epoch: int, progress) -> dict:
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    order = torch.randperm(len(train), generator=generator)
    steps = (len(order) + config.batch_size - 1) // config.batch_size
    net.train()
    loss_sum, correct = 0.0, 0
    for step in range(steps):
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        batch, labels = train.images[index], train.labels[index]
        if config.augment:
            batch = _augment(batch, generator)
        output = net(_inputs(batch, mean, std))
        loss = _loss(output, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(index)
        correct += int((class_probabilities(output.detach()).argmax(1) == labels).sum())
        if progress is not None:
            progress(ProgressEvent("batch", epoch, config.epochs, step + 1, steps, {"loss": loss.item()}))
    return {"train_loss": loss_sum / len(order), "train_accuracy": correct / len(order)}


def _validate(net, val: LabelledImages, mean, std) -> tuple[dict, torch.Tensor]:
    net.eval()
    output = predict_scores(net, val.images, mean, std)
    loss = float(_loss(output, val.labels))
    probabilities = class_probabilities(output)
    accuracy = float((probabilities.argmax(1) == val.labels).float().mean())
    return {"val_loss": loss, "val_accuracy": accuracy}, probabilities


# -- checkpoints --------------------------------------------------------------


def _checkpoint(net, config: TrainConfig, classes, mean, std, history, **extra) -> dict:
    return {
        "convlens": __version__,
        "arch": "shapesnet",
        "arch_kwargs": {
            "num_classes": len(classes),
            "widths": list(config.widths),
            "convs_per_stage": config.convs_per_stage,
        },
        "state_dict": {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()},
        "labels": list(classes),
        "input_size": [config.size, config.size],
        "normalize": {"mean": mean, "std": std},
        "output": "logits",
        "config": asdict(config),
        "history": history,
        **extra,
    }


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A ``checkpoint.pt`` written by :func:`train`, checked enough to resume from."""
    path = Path(path)
    if not path.is_file():
        raise ConvlensError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = first_line(err)
        raise ConvlensError(f"cannot read checkpoint {path}: {reason}") from None
    needed = ("convlens", "state_dict", "labels", "config", "history", "optimizer", "epoch", "normalize")
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in needed):
        raise ConvlensError(f"{path} is not a convlens training checkpoint (write one with convlens train)")
    return checkpoint


# -- the run ------------------------------------------------------------------


def train(
    data: str | os.PathLike | LabelledImages,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    resume: str | os.PathLike | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> TrainResult:
    """Train a :class:`~convlens.models.nets.ShapesNet` and write it with its evaluation to ``out_dir``.

    Args:
        data: a class-folder tree (see :mod:`convlens.data.folders`) or images in memory.
        out_dir: where checkpoint, model, metrics and plots go (created if needed).
        config: hyper-parameters; with ``resume`` the checkpoint's own are used,
            except ``epochs``, which may be raised to train longer.
        resume: a ``checkpoint.pt`` to continue from.
        progress: called with a :class:`ProgressEvent` per loaded image, batch and epoch.

    Example:
        >>> from convlens.data import ShapesTorchDataset, SHAPE_CLASSES
        >>> data = LabelledImages.from_dataset(ShapesTorchDataset(64, size=32), SHAPE_CLASSES)
        >>> result = train(data, "/tmp/run", TrainConfig(epochs=1, size=32, widths=[8]))  # doctest: +SKIP
    """
    checkpoint = read_checkpoint(resume) if resume is not None else None
    config = _resumed_config(checkpoint, config, resume) if checkpoint is not None else config or TrainConfig()
    config.check()
    train_set, val_set, skipped = _prepare_data(data, config, progress)
    if checkpoint is not None and list(checkpoint["labels"]) != list(train_set.classes):
        raise ConvlensError(
            f"checkpoint {resume} was trained on classes {checkpoint['labels']}, the data has {train_set.classes}"
        )
    run = _start_run(checkpoint, config, train_set)
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    for epoch in range(run.start + 1, config.epochs + 1):
        record = _train_epoch(run, config, train_set, val_set, epoch, progress)
        save_checkpoint(run.checkpoint(config, epoch=epoch, optimizer=run.optimizer.state_dict()), checkpoint_path)
        if progress is not None:
            progress(ProgressEvent("epoch", epoch, config.epochs, epoch, config.epochs, dict(record)))
    model_path, metrics = _finish(run, config, train_set, val_set, skipped, out_dir)
    return TrainResult(model_path, checkpoint_path, metrics, run.history, skipped)


def _resumed_config(checkpoint: dict, config: TrainConfig | None, resume) -> TrainConfig:
    """The checkpoint's configuration, with ``config``'s epochs when given (never fewer than are done)."""
    saved = TrainConfig(**checkpoint["config"])
    if config is not None:
        saved.epochs = config.epochs
    if saved.epochs < checkpoint["epoch"]:
        raise ConvlensError(f"checkpoint {resume} is at epoch {checkpoint['epoch']}; --epochs must be at least that")
    return saved


@dataclass
class _Run:
    """A training run's state: the network, its optimizer, the input normalisation, the epochs so far."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    classes: list[str]
    mean: list[float]
    std: list[float]
    history: list[dict]
    start: int  # the last epoch done (0 for a fresh run)

    @property
    def normalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as ``(1, C, 1, 1)`` tensors."""
        return torch.tensor(self.mean).view(1, -1, 1, 1), torch.tensor(self.std).view(1, -1, 1, 1)

    def checkpoint(self, config: TrainConfig, **extra) -> dict:
        return _checkpoint(self.net, config, self.classes, self.mean, self.std, self.history, **extra)


def _start_run(checkpoint: dict | None, config: TrainConfig, train_set: LabelledImages) -> _Run:
    """A fresh network seeded with ``config.seed``, or one carrying on from ``checkpoint``."""
    classes = train_set.classes
    torch.manual_seed(config.seed)
    net = ShapesNet(len(classes), config.widths, config.convs_per_stage).to(memory_format=torch.channels_last)
    optimizer = _optimizer(net, config)
    if checkpoint is None:
        mean, std = _channel_stats(train_set.images)
        return _Run(net, optimizer, classes, mean, std, [], 0)
    net.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return _Run(
        net,
        optimizer,
        classes,
        checkpoint["normalize"]["mean"],
        checkpoint["normalize"]["std"],
        list(checkpoint["history"]),
        int(checkpoint["epoch"]),
    )


def _train_epoch(
    run: _Run, config: TrainConfig, train_set: LabelledImages, val_set: LabelledImages, epoch: int, progress
) -> dict:
    """One epoch at its scheduled learning rate, then validation; its record is added to the history."""
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate_at(config, epoch)
    mean, std = run.normalize
    record = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"]}
    record.update(_run_epoch(run.net, run.optimizer, train_set, config, mean, std, epoch, progress))
    record.update(_validate(run.net, val_set, mean, std)[0])
    run.history.append(record)
    return record


def _finish(
    run: _Run, config: TrainConfig, train_set: LabelledImages, val_set: LabelledImages, skipped: int, out_dir: Path
) -> tuple[Path, dict]:
    """The final evaluation on the validation set, written with ``model.pt``; the model's path and the metrics."""
    from .evaluate import evaluate_predictions, write_evaluation

    _, probabilities = _validate(run.net, val_set, *run.normalize)
    metrics = evaluate_predictions(val_set.labels.numpy(), probabilities.numpy(), run.classes)
    metrics.update(
        {"train_images": len(train_set), "val_images": len(val_set), "skipped_images": skipped, "epochs": config.epochs}
    )
    model_path = save_checkpoint(run.checkpoint(config, metrics=metrics), out_dir / "model.pt")
    write_evaluation(out_dir, metrics, run.history)
    return model_path, metrics
