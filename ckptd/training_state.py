"""Training state for training scripts: build, save atomically, resume, and the seed's file layout.

Keys follow ml-cvnets (``iterations``, ``epoch``, ``model_state_dict``, ``optim_state_dict``, ``best_metric``,
``gradient_scaler_state_dict``, ``ema_state_dict``) so the daemon and existing tools read these files as-is.
``metric`` is *this* checkpoint's metric (``best_metric`` is the best so far and must not be used to rank).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptd import __version__
from ckptd.atomic import atomic_torch_save
from ckptd.errors import CheckpointError
from ckptd.model_state import load_model_weights, model_state_dict, unwrap_model
from ckptd.safe_load import load_torch

log = logging.getLogger("ckptd.training_state")

TRAINING_STATE_GLOB = "training_checkpoint*.pt"


def build_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: Any | None = None,
    ema: nn.Module | None = None,
    epoch: int = 0,
    iteration: int = 0,
    best_metric: float | None = None,
    metric: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One dict with everything needed to resume. Values are plain types and tensors (weights_only-loadable)."""
    state: dict[str, Any] = {
        "iterations": int(iteration),
        "epoch": int(epoch),
        "model_state_dict": model_state_dict(model),
        "best_metric": None if best_metric is None else float(best_metric),
        "ckptd_version": __version__,
    }
    if metric is not None:
        state["metric"] = float(metric)
    if optimizer is not None:
        state["optim_state_dict"] = optimizer.state_dict()
    if scaler is not None:
        state["gradient_scaler_state_dict"] = scaler.state_dict()
    if ema is not None:
        # full EMA state (AveragedModel keeps n_averaged) so resuming continues the average exactly
        state["ema_state_dict"] = ema.state_dict() if isinstance(ema, torch.optim.swa_utils.AveragedModel) \
            else model_state_dict(ema)
    if extra:
        state["extra"] = dict(extra)
    return state


def save_training_state(state: Mapping[str, Any], path: str | Path) -> Path:
    """Atomically write a training state (temp + fsync + rename + directory fsync)."""
    p = Path(path)
    atomic_torch_save(dict(state), p)
    return p


@dataclass
class ResumeInfo:
    """Where to continue from."""

    path: Path
    epoch: int
    iteration: int
    best_metric: float | None
    metric: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: Any | None = None,
    ema: nn.Module | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
    allow_globals: Sequence[str | Any] = (),
) -> ResumeInfo:
    """Restore model/optimizer/scaler/EMA in place from a training state and say where to continue."""
    p = Path(path)
    state = load_torch(p, map_location=map_location, allow_globals=allow_globals, mmap=False)
    if not isinstance(state, Mapping) or "model_state_dict" not in state:
        raise CheckpointError(p, "is not a training state (no 'model_state_dict'); use load_model_weights "
                              "for model-only files")
    load_model_weights(model, state["model_state_dict"], strict=strict)
    if optimizer is not None:
        if "optim_state_dict" not in state:
            raise CheckpointError(p, "has no optimizer state ('optim_state_dict') to resume from")
        optimizer.load_state_dict(state["optim_state_dict"])
    if scaler is not None and "gradient_scaler_state_dict" in state:
        scaler.load_state_dict(state["gradient_scaler_state_dict"])
    if ema is not None:
        if "ema_state_dict" not in state:
            raise CheckpointError(p, "has no EMA state ('ema_state_dict') but an EMA model was given")
        if isinstance(ema, torch.optim.swa_utils.AveragedModel):
            ema.load_state_dict(state["ema_state_dict"])
        else:
            load_model_weights(unwrap_model(ema), state["ema_state_dict"], strict=strict)
    return ResumeInfo(path=p, epoch=int(state.get("epoch", 0)), iteration=int(state.get("iterations", 0)),
                      best_metric=state.get("best_metric"), metric=state.get("metric"),
                      extra=dict(state.get("extra") or {}))


