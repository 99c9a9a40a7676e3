"""Checkpoints for evaluation-gate tests: one basin of good members, and a member from another basin.

The model is a tiny MLP fitted to a fixed teacher. The other basin is the same trained network with its hidden
units permuted: it computes exactly the same function (same loss, same metric), but averaging it with the first
basin mixes unrelated units, so the uniform average is much worse than either. That is the model-soups failure
(Wortsman et al. 2022) in its plainest, deterministic form.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from tests import eval_program

IN, HIDDEN = eval_program.IN, 16


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed synthetic regression data: the evaluation program's own (``tests/eval_program.py``)."""
    x, y = eval_program.data()
    return torch.from_numpy(x), torch.from_numpy(y)


def loss_of(state: dict[str, torch.Tensor]) -> float:
    model = build()
    model.load_state_dict(state)
    x, y = data()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def evaluated_loss(path: Path | str) -> float:
    """What the evaluation program answers for a safetensors file (same code, in this process)."""
    return eval_program.loss({k: v.numpy() for k, v in load_file(path).items()})


def uniform_average(paths: list[Path] | list[str]) -> dict[str, torch.Tensor]:
    """ckptd's averaging arithmetic, recomputed independently: float64 sum in the given order (best first),
    divided by n, cast back to each tensor's dtype; integer tensors from the first file."""
    states = [load_file(p) for p in paths]
    out = {}
    for k, ref in states[0].items():
        if not ref.is_floating_point():
            out[k] = ref
            continue
        acc = ref.double().clone()
        for s in states[1:]:
            acc.add_(s[k].double())
        out[k] = acc.div_(len(states)).to(ref.dtype)
    return out


def trained(steps: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """The base network (cached per process: ~1 s of training)."""
    return dict(_trained(steps, seed))


@functools.lru_cache(maxsize=4)
def _trained(steps: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = data()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Nudge seeds of ``trained()`` whose members, ranked by loss (this order), get better with every one added to the
# uniform average: [0], [0, 1], [0, 1, 2] and [0, 1, 2, 3] evaluate strictly better each (test_soup checks it).
GOOD_SEEDS = (11, 2, 8, 7)


def good_members(base: dict[str, torch.Tensor], n: int = len(GOOD_SEEDS)) -> list[dict[str, torch.Tensor]]:
    """``n`` same-basin neighbours of ``base``, best first, each improving the uniform average of the previous."""
    return [nudged(base, seed) for seed in GOOD_SEEDS[:n]]


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


def save(path: Path, state: dict[str, torch.Tensor], *, step: int, val_loss: float | None = None,
         mtime: float | None = None) -> Path:
    """A trainer-style checkpoint: the trainer's own metric is the loss on the same data unless given. ``mtime``
    pins the file's modification time (ckptd processes files in mtime order; the newest is the latest mtime)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metric = loss_of(state) if val_loss is None else val_loss
    torch.save({"model": state, "step": step, "val_loss": metric}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path
