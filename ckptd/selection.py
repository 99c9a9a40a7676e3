"""Top-k selection over checkpoints: read each one's metric/step (I/O), then rank (pure, ckptd.ranking)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptd.errors import MetricError
from ckptd.metric_sources import ValueSource, first_value, parse_source
from ckptd.ranking import Candidate, top_k
from ckptd.weights import Checkpoint, load_object


def read_candidate(source: str | Path | Checkpoint, metric_sources: Sequence[ValueSource],
                   step_sources: Sequence[ValueSource] = (), allow_globals: Sequence[Any] = ()) -> Candidate:
    """Metric and step of one checkpoint. A path is only loaded if a source needs the object; an already
    opened :class:`Checkpoint` is never loaded again."""
    obj: Any = None
    metadata: dict[str, str] | None = None
    if isinstance(source, Checkpoint):
        p, obj, metadata = source.path, source.obj, source.metadata
    else:
        p = Path(source)
        if any(s.kind == "checkpoint" for s in (*metric_sources, *step_sources)):
            _, obj, metadata = load_object(p, allow_globals=allow_globals)
    metric, _ = first_value(metric_sources, p, obj, metadata, "metric")
    step, _ = first_value(step_sources, p, obj, metadata, "step")
    return Candidate(path=str(p), metric=metric, step=None if step is None else int(step), mtime=p.stat().st_mtime)


def select_top_k(checkpoints: Sequence[str | Path | Checkpoint], metric: Sequence[str | ValueSource] | str, k: int,
                 mode: str = "max", *, step: Sequence[str | ValueSource] = (),
                 allow_globals: Sequence[Any] = (), skip_unranked: bool = True) -> list[Candidate]:
    """The best ``k`` checkpoints by ``metric`` (best first). Those without a metric are skipped (fewer than ``k``
    may come back: compare the length); with ``skip_unranked=False`` a checkpoint without a metric is a
    MetricError naming it (what ``ckptd average`` does unless ``--skip-unranked``). If none has one, MetricError
    explains why for each."""
    metric_list = [metric] if isinstance(metric, str) else list(metric)
    m_sources = [s if isinstance(s, ValueSource) else parse_source(s) for s in metric_list]
    s_sources = [s if isinstance(s, ValueSource) else parse_source(s) for s in step]
    candidates = [read_candidate(c, m_sources, s_sources, allow_globals) for c in checkpoints]
    missing = [c.path for c in candidates if c.metric is None]
    if missing and not skip_unranked:
        raise MetricError("no metric from " + ", ".join(s.describe() for s in m_sources) + " in " + ", ".join(missing))
    ranked = top_k(candidates, k, mode)
    if not ranked:
        raise MetricError("no checkpoint yielded a metric from " + ", ".join(s.describe() for s in m_sources))
    return ranked
