"""The history read model: one run's timeline from the ledger (``ckptd history``, the HTML status page).

Every checkpoint the daemon saw, in the order it first saw them, with the decision taken (its status) and why;
every export attempt and its result; every evaluation when the ledger has that table. Like ``ckptd status`` it
only reads (SQLite ``mode=ro``, PostgreSQL read-only transactions) and imports nothing heavy.
"""

from __future__ import annotations

import difflib
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ckptd.daemon.ledger_db import Database
from ckptd.daemon.policy import Record, ranked
from ckptd.daemon.status import (
    evaluation_dict,
    fmt_num,
    has_table,
    ledger_path,
    open_ledger_ro,
    render_table,
    run_mode,
    stream_columns,
    terminal_safe,
)
from ckptd.errors import CkptdError


class UnknownRunError(CkptdError):
    """No such run (or stream of it) in the ledger; ``ckptd history`` exits 1."""


class AmbiguousRunError(CkptdError):
    """A bare run name that several watches have; ``ckptd history`` exits 2 (name the watch)."""


def _known(db: Database | None) -> list[tuple[str, str]]:
    if db is None:
        return []
    return [(r[0], r[1]) for r in db.execute("SELECT watch, run FROM runs UNION SELECT watch, run FROM checkpoints "
                                             "ORDER BY 1, 2")]


