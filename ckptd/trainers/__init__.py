"""Trainer presets and weight streams: which files a trainer writes, which are checkpoints, where *this*
checkpoint's metric and step live, and which weight streams (``model``, ``ema``) a run carries.

The daemon calls :func:`plan_run` once per run (and again on each scan while the run's trainer is still
undetected), then per name :meth:`RunPlan.classify`, and per loaded candidate and stream :func:`pick_weights`
and :func:`ckptd.metric_sources.find_value` with the stream's sources. See ``plan.py`` for the precedence rules
and ``presets.py`` for the tables.
"""

from __future__ import annotations

from pathlib import Path

from ckptd.trainers.detect import detect, list_names
from ckptd.trainers.plan import (
    PlanSettings,
    RunPlan,
    StreamPlan,
    Verdict,
    WeightsPick,
    build_plan,
    ema_weights_key,
    pick_weights,
)
from ckptd.trainers.presets import PRESETS, STREAM_NAMES, TRAINERS, Preset, StreamSpec, WeightsSource

__all__ = ["PRESETS", "STREAM_NAMES", "TRAINERS", "PlanSettings", "Preset", "RunPlan", "StreamPlan", "StreamSpec",
           "Verdict", "WeightsPick", "WeightsSource", "build_plan", "detect", "ema_weights_key", "pick_weights",
           "plan_run"]


def plan_run(run_dir: str | Path, settings: PlanSettings | None = None) -> RunPlan:
    """The plan for one run directory. With ``trainer: auto`` the trainer is detected from the names present
    (a bounded directory walk: the only I/O here); an explicit trainer is taken as given."""
    settings = settings or PlanSettings()
    if settings.trainer != "auto":
        return build_plan(settings.trainer, f"trainer: {settings.trainer} (set in the config)", settings)
    trainer, why = detect(list_names(Path(run_dir), settings.max_depth))
    return build_plan(trainer, why, settings)
