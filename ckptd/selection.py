"""Top-k selection over checkpoint files: read each one's metric/step (I/O), then rank (pure, ckptd.ranking)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptd.errors import MetricError
from ckptd.formats import CheckpointFormat, detect_format
from ckptd.metrics import ValueSource, first_value, parse_source
from ckptd.ranking import Candidate, top_k
from ckptd.safe_load import load_torch
from ckptd.safetensors_io import open_safetensors


def read_candidate(path: str | Path, metric_sources: Sequence[ValueSource],
                   step_sources: Sequence[ValueSource] = (), allow_globals: Sequence[Any] = ()) -> Candidate:
    """Metric and step of one checkpoint file (the object is only loaded if a source needs it)."""
    p = Path(path)
    needs_obj = any(s.kind == "checkpoint" for s in (*metric_sources, *step_sources))
    obj: Any = None
    metadata: dict[str, str] | None = None
    if needs_obj:
        fmt = detect_format(p)
        if fmt is CheckpointFormat.SAFETENSORS:
            metadata = open_safetensors(p).metadata
        elif fmt in (CheckpointFormat.TORCH_ZIP, CheckpointFormat.TORCH_LEGACY):
            obj = load_torch(p, allow_globals=allow_globals)
    metric, _ = first_value(metric_sources, p, obj, metadata, "metric")
    step, _ = first_value(step_sources, p, obj, metadata, "step")
    return Candidate(path=str(p), metric=metric, step=None if step is None else int(step), mtime=p.stat().st_mtime)


def select_top_k(paths: Sequence[str | Path], metric: Sequence[str | ValueSource] | str, k: int, mode: str = "max",
                 *, step: Sequence[str | ValueSource] = (), allow_globals: Sequence[Any] = ()) -> list[Candidate]:
    """The best ``k`` of ``paths`` by ``metric`` (best first). Files without a metric are skipped; if none has
    one, MetricError explains why for each."""
    metric_list = [metric] if isinstance(metric, str) else list(metric)
    m_sources = [s if isinstance(s, ValueSource) else parse_source(s) for s in metric_list]
    s_sources = [s if isinstance(s, ValueSource) else parse_source(s) for s in step]
    candidates = [read_candidate(p, m_sources, s_sources, allow_globals) for p in paths]
    ranked = top_k(candidates, k, mode)
    if not ranked:
        raise MetricError("no checkpoint yielded a metric from " + ", ".join(s.describe() for s in m_sources))
    return ranked
