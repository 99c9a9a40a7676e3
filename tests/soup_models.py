"""Checkpoints for evaluation-gate tests: one basin of good members, and a member from another basin.

The model is a tiny MLP fitted to a fixed teacher. The other basin is the same trained network with its hidden
units permuted: it computes exactly the same function (same loss, same metric), but averaging it with the first
basin mixes unrelated units, so the uniform average is much worse than either. That is the model-soups failure
(Wortsman et al. 2022) in its plainest, deterministic form.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IN, HIDDEN = 4, 16


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed synthetic regression data (the evaluation program uses the same)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(256, IN, generator=g)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]])) + 0.1 * x[:, :1] ** 2
    return x, y


def loss_of(state: dict[str, torch.Tensor]) -> float:
    model = build()
    model.load_state_dict(state)
    x, y = data()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def trained(steps: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = data()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def nudged(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A neighbour in the same basin (what consecutive checkpoints of one run look like)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def permuted(state: dict[str, torch.Tensor], seed: int = 7) -> dict[str, torch.Tensor]:
    """The same function from another basin: hidden units permuted (identical outputs and loss)."""
    perm = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(seed))
    out = dict(state)
    out["0.weight"], out["0.bias"] = state["0.weight"][perm], state["0.bias"][perm]
    out["2.weight"] = state["2.weight"][:, perm]
    return out


def save(path: Path, state: dict[str, torch.Tensor], *, step: int, val_loss: float | None = None) -> Path:
    """A trainer-style checkpoint: the trainer's own metric is the loss on the same data unless given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metric = loss_of(state) if val_loss is None else val_loss
    torch.save({"model": state, "step": step, "val_loss": metric}, path)
    return path
