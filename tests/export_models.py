"""Tiny models used as export factories in the tests (importable as ``tests.export_models:build_*``)."""

from __future__ import annotations

import time

import torch
from torch import nn

from ckptd.examples import TinyConvNet


class EncoderBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, vec: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(vec)) + self.b(img).mean(dim=(2, 3))


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = TinyConvNet(num_classes=5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"logits": logits, "probs": torch.softmax(logits, dim=-1)}


class CumsumNet(nn.Module):
    """cumsum has no implementation in our reference interpreter: verification must say 'partial'."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.fc(x), dim=-1)


def build_encoder() -> nn.Module:
    return EncoderBlock()


def build_two_inputs() -> nn.Module:
    return TwoInputs()


def build_dict_output() -> nn.Module:
    return DictOutput()


def build_cumsum() -> nn.Module:
    return CumsumNet()


def build_slow(seconds: float = 60) -> nn.Module:
    time.sleep(seconds)
    return TinyConvNet()
