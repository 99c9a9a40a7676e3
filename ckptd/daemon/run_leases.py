"""The daemon's side of run leases: which runs this daemon may process now, kept alive by a heartbeat.

Several ``ckptd run`` processes sharing one PostgreSQL ledger share the runs: a run is processed only by the
daemon holding its lease (``ckptd.daemon.leases``). A job first makes sure it holds the lease (claiming a free or
expired one); a heartbeat thread renews every held lease each ``ttl/3``; a lease that could not be renewed is
dropped at once, and the run's processors are retired so nothing they still have in flight (an export, an
evaluation decision) is published. Publication itself is fenced in the ledger transaction (``fence``), so even a
daemon that was paused past its lease cannot overwrite the newer state of the daemon that took the run over.

Sharing the work: each daemon also holds a *presence* lease (watch ``~daemons``), so every daemon knows how many
live daemons share the ledger. A daemon claims at most its share of the runs it sees (``ceil(runs / daemons)``),
and gives idle runs beyond its share back, so a daemon that starts later gets work instead of waiting for the
first one to die. A run that stays unclaimed for a whole ``lease_ttl`` while this daemon is at its share (the other
daemons cannot see it: another watch, an unmounted share, a failing listing) is claimed anyway and kept (never
given back), so no run starves.

With the default SQLite ledger there is one daemon and every claim succeeds: the same code path, trivially.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ckptd.daemon.loop import describe

Key = tuple[str, str]  # (watch, run)
PRESENCE = "~daemons"  # the watch name of presence leases (not a valid watch name: no run is ever called that)


class RunLeases:
    """Held leases of this daemon. Thread-safe: jobs claim from worker threads, the heartbeat renews."""

    def __init__(self, store: Any, log: Any, *, on_lost: Callable[[Key], None],
                 surplus: Callable[[int], list[Key]] | None = None,
                 renewable: Callable[[Key], bool] | None = None) -> None:
        self.store = store  # a leases.LeaseStore
        self.log = log
        self.ttl: float = store.ttl
        self._on_lost = on_lost
        self._surplus = surplus  # picks up to n idle held runs to give back (and stops scheduling them)
        self._renewable = renewable  # False: this daemon cannot work on the run (its root gone): let it go
        self.presence: Key = (PRESENCE, str(store.holder))
        self.live = 1  # live daemons sharing the ledger (this one included), refreshed by the heartbeat
        self.total = 0  # runs this daemon sees (set by the daemon after each discovery)
        self.sticky: set[Key] = set()  # runs claimed beyond the share because nobody else took them: kept
        self._unclaimed_since: dict[Key, float] = {}  # runs this daemon left to others while at its share
        self._held: set[Key] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return str(self.store.holder)

    def holds(self, key: Key) -> bool:
        with self._lock:
            return key in self._held

    def held(self) -> set[Key]:
        with self._lock:
            return set(self._held)

    def share(self) -> int:
        """How many runs this daemon should hold: its fair part of the runs it sees."""
        return max(1, math.ceil(self.total / max(self.live, 1)))

    def ensure(self, key: Key) -> bool:
        """Hold the run's lease (claiming it if free or expired, and if this daemon is under its share). True when
        this daemon may process the run; a run newly claimed is logged with whoever held it before."""
        if self.holds(key):
            return True
        starving = False
        if len(self.held()) >= self.share():
            since = self._unclaimed_since.setdefault(key, time.monotonic())
            if time.monotonic() - since < self.ttl:
                return False  # its fair share is full: another daemon takes this run
            starving = True  # nobody took it for a whole ttl: another daemon may not see it at all
        before = self.store.get(*key)
        lease = self.store.claim(*key)
        if lease is None:
            return False
        with self._lock:
            self._held.add(key)
            self._unclaimed_since.pop(key, None)
            if starving:
                self.sticky.add(key)
        previous = before.holder if before is not None and before.holder != self.holder else None
        if previous:
            self._abandon_rows_of(key, previous)
        self.log.info("run.lease_acquired", watch=key[0], run=key[1], holder=self.holder, generation=lease.generation,
                      **({"taken_over_from": previous} if previous else {}))
        return True

    def _abandon_rows_of(self, key: Key, previous: str) -> None:
        """A run taken over: export and evaluation rows its previous holder left 'running' will never finish
        (that daemon is dead or stalled past its lease): mark them abandoned so status and history say so."""
        reason = f"its daemon {previous} lost the run's lease; {self.holder} took the run over"
        try:
            with self.store.ledger.transaction() as db:
                for table in ("exports", "evaluations"):
                    db.execute(f"UPDATE {table} SET status='abandoned', reason=?, finished_at=? "
                               "WHERE watch=? AND run=? AND status='running' AND holder=?",
                               (reason, time.time(), key[0], key[1], previous))
        except Exception as exc:  # status only: the run is processed anyway  # noqa: BLE001
            self.log.warning("run.abandon_failed", watch=key[0], run=key[1], reason=describe(exc))

    def forget(self, key: Key) -> None:
        """A publication found the lease gone (``LeaseLost``): stop treating the run as ours."""
        with self._lock:
            self._held.discard(key)
            self.sticky.discard(key)

    def release(self, keys: Iterable[Key]) -> None:
        """Give leases back (the run is gone, or the daemon stops): another daemon may take them at once."""
        keys = set(keys)
        with self._lock:
            keys &= self._held
            self._held -= keys
            self.sticky -= keys
        if keys:
            try:
                self.store.release(keys)
            except Exception as exc:  # they expire after ttl anyway  # noqa: BLE001
                self.log.warning("run.lease_release_failed", runs=len(keys), reason=describe(exc))

    def renew_once(self) -> None:
        """One heartbeat: renew every held lease and our presence; drop (and report) leases that are no longer
        ours; count the live daemons and give idle runs beyond our share back."""
        held = self.held()
        stuck = {k for k in held if self._renewable is not None and not self._renewable(k)}
        if stuck:
            self.release(stuck)  # another daemon that can see them takes them over
            for key in sorted(stuck):
                self.log.warning("run.lease_given_back", runs=[f"{key[0]}/{key[1]}"], live_daemons=self.live,
                                 reason="this daemon cannot reach the run's watch root for longer than lease_ttl")
                self._on_lost(key)
            held -= stuck
        try:
            still = set(self.store.renew(held | {self.presence}))
            if self.presence not in still:
                self.store.claim(*self.presence)  # expired while we stalled: present again
            self.live = max(1, sum(1 for key in self.store.holders() if key[0] == PRESENCE))
        except Exception as exc:  # the ledger is unreachable: keep them until they would expire  # noqa: BLE001
            self.log.warning("run.lease_renew_failed", runs=len(held), reason=describe(exc),
                             action="retry at the next heartbeat; publication stays fenced by the ledger")
            return
        lost = held - still
        with self._lock:
            self._held -= lost
            self.sticky -= lost
        for key in sorted(lost):
            self.log.warning("run.lease_lost", watch=key[0], run=key[1], holder=self.holder,
                             reason="the lease expired or was taken over by another daemon; nothing more of this run "
                                    "is published here")
            self._on_lost(key)
        extra = len(held - lost) - self.share()
        if extra > 0 and self._surplus is not None:
            give = self._surplus(extra)
            if give:
                self.release(give)
                self.log.info("run.lease_given_back", runs=[f"{w}/{r}" for w, r in sorted(give)],
                              live_daemons=self.live, share=self.share(),
                              reason="more runs than this daemon's share: another daemon takes them")

    def start(self) -> None:
        """The heartbeat thread (a daemon thread: it never keeps the process alive)."""
        if self._thread is not None:
            return
        try:
            self.store.claim(*self.presence)
            self.live = max(1, sum(1 for key in self.store.holders() if key[0] == PRESENCE))
        except Exception as exc:  # the heartbeat tries again  # noqa: BLE001
            self.log.warning("run.lease_renew_failed", runs=0, reason=describe(exc))
        self._thread = threading.Thread(target=self._beat, name="ckptd-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(self.ttl / 3.0, 0.05)
        while not self._stop.wait(interval):
            self.renew_once()

    def stop(self) -> None:
        """Stop the heartbeat and release every held lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._held.add(self.presence)
        self.release(self.held())
