"""The status read model: per run, the best, the top-k members, counts, the last event and errors, from the ledger.

It lives in the daemon package so that ``ckptd status`` and ``ckptd demo`` share it without the demo importing
the CLI. It only reads (a ``mode=ro`` connection, safe while the daemon writes) and imports nothing heavy (no
torch, no daemon service): status must answer fast on a busy host. The whole ledger is read with one query per
table (grouped in SQL), not a few queries per run: 200 runs cost the same handful of queries as one.

A missing ledger means "nothing recorded yet"; a ledger that exists but cannot be read (corrupt, locked, not a
database, unreadable, behind a directory the user may not enter, a symlink to a missing file) is an error naming
the file and the reason (exit 1), never silently "no runs".

Everything the text views print passes through :func:`terminal_safe`: file names, run names and reasons come from
the trainer's side (a hostile trainer picks its file names, and refusal reasons echo pickle global names), and
must not reach the operator's terminal as escape sequences.

A run **has an error** (the ``!`` column, ``--errors``, ``has_error`` in JSON) when

- its ``last_error`` is an export error: the daemon clears those only when an export succeeds, so one that is
  set means ``best.mlpackage`` is stale or missing, whatever happened since; or
- its ``last_error`` is newer than its newest checkpoint that was read fine (``done``, ``skipped``,
  ``duplicate``, ``unranked``, ``resume``); or
- its newest rejected (``invalid``) checkpoint is newer than that newest good one: the trainer's latest output
  is broken.

An error followed by good checkpoints (a rejected file, then good ones) is history: ``-v`` and ``ckptd history``
show it, the table does not flag it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from ckptd.daemon.leases import display_holder
from ckptd.daemon.ledger import EXPORT_ERROR_PREFIX, ledger_target
from ckptd.daemon.ledger_db import Database, LedgerConnectError, Row, SqliteDatabase, connect, describe, is_pg
from ckptd.daemon.policy import Record, ranked
from ckptd.errors import CkptdError

READ_TIMEOUT = 5.0  # seconds to wait for a lock: WAL readers are not blocked by the daemon's writes
NO_RUNS = "no runs recorded yet (is the daemon running, and does the state_dir match?)"
REQUIRED_TABLES = frozenset({"runs", "checkpoints", "members", "exports"})
OK_STATUSES = ("done", "skipped", "duplicate", "unranked", "resume")  # read fine (pruned: a later deletion)
ELLIPSIS = "…"


class LedgerReadError(CkptdError):
    """The ledger exists but cannot be read; ``ckptd status`` exits 1 with this message."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = path  # a SQLite file, or a PostgreSQL URL without password
        self.reason = reason
        super().__init__(f"cannot read the ledger {path}: {reason}")


# C0 controls (newline and tab included), DEL, C1 controls, the Unicode bidi controls (ALM, LRM, RLM, LRE, RLE, PDF,
# LRO, RLO, LRI, RLI, FSI, PDI), the Unicode line and paragraph separators, and lone surrogates (undecodable bytes
# of a file name: they could not even be written to a UTF-8 terminal)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    return _NAMED.get(ch) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


def terminal_safe(text: object) -> str:
    """``text`` with everything a terminal would act on shown as a visible escape instead: control characters
    (``\\x1b``, ``\\x07``, ``\\x9b``; newline, carriage return and tab as ``\\n``, ``\\r``, ``\\t``), DEL and the
    Unicode bidi controls (``\\u202e``). Every other character, non-ASCII letters included, is kept. For the text
    views only: ``--json`` output is escaped by ``json.dumps``."""
    return _UNSAFE.sub(_escape, str(text))


def ledger_path(config: Any) -> Path | str:
    """The config's ledger for messages: the SQLite file, or the PostgreSQL URL without its password."""
    target = ledger_target(config)
    return describe(target) if is_pg(target) else Path(target)


