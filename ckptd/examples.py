"""Small built-in models for the demo, the docs and the tests (and a factory the CoreML export can import)."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """Conv + BatchNorm + linear head: has float weights, float buffers and an integer buffer."""

    def __init__(self, width: int = 8, num_classes: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def build_tiny_convnet(width: int = 8, num_classes: int = 3, in_channels: int = 3) -> TinyConvNet:
    """Factory (``ckptd.examples:build_tiny_convnet``) for configs and ``ckptd export-coreml``."""
    return TinyConvNet(width=width, num_classes=num_classes, in_channels=in_channels)