def find_latest_training_state(directory: str | Path, pattern: str = TRAINING_STATE_GLOB,
                               allow_globals: Sequence[str | Any] = ()) -> Path | None:
    """Newest *valid* training state in ``directory`` (by iteration, then mtime); corrupt files are skipped
    with a warning naming them."""
    best: tuple[int, float, Path] | None = None
    for candidate in Path(directory).glob(pattern):
        if not candidate.is_file() or candidate.name.startswith("."):
            continue
        try:
            state = load_torch(candidate, allow_globals=allow_globals)
            if not isinstance(state, Mapping) or "model_state_dict" not in state:
                raise CheckpointError(candidate, "is not a training state")
            key = (int(state.get("iterations", 0)), candidate.stat().st_mtime, candidate)
        except (CheckpointError, OSError) as exc:
            log.warning("skipping unusable training checkpoint: %s", exc)
            continue
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def auto_resume(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                **kwargs: Any) -> ResumeInfo | None:
    """Resume from the newest valid training state in ``directory``; None when there is nothing to resume."""
    latest = find_latest_training_state(directory, allow_globals=kwargs.get("allow_globals", ()))
    if latest is None:
        return None
    return load_training_state(latest, model, optimizer, **kwargs)


_SCORE_RE = re.compile(r"^checkpoint(?P<ema>_ema)?_score_(?P<metric>[-+0-9.eE]+?)(?:_it(?P<it>\d+))?\.pt$")


