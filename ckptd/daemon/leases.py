"""Run leases: several daemons sharing one ledger split the runs, each run processed by one daemon at a time.

A lease is a row of the ledger's ``leases`` table, one per ``(watch, run)``: its ``holder`` (``host:pid``), when it
took the run (``held_since``), until when it holds it (``expires_at``) and the run's ``generation``, bumped by
every fenced publication. Times are seconds since the epoch **on the database's clock** (the PostgreSQL server's;
``time.time()`` for SQLite, one host): every daemon compares expiry against the same clock, so a host whose clock
runs ahead cannot take over runs early.

How the daemon uses it (one :class:`LeaseStore` per daemon, ``holder = default_holder()``,
``ttl = config.lease_ttl``):

- before processing a run: ``store.claim(watch, run)``; ``None`` means another live daemon holds it (skip the run
  until the next scan); a :class:`Lease` means this daemon holds it now (claimed, taken over after expiry, or
  already its own: renewed);
- a heartbeat thread calls ``store.renew(keys)`` every ``ttl / 3`` with the keys of the runs it works on; the
  answer is the set still held: the others were lost (this daemon stalled past the ttl and another took them)
  and must be dropped without publishing;
- every ledger commit that publishes calls ``store.fence(db, watch, run)`` **inside** that transaction: it bumps
  and returns the run's generation when this daemon still holds a lease with at least ``ttl/3`` left, and raises
  :class:`ckptd.errors.LeaseLost` otherwise, which rolls the transaction back: nothing is published;
- on clean shutdown: ``store.release(keys)`` (the rows stay, expired, so generations only ever grow);
- ``store.holders()`` for ``ckptd status``.

Claims are one ``INSERT … ON CONFLICT DO UPDATE … WHERE`` statement: atomic on both backends (PostgreSQL takes the
row lock, re-checks the condition on the latest row version, and never lets two claimers through), so no
``SELECT … FOR UPDATE`` round trip is needed. A fence takes the same row lock until its transaction commits: a
takeover waits for an in-flight publication and then sees it.

On SQLite (one host, one daemon) the same code runs with one holder: every claim succeeds.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptd.errors import LeaseLost

if TYPE_CHECKING:
    from ckptd.daemon.ledger import Ledger
    from ckptd.daemon.ledger_db import Database

Key = tuple[str, str]  # (watch, run)
CHUNK = 400  # keys per statement (well under SQLite's bound-parameter limit)


def default_holder() -> str:
    """This process as a lease holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def host_of(holder: str) -> str:
    return holder.rpartition(":")[0]


def pid_of(holder: str) -> int | None:
    text = holder.rpartition(":")[2]
    return int(text) if text.isdigit() else None


def takeable(now: float, expires_at: float | None, holder: str | None, me: str) -> bool:
    """May ``me`` claim a lease held by ``holder`` until ``expires_at`` (None: no lease row) at ``now``? A free or
    expired lease, or our own."""
    return expires_at is None or holder == me or expires_at <= now


def still_held(now: float, expires_at: float | None, holder: str | None, me: str) -> bool:
    """Does ``me`` hold the lease at ``now`` (what a fence requires)?"""
    return holder == me and expires_at is not None and expires_at > now


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def local_dead_holders(holders: Iterable[str], me: str) -> set[str]:
    """Holders on ``me``'s host that are gone: ``me`` itself (a process that is just starting holds nothing yet:
    a row with its holder was left by a predecessor with the same pid) or a pid that is not alive."""
    host = host_of(me)
    out = set()
    for h in holders:
        pid = pid_of(h)
        if host_of(h) == host and pid is not None and (h == me or not pid_alive(pid)):
            out.add(h)
    return out


@dataclass(frozen=True)
class Lease:
    watch: str
    run: str
    holder: str
    held_since: float  # database clock
    expires_at: float  # database clock
    generation: int

    @property
    def key(self) -> Key:
        return (self.watch, self.run)


_COLUMNS = "watch, run, holder, held_since, expires_at, generation"


def _keys_sql(keys: Sequence[Key]) -> tuple[str, tuple[Any, ...]]:
    """``(watch, run) IN (VALUES (?,?), …)`` (row values: SQLite >= 3.15 and PostgreSQL)."""
    return (f"(watch, run) IN (VALUES {','.join(['(?,?)'] * len(keys))})",
            tuple(v for k in keys for v in k))


def _chunks(keys: Iterable[Key]) -> list[list[Key]]:
    ordered = sorted(set(keys))
    return [ordered[i:i + CHUNK] for i in range(0, len(ordered), CHUNK)]


