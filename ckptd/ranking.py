"""Pure ranking logic: which checkpoints are best, which form the top-k. No I/O, no clock reads."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Mode = Literal["max", "min"]


def check_mode(mode: str) -> Mode:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    return mode  # type: ignore[return-value]


def is_better(a: float, b: float, mode: str) -> bool:
    """Strictly better under ``mode``."""
    return a > b if check_mode(mode) == "max" else a < b


@dataclass(frozen=True)
class Candidate:
    """A checkpoint as ranking sees it. ``metric`` None means unranked (it can still be "last")."""

    path: str
    metric: float | None
    step: int | None = None
    mtime: float = 0.0


def rank_key(c: Candidate, mode: str) -> tuple[float, int, float, str]:
    """Sort key, ascending = best first: metric, then newer step, then newer mtime, then path for stability."""
    assert c.metric is not None
    metric = -c.metric if check_mode(mode) == "max" else c.metric
    return (metric, -(c.step if c.step is not None else -1), -c.mtime, c.path)


def rank(candidates: Iterable[Candidate], mode: str) -> list[Candidate]:
    """Ranked candidates, best first; those without a metric are left out."""
    return sorted((c for c in candidates if c.metric is not None), key=lambda c: rank_key(c, mode))


def top_k(candidates: Iterable[Candidate], k: int, mode: str) -> list[Candidate]:
    if k < 1:
        raise ValueError("k must be >= 1")
    return rank(candidates, mode)[:k]


def newest(candidates: Iterable[Candidate]) -> Candidate | None:
    """The "last" checkpoint: highest step, then newest mtime (unranked ones included)."""
    items = list(candidates)
    if not items:
        return None
    return max(items, key=lambda c: (c.step if c.step is not None else -1, c.mtime, c.path))
