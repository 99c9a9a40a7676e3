"""Export factories that misbehave on cue (a marker file), for the export-job tests.

They run inside the real export child process (``ckptd.export.worker``), so a test steers a real conversion:
fail while a marker exists, wait before reading the weights, or pause after the package was saved.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ckptd.examples import TinyConvNet

LIMIT_S = 120.0  # never wait forever, even if a test dies without removing its marker


def _wait_while(marker: Path) -> None:
    deadline = time.monotonic() + LIMIT_S
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def build_failing_while(marker: str) -> nn.Module:
    """Fails (as a broken environment would) while ``marker`` exists."""
    if Path(marker).exists():
        raise RuntimeError(f"simulated failure: {marker} exists")
    return TinyConvNet()


def build_waiting_while(marker: str) -> nn.Module:
    """Holds the export before it reads its weights while ``marker`` exists (an export that takes long)."""
    _wait_while(Path(marker))
    return TinyConvNet()


class PausesAfterSave(TinyConvNet):
    """Same weights as TinyConvNet; its forward waits while ``marker`` exists once a saved staging package of
    ``output`` is on disk (its Manifest.json), i.e. during verification, after coremltools saved the package."""

    def __init__(self, output: str, marker: str) -> None:
        super().__init__()
        self._versions = Path(output) / "coreml"
        self._marker = Path(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._marker.exists() and any(self._versions.glob(".ckptd-tmp-staging-*/Manifest.json")):
            _wait_while(self._marker)
        return super().forward(x)


def build_pausing_after_save(output: str, marker: str) -> nn.Module:
    return PausesAfterSave(output, marker)
