"""Opt-in retention of *training* checkpoints: pure selection, then careful deletion.

Off by default. A file is pruned only if the ledger knows it as complete and processed (same size and mtime
as when it was processed), it is not a source of a current top-k member, not among the newest ``keep_last``,
not the newest of all, and older than ``min_age``. Folders (HF/DCP) are never deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PRUNABLE_STATUSES = ("done", "skipped", "duplicate", "unranked")


@dataclass(frozen=True)
class Known:
    path: str
    size: int
    mtime_ns: int
    step: int | None
    status: str
    is_dir: bool = False


def select_prunable(known: Sequence[Known], member_sources: set[str], keep_last: int, min_age: float,
                    now: float) -> list[tuple[Known, str]]:
    """Which files may go, each with the reason it may go. Pure: ``now`` is passed in."""
    processed = [k for k in known if k.status in PRUNABLE_STATUSES]
    newest = sorted(processed, key=lambda k: (k.step if k.step is not None else -1, k.mtime_ns), reverse=True)
    protected = {k.path for k in newest[: max(keep_last, 1)]}
    out = []
    for k in processed:
        if k.is_dir or k.path in member_sources or k.path in protected:
            continue
        age = now - k.mtime_ns / 1e9
        if age < min_age:
            continue
        out.append((k, f"not in the top-k, not among the last {keep_last}, {age / 3600:.1f}h old"))
    return out