class SeedLayoutSaver:
    """Writes the files of ml-cvnets' ``save_checkpoint`` (``utils/checkpoint_utils.py``), fixing its pitfalls.

    Per :meth:`save`, in ml-cvnets' order: on a new best (``metric`` ties or beats ``best_metric``, as ml-cvnets'
    ``>=``) ``checkpoint_best.pt`` and, when ``top_k > 1``, the top-k file ``checkpoint_score_{metric:.4f}.pt`` plus
    ``checkpoint_avg.pt`` (mean of the kept score files); ``checkpoint_ema_last.pt``; on a new EMA best (by the EMA
    model's *own* ``ema_metric`` against ``ema_best_metric``) ``checkpoint_ema_best.pt``,
    ``checkpoint_ema_score_{ema_metric:.4f}.pt`` and ``checkpoint_ema_avg.pt``; ``training_checkpoint_last.pt``
    (+ ``training_checkpoint_{epoch}_{iter}.pt`` with ``keep_all_training``); ``checkpoint_last.pt``.

    Top-k semantics of ml-cvnets' ``avg_and_save_k_checkpoints``: a score file is written only for a new best (so the
    kept files are the ``top_k`` best of the successive bests), more than ``top_k`` score files → the worst are
    deleted, the average is over the kept score files. No EMA metric → no EMA best/score/avg files (only
    ``checkpoint_ema_last.pt``), as ml-cvnets without ``ema_best_metric``.

    Deliberate differences (ml-cvnets pitfalls, DESIGN.md §4): every file is written atomically (temp + rename), so the
    old best is never deleted before the new one exists; two scores equal to 4 decimals get an ``_it{iteration}``
    suffix instead of overwriting each other (the daemon's ``cvnets`` preset reads that suffix as the step); only
    score files this saver manages are pruned, after the new one is written; the average keeps integer buffers
    (``num_batches_tracked``) from the best file instead of truncating their float64 mean, and is written as soon as
    two score files exist (ml-cvnets writes it only once more than ``top_k`` have existed, so a run with at most
    ``top_k`` improvements never gets one); averaging errors raise instead of being printed and swallowed.
    """

    def __init__(self, directory: str | Path, *, mode: str = "max", top_k: int = 5,
                 keep_all_training: bool = False) -> None:
        if mode not in ("max", "min"):
            raise ValueError("mode must be 'max' or 'min'")
        self.directory = Path(directory)
        self.mode = mode
        self.top_k = top_k
        self.keep_all_training = keep_all_training
        self.directory.mkdir(parents=True, exist_ok=True)

    def _improves(self, value: float, best: float | None) -> bool:
        from ckptd.ranking import is_better

        return best is None or value == best or is_better(value, best, self.mode)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, epoch: int,
             iteration: int, metric: float, best_metric: float | None = None, scaler: Any | None = None,
             ema: nn.Module | None = None, ema_metric: float | None = None, ema_best_metric: float | None = None,
             extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Save one evaluation's files; returns what was written, by role. ``best_metric``/``ema_best_metric`` are
        the bests *before* this call (None at the start); the training state records the updated best."""
        is_best = self._improves(metric, best_metric)
        best = metric if is_best else best_metric
        state = build_training_state(model, optimizer, scaler=scaler, ema=ema, epoch=epoch, iteration=iteration,
                                     best_metric=best, metric=metric, extra=extra)
        d = self.directory
        written: dict[str, Path] = {}
        weights = state["model_state_dict"]
        if is_best:
            atomic_torch_save(weights, d / "checkpoint_best.pt")
            written["best"] = d / "checkpoint_best.pt"
            if self.top_k > 1:
                written.update(self._save_scored(weights, metric, iteration, ema=False))
        if ema is not None:
            ema_weights = model_state_dict(ema)
            atomic_torch_save(ema_weights, d / "checkpoint_ema_last.pt")
            written["ema_last"] = d / "checkpoint_ema_last.pt"
            if ema_metric is not None and self._improves(ema_metric, ema_best_metric):
                atomic_torch_save(ema_weights, d / "checkpoint_ema_best.pt")
                written["ema_best"] = d / "checkpoint_ema_best.pt"
                if self.top_k > 1:
                    written.update(self._save_scored(ema_weights, ema_metric, iteration, ema=True))
        written["training_last"] = save_training_state(state, d / "training_checkpoint_last.pt")
        if self.keep_all_training:
            written["training"] = save_training_state(state, d / f"training_checkpoint_{epoch}_{iteration}.pt")
        atomic_torch_save(weights, d / "checkpoint_last.pt")
        written["last"] = d / "checkpoint_last.pt"
        return written

    def _save_scored(self, weights: Mapping[str, torch.Tensor], metric: float, iteration: int,
                     *, ema: bool) -> dict[str, Path]:
        from ckptd.averaging import average_checkpoints

        tag = "_ema" if ema else ""
        path = self.directory / f"checkpoint{tag}_score_{metric:.4f}.pt"
        if path.exists():
            path = self.directory / f"checkpoint{tag}_score_{metric:.4f}_it{iteration}.pt"
        atomic_torch_save(dict(weights), path)  # write first, prune after
        ranked = self._rank(self._scored(ema))
        for _, _, old in ranked[self.top_k:]:
            old.unlink(missing_ok=True)
        kept = [p for _, _, p in ranked[: self.top_k]]
        out = {f"score{tag}": path}
        if len(kept) >= 2:
            avg = self.directory / f"checkpoint{tag}_avg.pt"
            average_checkpoints(kept, avg, reference=0)  # kept[0] is the best: integer buffers come from it
            out[f"avg{tag}"] = avg
        return out

    def _rank(self, entries: list[tuple[float, int, Path]]) -> list[tuple[float, int, Path]]:
        """Best first; equal metrics (as far as the 4-decimal names tell) rank the newer iteration first."""
        sign = -1 if self.mode == "max" else 1
        return sorted(entries, key=lambda e: (sign * round(e[0], 4), -e[1]))

    def _scored(self, ema: bool) -> list[tuple[float, int, Path]]:
        out = []
        for f in self.directory.glob("checkpoint*_score_*.pt"):
            m = _SCORE_RE.match(f.name)
            if m and bool(m.group("ema")) == ema:
                try:
                    out.append((float(m.group("metric")), int(m.group("it") or -1), f))
                except ValueError:
                    continue
        return out