class LeaseStore:
    """This daemon's side of the ``leases`` table (see the module docstring for how the daemon uses it)."""

    def __init__(self, ledger: Ledger, holder: str, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self.ledger, self.holder, self.ttl = ledger, holder, float(ttl)

    def claim(self, watch: str, run: str) -> Lease | None:
        """Take the run's lease when it is free or expired (a takeover bumps the generation), or keep our own
        (renewed); None when another holder's lease is live. One statement."""
        now = self.ledger.now_sql
        rows = self.ledger.write(
            f"INSERT INTO leases AS l ({_COLUMNS}) VALUES (?, ?, ?, {now}, {now} + ?, 0) "
            "ON CONFLICT (watch, run) DO UPDATE SET holder=excluded.holder, expires_at=excluded.expires_at, "
            "held_since=CASE WHEN l.holder=excluded.holder THEN l.held_since ELSE excluded.held_since END, "
            "generation=CASE WHEN l.holder=excluded.holder THEN l.generation ELSE l.generation + 1 END "
            f"WHERE l.holder=excluded.holder OR l.expires_at <= excluded.held_since RETURNING {_COLUMNS}",
            (watch, run, self.holder, self.ttl))
        return _lease(rows[0]) if rows else None

    def renew(self, keys: Iterable[Key]) -> set[Key]:
        """Extend our leases on ``keys`` by the ttl; returns the keys we still hold (one statement per 400 keys).
        A lease that expired but that nobody took is still ours and is renewed; one another daemon took is not."""
        held: set[Key] = set()
        now = self.ledger.now_sql
        for chunk in _chunks(keys):
            where, args = _keys_sql(chunk)
            rows = self.ledger.write(f"UPDATE leases SET expires_at = {now} + ? WHERE holder = ? AND {where} "
                                     "RETURNING watch, run", (self.ttl, self.holder, *args))
            held |= {(r[0], r[1]) for r in rows}
        return held

    def release(self, keys: Iterable[Key]) -> None:
        """Give our leases on ``keys`` up (clean shutdown): they expire now, so another daemon claims them at
        once; the rows stay so that the run's generation keeps growing."""
        now = self.ledger.now_sql
        for chunk in _chunks(keys):
            where, args = _keys_sql(chunk)
            self.ledger.write(f"UPDATE leases SET expires_at = {now} WHERE holder = ? AND {where}",
                              (self.holder, *args))

    def fence(self, db: Database, watch: str, run: str) -> int:
        """Inside the publishing transaction (``with ledger.transaction() as db``): bump and return the run's
        generation when we still hold a lease on it with at least ttl/3 left; else raise :class:`LeaseLost` (the
        transaction rolls back). The row stays locked until the transaction ends (PostgreSQL), so a takeover waits
        for it."""
        # a margin of ttl/3 (the heartbeat renews every ttl/3): once this passes, no other daemon can claim the run
        # for at least that long, which covers the swap that follows the commit
        row = db.execute(f"UPDATE leases SET generation = generation + 1 WHERE watch=? AND run=? AND holder=? "
                         f"AND expires_at > {db.now} + ? RETURNING generation",
                         (watch, run, self.holder, self.ttl / 3)).fetchone()
        if row is None:
            current = db.execute("SELECT holder FROM leases WHERE watch=? AND run=?", (watch, run)).fetchone()
            raise LeaseLost(watch, run, self.holder, current[0] if current else None)
        return int(row[0])

    def get(self, watch: str, run: str) -> Lease | None:
        """The run's lease row as it is (live or expired), or None."""
        rows = self.ledger.query(f"SELECT {_COLUMNS} FROM leases WHERE watch=? AND run=?", (watch, run))
        return _lease(rows[0]) if rows else None

    def holders(self) -> dict[Key, tuple[str, float]]:
        """Live leases: ``(watch, run) -> (holder, held_since)`` (database clock)."""
        rows = self.ledger.query(f"SELECT watch, run, holder, held_since FROM leases "
                                 f"WHERE expires_at > {self.ledger.now_sql}")
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    def mine(self) -> set[Key]:
        """The runs whose live lease we hold."""
        rows = self.ledger.query(f"SELECT watch, run FROM leases WHERE holder=? AND expires_at > "
                                 f"{self.ledger.now_sql}", (self.holder,))
        return {(r[0], r[1]) for r in rows}


def _lease(row: Sequence[Any]) -> Lease:
    return Lease(row[0], row[1], row[2], float(row[3]), float(row[4]), int(row[5]))
