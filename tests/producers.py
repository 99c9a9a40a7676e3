"""Test helpers: writers of trainers' exact layouts (where the real trainer cannot run here) and a follower that
decides like the daemon (the trainer plan + the daemon's pure ``policy.decide``) while a producer writes.

The ml-cvnets writer follows ``save_checkpoint`` / ``avg_and_save_k_checkpoints`` of ml-cvnets
(``utils/checkpoint_utils.py``) and its training engine's ``is_best`` rule, pitfalls included (plain ``torch.save``
rewriting ``*_last.pt`` in place, the old best removed before the new one is written, integer buffers averaged
through float64 and truncated): it is what a real ml-cvnets run leaves on disk.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptd.daemon.discovery import walk_run
from ckptd.daemon.policy import Record, decide
from ckptd.metric_sources import find_value
from ckptd.trainers import RunPlan, pick_weights
from ckptd.weights import load_object, open_checkpoint


def _cvnets_average(paths: list[str]) -> dict[str, torch.Tensor]:
    """ml-cvnets' average_ckpts: every tensor (integer buffers too) summed in float64, divided, cast back."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for p in paths:
        for k, v in torch.load(p, map_location="cpu", weights_only=True).items():
            dtypes.setdefault(k, v.dtype)
            total[k] = total.get(k, torch.zeros_like(v, dtype=torch.float64)) + v.to(torch.float64)
    return {k: (v / len(paths)).to(dtypes[k]) for k, v in total.items()}


def cvnets_avg_and_save_k(state: dict[str, torch.Tensor], score: float, k: int, maximize: bool, prefix: str) -> None:
    """The top-k file of this score, then keep the k best score files, then average them (only when a file was
    dropped, i.e. more than k existed: ml-cvnets' keep list is empty before)."""
    torch.save(state, f"{prefix}_score_{score:.4f}.pt")
    scores = [float(f.split("_score_")[-1].replace(".pt", "")) for f in glob.glob(f"{prefix}_score_*")]
    keep: list[float] = []
    if len(scores) > k:
        scores = sorted(scores) if maximize else sorted(scores)[::-1]
        keep = scores[-k:]
        for s in scores:
            if s not in keep:
                os.remove(f"{prefix}_score_{s:.4f}.pt")
    if len(keep) > 1:
        torch.save(_cvnets_average([f"{prefix}_score_{s:.4f}.pt" for s in keep]), f"{prefix}_avg.pt")


def cvnets_save_checkpoint(save_dir: Path, *, iterations: int, epoch: int, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, best_metric: float, is_best: bool,
                           ema: torch.nn.Module | None, is_ema_best: bool, ema_best_metric: float | None,
                           maximize: bool, k: int) -> None:
    """ml-cvnets' save_checkpoint, in its order of writes."""
    model_state = model.state_dict()
    checkpoint: dict[str, Any] = {"iterations": iterations, "epoch": epoch, "model_state_dict": model_state,
                                  "optim_state_dict": optimizer.state_dict(), "best_metric": best_metric,
                                  "gradient_scaler_state_dict": {}}
    if ema is not None:
        checkpoint["ema_state_dict"] = ema.state_dict()
    prefix = f"{save_dir}/checkpoint"
    if is_best:
        if os.path.isfile(f"{prefix}_best.pt"):
            os.remove(f"{prefix}_best.pt")
        torch.save(model_state, f"{prefix}_best.pt")
        if k > 1:
            cvnets_avg_and_save_k(model_state, best_metric, k, maximize, prefix)
    if ema is not None:
        torch.save(checkpoint["ema_state_dict"], f"{prefix}_ema_last.pt")
        if is_ema_best:
            if os.path.isfile(f"{prefix}_ema_best.pt"):
                os.remove(f"{prefix}_ema_best.pt")
            torch.save(checkpoint["ema_state_dict"], f"{prefix}_ema_best.pt")
            if k > 1 and ema_best_metric is not None:
                cvnets_avg_and_save_k(checkpoint["ema_state_dict"], ema_best_metric, k, maximize, f"{prefix}_ema")
    torch.save(checkpoint, f"{save_dir}/training_checkpoint_last.pt")
    torch.save(model_state, f"{prefix}_last.pt")


@dataclass
class Follower:
    """Watches a run directory like the daemon: after each producer step, every new or changed candidate is
    classified by the plan, read per stream and decided with the daemon's own ``policy.decide``."""

    run_dir: Path
    plan: RunPlan
    mode: str
    top_k: int
    max_depth: int = 3
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    members: dict[str, list[Record]] = field(default_factory=dict)
    weights: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)
    metrics: dict[tuple[str, str], tuple[float | None, str]] = field(default_factory=dict)
    next_id: int = 0

    def poll(self) -> None:
        for rel, is_dir in walk_run(self.plan, self.run_dir, self.max_depth):
            path = self.run_dir / rel
            st = path.stat()
            identity = (st.st_size, st.st_mtime_ns) if not is_dir else (0, max(
                (f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()), default=0))
            if self.seen.get(rel) == identity:
                continue
            self.seen[rel] = identity
            verdict = self.plan.classify(rel, is_dir)
            self.verdicts[rel] = verdict.kind
            if verdict.kind != "candidate":
                continue
            _, obj, metadata = load_object(path, allow_globals=self.plan.allow_globals)
            for name in verdict.streams:
                stream = self.plan.stream(name)
                pick = pick_weights(stream, obj)
                if pick is None:
                    continue
                metric = find_value(stream.metric_sources, path, obj, metadata, "metric")
                step = find_value(stream.step_sources, path, obj, metadata, "step")
                self.metrics[(name, rel)] = (metric.value, metric.where)
                ckpt = open_checkpoint(path, key=pick.key, prefer_ema=pick.prefer_ema,
                                       allow_globals=self.plan.allow_globals)
                record = Record(self.next_id, rel, ckpt.content_sha256 or str(self.next_id), metric.value,
                                None if step.value is None else int(step.value), st.st_mtime_ns / 1e9)
                self.next_id += 1
                decision = decide(self.members.get(name, []), record, self.top_k, self.mode)
                if decision.action == "join":
                    self.members[name] = list(decision.members)
                    self.weights[(name, record.ckpt_id)] = {k: v.clone() for k, v in ckpt.weights.items()}

    def member_names(self, stream: str) -> list[str]:
        return [m.path for m in self.members.get(stream, [])]

    def average(self, stream: str) -> dict[str, torch.Tensor]:
        """The daemon's average of the stream's members: float64 mean of floating tensors, cast back; integer
        buffers from the best member."""
        states = [self.weights[(stream, m.ckpt_id)] for m in self.members[stream]]
        out = {}
        for k, ref in states[0].items():
            if ref.is_floating_point():
                out[k] = (sum(s[k].double() for s in states) / len(states)).to(ref.dtype)
            else:
                out[k] = ref
        return out
