"""A classifier's linear head: the last ``Linear`` (or Keras ``Dense``) layer, as ``(module, weight, bias)``.

CAM weights a layer's channels by it, and Deep Feature Factorization scores each concept through it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConvlensError


def linear_head(layers: dict[str, nn.Module], refusal: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """The last linear layer of ``layers`` (named, in forward order): the module, its weight ``(K, C)`` and bias.

    ``refusal`` is the one-line error when there is none.
    """
    for module in reversed(list(layers.values())):
        if isinstance(module, nn.Linear):
            bias = module.bias.detach() if module.bias is not None else None
            return module, module.weight.detach(), bias
        if type(module).__name__ == "Dense" and hasattr(module, "kernel"):
            bias = getattr(module, "bias", None)
            bias = torch.as_tensor(bias.value).detach() if bias is not None else None
            return module, torch.as_tensor(module.kernel.value).detach().T, bias
    raise ConvlensError(refusal)
