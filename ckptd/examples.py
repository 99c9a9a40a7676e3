"""Small built-in models for the demo, the docs and the tests (and a factory the CoreML export can import).

Also the demo's evaluation program, the kind of program an ``evaluate`` policy runs: ::

    python -m ckptd.examples evaluate     # reads CKPTD_WEIGHTS, prints {"accuracy": ..., "loss": ..., "n": ...}

It loads the candidate's model-only weights (a safetensors file) into :class:`TinyConvNet` and scores them on
held-out synthetic data (drawn like the demo's training data, from another seed).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence

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


def synthetic_images(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's data: 3x8x8 noise images, 3 classes from two thresholds on channel means (seed 0: training)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0.1).long()
    return x, y


CONV_CHANNEL_KEYS = ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")


def swap_channels(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same network from another basin: its conv channels swapped pairwise (0<->1, 2<->3, ...). It computes
    exactly the same function (same accuracy), but averaging it with its unswapped neighbours mixes unrelated
    channels: what a checkpoint from another run does to a uniform average (the model-soups failure)."""
    width = state["conv.weight"].shape[0]
    order = torch.arange(width).view(-1, 2).flip(1).reshape(-1) if width % 2 == 0 else torch.arange(width).roll(1)
    out = dict(state)
    for key in CONV_CHANNEL_KEYS:
        out[key] = state[key][order].clone()
    out["head.weight"] = state["head.weight"][:, order].clone()
    return out


def evaluate_weights(path: str | os.PathLike[str], n: int = 2048, seed: int = 1) -> dict[str, float]:
    """Accuracy and loss of a TinyConvNet safetensors file on ``n`` held-out images."""
    from safetensors.torch import load_file

    state = load_file(os.fspath(path))
    model = TinyConvNet(width=state["conv.weight"].shape[0], num_classes=state["head.weight"].shape[0],
                        in_channels=state["conv.weight"].shape[1])
    model.load_state_dict(state)
    model.eval()
    x, y = synthetic_images(n, seed)
    with torch.no_grad():
        logits = model(x)
    return {"accuracy": float((logits.argmax(1) == y).float().mean()),
            "loss": float(nn.functional.cross_entropy(logits, y)), "n": n}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ckptd.examples evaluate``: the demo's evaluation program (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["evaluate"] or "CKPTD_WEIGHTS" not in os.environ:
        print("usage: CKPTD_WEIGHTS=weights.safetensors python -m ckptd.examples evaluate", file=sys.stderr)
        return 2
    print(json.dumps(evaluate_weights(os.environ["CKPTD_WEIGHTS"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
