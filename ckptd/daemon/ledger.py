"""The ledger: every checkpoint seen, members, exports, evaluations and run leases, in a database.

Default: a SQLite database (WAL) in ``state_dir``, for one daemon. Several daemons (on several hosts) share one
PostgreSQL ledger (the config's ``ledger: postgresql://…``) and split the runs between them under leases
(:mod:`ckptd.daemon.leases`). Both run the same SQL through :mod:`ckptd.daemon.ledger_db`.

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

from ckptd.daemon.ledger_db import (
    BASE_SCHEMA,
    LEDGER_NAME,
    SCHEMA_VERSION,
    Database,
    LedgerConnectError,
    Target,
    connect,
    describe,
    is_pg,
    migrate,
)
from ckptd.daemon.policy import Record

__all__ = ["BASE_SCHEMA", "LEDGER_NAME", "SCHEMA_VERSION", "Ledger", "LedgerConnectError", "ledger_target"]


def ledger_target(config: Any) -> Target:
    """Where the config's ledger is: its ``ledger`` (a URL or a path), else ``state_dir/ledger.sqlite3``."""
    value = getattr(config, "ledger", "") or ""
    if is_pg(value):
        return value
    return Path(value) if value else Path(config.state_dir) / LEDGER_NAME


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

    def __init__(self, target: Target, *, holder: str | None = None, lease_ttl: float | None = None) -> None:
        """``target``: a SQLite file path or a ``postgresql://`` URL. ``holder``: who this process is in the
        ``holder`` columns (default :func:`ckptd.daemon.leases.default_holder`). ``lease_ttl``: the daemons' lease
        ttl, which the PostgreSQL session timeouts are fitted to (:meth:`set_lease_ttl`)."""
        from ckptd.daemon.leases import default_holder

        self.target: Target = target if is_pg(target) else Path(target)
        self.path = self.target if isinstance(self.target, Path) else None  # the SQLite file, if any
        self.holder = holder or default_holder()
        self.lease_ttl = lease_ttl
        self._lock = threading.RLock()
        self._siblings: list[Ledger] = []  # closed with this one
        self._db: Database = connect(self.target, lease_ttl=lease_ttl)
        try:
            migrate(self._db)
        except sqlite3.Error:
            self._db.close()
            raise

    def sibling(self) -> Ledger:
        """Another connection to the same ledger, with the same holder and timeouts, and its own lock: what the
        lease heartbeat uses, so that it never waits behind a job's transaction. Closed with this ledger."""
        other = Ledger(self.target, holder=self.holder, lease_ttl=self.lease_ttl)
        with self._lock:
            self._siblings.append(other)
        return other

    def set_lease_ttl(self, ttl: float) -> None:
        """Fit the (PostgreSQL) session timeouts to the lease ttl: a lock wait ends after ``min(5 s, ttl/6)``, a
        session idle inside a transaction for ``ttl`` is ended by the server (a stalled daemon's row locks go)."""
        with self._lock:
            self.lease_ttl = ttl
            self._db.set_lease_ttl(ttl)

    @property
    def dialect(self) -> str:
        return self._db.dialect

    @property
    def now_sql(self) -> str:
        """SQL for the clock lease expiry is compared against (the server's on PostgreSQL)."""
        return self._db.now

    def describe(self) -> str:
        """The ledger for messages: the path, or the URL without password."""
        return describe(self.target)

    @classmethod
    def open(cls, target: Target) -> tuple[Ledger, str | None]:
        """Open the ledger; a corrupt SQLite file is moved aside and a fresh ledger started (outputs rebuild it from
        the pinned member copies). Returns the ledger and a warning for the log, if any. A PostgreSQL ledger that
        cannot be reached raises :class:`LedgerConnectError` (the URL in it without password); one that fails
        otherwise raises :class:`sqlite3.Error` (:class:`ckptd.daemon.ledger_db.PgError`), never moved aside."""
        if is_pg(target):
            return cls(target), None
        path = Path(target)
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

    def schema_version(self) -> int:
        with self._lock:
            return self._db.schema_version()

    def close(self) -> None:
        with self._lock:
            siblings, self._siblings = self._siblings, []
            self._db.close()
        for other in siblings:
            other.close()

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """One transaction (BEGIN IMMEDIATE on SQLite, BEGIN on PostgreSQL), committed when the block ends,
        rolled back when it raises. The yielded object's ``execute(sql, args)`` takes ``?`` placeholders."""
        with self._lock, self._db.transaction() as db:
            yield db

    def _one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read (for stores of other tables, e.g. ``evaluation_store``); rows are tuples that also
        answer ``row["column"]``."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def write(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction; returns its rows (``RETURNING``) if it has any."""
        with self.transaction() as db:
            cur = db.execute(sql, args)
            return cur.fetchall() if cur.description else []

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
               db: Database | None = None, attempt: bool = False) -> int:
        """Insert or update the row for this identity; returns its id. Pass ``db`` to join an open transaction;
        ``attempt`` counts one more failed attempt (a checkpoint failing again and again is given up on)."""
        if db is None:
            with self.transaction() as own:
                return self.record(watch, run, path, size, mtime_ns, status=status, reason=reason, sha256=sha256,
                                   metric=metric, metric_source=metric_source, step=step, stream=stream, db=own,
                                   attempt=attempt)
        now = time.time()
        row = db.execute(
            "INSERT INTO checkpoints (watch, run, stream, path, size, mtime_ns, sha256, status, reason, metric, "
            "metric_source, step, first_seen, updated_at, attempts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (watch, run, stream, path, size, mtime_ns) DO UPDATE SET sha256=excluded.sha256, "
            "status=excluded.status, reason=excluded.reason, metric=excluded.metric, "
            "metric_source=excluded.metric_source, step=excluded.step, updated_at=excluded.updated_at, "
            "attempts=checkpoints.attempts + excluded.attempts RETURNING id",
            (watch, run, stream, path, size, mtime_ns, sha256, status, reason, metric, metric_source, step, now, now,
             int(attempt))).fetchone()
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

    def set_members(self, db: Database, watch: str, run: str, members: list[MemberRow], *,
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
        """A 'running' export row held by this process (``holder``); returns its id."""
        with self.transaction() as db:
            row = db.execute("INSERT INTO exports (watch, run, stream, source, sha256, metric, step, status, "
                             "started_at, holder) VALUES (?,?,?,?,?,?,?, 'running', ?, ?) RETURNING id",
                             (watch, run, stream, source, sha256, metric, step, time.time(), self.holder)).fetchone()
            return int(row[0])

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
        """At startup: rows still 'running' belong to a process that died (crash, kill -9); no export of this
        daemon runs yet. Marks them 'abandoned'; returns how many. Only rows that are surely orphaned
        (:meth:`orphan_filter`): on a PostgreSQL ledger other daemons' exports are running beside ours."""
        where, args = self.orphan_filter("exports")
        with self.transaction() as db:
            cur = db.execute(f"UPDATE exports SET status='abandoned', reason=?, finished_at=? "
                             f"WHERE status='running' AND ({where})", (reason, time.time(), *args))
            return int(cur.rowcount)

    def orphan_filter(self, table: str) -> tuple[str, tuple[Any, ...]]:
        """SQL condition (and its arguments) on ``table``'s ``holder`` (and ``watch``/``run``) selecting the
        'running' rows of a process that is gone, for the startup clean-up of ``exports`` and ``evaluations``.

        - SQLite (one host, one daemon per ledger): rows of this host (any pid: a daemon just starting runs nothing
          yet, and the one that wrote them, even with this pid reused, is gone) and rows with no holder (written
          before schema 4).
        - PostgreSQL (daemons on several hosts): rows of this host whose pid is this process (a restart reusing
          the pid) or is not alive; and rows of any host whose holder's lease on that run has expired (on the
          server's clock), i.e. a daemon that died or lost the run. Rows of live daemons, of other hosts with a
          live lease, of holders holding no lease on the run (a queue worker) and with no holder are left alone.
        """
        from ckptd.daemon.leases import host_of, local_dead_holders

        host = host_of(self.holder)
        like = "".join("!" + c if c in "!%_" else c for c in host) + ":%"
        if self.dialect == "sqlite":
            return "holder IS NULL OR holder LIKE ? ESCAPE '!'", (like,)
        rows = self.query(f"SELECT DISTINCT holder FROM {table} WHERE status='running' AND holder LIKE ? "
                          "ESCAPE '!'", (like,))
        dead = sorted(local_dead_holders([r[0] for r in rows], self.holder))
        expired = (f"EXISTS (SELECT 1 FROM leases l WHERE l.watch={table}.watch AND l.run={table}.run "
                   f"AND l.holder={table}.holder AND l.expires_at <= {self.now_sql})")
        if not dead:
            return expired, ()
        return f"holder IN ({','.join('?' * len(dead))}) OR {expired}", tuple(dead)

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
