"""Small models built in a few lines; nothing here downloads."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("MPLBACKEND", "Agg")
# what convlens.cli.main sets, but OpenMP reads it once, when torch loads (below): without it the in-process CLI
# tests spin-wait, and a tiny report took 29 s instead of 3 s beside other jobs on 2 cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

torch.set_num_threads(2)


class TinyNet(nn.Module):
    """conv -> BN -> in-place ReLU -> conv -> in-place ReLU -> GAP -> linear: CAM-ready."""

    def __init__(self, classes: int = 3, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width * 2, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 2, classes)

    def forward(self, x):
        x = self.relu1(self.bn(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture
def picture(tmp_path) -> Path:
    """A small red PNG file (20 x 16)."""
    path = tmp_path / "pic.png"
    Image.new("RGB", (20, 16), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def cli(capsys):
    """Run the convlens CLI in this process (fast): ``cli(*args) -> (exit code, stdout, stderr)``."""
    from convlens.cli import main

    def invoke(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code or 0, captured.out, captured.err

    return invoke


@pytest.fixture
def image_batch() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
