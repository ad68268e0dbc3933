"""Perturbation CAMs: channel weights from how the target score reacts when the input or layer changes.

Both methods score many perturbed variants of each image; they share
:func:`score_variants`, which runs the variants in batches of at most
``batch_size`` under ``torch.inference_mode`` (the memory cap a user can set),
in channels-last memory format, which oneDNN convolutions run faster on CPU.

Score-CAM's cost is its masked forward passes, one per distinct channel
(``benchmarks/bench_heatmaps.py`` times them alone): what is left to win is
scoring fewer of them (identical masks once) and a batch size that suits the
device (:func:`scorecam_batch_size`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..capture import prefix_tokens, spatial_view
from ..scoring import MakeBatch, score_batches
from ..targets import ScoreFn, target_for_rows
from .base import RawMaps, Request, normalise

#: Variants scored per forward pass unless the caller says otherwise.
DEFAULT_BATCH_SIZE = 64
#: Score-CAM's default batch on a CPU, in masked-image pixels: 16 images at 224x224. Smaller batches keep
#: the activations nearer the cache, larger ones share the per-pass overhead; resnet18 at 224 px on a quiet
#: 2-core Xeon (2 threads) took 13.4 ms per masked image at 8, 13.1 at 16, 14.5 at 32 and 15.9 at 64, the
#: old default, which made convlens no faster than pytorch-grad-cam's channels-first batches of 16.
CPU_BATCH_PIXELS = 16 * 224 * 224
#: The same on an accelerator, where a bigger batch fills the device: 64 images at 224x224.
ACCELERATOR_BATCH_PIXELS = 64 * 224 * 224


def scorecam_batch_size(x: torch.Tensor) -> int:
    """Score-CAM's default masked images per forward pass for inputs like ``x`` ``(N, C, H, W)``.

    A rule per device, not a timed probe: the same input always runs in the same
    batches, so a map does not change with the machine's load. The pixel budget
    gives 16 images of 224x224 on a CPU (64 on an accelerator) and proportionally
    more of smaller images, whose passes are too short to fill the cores one by one.
    """
    budget = CPU_BATCH_PIXELS if x.device.type == "cpu" else ACCELERATOR_BATCH_PIXELS
    return max(1, budget // (x.shape[-2] * x.shape[-1]))


def _image_score(request: Request, image: int, rows: int) -> ScoreFn:
    """The target of image ``image``, applied to each of ``rows`` rows of a batch of its variants."""
    return target_for_rows(request.score_fn, [image] * rows)


def score_variants(
    request: Request, image: int, count: int, make_batch: MakeBatch, batch_size: int, done: int = 0, total: int = 0
) -> torch.Tensor:
    """Scores ``(count,)`` of ``count`` variants of image ``image``, ``batch_size`` per forward pass.

    ``make_batch(start, stop)`` returns the channels-first input of variants
    ``start:stop`` and the output rewrites that create them (``{}`` for masked
    inputs; a layer rewrite for ablations); see :func:`convlens.scoring.score_batches`.
    """
    return score_batches(
        request.model,
        count,
        make_batch,
        lambda output, start, stop: _image_score(request, image, stop - start)(output),
        batch_size=batch_size,
        rewrite=request.rewrites(),
        progress=lambda stop, _: request.report(done + stop, total),
    )


def clean_scores(request: Request) -> torch.Tensor:
    """``(N,)`` float32: the target score of each clean image, from one pass that settles the target."""
    with torch.inference_mode(), request.capture([]) as rec:
        return request.score(rec.forward(request.x), clean=True).float()


def _layer_activations(request: Request) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: resolves the targets; returns the layer's ``(N, C, h, w)`` output and the scores."""
    with torch.inference_mode(), request.capture() as rec:
        output = rec.forward(request.x)
        scores = request.score(output, clean=True).float()
        return request.layer_output(rec, request.layers[0]).float(), scores


