"""``ckptd demo``: a tiny real training run writes checkpoints while the real daemon watches it.

Everything is local and offline: synthetic data, a built-in model, a config generated from
``config.example.yaml`` (shipped inside the package as the demo's template), the daemon as a subprocess.

The average is gated (``average: {gate: true}``): a new top-k average is published only when the demo's evaluation
program (``python -m ckptd.examples evaluate``, held-out accuracy) scores it at least as well as the best member,
less a margin. Late in the run a checkpoint "from another run" lands: the best network with its channels swapped,
the same function (same accuracy) from another basin. It joins the top-k on its metric, and the gate keeps it
out of the published average, saying why.
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

from ckptd.examples import TinyConvNet, swap_channels, synthetic_images
from ckptd.training_state import build_training_state, save_training_state

EXAMPLE_CONFIG = Path(__file__).resolve().parent / "config.example.yaml"  # package data (ships in the wheel)


FOREIGN = "from_other_run.pt"
MARGIN = 0.02  # accuracy an average may lose against the best member and still be published
MIN_MEMBERS = 3  # = top_k: the gate decides about full top-3 averages only


def synthetic_training(out: Path, epochs: int, *, pause: float = 0.3, delete_non_topk: int = 0,
                       on_save: Callable[[dict[str, Any]], None] | None = None,
                       foreign_after: int | None = None) -> Iterator[dict[str, Any]]:
    """Train a TinyConvNet on synthetic data; after each epoch save a training state (atomically) whose
    ``metric`` is this epoch's accuracy. Yields one record per checkpoint. After epoch ``foreign_after`` it also
    saves ``from_other_run.pt``: the best network so far with its channels swapped (another basin, the same
    accuracy), ranked just below that best (record ``foreign: True``)."""
    out.mkdir(parents=True, exist_ok=True)
    x, y = synthetic_images(64, seed=0)
    torch.manual_seed(0)
    model = TinyConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    saved: list[tuple[float, Path]] = []
    best: float | None = None
    best_state: dict[str, torch.Tensor] = {}
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
        if best is None or acc > best:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        best = acc if best is None else max(best, acc)
        path = out / f"training_checkpoint_{epoch}.pt"
        save_training_state(build_training_state(model, opt, epoch=epoch, iteration=(epoch + 1) * 4,
                                                 best_metric=best, metric=acc), path)
        saved.append((acc, path))
        record = {"path": str(path), "metric": acc, "epoch": epoch, "loss": float(loss.detach())}
        yield record
        if epoch == foreign_after:
            other = TinyConvNet()
            other.load_state_dict(swap_channels(best_state))
            foreign = out / FOREIGN
            save_training_state(build_training_state(other, None, epoch=epoch, iteration=(epoch + 1) * 4,
                                                     best_metric=best, metric=best - 5e-5), foreign)
            yield {"path": str(foreign), "metric": best - 5e-5, "epoch": epoch, "foreign": True}
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
    policy["average"] = {**policy.get("average", {}), "top_k": 3, "min_members": MIN_MEMBERS, "gate": True,
                         "margin": MARGIN}
    policy["metric"] = {"mode": "max", "sources": [{"checkpoint": "metric"}]}
    policy["evaluate"] = {"command": [sys.executable, "-m", "ckptd.examples", "evaluate"], "metric": "accuracy",
                          "mode": "max", "timeout": "2m"}
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
        manifest_path = base / "out" / "demo" / "exp1" / "manifest.json"
        foreign_after = epochs - 2 if epochs >= 3 else None
        for rec in synthetic_training(base / "train" / "exp1", epochs, pause=0.5, delete_non_topk=2,
                                      foreign_after=foreign_after):
            records.append(rec)
            if rec.get("foreign"):
                print(f"  a checkpoint from another run lands: {FOREIGN} (the best network with its channels "
                      f"swapped: same accuracy {rec['metric']:.4f}, another basin)")
            else:
                print(f"  epoch {rec['epoch']}: accuracy {rec['metric']:.4f} -> {Path(rec['path']).name}")
            for event in reader.new():
                _show(event)
            if rec["epoch"] == foreign_after:  # before and after the foreign checkpoint: each decision in turn
                _wait_decision(reader, daemon, manifest_path, rec["path"])
        last = records[-1]["path"]
        _wait_decision(reader, daemon, manifest_path, last)
        if export:
            print("waiting for the CoreML export of the final best …")
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
    _summarize_gate(manifest, reader.seen)
    if manifest.get("coreml"):
        c = manifest["coreml"]
        checks = ", ".join(f"{k} {c['verification'].get(k)}" for k in ("graph_parity", "spec", "package_run")
                           if k in c.get("verification", {}))
        print(f"coreml:   {out / 'best.mlpackage'} ({c['status']}; {checks})")
    return 0


def _decided(manifest: dict[str, Any], checkpoint: str) -> bool:
    """Does the manifest show the gate's decision for the top-k that ``checkpoint`` joined?"""
    topk = [e["source"] for e in manifest.get("top_k_members") or []]
    avg = manifest.get("average") or {}
    if checkpoint not in topk or len(topk) < MIN_MEMBERS:
        return True  # it did not join, or no average is due yet: nothing to decide
    ev = avg.get("evaluation") or {}
    if ev.get("current") is True:
        return True
    return not avg.get("members") and (ev.get("rejected") or {}).get("members") == topk