def resolve_run(known: list[tuple[str, str]], watch: str | None, run: str, where: Path | str) -> tuple[str, str]:
    """``run`` is ``watch/run`` or a bare run name (run names never contain ``/``: ckptd flattens them)."""
    prefix, _, name = run.rpartition("/")
    if prefix and watch is not None and prefix != watch:
        raise UnknownRunError(f"run {run!r} is not in watch {watch!r} (drop --watch or the 'watch/' prefix)")
    watch = watch or prefix or None
    matches = [k for k in known if k[1] == name and (watch is None or k[0] == watch)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AmbiguousRunError(f"run {name!r} is in several watches ({', '.join(w for w, _ in matches)}); "
                                f"name one: {', '.join(f'{w}/{r}' for w, r in matches)}")
    wanted = f"{watch}/{name}" if watch else name
    names = [f"{w}/{r}" for w, r in known]
    close = difflib.get_close_matches(wanted, names if watch else [r for _, r in known], n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else (
        f"; it has {len(known)} run(s) (`ckptd status` lists them)" if known else "; it has no runs yet")
    raise UnknownRunError(f"no run {wanted!r} in the ledger {where}{hint}")


def collect_history(config: Any, watch: str | None, run: str, stream: str = "model") -> dict[str, Any]:
    """returns {"watch": str, "run": str, "stream": str, "mode": "max"|"min",
      "checkpoints": [ {"id": int, "path": str, "name": str (basename), "step": int|None, "metric": float|None,
                        "status": str, "reason": str|None, "first_seen": float, "updated_at": float,
                        "member": bool (in the current top-k), "best": bool (the current best),
                        "evicted": bool (status 'done' but no longer a member)} ...]  ordered by first_seen,
      "exports": [ {"id","status","reason","source","metric","step","started_at","finished_at","path"} ...]
                 ordered by id,
      "evaluations": [ {"id","kind","key","members": list[str],"value","status","reason","started_at",
                        "finished_at"} ...] ([] when the table is absent)}

    ``run`` may be ``watch/run`` (then ``watch`` may be None). Raises :class:`LedgerReadError` (from
    ``ckptd.daemon.status``) for an unreadable ledger, :class:`UnknownRunError` for an unknown run or stream and
    :class:`AmbiguousRunError` for a bare run name that several watches have.
    """
    with open_ledger_ro(config) as db:
        watch, run = resolve_run(_known(db), watch, run, ledger_path(config))
        assert db is not None  # a known run implies a ledger
        return _read(db, config, watch, run, stream)


def _read(db: Database, config: Any, watch: str, run: str, stream: str) -> dict[str, Any]:
    sel, _ = stream_columns(db)
    where = f"SELECT * FROM (SELECT {sel}, {{cols}} FROM {{table}}) AS t WHERE watch=? AND run=? AND stream=?"
    args = (watch, run, stream)
    checkpoints = db.execute(where.format(cols="id, path, step, metric, status, reason, first_seen, updated_at",
                                          table="checkpoints") + " ORDER BY first_seen, id", args).fetchall()
    has_run = db.execute(where.format(cols="1", table="runs"), args).fetchone()
    if not checkpoints and not has_run:
        streams = sorted({r[0] for r in db.execute(
            "SELECT stream FROM (SELECT " + sel + " FROM runs UNION SELECT " + sel + " FROM checkpoints) AS t "
            "WHERE watch=? AND run=?", (watch, run))})
        raise UnknownRunError(f"run {watch}/{run} has no stream {stream!r} (it has: {', '.join(streams)})")
    mode = run_mode(config, watch)
    members = db.execute(where.format(cols="checkpoint_id, source, sha256, metric, step, mtime", table="members"),
                         args).fetchall()
    order = ranked([Record(*tuple(m)[3:9]) for m in members], mode)
    member_ids = {m.ckpt_id for m in order}
    best_id = order[0].ckpt_id if order else None
    exports = db.execute(where.format(cols="id, status, reason, source, metric, step, started_at, finished_at, path",
                                      table="exports") + " ORDER BY id", args).fetchall()
    evaluations = (db.execute("SELECT * FROM evaluations WHERE watch=? AND run=? AND stream=? ORDER BY id",
                              args).fetchall() if has_table(db, "evaluations") else [])
    return {
        "watch": watch, "run": run, "stream": stream, "mode": mode,
        "checkpoints": [{"id": c["id"], "path": c["path"], "name": Path(c["path"]).name, "step": c["step"],
                         "metric": c["metric"], "status": c["status"], "reason": c["reason"],
                         "first_seen": c["first_seen"], "updated_at": c["updated_at"],
                         "member": c["id"] in member_ids, "best": c["id"] == best_id,
                         "evicted": c["status"] == "done" and c["id"] not in member_ids} for c in checkpoints],
        "exports": [{k: e[k] for k in ("id", "status", "reason", "source", "metric", "step", "started_at",
                                       "finished_at", "path")} for e in exports],
        "evaluations": [{k: d.get(k) for k in ("id", "kind", "key", "members", "value", "status", "reason",
                                               "started_at", "finished_at")}
                        for d in map(evaluation_dict, evaluations)],
    }


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def timeline(history: dict[str, Any]) -> list[dict[str, Any]]:
    """Checkpoints, exports and evaluations merged by time (stable: each kind keeps its own order)."""
    items = [{"at": c["first_seen"], "event": "checkpoint", "step": c["step"], "metric": c["metric"],
              "result": c["status"], "subject": c["name"],
              "note": ", ".join(n for n, on in (("best", c["best"]), ("top-k", c["member"] and not c["best"]),
                                               ("evicted", c["evicted"])) if on),
              "reason": c["reason"]} for c in history["checkpoints"]]
    items += [{"at": e["started_at"], "event": "export", "step": e["step"], "metric": e["metric"],
               "result": e["status"], "subject": Path(e["source"]).name if e["source"] else "-",
               "note": f"{e['finished_at'] - e['started_at']:.1f}s" if e["finished_at"] else "",
               "reason": e["reason"]} for e in history["exports"]]
    items += [{"at": v["started_at"], "event": "evaluation", "step": None, "metric": v["value"],
               "result": v["status"], "subject": v["key"] or v["kind"] or "-",
               "note": f"{v['kind'] or ''} over {len(v['members'])}".strip(), "reason": v["reason"]}
              for v in history["evaluations"]]
    return sorted(items, key=lambda i: i["at"] or 0.0)


HISTORY_HEADERS = ("TIME", "EVENT", "STEP", "METRIC", "RESULT", "NOTE", "SUBJECT", "REASON")


def print_history(history: dict[str, Any], stream: TextIO | None = None) -> None:
    """The text timeline (``ckptd history``); every field made terminal-safe (the title here, the cells by
    :func:`render_table`)."""
    out = stream or sys.stdout
    cps = history["checkpoints"]
    title = f"{history['watch']}/{history['run']}  stream {history['stream']}  ({history['mode']})"
    print(terminal_safe(f"{title}: {len(cps)} checkpoint(s), {sum(c['member'] for c in cps)} in the top-k, "
                        f"{len(history['exports'])} export(s)"
                        + (f", {len(history['evaluations'])} evaluation(s)" if history["evaluations"] else "")),
          file=out)
    cells = [[_when(i["at"]), i["event"], fmt_num(i["step"]), fmt_num(i["metric"]), i["result"] or "-", i["note"],
              i["subject"], i["reason"] or ""] for i in timeline(history)]
    for text in render_table(HISTORY_HEADERS, cells, right=("STEP", "METRIC"),
                             widest={"SUBJECT": 48, "REASON": 160}):
        print(text, file=out)

