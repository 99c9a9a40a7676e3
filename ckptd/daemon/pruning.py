"""Opt-in pruning of a run's training checkpoints: the careful, I/O half of ``ckptd.daemon.retention``.

Every candidate the pure selection offers is re-observed first (a file changed since it was processed is not the
file the ledger knows), ``dry_run`` only logs, and every deletion is logged and recorded in the ledger.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ckptd.daemon.discovery import observe
from ckptd.daemon.ledger import FINAL_STATUSES
from ckptd.daemon.retention import Known, select_prunable

if TYPE_CHECKING:
    from ckptd.daemon.pipeline import RunProcessor


def apply_retention(processors: list[RunProcessor], now: float) -> int:
    """Opt-in pruning of one run's training checkpoints (see ckptd.daemon.retention); a file any stream still
    holds as a member source is kept. Returns how many were deleted."""
    first = processors[0]
    policy = first.ctx.policy.retention
    if not policy.enabled:
        return 0
    ctx, ledger = first.ctx, first.ledger
    rows = ledger.known_files(ctx.watch.name, ctx.run)
    unfinished = {r.path for r in rows if r.status not in FINAL_STATUSES}  # a stream still has to read it
    known = [Known(r.path, r.size, r.mtime_ns, r.step, r.status, Path(r.path).is_dir()) for r in rows
             if r.path not in unfinished]
    sources = {m.record.path for p in processors for m in p.members()}
    deleted = 0
    by_path: dict[tuple[str, int, int], list[int]] = {}
    for r in rows:
        by_path.setdefault((r.path, r.size, r.mtime_ns), []).append(r.id)
    for item, reason in select_prunable(known, sources, policy.keep_last, policy.min_age, now):
        path = Path(item.path)
        now_seen = observe(path, is_dir=False)
        if now_seen is None or now_seen.signature != (item.size, item.mtime_ns) or not path.is_file():
            continue  # changed or gone since it was processed: not the file the ledger knows
        if policy.dry_run:
            first.log.info("retention.would_delete", checkpoint=str(path), action="dry-run", reason=reason)
            continue
        try:
            path.unlink()
        except OSError as exc:
            first.log.warning("retention.failed", checkpoint=str(path), reason=str(exc))
            continue
        for row_id in by_path[(item.path, item.size, item.mtime_ns)]:
            ledger.set_status(row_id, "pruned", reason)
        first.log.info("retention.deleted", checkpoint=str(path), action="delete", reason=reason)
        deleted += 1
    return deleted
