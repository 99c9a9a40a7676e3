"""The ledger's evaluation tables: every evaluation run (the cache), and per run the gate's published decision.

``evaluations`` holds one row per evaluation process (running, ok, failed, abandoned), with the process's pid
(its process group: a daemon restarted after a crash kills what its predecessor left running) and start time (the
``evaluate.max_per_hour`` budget counts them). A row with status ``ok`` is the cache: the same set of members,
evaluated by the same evaluator, is never evaluated twice, across restarts too. ``gates`` holds, per run and
stream, what the evaluated average publishes: its members (which may differ from the top-k: a greedy soup holds
fewer, a gated average may be an older one), the manifest's ``evaluation`` object, the winner (for
``export.coreml.source: winner``) and the top-k it was decided for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.daemon.ledger import Ledger, MemberRow
from ckptd.daemon.policy import Record


def set_key(shas: Sequence[str]) -> str:
    """Identity of a set of members (order does not matter: a uniform average of a set is one tensor set)."""
    return hashlib.sha256("\n".join(sorted(shas)).encode()).hexdigest()


def evaluation_key(evaluator: str, shas: Sequence[str]) -> str:
    """Cache key: the evaluator's signature plus the member set."""
    return f"{evaluator}:{set_key(shas)}"


@dataclass(frozen=True)
class EvaluationRow:
    id: int
    kind: str
    key: str
    members: list[str]
    value: float | None
    status: str
    reason: str | None
    started_at: float
    finished_at: float | None


_COLUMNS = "id, kind, key, members, value, status, reason, started_at, finished_at"


def _row(r: tuple[Any, ...]) -> EvaluationRow:
    return EvaluationRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7], r[8])


def cached(ledger: Ledger, watch: str, run: str, stream: str, key: str) -> EvaluationRow | None:
    """The newest successful evaluation of ``key`` in this run and stream, or None."""
    rows = ledger.query(f"SELECT {_COLUMNS} FROM evaluations WHERE watch=? AND run=? AND stream=? AND key=? "
                        "AND status='ok' ORDER BY id DESC LIMIT 1", (watch, run, stream, key))
    return _row(rows[0]) if rows else None


def history(ledger: Ledger, watch: str, run: str, stream: str) -> list[EvaluationRow]:
    rows = ledger.query(f"SELECT {_COLUMNS} FROM evaluations WHERE watch=? AND run=? AND stream=? ORDER BY id",
                        (watch, run, stream))
    return [_row(r) for r in rows]


def started(ledger: Ledger, watch: str, run: str, stream: str, kind: str, key: str, members: Sequence[str]) -> int:
    """A 'running' row held by this process (``ledger.holder``); returns its id."""
    with ledger.transaction() as db:
        row = db.execute("INSERT INTO evaluations (watch, run, stream, kind, key, members, status, started_at, "
                         "holder) VALUES (?,?,?,?,?,?, 'running', ?, ?) RETURNING id",
                         (watch, run, stream, kind, key, json.dumps(list(members)), time.time(),
                          ledger.holder)).fetchone()
        return int(row[0])


def set_pid(ledger: Ledger, row_id: int, pid: int) -> None:
    """The evaluator's pid (= its process group id, it runs in its own session), as soon as it runs."""
    with ledger.transaction() as db:
        db.execute("UPDATE evaluations SET pid=? WHERE id=?", (pid, row_id))


def started_since(ledger: Ledger, watch: str, since: float, limit: int) -> list[float]:
    """Start times (newest first, at most ``limit``) of the evaluations of ``watch`` started after ``since``,
    whatever became of them: what ``evaluate.max_per_hour`` counts across processes."""
    rows = ledger.query("SELECT started_at FROM evaluations WHERE watch=? AND started_at>? "
                        "ORDER BY started_at DESC LIMIT ?", (watch, since, limit))
    return [r[0] for r in rows]


def finished(ledger: Ledger, row_id: int, status: str, *, value: float | None = None,
             reason: str | None = None) -> None:
    with ledger.transaction() as db:
        db.execute("UPDATE evaluations SET status=?, value=?, reason=?, finished_at=? WHERE id=?",
                   (status, value, reason, time.time(), row_id))


EVALUATION_ID = "CKPTD_EVALUATION_ID"  # in each evaluator's environment: the id of its row


def _stat_pgrp(pid: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[2])  # after "pid (comm)": state, ppid, pgrp
    except (OSError, IndexError, ValueError):
        return None


