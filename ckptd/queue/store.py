"""The ledger side of queued exports: one ``exports`` row per request, moved on only by conditioned updates.

Row life: ``queued`` (the daemon, at request) -> ``running`` (a worker claimed it; ``holder`` = that worker) ->
``ok`` / ``partial`` (published) or ``failed`` (the attempt failed: final, or until the job's next attempt claims it
again) or ``superseded`` (a newer request of the run exists; never published). One row per request, however many
attempts: the row's id names the package's version directory, so a retried attempt finds what an earlier attempt
of the same request left and never publishes a second version.

Exactly once: :func:`publish` flips the row to ``ok`` in the same transaction that switches ``best.mlpackage``,
and only where the row is still ``running`` under this worker and no newer request of the run exists. A worker
killed between the switch and the commit leaves the row ``running``: the retried job finds the version directory
of its export id and commits that one (:func:`ckptd.queue.task.find_version`), it does not export again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ckptd.daemon.ledger import Ledger

CLAIMABLE = ("queued", "running", "failed")  # running: a killed worker's attempt; failed: awaiting its retry
PUBLISHED = ("ok", "partial")
Claim = Literal["claimed", "published", "superseded", "dropped", "gone"]
PathOrUrl = Path | str  # a local version directory, or the URL of an object-store package prefix
_NEWEST = ("NOT EXISTS (SELECT 1 FROM exports n WHERE n.watch = exports.watch AND n.run = exports.run "
           "AND n.stream = exports.stream AND n.id > exports.id)")
_LIVE_JOBS = ("SELECT id, status, args FROM procrastinate_jobs WHERE task_name = ? AND status IN ('todo', 'doing')")


@dataclass(frozen=True)
class RowState:
    id: int
    sha256: str | None
    status: str
    holder: str | None
    finished_at: float | None


def insert_queued(ledger: Ledger, watch: str, run: str, stream: str, source: str, sha256: str,
                  metric: float | None, step: int | None) -> int:
    """The request's row (``queued``, no holder: no daemon's start-up clean-up touches it); returns its id."""
    rows = ledger.write("INSERT INTO exports (watch, run, stream, source, sha256, metric, step, status, started_at) "
                        "VALUES (?,?,?,?,?,?,?, 'queued', ?) RETURNING id",
                        (watch, run, stream, source, sha256, metric, step, time.time()))
    return int(rows[0][0])


def newest(ledger: Ledger, watch: str, run: str, stream: str) -> RowState | None:
    """The run's newest export row (any executor, any status)."""
    rows = ledger.query("SELECT id, sha256, status, holder, finished_at FROM exports WHERE watch=? AND run=? "
                        "AND stream=? ORDER BY id DESC LIMIT 1", (watch, run, stream))
    return RowState(*rows[0]) if rows else None


def states(ledger: Ledger, ids: Iterable[int]) -> dict[int, RowState]:
    ids = sorted(set(ids))
    if not ids:
        return {}
    rows = ledger.query(f"SELECT id, sha256, status, holder, finished_at FROM exports WHERE id IN "
                        f"({','.join('?' * len(ids))})", tuple(ids))
    return {int(r[0]): RowState(*r) for r in rows}


def supersede(ledger: Ledger, export_id: int, reason: str) -> bool:
    """A request whose job was cancelled before it ran (a newer one replaced it): ``superseded``."""
    rows = ledger.write(f"UPDATE exports SET status='superseded', reason=?, finished_at=? WHERE id=? AND status IN "
                        f"({','.join('?' * len(CLAIMABLE))}) RETURNING id",
                        (reason, time.time(), export_id, *CLAIMABLE))
    return bool(rows)


def claim(ledger: Ledger, export_id: int, holder: str, job_id: int | None = None) -> Claim:
    """Start an attempt: the row becomes ``running`` under ``holder`` if it is still claimable and the newest
    request of its run. Otherwise says why not (a newer request: the row is marked ``superseded``).

    In the same transaction the job's queueing lock is cleared: it only keeps one *waiting request* per run, and
    a job that has started must be free to go back to waiting (a retry) while a newer request waits too."""
    marks = ",".join("?" * len(CLAIMABLE))
    with ledger.transaction() as db:
        cur = db.execute(f"UPDATE exports SET status='running', holder=?, reason=NULL, finished_at=NULL, "
                         f"started_at=? WHERE id=? AND status IN ({marks}) AND {_NEWEST}",
                         (holder, time.time(), export_id, *CLAIMABLE))
        if cur.rowcount == 1:
            if job_id is not None:
                db.execute("UPDATE procrastinate_jobs SET queueing_lock = NULL WHERE id = ?", (job_id,))
            return "claimed"
        row = db.execute("SELECT status FROM exports WHERE id=?", (export_id,)).fetchone()
        if row is None:
            return "gone"
        if row[0] in PUBLISHED:
            return "published"  # an earlier attempt committed, then its worker died before the job was acknowledged
        if row[0] in CLAIMABLE:
            db.execute("UPDATE exports SET status='superseded', reason=?, finished_at=? WHERE id=?",
                       ("a newer export request of the run replaced it before it ran", time.time(), export_id))
            return "superseded"
        return "dropped"  # superseded or abandoned already


