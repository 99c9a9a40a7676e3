"""``ckptd demo``: a tiny real training run writes checkpoints while the real daemon watches it.

Everything is local and offline: synthetic data, a built-in model, a config generated from
``config.example.yaml`` (shipped inside the package as the demo's template), the daemon as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ckptd.examples import TinyConvNet
from ckptd.training_state import build_training_state, save_training_state

EXAMPLE_CONFIG = Path(__file__).resolve().parent / "config.example.yaml"  # package data (ships in the wheel)


def synthetic_training(out: Path, epochs: int, *, pause: float = 0.3, delete_non_topk: int = 0,
                       on_save: Callable[[dict[str, Any]], None] | None = None) -> Iterator[dict[str, Any]]:
    """Train a TinyConvNet on synthetic data; after each epoch save a training state (atomically) whose
    ``metric`` is this epoch's accuracy. Yields one record per checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0.1).long()
    model = TinyConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    saved: list[tuple[float, Path]] = []
    best: float | None = None
    for epoch in range(epochs):
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
        save_training_state(build_training_state(model, opt, epoch=epoch, iteration=(epoch + 1) * 4,
                                                 best_metric=best, metric=acc), path)
        saved.append((acc, path))
        record = {"path": str(path), "metric": acc, "epoch": epoch, "loss": float(loss.detach())}
        yield record
        if delete_non_topk:
            keep = {p for _, p in sorted(saved, key=lambda t: -t[0])[:delete_non_topk]}
            for _, p in saved:
                if p not in keep and p.exists():
                    p.unlink()
        time.sleep(pause)


def demo_config(base: Path, export: bool) -> dict[str, Any]:
    """The example config, pointed at the demo's directories, with the built-in model as export factory."""
    cfg = yaml.safe_load(EXAMPLE_CONFIG.read_text()) if EXAMPLE_CONFIG.exists() else {}
    cfg["state_dir"] = str(base / "state")
    cfg["log"] = {"format": "json", "level": "info"}
    watch = cfg.get("watches", [{}])[0]
    watch.update({"name": "demo", "root": str(base / "train"), "runs": "*", "output": str(base / "out/{watch}/{run}"),
                  "settle": "1s", "mode": "auto"})
    cfg["watches"] = [watch]
    policy = cfg.setdefault("policies", {}).setdefault("default", {})
    policy.setdefault("average", {})["top_k"] = 3
    policy["metric"] = {"mode": "max", "sources": [{"checkpoint": "metric"}]}
    coreml = policy.setdefault("export", {}).setdefault("coreml", {})
    coreml.update({"enabled": export, "factory": "ckptd.examples:build_tiny_convnet",
                   "factory_kwargs": {"width": 8, "num_classes": 3},
                   "inputs": [{"name": "image", "shape": [1, 3, 8, 8], "kind": "tensor"}], "outputs": ["logits"],
                   "timeout": "5m", "keep": 2})
    return cfg


def run_demo(directory: str | None, *, epochs: int = 8, export: bool = True) -> int:
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="ckptd-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    (base / "train").mkdir(exist_ok=True)
    cfg_path = base / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(base, export), sort_keys=False))
    log_path = base / "daemon.log"
    print(f"ckptd demo in {base}\n  config  {cfg_path} (generated from config.example.yaml)\n  log     {log_path}\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "ckptd.cli", "run", "-c", str(cfg_path)], stdout=log,
                                  stderr=log, env=env)
    try:
        reader = _LogReader(log_path)
        reader.wait(lambda e: e["event"] == "daemon.ready", 60, daemon)
        print(f"daemon running (pid {daemon.pid}); training a tiny model for {epochs} epochs …")
        records = []
        for rec in synthetic_training(base / "train" / "exp1", epochs, pause=0.5, delete_non_topk=2):
            records.append(rec)
            print(f"  epoch {rec['epoch']}: accuracy {rec['metric']:.4f} -> {Path(rec['path']).name}")
            for event in reader.new():
                _show(event)
        last = records[-1]["path"]
        reader.wait(lambda e: e.get("checkpoint") == last and e["event"].startswith("checkpoint."), 60, daemon,
                    show=True)
        if export:
            print("waiting for the CoreML export of the final best …")
            manifest_path = base / "out" / "demo" / "exp1" / "manifest.json"
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                for event in reader.new():
                    _show(event)
                try:
                    m = json.loads(manifest_path.read_text())
                    if m.get("coreml") and m["coreml"].get("sha256") == m["best"]["sha256"]:
                        break
                except (OSError, ValueError, KeyError, TypeError):
                    pass
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited early; see {log_path}")
                time.sleep(0.2)
        time.sleep(0.5)
        for event in reader.new():
            _show(event)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    out = base / "out" / "demo" / "exp1"
    print("\nproduced:")
    for p in sorted(out.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(out).parts):
            continue  # ckptd's internals (generations, export inputs): the links above them are the products
        if (p.is_file() and ".mlpackage" not in str(p.parent)) or p.suffix == ".mlpackage":
            size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            print(f"  {p.relative_to(base)}  ({size / 1024:.1f} KiB)")
    from ckptd.daemon.config import load_config
    from ckptd.daemon.status import collect_status, print_status

    print("\nckptd status:")
    print_status(collect_status(load_config(cfg_path)))
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"\nmanifest: {out / 'manifest.json'} (best {manifest['best']['metric']:.4f} from "
          f"{Path(manifest['best']['source']).name})")
    if manifest.get("coreml"):
        c = manifest["coreml"]
        checks = ", ".join(f"{k} {c['verification'].get(k)}" for k in ("graph_parity", "spec", "package_run")
                           if k in c.get("verification", {}))
        print(f"coreml:   {out / 'best.mlpackage'} ({c['status']}; {checks})")
    return 0


class _LogReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seen: list[dict[str, Any]] = []

    def new(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        events = []
        for line in data[:cut].decode(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        self.seen.extend(events)
        return events

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float, proc: subprocess.Popen[bytes],
             show: bool = False) -> None:
        if any(pred(e) for e in self.seen):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.new():
                if show:
                    _show(e)
                if pred(e):
                    return
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited early; see {self.path}")
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for the daemon; see {self.path}")


def _show(e: dict[str, Any]) -> None:
    name = e["event"]
    if name == "checkpoint.joined":
        print(f"    ckptd: {Path(e['checkpoint']).name} joins top-k ({e['reason']})")
    elif name.startswith("checkpoint."):
        print(f"    ckptd: {Path(e.get('checkpoint', '?')).name}: {name.split('.', 1)[1]} ({e.get('reason', '')})")
    elif name.startswith("export."):
        print(f"    ckptd: CoreML {name.split('.', 1)[1]}" + (f" ({e['reason']})" if e.get("reason") else ""))
