"""The one loop that scores many inputs in batches: perturbation heatmaps and faithfulness metrics.

Score-CAM and Ablation-CAM score one masked or ablated variant per channel;
deletion, insertion, ROAD and Average Drop score one perturbed image per step.
All of them build their inputs lazily, ``batch_size`` at a time, so no more
than one batch of variants exists at once whatever the image count, and run
each batch through :func:`convlens.capture` (the model borrowed, state restored).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .capture import OutputRewrite, capture, merge_rewrites
from .errors import ConvlensError
from .progress import Progress

if TYPE_CHECKING:
    from .models.model import Model

#: ``make_batch(start, stop) -> (inputs, rewrites)``: channels-first inputs ``start..stop-1`` and the
#: output rewrites that make them (``{}`` for perturbed pixels; a layer rewrite for an ablation).
MakeBatch = Callable[[int, int], tuple[torch.Tensor, Mapping[nn.Module, OutputRewrite]]]
#: ``score(output, start, stop) -> (stop - start,)``: the score of each input of the batch.
ScoreBatch = Callable[[Any, int, int], torch.Tensor]


def score_batches(
    model: Model | nn.Module,
    count: int,
    make_batch: MakeBatch,
    score: ScoreBatch,
    *,
    batch_size: int,
    rewrite: Mapping[nn.Module, OutputRewrite] | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Scores ``(count,)`` float32 of ``count`` inputs, ``batch_size`` per forward pass.

    ``rewrite`` applies to every batch (a final softmax skipped for logits), before a batch's own.
    A batch that does not give one score per input is a ``RuntimeError`` (a model that cannot
    broadcast a batch of variants), so callers can fall back to another way of building it.
    """
    if batch_size < 1:
        raise ConvlensError(f"batch size must be at least 1, got {batch_size}")
    scores = []
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        inputs, own = make_batch(start, stop)
        with torch.inference_mode(), capture(model, rewrite=merge_rewrites(rewrite or {}, own)) as rec:
            # channels-last is oneDNN's native layout: CPU convolutions run about twice as fast in it
            output = rec.forward(inputs.contiguous(memory_format=torch.channels_last))
        values = score(output, start, stop).float()
        if values.shape != (stop - start,):
            raise RuntimeError(f"expected {stop - start} scores, got shape {tuple(values.shape)}")
        scores.append(values)
        if progress is not None:
            progress(stop, count)
    return torch.cat(scores) if scores else torch.empty(0)