def _carries(pid: int | str, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def evaluator_group_alive(pgid: int, row_id: int) -> bool:
    """Is process group ``pgid`` still the evaluator of row ``row_id``? Only a process of that group carrying
    ``CKPTD_EVALUATION_ID=<row_id>`` in its environment says so, so a pid reused since is never mistaken for it:
    the group's leader (the evaluator), or once it is gone (or a zombie), a process it left in its group (a forked
    helper). Linux only (/proc); elsewhere always False."""
    marker = f"{EVALUATION_ID}={row_id}".encode()
    if _stat_pgrp(str(pgid)) == pgid and _carries(pgid, marker):
        return True
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    return any(_stat_pgrp(p) == pgid and _carries(p, marker) for p in pids)


def abandon_running(ledger: Ledger, reason: str) -> tuple[int, list[int]]:
    """At startup: rows left 'running' by a process that died; returns how many were marked abandoned and the
    process groups of the orphaned evaluators that were killed. An evaluator such a process left running (it runs
    in its own session, so it outlives a ``kill -9`` of the daemon) is killed with its process group first, so the
    redone evaluation never runs beside it. A grandchild that called ``setsid`` itself is out of reach (under
    systemd, ``KillMode=mixed`` and the cgroup end it).

    Only rows surely orphaned are touched (:meth:`Ledger.orphan_filter`: on a PostgreSQL ledger other daemons'
    evaluations run beside ours), and only evaluators of this host are killed (a pid names a process of the host
    that started it)."""
    from ckptd.daemon.leases import host_of

    where, args = ledger.orphan_filter("evaluations")
    rows = [(r[0], r[1], r[2]) for r in ledger.query(
        f"SELECT id, pid, holder FROM evaluations WHERE status='running' AND ({where})", args)]
    here = host_of(ledger.holder)
    killed: set[int] = set()
    for row_id, pid, holder in rows:
        if holder is not None and host_of(holder) != here:
            continue
        if pid and pid > 1 and pid != os.getpgrp() and evaluator_group_alive(pid, row_id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
                killed.add(row_id)
    now = time.time()
    with ledger.transaction() as db:
        for row_id, pid, _ in rows:
            why = reason + (f"; its evaluator (process group {pid}) was still running and was killed"
                            if row_id in killed else "")
            db.execute("UPDATE evaluations SET status='abandoned', reason=?, finished_at=? "
                       "WHERE id=? AND status='running'", (why, now, row_id))
    return len(rows), sorted(pid for row_id, pid, _ in rows if row_id in killed)


@dataclass(frozen=True)
class GateState:
    """What the evaluated average publishes for one run and stream."""

    topk_key: str | None  # the top-k set this decision was made for (None: never decided)
    members: tuple[MemberRow, ...]  # the published average's members, best first (empty: no average)
    evaluation: dict[str, Any] | None  # the manifest's average.evaluation object
    winner: str | None  # "best" or "average": which evaluated better (for export source winner)


NO_GATE = GateState(None, (), None, None)


def _member_json(m: MemberRow) -> dict[str, Any]:
    r = m.record
    return {"checkpoint_id": r.ckpt_id, "source": r.path, "sha256": r.sha256, "metric": r.metric, "step": r.step,
            "mtime": r.mtime, "file": m.file}


def _member_from(d: dict[str, Any]) -> MemberRow:
    return MemberRow(Record(d["checkpoint_id"], d["source"], d["sha256"], d["metric"], d["step"], d["mtime"]),
                     d["file"])


def load_gate(ledger: Ledger, watch: str, run: str, stream: str) -> GateState:
    rows = ledger.query("SELECT topk_key, members, evaluation, winner FROM gates WHERE watch=? AND run=? AND "
                        "stream=?", (watch, run, stream))
    if not rows:
        return NO_GATE
    topk_key, members, evaluation, winner = rows[0]
    return GateState(topk_key, tuple(_member_from(d) for d in json.loads(members)),
                     json.loads(evaluation) if evaluation else None, winner)


def save_gate(ledger: Ledger, watch: str, run: str, stream: str, state: GateState) -> None:
    with ledger.transaction() as db:
        db.execute("INSERT INTO gates (watch, run, stream, topk_key, members, evaluation, winner, updated_at) "
                   "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (watch, run, stream) DO UPDATE SET "
                   "topk_key=excluded.topk_key, members=excluded.members, evaluation=excluded.evaluation, "
                   "winner=excluded.winner, updated_at=excluded.updated_at",
                   (watch, run, stream, state.topk_key, json.dumps([_member_json(m) for m in state.members]),
                    json.dumps(state.evaluation) if state.evaluation is not None else None, state.winner,
                    time.time()))
