"""A classifier's linear head: the last ``Linear`` (or Keras ``Dense``) layer, as ``(module, weight, bias)``.

CAM weights a layer's channels by it, and Deep Feature Factorization scores each concept through it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConvlensError


def linear_head(layers: dict[str, nn.Module], refusal: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """The last linear layer of ``layers`` (named, in forward order): the module, its weight ``(K, C)`` and bias.

    ``refusal`` is the one-line error when there is none.
    """
    for module in reversed(list(layers.values())):
        if isinstance(module, nn.Linear):
            bias: torch.Tensor | None = module.bias.detach() if module.bias is not None else None
            return module, module.weight.detach(), bias
        if type(module).__name__ == "Dense" and hasattr(module, "kernel"):
            dense: Any = module  # a Keras Dense layer (keras ships no types)
            keras_bias = getattr(dense, "bias", None)
            bias = torch.as_tensor(keras_bias.value).detach() if keras_bias is not None else None
            return module, torch.as_tensor(dense.kernel.value).detach().T, bias
    raise ConvlensError(refusal)
