"""What an optimised RGB image must go through to reach a model, in one place.

Filter patterns, class models and DeepDream optimise an RGB image in ``[0, 1]``
``(N, 3, H, W)``. Models want their own input: ImageNet mean/std for
torchvision, a ``keras.applications`` mode for Keras (``caffe`` even swaps to
BGR), a single grey channel for some. :func:`input_normalizer` derives that
step as a differentiable per-pixel affine map ``x -> M x + b`` by probing the
model's own ``transform`` with four flat images (black, red, green, blue), so
whatever preprocessing a model was loaded with is honoured without a table
of cases. A transform that is not affine per pixel is refused.

Some models take one input size only (a Keras model's declared input, a
``Flatten`` before a dense head): :func:`fixed_input_size` says which, and the
optimisers use it as their default size and keep their transformed images at it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from ..errors import ConvlensError, first_line
from ..models import Model

_PROBES = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255))


def _flat_response(transform: Callable, rgb: tuple[int, int, int]) -> torch.Tensor:
    out = transform(Image.new("RGB", (32, 32), rgb))
    return torch.as_tensor(out, dtype=torch.float32).flatten(1).mean(1)  # (C_in,)


def input_normalizer(model: Model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Differentiable ``RGB in [0, 1] (N, 3, H, W) -> model input (N, C, H, W)`` (channels-first).

    Example::

        to_input = input_normalizer(cl.load_model("resnet18", weights="none"))
        to_input(torch.full((1, 3, 8, 8), 0.485))[0, 0, 0, 0]   # ~0: ImageNet mean removed
    """
    black, red, green, blue = (_flat_response(model.transform, rgb) for rgb in _PROBES)
    matrix = torch.stack([red - black, green - black, blue - black], dim=1)  # (C_in, 3)
    offset = black
    gray = torch.full((3,), 128 / 255)
    if not torch.allclose(
        matrix @ gray + offset,
        _flat_response(model.transform, (128, 128, 128)),
        atol=1e-3 * (1 + offset.abs().max().item()),
    ):
        raise ConvlensError(
            f"the preprocessing of {model.name} is not a per-pixel affine map, so an "
            "optimised image cannot be fed through it; load the model with plain preprocessing"
        )
    device, dtype = model.device, model.dtype
    matrix, offset = matrix.to(device), offset.to(device)

    def to_input(rgb: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("ck,nkhw->nchw", matrix.to(rgb.dtype), rgb) + offset.to(rgb.dtype).view(1, -1, 1, 1)
        return x.to(dtype)

    return to_input


def fixed_input_size(model: Model) -> tuple[int, int] | None:
    """``(H, W)`` when the model takes that input size only (``model.info["fixed_input_size"]``), else ``None``.

    Keras models are marked when wrapped: their declared input size is the size
    their dense layers were built for. Mark a PyTorch model whose head flattens
    a fixed-size map the same way: ``model.info["fixed_input_size"] = True``.
    """
    return (int(model.input_size[0]), int(model.input_size[1])) if model.info.get("fixed_input_size") else None


def run_failure(err: Exception, size: Sequence[int], expected: Sequence[int] | None = None) -> ConvlensError:
    """A one-line user error for a forward pass that failed at ``size`` (too small, or not the model's size)."""
    if expected is not None and tuple(expected) != tuple(size):
        hint = f"this model takes {expected[0]}x{expected[1]} images only: leave the size out"
    else:
        hint = "use a larger image size or an earlier layer"
    return ConvlensError(f"the model cannot run on a {size[0]}x{size[1]} image ({first_line(err)}); {hint}")