def _wait_decision(reader: _LogReader, daemon: subprocess.Popen[bytes], manifest_path: Path, checkpoint: str,
                   timeout: float = 300) -> None:
    """Wait until the daemon processed ``checkpoint`` and evaluated the top-k it joined (showing the log)."""
    reader.wait(lambda e: e.get("checkpoint") == checkpoint and e["event"].startswith("checkpoint."), 60, daemon,
                show=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in reader.new():
            _show(event)
        try:
            if _decided(json.loads(manifest_path.read_text()), checkpoint):
                return
        except (OSError, ValueError):
            pass
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited early; see {reader.path}")
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for the evaluation of {Path(checkpoint).name}; see {reader.path}")


def _summarize_gate(manifest: dict[str, Any], events: list[dict[str, Any]]) -> None:
    """What the evaluation gate published, and what it kept out and why."""
    avg = manifest.get("average") or {}
    ev = avg.get("evaluation") or {}
    names = ", ".join(Path(m["source"]).name for m in avg.get("members", []))
    if avg.get("members"):
        print(f"average:  {avg['path']} = uniform average of {avg['k']} ({names}); evaluated {ev.get('metric')} "
              f"{_num(ev.get('value'))} (the best member now: {_num(ev.get('best_value'))}; an average is published "
              f"only if it scores >= the best member's - {ev.get('margin', MARGIN):g})")
    else:
        print(f"average:  none published: {avg.get('waiting_for', 'no average yet')}")
    published = sum(e["event"] == "average.published" for e in events)
    rejected = [e for e in events if e["event"] == "average.rejected"]
    print(f"gate:     {published} average(s) published, {len(rejected)} candidate(s) rejected in this run")
    last = ev.get("rejected")
    if last:
        holds = [Path(s).name for s in last.get("members", [])]
        why = f" (it holds {FOREIGN}: another basin)" if FOREIGN in holds else ""
        print(f"          newest candidate REJECTED{why}; the average above stays: {last['reason']}")


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "?"


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
    elif name == "evaluation.finished":
        what = "the best member alone" if e.get("candidate") == "member" else f"the average of {e.get('members')}"
        print(f"    ckptd: evaluated {what}: {e.get('metric_name')} {_num(e.get('value'))}")
    elif name == "evaluation.superseded":
        print("    ckptd: evaluation superseded (the top-k changed meanwhile; the newer one is evaluated)")
    elif name == "evaluation.failed":
        print(f"    ckptd: evaluation failed ({e.get('reason')})")
    elif name == "average.published":
        print(f"    ckptd: gate: average of {e.get('members')} published (evaluated {_num(e.get('value'))})")
    elif name == "average.rejected":
        print(f"    ckptd: gate: average REJECTED, not published ({e.get('reason')})")
