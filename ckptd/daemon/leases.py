"""Run leases: several daemons sharing one ledger split the runs, each run processed by one daemon at a time.

A lease is a row of the ledger's ``leases`` table, one per ``(watch, run)``: its ``holder`` (``host:pid.token``,
:func:`default_holder`), when it
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
takeover waits for an in-flight publication and then sees it, but no longer than the session's ``lock_timeout``
(``min(5 s, ttl/6)``): a claim that times out means "not claimable now" (None), so a daemon stalled inside its
publishing transaction never freezes the others; the server ends that stalled session after ``ttl``
(``idle_in_transaction_session_timeout``), which rolls its publication back and frees the row.

The store claims, renews and releases on a connection of its own (:meth:`Ledger.sibling`): a heartbeat never
waits behind a job's long transaction on the jobs' connection (and its lock), so a busy daemon keeps its leases.

On SQLite (one host, one daemon) the same code runs with one holder; a lease left by a daemon of this host that
is gone (kill -9: its pid is not alive, or it is our pid under another token, a predecessor) is taken at once,
not after the ttl: on one host the pid check is authoritative. (Not on PostgreSQL: containers sharing a host name,
with host networking, have separate pid namespaces, where another daemon's pid looks dead or like ours.)
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptd.daemon.ledger_db import is_lock_timeout
from ckptd.errors import LeaseLost

if TYPE_CHECKING:
    from ckptd.daemon.ledger import Ledger
    from ckptd.daemon.ledger_db import Database

Key = tuple[str, str]  # (watch, run)
CHUNK = 400  # keys per statement (well under SQLite's bound-parameter limit)


_TOKEN: tuple[int, str] = (0, "")  # (pid, token) of this process; a forked child makes its own


def default_holder() -> str:
    """This process as a lease holder: ``host:pid.token``, the token random per process. ``host:pid`` alone is
    not unique: containers sharing the host's name (host networking) each run ckptd as pid 1. The same string
    for the whole life of the process (the ledger's ``holder`` columns and the leases must agree)."""
    global _TOKEN
    pid = os.getpid()
    if _TOKEN[0] != pid:
        _TOKEN = (pid, secrets.token_hex(3))
    return f"{socket.gethostname()}:{pid}.{_TOKEN[1]}"


def host_of(holder: str) -> str:
    """The host part of ``host:pid.token`` (and of ``host:pid``, written by ckptd before the token)."""
    return holder.rpartition(":")[0]


def pid_of(holder: str) -> int | None:
    text = holder.rpartition(":")[2].partition(".")[0]
    return int(text) if text.isdigit() else None


def display_holder(holder: str | None) -> str | None:
    """``host:pid`` for people (status): the holder without its token."""
    if holder is None:
        return None
    host, sep, rest = holder.rpartition(":")
    return f"{host}{sep}{rest.partition('.')[0]}" if sep else holder


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
    """Holders on ``me``'s host that are gone: one with ``me``'s pid (``me`` itself, for the startup clean-up: a
    process that is just starting holds nothing yet; or another token, or none: a predecessor that had this pid)
    or a pid that is not alive."""
    host, mine = host_of(me), pid_of(me)
    out = set()
    for h in holders:
        pid = pid_of(h)
        if host_of(h) == host and pid is not None and (pid == mine or not pid_alive(pid)):
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
    """This daemon's side of the ``leases`` table (see the module docstring for how the daemon uses it).

    ``ledger`` is the jobs' ledger (fences run inside its transactions); claims, renewals, releases and reads go
    through :attr:`db`, a connection of the store's own (``own_connection=False``: the ledger's, for tests that
    want one connection). Both get session timeouts fitted to ``ttl``."""

    def __init__(self, ledger: Ledger, holder: str, ttl: float, *, own_connection: bool = True) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self.ledger, self.holder, self.ttl = ledger, holder, float(ttl)
        ledger.set_lease_ttl(self.ttl)
        self.db: Ledger = ledger.sibling() if own_connection else ledger

    def claim(self, watch: str, run: str) -> Lease | None:
        """Take the run's lease when it is free or expired (a takeover bumps the generation), or keep our own
        (renewed); None when another holder's lease is live, or its row stays locked past the lock timeout (a
        daemon stalled mid-publication: not claimable now). One statement (on SQLite, after expiring the lease
        of a dead holder of this host, in the same transaction)."""
        now = self.db.now_sql
        try:
            with self.db.transaction() as db:
                if self.db.dialect == "sqlite":
                    self._expire_dead_local(db, watch, run)
                row = db.execute(
                    f"INSERT INTO leases AS l ({_COLUMNS}) VALUES (?, ?, ?, {now}, {now} + ?, 0) "
                    "ON CONFLICT (watch, run) DO UPDATE SET holder=excluded.holder, expires_at=excluded.expires_at, "
                    "held_since=CASE WHEN l.holder=excluded.holder THEN l.held_since ELSE excluded.held_since END, "
                    "generation=CASE WHEN l.holder=excluded.holder THEN l.generation ELSE l.generation + 1 END "
                    f"WHERE l.holder=excluded.holder OR l.expires_at <= excluded.held_since RETURNING {_COLUMNS}",
                    (watch, run, self.holder, self.ttl)).fetchone()
        except sqlite3.Error as exc:
            if is_lock_timeout(exc):
                return None
            raise
        return _lease(row) if row else None

    def _expire_dead_local(self, db: Database, watch: str, run: str) -> None:
        """SQLite (one host): a live lease whose holder is a daemon of this host that is gone (kill -9, OOM) ends
        now, so a restarted daemon or ``ckptd once`` takes the run at once instead of after the ttl."""
        row = db.execute(f"SELECT holder FROM leases WHERE watch=? AND run=? AND holder != ? AND expires_at > "
                         f"{db.now}", (watch, run, self.holder)).fetchone()
        if row is not None and local_dead_holders([row[0]], self.holder):
            db.execute(f"UPDATE leases SET expires_at = {db.now} WHERE watch=? AND run=? AND holder=?",
                       (watch, run, row[0]))

    def renew(self, keys: Iterable[Key]) -> set[Key]:
        """Extend our leases on ``keys`` by the ttl; returns the keys we still hold (one statement per 400 keys).
        A lease that expired but that nobody took is still ours and is renewed; one another daemon took is not."""
        held: set[Key] = set()
        now = self.db.now_sql
        for chunk in _chunks(keys):
            where, args = _keys_sql(chunk)
            rows = self.db.write(f"UPDATE leases SET expires_at = {now} + ? WHERE holder = ? AND {where} "
                                 "RETURNING watch, run", (self.ttl, self.holder, *args))
            held |= {(r[0], r[1]) for r in rows}
        return held

    def release(self, keys: Iterable[Key]) -> None:
        """Give our leases on ``keys`` up (clean shutdown): they expire now, so another daemon claims them at
        once; the rows stay so that the run's generation keeps growing."""
        now = self.db.now_sql
        for chunk in _chunks(keys):
            where, args = _keys_sql(chunk)
            self.db.write(f"UPDATE leases SET expires_at = {now} WHERE holder = ? AND {where}",
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
        rows = self.db.query(f"SELECT {_COLUMNS} FROM leases WHERE watch=? AND run=?", (watch, run))
        return _lease(rows[0]) if rows else None

    def holders(self) -> dict[Key, tuple[str, float]]:
        """Live leases: ``(watch, run) -> (holder, held_since)`` (database clock)."""
        rows = self.db.query(f"SELECT watch, run, holder, held_since FROM leases WHERE expires_at > {self.db.now_sql}")
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    def mine(self) -> set[Key]:
        """The runs whose live lease we hold."""
        rows = self.db.query(f"SELECT watch, run FROM leases WHERE holder=? AND expires_at > {self.db.now_sql}",
                             (self.holder,))
        return {(r[0], r[1]) for r in rows}


def _lease(row: Sequence[Any]) -> Lease:
    return Lease(row[0], row[1], row[2], float(row[3]), float(row[4]), int(row[5]))