def scorecam(
    request: Request, *, batch_size: int | None = None, top_k: int | None = None, align_corners: bool = False
) -> RawMaps:
    """Score-CAM: each channel, upsampled and normalised, masks the input; the masked scores weight it.

    Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for
    Convolutional Neural Networks", arXiv:1910.01279, Algorithm 1:
    ``H_k = s(Up(A_k))`` (bilinear, min-max to [0, 1]), ``S_k = f_c(X * H_k)``,
    ``w = softmax_k(S)``, ``M = ReLU(sum_k w_k A_k)`` with ``f_c`` the logit, as
    pytorch-grad-cam does (no baseline subtraction).

    Exact savings only: channels with the same normalised mask (all dead
    channels, for one) are scored once, since min-max normalisation is blind to
    a channel's scale and offset and bilinear upsampling is linear.
    ``batch_size`` caps how many masked images run at once (memory); by default
    :func:`scorecam_batch_size` chooses it for the input's size and device.
    ``align_corners=True`` upsamples the masks as pytorch-grad-cam's
    ``UpsamplingBilinear2d`` does; the default matches the engine.
    ``top_k`` (approximate, Faster Score-CAM, Wang 2020): only the ``k``
    channels with the largest spatial variance are scored and summed.
    """
    acts, _ = _layer_activations(request)
    n, channels = acts.shape[:2]
    size = tuple(request.x.shape[-2:])
    batch_size = scorecam_batch_size(request.x) if batch_size is None else batch_size
    keep = torch.arange(channels, device=acts.device).expand(n, channels)
    if top_k is not None and top_k < channels:
        keep = acts.flatten(2).var(dim=2).topk(max(1, int(top_k)), dim=1).indices
    # One buffer for every batch, already in the channels-last layout score_batches runs the model in:
    # multiplying straight into it saves building each batch channels-first and copying it over.
    rows = max(1, min(batch_size, keep.shape[1]))
    buffer = torch.empty(
        (rows, *request.x.shape[1:]), dtype=request.x.dtype, device=request.x.device, memory_format=torch.channels_last
    )
    maps = []
    for image in range(n):
        chosen = acts[image, keep[image]]
        # Each channel min-maxed as a whole (a flat one gives the zero mask), then deduplicated.
        unique, inverse = torch.unique(normalise(chosen)[0].flatten(1), dim=0, return_inverse=True)
        distinct = unique.view(-1, 1, *chosen.shape[-2:])  # min-max normalised already, at the layer's size
        image_x = request.x[image].unsqueeze(0)

        def masked_inputs(start: int, stop: int, distinct=distinct, image_x=image_x):
            # Masks are made per batch, so memory stays within batch_size full-size images; the batch is
            # scored before the next one overwrites the buffer. Upsampling commutes with min-max (its
            # weights sum to one), but its samples miss most of the layer's grid, extremes included: the
            # upsampled mask is min-maxed again, as the paper's s(Up(A_k)) says.
            masks = F.interpolate(distinct[start:stop], size=size, mode="bilinear", align_corners=align_corners)
            return torch.mul(image_x, normalise(masks)[0].to(image_x.dtype), out=buffer[: stop - start]), {}

        scores = score_variants(
            request, image, len(unique), masked_inputs, batch_size, done=image * channels, total=n * channels
        )[inverse]
        weights = torch.softmax(scores, dim=0)
        maps.append(torch.einsum("k,khw->hw", weights, chosen))
    return RawMaps([torch.stack(maps)])


def ablationcam(request: Request, *, batch_size: int = DEFAULT_BATCH_SIZE) -> RawMaps:
    """Ablation-CAM: a channel's weight is the relative drop of the score when it is zeroed.

    Desai & Ramaswamy 2020, "Ablation-CAM: Visual Explanations for Deep
    Convolutional Network via Gradient-free Localization", WACV 2020:
    ``w_k = (y_c - y_c^k) / y_c`` where ``y_c^k`` is the logit with channel
    ``k`` of the layer set to zero; ``M = ReLU(sum_k w_k A_k)``.
    The layers before the target run once per batch on a single copy of the
    image; the layer's output is expanded into the ablated variants. Models
    that cannot broadcast that batch fall back to repeating the input.
    """
    acts, base_scores = _layer_activations(request)
    n, channels = acts.shape[:2]
    layer = request.model.named_layers()[request.layers[0]]
    keras = request.model.layout == "channels_last"
    size, prefix = tuple(request.x.shape[-2:]), prefix_tokens(request.model.module)
    repeat_input = False  # decided once: a model that cannot broadcast the ablated batch gets repeated inputs
    maps = []
    for image in range(n):
        image_x = request.x[image].unsqueeze(0)

        def ablated(start: int, stop: int, image_x=image_x):
            keep = torch.ones(stop - start, channels, 1, 1, dtype=image_x.dtype, device=image_x.device)
            keep[torch.arange(stop - start), torch.arange(start, stop)] = 0

            def ablate(module, inputs, output):
                # Zero channel k of variant k in the layer's own layout (channels-last, tokens): through its map view.
                expanded = output.expand(stop - start, *output.shape[1:])
                view = spatial_view(expanded, size, channels_last=keras, prefix_tokens=prefix)
                return view.restore(view.map * keep, expanded)

            # repeat_input is read at call time on purpose: the retry below turns it on for this image
            return (image_x.expand(stop - start, -1, -1, -1) if repeat_input else image_x), {layer: ablate}  # noqa: B023

        try:
            scores = score_variants(request, image, channels, ablated, batch_size, image * channels, n * channels)
        except torch.OutOfMemoryError:
            raise  # not a broadcasting problem: a smaller batch_size is the cure, not a retry
        except RuntimeError:
            if repeat_input:
                raise
            repeat_input = True
            scores = score_variants(request, image, channels, ablated, batch_size, image * channels, n * channels)
        base = base_scores[image]
        weights = (base - scores) / base
        maps.append(torch.einsum("k,khw->hw", weights, acts[image]))
    return RawMaps([torch.stack(maps)])
