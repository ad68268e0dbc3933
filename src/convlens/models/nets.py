"""convlens's own compact classifier (listed in ``convlens.models.loading.ARCHITECTURES``, so checkpoints load by name).

``shapesnet`` is a VGG-style network (Simonyan & Zisserman 2014, arXiv:1409.1556)
shrunk to a few hundred thousand parameters: stages of
``3x3 conv -> BatchNorm -> ReLU`` (Ioffe & Szegedy 2015, arXiv:1502.03167)
separated by 2x2 max-pooling, then global average pooling and one linear
layer. That head is exactly the structure Class Activation Mapping needs
(Zhou et al. 2016, arXiv:1512.04150): the CAM of class ``c`` is
``sum_k w[c, k] * A_k`` over the last convolutional stage's maps ``A_k``.

Two classes give a single logit (sigmoid probability of the second class);
more classes give one logit per class (softmax).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


class ShapesNet(nn.Module):
    """Compact VGG-style CNN with BatchNorm, global average pooling and a linear head.

    Args:
        num_classes: classes to tell apart; 2 gives one output logit.
        widths: channels of each stage; a 2x2 max-pool follows every stage but the last.
        convs_per_stage: ``conv-BN-ReLU`` blocks per stage.
        in_channels: input channels.

    Layer names: ``features.conv1``, ``features.bn1``, ``features.relu1``,
    ``features.pool1``, ... (blocks numbered in order), ``gap``, ``head``.

    Example:
        >>> net = ShapesNet(num_classes=8, widths=(8, 16))
        >>> net(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 8])
    """

    def __init__(
        self,
        num_classes: int = 8,
        widths: Sequence[int] = (16, 32, 64, 128),
        convs_per_stage: int = 1,
        in_channels: int = 3,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, block = in_channels, 0
        for stage, width in enumerate(widths, 1):
            for _ in range(convs_per_stage):
                block += 1
                layers[f"conv{block}"] = nn.Conv2d(channels, width, 3, padding=1, bias=False)
                layers[f"bn{block}"] = nn.BatchNorm2d(width)
                layers[f"relu{block}"] = nn.ReLU()
                channels = width
            if stage < len(widths):
                layers[f"pool{stage}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, 1 if num_classes == 2 else num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.gap(self.features(x)).flatten(1))
        return logits
