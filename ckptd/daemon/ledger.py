"""The ledger: a SQLite database (WAL) in ``state_dir`` recording every checkpoint seen, members and exports.

It lets a restart resume without redoing work, and lets ``ckptd status`` read state while the daemon runs.
It is not the only copy of the truth: member files carry their provenance, so a lost ledger is rebuilt.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.daemon.policy import Record

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    watch TEXT NOT NULL, run TEXT NOT NULL, path TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT, status TEXT NOT NULL, reason TEXT,
    metric REAL, metric_source TEXT, step INTEGER,
    first_seen REAL NOT NULL, updated_at REAL NOT NULL,
    UNIQUE (watch, run, path, size, mtime_ns)
);
CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints (watch, run);
CREATE TABLE IF NOT EXISTS members (
    watch TEXT NOT NULL, run TEXT NOT NULL, checkpoint_id INTEGER NOT NULL,
    file TEXT NOT NULL, source TEXT NOT NULL, sha256 TEXT NOT NULL,
    metric REAL, step INTEGER, mtime REAL NOT NULL,
    PRIMARY KEY (watch, run, checkpoint_id)
);
CREATE TABLE IF NOT EXISTS runs (
    watch TEXT NOT NULL, run TEXT NOT NULL, run_dir TEXT, output TEXT,
    last_event TEXT, last_event_at REAL, last_error TEXT, last_error_at REAL,
    PRIMARY KEY (watch, run)
);
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY,
    watch TEXT NOT NULL, run TEXT NOT NULL, source TEXT, sha256 TEXT, metric REAL, step INTEGER,
    status TEXT NOT NULL, reason TEXT, path TEXT, capture TEXT, verification TEXT,
    started_at REAL NOT NULL, finished_at REAL
);
"""

FINAL_STATUSES = ("done", "invalid", "unranked", "duplicate", "skipped", "pruned")


@dataclass(frozen=True)
class CheckpointRow:
    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str | None
    status: str
    reason: str | None
    metric: float | None
    step: int | None


@dataclass(frozen=True)
class MemberRow:
    record: Record
    file: str


class Ledger:
    """Thread-safe access (one connection, one lock): the daemon's workers share it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    @classmethod
    def open_readonly(cls, path: str | Path) -> sqlite3.Connection:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    # --- checkpoints ---------------------------------------------------------------------------------------
    def find(self, watch: str, run: str, path: str, size: int, mtime_ns: int) -> CheckpointRow | None:
        row = self._one("SELECT id, path, size, mtime_ns, sha256, status, reason, metric, step FROM checkpoints "
                        "WHERE watch=? AND run=? AND path=? AND size=? AND mtime_ns=?",
                        (watch, run, path, size, mtime_ns))
        return CheckpointRow(*row) if row else None

    def record(self, watch: str, run: str, path: str, size: int, mtime_ns: int, *, status: str,
               reason: str | None = None, sha256: str | None = None, metric: float | None = None,
               metric_source: str | None = None, step: int | None = None) -> int:
        """Insert or update the row for this identity; returns its id."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO checkpoints (watch, run, path, size, mtime_ns, sha256, status, reason, metric, "
                "metric_source, step, first_seen, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (watch, run, path, size, mtime_ns) DO UPDATE SET sha256=excluded.sha256, "
                "status=excluded.status, reason=excluded.reason, metric=excluded.metric, "
                "metric_source=excluded.metric_source, step=excluded.step, updated_at=excluded.updated_at",
                (watch, run, path, size, mtime_ns, sha256, status, reason, metric, metric_source, step, now, now))
            row = db.execute("SELECT id FROM checkpoints WHERE watch=? AND run=? AND path=? AND size=? AND mtime_ns=?",
                             (watch, run, path, size, mtime_ns)).fetchone()
        return int(row[0])

    def known_files(self, watch: str, run: str) -> list[CheckpointRow]:
        """Every processed identity of this run (rows restored from member copies excluded)."""
        with self._lock:
            rows = self._db.execute("SELECT id, path, size, mtime_ns, sha256, status, reason, metric, step FROM "
                                    "checkpoints WHERE watch=? AND run=? AND size >= 0", (watch, run)).fetchall()
        return [CheckpointRow(*r) for r in rows]

    def set_status(self, ckpt_id: int, status: str, reason: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE checkpoints SET status=?, reason=?, updated_at=? WHERE id=?",
                       (status, reason, time.time(), ckpt_id))

    def counts(self, watch: str, run: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM checkpoints WHERE watch=? AND run=? GROUP BY status",
                                    (watch, run)).fetchall()
        return {status: n for status, n in rows}

    def last_checkpoint(self, watch: str, run: str) -> CheckpointRow | None:
        row = self._one("SELECT id, path, size, mtime_ns, sha256, status, reason, metric, step FROM checkpoints "
                        "WHERE watch=? AND run=? AND status IN ('done','unranked','duplicate','skipped') "
                        "ORDER BY COALESCE(step, -1) DESC, mtime_ns DESC LIMIT 1", (watch, run))
        return CheckpointRow(*row) if row else None

    # --- members ----------------------------------------------------------------------------------------------
    def members(self, watch: str, run: str) -> list[MemberRow]:
        with self._lock:
            rows = self._db.execute("SELECT checkpoint_id, source, sha256, metric, step, mtime, file FROM members "
                                    "WHERE watch=? AND run=?", (watch, run)).fetchall()
        return [MemberRow(Record(r[0], r[1], r[2], r[3], r[4], r[5]), r[6]) for r in rows]

    def set_members(self, db: sqlite3.Connection, watch: str, run: str, members: list[MemberRow]) -> None:
        """Replace the member set (call inside ``transaction()``)."""
        db.execute("DELETE FROM members WHERE watch=? AND run=?", (watch, run))
        db.executemany(
            "INSERT INTO members (watch, run, checkpoint_id, file, source, sha256, metric, step, mtime) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            [(watch, run, m.record.ckpt_id, m.file, m.record.path, m.record.sha256, m.record.metric,
              m.record.step, m.record.mtime) for m in members])

    # --- runs ---------------------------------------------------------------------------------------------------
    def touch_run(self, watch: str, run: str, run_dir: str, output: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO runs (watch, run, run_dir, output) VALUES (?,?,?,?) ON CONFLICT (watch, run) "
                       "DO UPDATE SET run_dir=excluded.run_dir, output=excluded.output", (watch, run, run_dir, output))

    def note_event(self, watch: str, run: str, event: str, *, error: str | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            if error is None:
                db.execute("UPDATE runs SET last_event=?, last_event_at=? WHERE watch=? AND run=?",
                           (event, now, watch, run))
            else:
                db.execute("UPDATE runs SET last_event=?, last_event_at=?, last_error=?, last_error_at=? "
                           "WHERE watch=? AND run=?", (event, now, error, now, watch, run))

    # --- exports ------------------------------------------------------------------------------------------------
    def export_started(self, watch: str, run: str, source: str, sha256: str, metric: float | None,
                       step: int | None) -> int:
        with self.transaction() as db:
            cur = db.execute("INSERT INTO exports (watch, run, source, sha256, metric, step, status, started_at) "
                             "VALUES (?,?,?,?,?,?, 'running', ?)",
                             (watch, run, source, sha256, metric, step, time.time()))
            return int(cur.lastrowid or 0)

    def export_finished(self, export_id: int, status: str, *, reason: str | None = None, path: str | None = None,
                        capture: str | None = None, verification: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE exports SET status=?, reason=?, path=?, capture=?, verification=?, finished_at=? "
                       "WHERE id=?", (status, reason, path, capture, verification, time.time(), export_id))
