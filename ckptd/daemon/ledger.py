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

LEDGER_NAME = "ledger.sqlite3"  # in state_dir; `ckptd status` reads it without importing the service

SCHEMA_VERSION = 3  # 3 added the evaluations and gates tables (issue 12); no data moves, they are created empty
SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    watch TEXT NOT NULL, run TEXT NOT NULL, stream TEXT NOT NULL DEFAULT 'model', path TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT, status TEXT NOT NULL, reason TEXT,
    metric REAL, metric_source TEXT, step INTEGER,
    first_seen REAL NOT NULL, updated_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    UNIQUE (watch, run, stream, path, size, mtime_ns)
);
CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints (watch, run, stream);
CREATE TABLE IF NOT EXISTS members (
    watch TEXT NOT NULL, run TEXT NOT NULL, stream TEXT NOT NULL DEFAULT 'model', checkpoint_id INTEGER NOT NULL,
    file TEXT NOT NULL, source TEXT NOT NULL, sha256 TEXT NOT NULL,
    metric REAL, step INTEGER, mtime REAL NOT NULL,
    PRIMARY KEY (watch, run, stream, checkpoint_id)
);
CREATE TABLE IF NOT EXISTS runs (
    watch TEXT NOT NULL, run TEXT NOT NULL, stream TEXT NOT NULL DEFAULT 'model', run_dir TEXT, output TEXT,
    last_event TEXT, last_event_at REAL, last_error TEXT, last_error_at REAL,
    PRIMARY KEY (watch, run, stream)
);
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY,
    watch TEXT NOT NULL, run TEXT NOT NULL, stream TEXT NOT NULL DEFAULT 'model',
    source TEXT, sha256 TEXT, metric REAL, step INTEGER,
    status TEXT NOT NULL, reason TEXT, path TEXT, capture TEXT, verification TEXT,
    started_at REAL NOT NULL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY,
    watch TEXT NOT NULL, run TEXT NOT NULL, stream TEXT NOT NULL DEFAULT 'model',
    kind TEXT NOT NULL, key TEXT NOT NULL, members TEXT NOT NULL,
    value REAL, status TEXT NOT NULL, reason TEXT, started_at REAL NOT NULL, finished_at REAL,
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS evaluations_key ON evaluations (watch, run, stream, key);
CREATE INDEX IF NOT EXISTS evaluations_started ON evaluations (watch, started_at);
CREATE TABLE IF NOT EXISTS gates (
    watch TEXT NOT NULL, run TEXT NOT NULL, stream TEXT NOT NULL DEFAULT 'model',
    topk_key TEXT, members TEXT NOT NULL, evaluation TEXT, winner TEXT, updated_at REAL NOT NULL,
    PRIMARY KEY (watch, run, stream)
);
"""

# Version 1 (ckptd 0.1.0) had no stream column and no attempts counter; its tables are rebuilt in place.
_MIGRATE_FROM_1 = {
    "checkpoints": "id, watch, run, path, size, mtime_ns, sha256, status, reason, metric, metric_source, step, "
                   "first_seen, updated_at",
    "members": "watch, run, checkpoint_id, file, source, sha256, metric, step, mtime",
    "runs": "watch, run, run_dir, output, last_event, last_event_at, last_error, last_error_at",
    "exports": "id, watch, run, source, sha256, metric, step, status, reason, path, capture, verification, "
               "started_at, finished_at",
}

FINAL_STATUSES = ("done", "invalid", "unranked", "duplicate", "skipped", "pruned", "resume")


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
    attempts: int = 0


@dataclass(frozen=True)
class MemberRow:
    record: Record
    file: str


class Ledger:
    """Thread-safe access (one connection, one lock): the daemon's workers share it.

    Every method takes ``stream`` (default ``model``): a run's weight streams (model, EMA) are ranked, averaged
    and recorded separately and never mix.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError:
            self._db.close()
            raise

    @classmethod
    def open(cls, path: str | Path) -> tuple[Ledger, str | None]:
        """Open the ledger; a corrupt file is moved aside and a fresh ledger started (outputs rebuild it from the
        pinned member copies). Returns the ledger and a warning for the log, if any."""
        path = Path(path)
        try:
            return cls(path), None
        except sqlite3.DatabaseError as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(path) + suffix)
                if src.exists():
                    src.replace(Path(str(aside) + suffix))
            return cls(path), (f"ledger {path} is unreadable ({exc}); moved it to {aside.name} and started a new "
                               "one: members are restored from the pinned copies, other checkpoints are re-read")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version < SCHEMA_VERSION and "checkpoints" in tables:
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(checkpoints)")}
            if "stream" not in cols:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for table in _MIGRATE_FROM_1:
                        if table in tables:
                            self._db.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
                    self._db.execute("DROP INDEX IF EXISTS checkpoints_run")
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    for table, cols_sql in _MIGRATE_FROM_1.items():
                        if table in tables:
                            self._db.execute(f"INSERT INTO {table} ({cols_sql}) SELECT {cols_sql} FROM old_{table}")
                            self._db.execute(f"DROP TABLE old_{table}")
                    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read (for stores of other tables, e.g. ``evaluation_store``)."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- checkpoints ---------------------------------------------------------------------------------------
    _ROW = "id, path, size, mtime_ns, sha256, status, reason, metric, step, attempts"

    def find(self, watch: str, run: str, path: str, size: int, mtime_ns: int, *,
             stream: str = "model") -> CheckpointRow | None:
        row = self._one(f"SELECT {self._ROW} FROM checkpoints "
                        "WHERE watch=? AND run=? AND stream=? AND path=? AND size=? AND mtime_ns=?",
                        (watch, run, stream, path, size, mtime_ns))
        return CheckpointRow(*row) if row else None

    def record(self, watch: str, run: str, path: str, size: int, mtime_ns: int, *, status: str,
               reason: str | None = None, sha256: str | None = None, metric: float | None = None,
               metric_source: str | None = None, step: int | None = None, stream: str = "model",
               db: sqlite3.Connection | None = None, attempt: bool = False) -> int:
        """Insert or update the row for this identity; returns its id. Pass ``db`` to join an open transaction;
        ``attempt`` counts one more failed attempt (a checkpoint failing again and again is given up on)."""
        if db is None:
            with self.transaction() as own:
                return self.record(watch, run, path, size, mtime_ns, status=status, reason=reason, sha256=sha256,
                                   metric=metric, metric_source=metric_source, step=step, stream=stream, db=own,
                                   attempt=attempt)
        now = time.time()
        db.execute(
            "INSERT INTO checkpoints (watch, run, stream, path, size, mtime_ns, sha256, status, reason, metric, "
            "metric_source, step, first_seen, updated_at, attempts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (watch, run, stream, path, size, mtime_ns) DO UPDATE SET sha256=excluded.sha256, "
            "status=excluded.status, reason=excluded.reason, metric=excluded.metric, "
            "metric_source=excluded.metric_source, step=excluded.step, updated_at=excluded.updated_at, "
            "attempts=checkpoints.attempts + excluded.attempts",
            (watch, run, stream, path, size, mtime_ns, sha256, status, reason, metric, metric_source, step, now, now,
             int(attempt)))
        row = db.execute("SELECT id FROM checkpoints WHERE watch=? AND run=? AND stream=? AND path=? AND size=? "
                         "AND mtime_ns=?", (watch, run, stream, path, size, mtime_ns)).fetchone()
        return int(row[0])

    def known_files(self, watch: str, run: str, *, stream: str | None = None) -> list[CheckpointRow]:
        """Every processed identity of this run, all streams unless one is named (rows restored from member
        copies, which have no real file identity, excluded)."""
        sql = f"SELECT {self._ROW} FROM checkpoints WHERE watch=? AND run=? AND size >= 0"
        args: tuple[Any, ...] = (watch, run)
        if stream is not None:
            sql, args = sql + " AND stream=?", (*args, stream)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [CheckpointRow(*r) for r in rows]

    def set_status(self, ckpt_id: int, status: str, reason: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE checkpoints SET status=?, reason=?, updated_at=? WHERE id=?",
                       (status, reason, time.time(), ckpt_id))

    def counts(self, watch: str, run: str, *, stream: str = "model") -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM checkpoints WHERE watch=? AND run=? AND stream=? "
                                    "GROUP BY status", (watch, run, stream)).fetchall()
        return {status: n for status, n in rows}

    def last_checkpoint(self, watch: str, run: str, *, stream: str = "model") -> CheckpointRow | None:
        row = self._one(f"SELECT {self._ROW} FROM checkpoints "
                        "WHERE watch=? AND run=? AND stream=? AND status IN ('done','unranked','duplicate','skipped') "
                        "ORDER BY COALESCE(step, -1) DESC, mtime_ns DESC LIMIT 1", (watch, run, stream))
        return CheckpointRow(*row) if row else None

    # --- members ----------------------------------------------------------------------------------------------
    def members(self, watch: str, run: str, *, stream: str = "model") -> list[MemberRow]:
        with self._lock:
            rows = self._db.execute("SELECT checkpoint_id, source, sha256, metric, step, mtime, file FROM members "
                                    "WHERE watch=? AND run=? AND stream=?", (watch, run, stream)).fetchall()
        return [MemberRow(Record(r[0], r[1], r[2], r[3], r[4], r[5]), r[6]) for r in rows]

    def set_members(self, db: sqlite3.Connection, watch: str, run: str, members: list[MemberRow], *,
                    stream: str = "model") -> None:
        """Replace the member set (call inside ``transaction()``)."""
        db.execute("DELETE FROM members WHERE watch=? AND run=? AND stream=?", (watch, run, stream))
        db.executemany(
            "INSERT INTO members (watch, run, stream, checkpoint_id, file, source, sha256, metric, step, mtime) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(watch, run, stream, m.record.ckpt_id, m.file, m.record.path, m.record.sha256, m.record.metric,
              m.record.step, m.record.mtime) for m in members])

    # --- runs ---------------------------------------------------------------------------------------------------
    def touch_run(self, watch: str, run: str, run_dir: str, output: str, *, stream: str = "model") -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO runs (watch, run, stream, run_dir, output) VALUES (?,?,?,?,?) "
                       "ON CONFLICT (watch, run, stream) DO UPDATE SET run_dir=excluded.run_dir, "
                       "output=excluded.output",
                       (watch, run, stream, run_dir, output))

    def note_event(self, watch: str, run: str, event: str, *, error: str | None = None,
                   stream: str = "model", clear_error: bool = False) -> None:
        """Record the run's last event (and error). ``clear_error``: the error is resolved (e.g. an export that
        failed now succeeded), so status stops showing it; the log keeps the history."""
        now = time.time()
        with self.transaction() as db:
            if error is not None:
                db.execute("UPDATE runs SET last_event=?, last_event_at=?, last_error=?, last_error_at=? "
                           "WHERE watch=? AND run=? AND stream=?", (event, now, error, now, watch, run, stream))
            elif clear_error:
                db.execute("UPDATE runs SET last_event=?, last_event_at=?, last_error=NULL, last_error_at=NULL "
                           "WHERE watch=? AND run=? AND stream=?", (event, now, watch, run, stream))
            else:
                db.execute("UPDATE runs SET last_event=?, last_event_at=? WHERE watch=? AND run=? AND stream=?",
                           (event, now, watch, run, stream))

    # --- exports ------------------------------------------------------------------------------------------------
    def export_started(self, watch: str, run: str, source: str, sha256: str, metric: float | None,
                       step: int | None, *, stream: str = "model") -> int:
        with self.transaction() as db:
            cur = db.execute("INSERT INTO exports (watch, run, stream, source, sha256, metric, step, status, "
                             "started_at) VALUES (?,?,?,?,?,?,?, 'running', ?)",
                             (watch, run, stream, source, sha256, metric, step, time.time()))
            return int(cur.lastrowid or 0)

    def export_finished(self, export_id: int, status: str, *, reason: str | None = None, path: str | None = None,
                        capture: str | None = None, verification: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE exports SET status=?, reason=?, path=?, capture=?, verification=?, finished_at=? "
                       "WHERE id=?", (status, reason, path, capture, verification, time.time(), export_id))

    def latest_export(self, watch: str, run: str, *, stream: str = "model") -> ExportRow | None:
        """The newest finished export result (ok, partial or failed) of this run: what the manifest shows."""
        row = self._one(f"SELECT {_EXPORT_COLUMNS} FROM exports WHERE watch=? AND run=? AND stream=? "
                        "AND status IN ('ok','partial','failed') ORDER BY id DESC LIMIT 1", (watch, run, stream))
        return ExportRow(*row) if row else None

    def last_ok_export(self, watch: str, run: str, *, stream: str = "model") -> ExportRow | None:
        """The newest *published* export (what ``best.mlpackage`` points at)."""
        row = self._one(f"SELECT {_EXPORT_COLUMNS} FROM exports WHERE watch=? AND run=? AND stream=? "
                        "AND status IN ('ok','partial') AND path IS NOT NULL ORDER BY id DESC LIMIT 1",
                        (watch, run, stream))
        return ExportRow(*row) if row else None

    def export_rows(self, watch: str, run: str, *, stream: str = "model") -> list[ExportRow]:
        """Every export attempt of this run, oldest first (history, tests, ``ckptd status``)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_EXPORT_COLUMNS} FROM exports WHERE watch=? AND run=? AND stream=? "
                                    "ORDER BY id", (watch, run, stream)).fetchall()
        return [ExportRow(*r) for r in rows]

    def abandon_running_exports(self, reason: str) -> int:
        """At startup: rows still 'running' belong to a process that died (crash, kill -9); no export of
        this daemon runs yet. Marks them 'abandoned'; returns how many."""
        with self.transaction() as db:
            cur = db.execute("UPDATE exports SET status='abandoned', reason=?, finished_at=? WHERE status='running'",
                             (reason, time.time()))
            return int(cur.rowcount)

    def clear_export_error(self, watch: str, run: str, *, stream: str = "model") -> None:
        """A successful export clears an *export* error from the run's status (any other error stays; the log
        keeps the history)."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET last_error=NULL, last_error_at=NULL WHERE watch=? AND run=? AND stream=? "
                       "AND last_error LIKE ?", (watch, run, stream, EXPORT_ERROR_PREFIX + "%"))


EXPORT_ERROR_PREFIX = "coreml export:"
_EXPORT_COLUMNS = ("id, source, sha256, metric, step, status, reason, path, capture, verification, started_at, "
                   "finished_at")


@dataclass(frozen=True)
class ExportRow:
    """One export attempt. ``path`` is the published version directory (absolute) when status is ok/partial;
    ``verification`` is JSON text."""

    id: int
    source: str | None
    sha256: str | None
    metric: float | None
    step: int | None
    status: str
    reason: str | None
    path: str | None
    capture: str | None
    verification: str | None
    started_at: float
    finished_at: float | None