def record_result(ledger: Ledger, export_id: int, holder: str, *, capture: str, verification: str) -> bool:
    """Keep a verified attempt's evidence on the row before publishing (a retry that only commits reuses it)."""
    rows = ledger.write("UPDATE exports SET capture=?, verification=? WHERE id=? AND holder=? AND status='running' "
                        "RETURNING id", (capture, verification, export_id, holder))
    return bool(rows)


def publish(ledger: Ledger, export_id: int, holder: str, status: str,
            switch: Callable[[], PathOrUrl]) -> PathOrUrl | None:
    """Exactly-once publication: in one transaction, flip the row to ``status`` (ok/partial) where it is still
    ``running`` under ``holder`` and the newest request of its run, then call ``switch`` (moves the package into
    its version directory and switches ``best.mlpackage``; for an object-store output, returns the URL of the
    package's prefix, uploaded already) and record its path. 0 rows: ``switch`` is not called, returns None.
    ``switch`` raising rolls the row back (it stays ``running``; the job's retry finishes it)."""
    with ledger.transaction() as db:
        cur = db.execute(f"UPDATE exports SET status=?, reason=NULL, finished_at=? WHERE id=? AND holder=? "
                         f"AND status='running' AND {_NEWEST}", (status, time.time(), export_id, holder))
        if cur.rowcount != 1:
            return None
        version = switch()
        db.execute("UPDATE exports SET path=? WHERE id=?", (str(version), export_id))
        return version


def fail(ledger: Ledger, export_id: int, holder: str, reason: str, *, capture: str | None = None,
         verification: str | None = None) -> bool:
    rows = ledger.write("UPDATE exports SET status='failed', reason=?, capture=?, verification=?, finished_at=? "
                        "WHERE id=? AND holder=? AND status='running' RETURNING id",
                        (reason, capture, verification, time.time(), export_id, holder))
    return bool(rows)


def requeue(ledger: Ledger, export_id: int, holder: str, reason: str) -> bool:
    """The worker stops: the row waits again (no holder) for the job's next attempt."""
    rows = ledger.write("UPDATE exports SET status='queued', holder=NULL, reason=? WHERE id=? AND holder=? "
                        "AND status='running' RETURNING id", (reason, export_id, holder))
    return bool(rows)


def mark_superseded(ledger: Ledger, export_id: int, holder: str, reason: str) -> bool:
    """An attempt that could not publish because a newer request exists (checked at publication)."""
    rows = ledger.write(f"UPDATE exports SET status='superseded', reason=?, finished_at=? WHERE id=? AND holder=? "
                        f"AND status='running' AND NOT {_NEWEST} RETURNING id",
                        (reason, time.time(), export_id, holder))
    return bool(rows)


# --- procrastinate's jobs table (same database), read for the daemon's bookkeeping -----------------------------


@dataclass(frozen=True)
class LiveJob:
    id: int
    status: str  # todo | doing
    args: dict[str, Any]

    @property
    def export_id(self) -> int | None:
        value = self.args.get("export_id")
        return int(value) if isinstance(value, int) else None


def has_queue(ledger: Ledger) -> bool:
    if ledger.dialect != "postgresql":
        return False
    return ledger.query("SELECT to_regclass('procrastinate_jobs')")[0][0] is not None


def live_jobs(ledger: Ledger, task: str, *, lock: str | None = None) -> list[LiveJob]:
    """Jobs of ``task`` waiting or running (of one run's ``lock``, if given)."""
    if lock is None:
        rows = ledger.query(_LIVE_JOBS, (task,))
    else:
        rows = ledger.query(_LIVE_JOBS + " AND lock = ?", (task, lock))
    return [LiveJob(int(r[0]), str(r[1]), dict(r[2] or {})) for r in rows]


def job_statuses(ledger: Ledger, job_ids: Iterable[int]) -> dict[int, str]:
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    rows = ledger.query(f"SELECT id, status FROM procrastinate_jobs WHERE id IN ({','.join('?' * len(ids))})",
                        tuple(ids))
    return {int(r[0]): str(r[1]) for r in rows}
