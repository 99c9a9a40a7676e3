"""Export factory for the fault suite, steered by a control file (a fake used only to inject the fault).

It runs inside the real export child process (``ckptd.export.worker``). The model matches the state dicts of
``bench.chaos_data.model_state`` (conv W->W 3x3, BatchNorm, linear W->W). Control file contents:
  ok    build the model             fail  raise (a broken factory/environment)
  hang  sleep far past any timeout  slow  sleep 90 s (long enough for the harness to SIGKILL the child)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


class ChaosNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def build(width: int, control: str) -> nn.Module:
    mode = Path(control).read_text().strip() if Path(control).exists() else "ok"
    if mode == "fail":
        raise RuntimeError("chaos factory: told to fail")
    if mode == "hang":
        time.sleep(3600)
    if mode == "slow":
        time.sleep(90)
    return ChaosNet(width)
