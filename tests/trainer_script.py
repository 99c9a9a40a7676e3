"""A tiny real training run (synthetic data) that writes checkpoints with a metric, as a trainer would.

usage: python tests/trainer_script.py OUT_DIR EPOCHS [--delete-non-topk K] [--pause S]
Prints one JSON line per checkpoint: {"path", "metric", "epoch"}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from ckptd.examples import TinyConvNet
from ckptd.training_state import build_training_state, save_training_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("epochs", type=int)
    ap.add_argument("--delete-non-topk", type=int, default=0)
    ap.add_argument("--pause", type=float, default=0.3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0.1).long()
    model = TinyConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    saved: list[tuple[float, Path]] = []
    best = None
    for epoch in range(args.epochs):
        model.train()
        for i in range(0, 64, 16):
            loss = nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean()) + epoch * 1e-4  # distinct metrics
        best = acc if best is None else max(best, acc)
        path = out / f"training_checkpoint_{epoch}.pt"
        state = build_training_state(model, opt, epoch=epoch, iteration=(epoch + 1) * 4, best_metric=best,
                                     metric=acc)
        save_training_state(state, path)
        saved.append((acc, path))
        print(json.dumps({"path": str(path), "metric": acc, "epoch": epoch}), flush=True)
        if args.delete_non_topk:
            keep = {p for _, p in sorted(saved, key=lambda t: -t[0])[: args.delete_non_topk]}
            for _, p in saved:
                if p not in keep and p.exists():
                    p.unlink()
        time.sleep(args.pause)


if __name__ == "__main__":
    main()