def _hint(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text:
        return "the file is corrupt or not a ckptd ledger; stop the daemon and delete it to have it rebuilt by a scan"
    if "locked" in text or "busy" in text:
        return f"another process held a lock for more than {READ_TIMEOUT:g}s"
    if "unable to open" in text:
        return "it cannot be opened: check its permissions and those of its directory"
    return ""


def _columns(db: Database, table: str) -> set[str]:
    return db.columns(table)


def has_table(db: Database, name: str) -> bool:
    return db.has_table(name)


@contextmanager
def open_ledger_ro(config: Any) -> Iterator[Database | None]:
    """A read-only connection to the config's ledger (SQLite ``mode=ro``; PostgreSQL with read-only
    transactions; rows are tuples that also answer ``row["column"]``), or ``None`` when nothing is recorded yet (no
    file, or no schema written yet).

    Raises :class:`LedgerReadError` when the ledger exists but cannot be read, also for database errors raised by
    the queries run inside the ``with`` block.
    """
    target = ledger_target(config)
    if is_pg(target):
        with _open_pg_ro(str(target)) as pg:
            yield pg
        return
    path = Path(target)
    try:  # exists() raises, rather than answer False, when a directory on the way may not be entered
        present = path.exists()
        dangling = not present and path.is_symlink()
        regular = present and path.is_file()
    except OSError as exc:
        raise LedgerReadError(path, f"{exc.strerror or exc} (check its permissions and those of its "
                                    "directory)") from exc
    if dangling:
        try:
            target = f" ({os.readlink(path)})"
        except OSError:
            target = ""
        raise LedgerReadError(path, f"is a symlink to a missing file{target}")
    if not present:
        yield None
        return
    if not regular:
        raise LedgerReadError(path, "not a regular file")
    db: Database | None = None
    try:
        db = SqliteDatabase.open_readonly(path, timeout=READ_TIMEOUT)
        tables = db.tables()
        missing = REQUIRED_TABLES - tables
        if tables and missing:
            raise LedgerReadError(path, f"not a ckptd ledger (no table {', '.join(sorted(missing))})")
        yield db if tables else None  # no tables: created, schema not written yet
    except sqlite3.Error as exc:
        hint = _hint(exc)
        raise LedgerReadError(path, f"{exc}" + (f" ({hint})" if hint else "")) from exc
    except OSError as exc:
        raise LedgerReadError(path, f"{exc.strerror or exc}") from exc
    finally:
        if db is not None:
            db.close()


@contextmanager
def _open_pg_ro(url: str) -> Iterator[Database | None]:
    """The PostgreSQL side of :func:`open_ledger_ro`: no ckptd tables yet is "nothing recorded yet"."""
    where = describe(url)
    db: Database | None = None
    try:
        db = connect(url, read_only=True)
        tables = db.tables()
        missing = REQUIRED_TABLES - tables
        if tables and missing and not REQUIRED_TABLES.isdisjoint(tables):
            raise LedgerReadError(where, f"not a complete ckptd ledger (no table {', '.join(sorted(missing))})")
        yield None if missing else db
    except LedgerConnectError as exc:
        raise LedgerReadError(where, str(exc).split(": ", 1)[-1]) from None
    except sqlite3.Error as exc:  # PgError: a query failed
        raise LedgerReadError(where, f"{exc}") from exc
    finally:
        if db is not None:
            db.close()


def stream_columns(db: Database) -> tuple[str, str]:
    """``(select, group)`` SQL for a row's identity: an older ledger has no stream column (one implicit stream,
    ``model``), and then the select yields the constant."""
    if "stream" in _columns(db, "runs"):
        return "watch, run, stream", "watch, run, stream"
    return "watch, run, 'model' AS stream", "watch, run"


def run_mode(config: Any, watch_name: str) -> str:
    """The metric mode of a watch's policy (``max`` for a watch no longer in the config)."""
    watch = next((w for w in config.watches if w.name == watch_name), None)
    return config.policy_for(watch).metric.mode if watch else "max"


def _top_k(config: Any, watch_name: str) -> int | None:
    watch = next((w for w in config.watches if w.name == watch_name), None)
    return config.policy_for(watch).average.top_k if watch else None


def evaluation_dict(row: Row) -> dict[str, Any]:
    """An ``evaluations`` row as a dict; ``members`` (JSON text in the ledger) decoded to a list of paths."""
    out = dict(row)
    try:
        members = json.loads(out.get("members") or "[]")
    except ValueError:
        members = []
    out["members"] = [str(m) for m in members] if isinstance(members, list) else []
    return out


def collect_status(config: Any) -> list[dict[str, Any]]:
    """Per-run status rows, ordered by watch, run, stream (the ``--json`` contract: fields are added, never
    renamed; ``last_activity_at`` orders them by recency).

    Raises :class:`LedgerReadError` when the ledger exists but cannot be read.
    """
    with open_ledger_ro(config) as db:
        return [] if db is None else _read(db, config)


def _grouped(db: Database, sql: str) -> dict[tuple[str, str, str], list[Any]]:
    out: dict[tuple[str, str, str], list[Any]] = {}
    for row in db.execute(sql):
        out.setdefault((row["watch"], row["run"], row["stream"]), []).append(row)
    return out


def _latest(*stamps: float | None) -> float | None:
    return max((s for s in stamps if s), default=None)


def _newest(sel: str, grp: str, cols: str, table: str, where: str, order: str) -> str:
    """Per run and stream, the newest row of ``table`` by ``order`` (standard SQL: a window, on both backends)."""
    return (f"SELECT * FROM (SELECT {sel}, {cols}, ROW_NUMBER() OVER (PARTITION BY {grp} ORDER BY {order}) AS rn "
            f"FROM {table} WHERE {where}) AS t WHERE rn = 1")


def _read(db: Database, config: Any) -> list[dict[str, Any]]:
    # the ledger grows per-stream keys; read them when present (an older ledger has one implicit stream)
    streamed = "stream" in _columns(db, "runs")
    sel, grp = stream_columns(db)
    members_by = _grouped(db, f"SELECT {sel}, checkpoint_id, source, sha256, metric, step, mtime, file FROM members")
    counts_by = _grouped(db, f"SELECT {sel}, status, COUNT(*) AS n, MAX(updated_at) AS at FROM checkpoints "
                             f"GROUP BY {grp}, status")
    invalid_by = _grouped(db, _newest(sel, grp, "path, reason, updated_at AS at", "checkpoints", "status='invalid'",
                                      "updated_at DESC, id DESC"))
    export_by = _grouped(db, _newest(sel, grp, "id, status, reason, source, metric, step, started_at, finished_at",
                                     "exports", "status != 'abandoned'", "id DESC"))
    evaluation_by = (_grouped(db, "SELECT * FROM evaluations WHERE id IN "
                                  "(SELECT MAX(id) FROM evaluations GROUP BY watch, run, stream)")
                     if has_table(db, "evaluations") else {})
    # live run leases (several daemons sharing a PostgreSQL ledger; one on SQLite): who processes the run
    leases = ({(r["watch"], r["run"]): (r["holder"], r["held_since"]) for r in db.execute(
        f"SELECT watch, run, holder, held_since FROM leases WHERE expires_at > {db.now}")}
        if has_table(db, "leases") else {})
    out = []
    for r in db.execute(f"SELECT {sel}, run_dir, output, last_event, last_event_at, last_error, last_error_at "
                        f"FROM runs ORDER BY {grp}").fetchall():
        key = (r["watch"], r["run"], r["stream"])
        mode = run_mode(config, r["watch"])
        rows = members_by.get(key, [])
        files = {row["checkpoint_id"]: row["file"] for row in rows}
        members = [{"source": m.path, "metric": m.metric, "step": m.step, "sha256": m.sha256,
                    "file": files[m.ckpt_id]}
                   for m in ranked([Record(*tuple(row)[3:9]) for row in rows], mode)]
        counts = {c["status"]: c["n"] for c in counts_by.get(key, [])}
        last_ok = _latest(*(c["at"] for c in counts_by.get(key, []) if c["status"] in OK_STATUSES))
        invalid = (invalid_by.get(key) or [None])[0]
        export = (export_by.get(key) or [None])[0]
        evaluation = (evaluation_by.get(key) or [None])[0]
        row: dict[str, Any] = {
            "watch": r["watch"], "run": r["run"], "run_dir": r["run_dir"], "output": r["output"],
            "mode": mode,
            "best": members[0] if members else None,
            "members": members,
            "top_k": _top_k(config, r["watch"]),
            "checkpoints": counts,
            "invalid": counts.get("invalid", 0),
            "last_invalid": ({"source": invalid["path"], "reason": invalid["reason"], "at": invalid["at"]}
                             if invalid else None),
            "last_ok_at": last_ok,
            "last_event": r["last_event"], "last_event_at": r["last_event_at"],
            "last_error": r["last_error"], "last_error_at": r["last_error_at"],
            "export": ({k: export[k] for k in ("status", "reason", "source", "metric", "finished_at", "id", "step",
                                              "started_at")} if export else None),
            "evaluation": evaluation_dict(evaluation) if evaluation else None,
        }
        row["last_activity_at"] = _latest(
            r["last_event_at"], r["last_error_at"], *(c["at"] for c in counts_by.get(key, [])),
            *((export["started_at"], export["finished_at"]) if export else ()),
            *((evaluation["started_at"], evaluation["finished_at"]) if evaluation else ()))
        row["holder"], row["held_since"] = leases.get((r["watch"], r["run"]), (None, None))
        row["has_error"] = has_error(row)
        if streamed:
            row["stream"] = r["stream"]
        out.append(row)
    return out


def has_error(row: dict[str, Any]) -> bool:
    """The module docstring's definition: an export error, or an error or rejected checkpoint newer than the
    newest good checkpoint."""
    ok_at = row.get("last_ok_at") or 0.0
    error = row.get("last_error")
    if error and (error.startswith(EXPORT_ERROR_PREFIX) or (row.get("last_error_at") or 0.0) > ok_at):
        return True
    last = row.get("last_invalid")
    return bool(row.get("invalid") and last and (last["at"] or 0.0) > ok_at)


def filter_rows(rows: Sequence[dict[str, Any]], *, run: str | None = None, watch: str | None = None,
                errors: bool = False) -> list[dict[str, Any]]:
    """``run``: an fnmatch pattern over the run name or ``watch/run``; ``watch``: a watch name; ``errors``: only
    runs that :func:`has_error`."""
    return [r for r in rows
            if (run is None or fnmatch.fnmatchcase(r["run"], run) or fnmatch.fnmatchcase(f"{r['watch']}/{r['run']}",
                                                                                          run))
            and (watch is None or r["watch"] == watch)
            and (not errors or has_error(r))]


def by_activity(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most recent activity first (ties and rows without any activity keep their order)."""
    return sorted(rows, key=lambda r: -(r.get("last_activity_at") or 0.0))


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """The table's fields for one :func:`collect_status` row."""
    best = row["best"]
    return {"watch": row["watch"], "run": row["run"], "stream": row.get("stream", "model"), "mode": row["mode"],
            "best_metric": best["metric"] if best else None, "best_step": best["step"] if best else None,
            "members": len(row["members"]), "top_k": row.get("top_k"),
            "seen": sum(row["checkpoints"].values()),
            "last_event": row["last_event"], "last_activity_at": row.get("last_activity_at"),
            "export": row["export"]["status"] if row["export"] else None,
            "has_error": has_error(row), "error": (row["last_error"] or f"latest checkpoint rejected: "
                                                   f"{row['last_invalid']['reason']}") if has_error(row) else None,
            "holder": display_holder(row.get("holder")), "held_since": row.get("held_since")}


def run_summaries(config: Any) -> list[dict[str, Any]]:
    """One compact dict per run and stream, most recent activity first: what ``ckptd status`` prints as a
    table (``best_metric``, ``best_step``, ``members``/``top_k``, ``seen``, ``last_event``, ``last_activity_at``,
    ``export``, ``has_error`` and ``error``; ``holder``, ``host:pid`` of the daemon holding the run's lease, and
    ``held_since``)."""
    return [summary(r) for r in by_activity(collect_status(config))]


def _ago(ts: float | None) -> str:
    return f"{age(ts)} ago" if ts else "never"


def _clock(ts: float | None) -> str:
    """Local date and time of ``ts`` (seconds since the epoch), to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def age(ts: float | None, now: float | None = None) -> str:
    """``12s``, ``5m``, ``3h``, ``2d``; ``-`` for no time."""
    if not ts:
        return "-"
    delta = max(0.0, (time.time() if now is None else now) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta / size:.0f}{unit}"
    return f"{delta:.0f}s"


def clip(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters (an ellipsis marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:max(0, width - 1)] + ELLIPSIS


def render_table(headers: Sequence[str], cells: Sequence[Sequence[str]], *, right: Sequence[str] = (),
                 widest: dict[str, int] | None = None) -> list[str]:
    """Plain-text columns as wide as their content (``widest``: a cap per header, cut with an ellipsis);
    ``right``: headers of right-aligned (numeric) columns. No trailing spaces. Cells pass through
    :func:`terminal_safe`."""
    widest = widest or {}
    cells = [[clip(terminal_safe(c), widest.get(h, 10**6)) for h, c in zip(headers, row)] for row in cells]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for h, c, w in zip(headers, row, widths)).rstrip()

    return [line(headers), *(line(row) for row in cells)]


def fmt_num(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


TABLE_HEADERS = ("!", "RUN", "STREAM", "BEST", "STEP", "TOP-K", "SEEN", "LAST EVENT", "AGE", "EXPORT")
HOLDER_HEADERS = ("HELD BY", "HELD")  # only when some run's lease is held (a daemon is processing it)
TABLE_WIDEST = {"RUN": 40, "STREAM": 16, "LAST EVENT": 32, "EXPORT": 12, "HELD BY": 32}  # cut with an ellipsis


def print_table(rows: Sequence[dict[str, Any]], stream: TextIO | None = None, *, now: float | None = None) -> None:
    """The default human view: one line per run and stream, most recent activity first. When a daemon holds some
    run's lease, two more columns say which one (``host:pid``) and for how long (several daemons sharing a
    PostgreSQL ledger split the runs)."""
    out = stream or sys.stdout
    if not rows:
        print(NO_RUNS, file=out)
        return
    summaries = [summary(r) for r in by_activity(rows)]
    held = any(s["holder"] for s in summaries)
    cells = []
    for s in summaries:
        topk = f"{s['members']}/{s['top_k']}" if s["top_k"] else str(s["members"])
        cells.append(["!" if s["has_error"] else "", f"{s['watch']}/{s['run']}", s["stream"], fmt_num(s["best_metric"]),
                      fmt_num(s["best_step"]), topk, str(s["seen"]), s["last_event"] or "-",
                      age(s["last_activity_at"], now), s["export"] or "-"])
        if held:
            cells[-1] += [s["holder"] or "-", age(s["held_since"], now) if s["holder"] else "-"]
    headers = TABLE_HEADERS + HOLDER_HEADERS if held else TABLE_HEADERS
    for text in render_table(headers, cells, right=("BEST", "STEP", "TOP-K", "SEEN", "AGE", "HELD"),
                             widest=TABLE_WIDEST):
        print(text, file=out)


def print_status(rows: list[dict[str, Any]], stream: TextIO | None = None) -> None:
    """The detailed human view of :func:`collect_status` (``ckptd status -v``)."""
    out = stream or sys.stdout

    def say(line: str) -> None:  # one line each: the whole line is made terminal-safe, every field with it
        print(terminal_safe(line), file=out)

    if not rows:
        say(NO_RUNS)
        return
    for r in rows:
        best = r["best"]
        best_txt = f"{best['metric']:g} from {Path(best['source']).name} (step {best['step']})" if best else "none yet"
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["checkpoints"].items())) or "no checkpoints"
        title = f"{r['watch']}/{r['run']}" + (f" [{r['stream']}]" if r.get("stream", "model") != "model" else "")
        say(f"{title}  ({r['mode']})")
        say(f"  best      {best_txt}")
        say(f"  top-k     {len(r['members'])} member(s): " + ", ".join(f"{m['metric']:g}" for m in r["members"]))
        say(f"  seen      {counts}")
        if r["invalid"]:
            last = r["last_invalid"]
            say(f"  invalid   {r['invalid']} rejected; latest {Path(last['source']).name}: {last['reason']}")
        say(f"  last      {r['last_event'] or '-'} ({_ago(r['last_event_at'])})")
        if r.get("holder"):
            say(f"  held by   {display_holder(r['holder'])} since {_clock(r.get('held_since'))} "
                f"({_ago(r.get('held_since'))}; lease holder {r['holder']})")
        if r["last_error"]:
            say(f"  error     {r['last_error']} ({_ago(r['last_error_at'])})")
        if r["export"]:
            e = r["export"]
            say(f"  coreml    {e['status']}" + (f": {e['reason']}" if e["reason"] else ""))
        if r.get("evaluation"):
            say(f"  eval      {describe_evaluation(r['evaluation'])}")
        say(f"  output    {r['output']}")


def describe_evaluation(e: dict[str, Any]) -> str:
    """``soup ok: 0.8123 over 3 member(s) (2m ago)``, with the reason when there is one (the cache key is for
    machines: it stays in ``--json``)."""
    what = str(e.get("kind") or "evaluation")
    value = f": {e['value']:g}" if isinstance(e.get("value"), (int, float)) else ""
    text = f"{what} {e.get('status') or '?'}{value} over {len(e.get('members') or [])} member(s)"
    text += f" ({_ago(e.get('finished_at') or e.get('started_at'))})"
    return text + (f"; {e['reason']}" if e.get("reason") else "")
