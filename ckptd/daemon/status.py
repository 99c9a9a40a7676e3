"""The status read model: per run, the best, the top-k members, counts, the last event and errors, from the ledger.

It lives in the daemon package so that ``ckptd status`` and ``ckptd demo`` share it without the demo importing
the CLI. It only reads (a ``mode=ro`` connection, safe while the daemon writes) and imports nothing heavy (no
torch, no daemon service): status must answer fast on a busy host.

A missing ledger means "nothing recorded yet"; a ledger that exists but cannot be read (corrupt, locked, not a
database, unreadable) is an error naming the file and the reason (exit 1), never silently "no runs".
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ckptd.daemon.ledger import LEDGER_NAME
from ckptd.daemon.policy import Record, ranked
from ckptd.errors import CkptdError

READ_TIMEOUT = 5.0  # seconds to wait for a lock: WAL readers are not blocked by the daemon's writes
NO_RUNS = "no runs recorded yet (is the daemon running, and does the state_dir match?)"


class LedgerReadError(CkptdError):
    """The ledger exists but cannot be read; ``ckptd status`` exits 1 with this message."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read the ledger {path}: {reason}")


def ledger_path(config: Any) -> Path:
    return Path(config.state_dir) / LEDGER_NAME


def _hint(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text:
        return "the file is corrupt or not a ckptd ledger; stop the daemon and delete it to have it rebuilt by a scan"
    if "locked" in text or "busy" in text:
        return f"another process held a lock for more than {READ_TIMEOUT:g}s"
    if "unable to open" in text:
        return "it cannot be opened: check its permissions and those of its directory"
    return ""


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def collect_status(config: Any) -> list[dict[str, Any]]:
    """Per-run status rows (the ``--json`` contract: fields are added, never renamed).

    Raises :class:`LedgerReadError` when the ledger exists but cannot be read.
    """
    path = ledger_path(config)
    if not path.exists():
        return []
    if not path.is_file():
        raise LedgerReadError(path, "not a regular file")
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=READ_TIMEOUT)
        db.row_factory = sqlite3.Row
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return []  # created, schema not written yet
        missing = {"runs", "checkpoints", "members", "exports"} - tables
        if missing:
            raise LedgerReadError(path, f"not a ckptd ledger (no table {', '.join(sorted(missing))})")
        return _read(db, config)
    except sqlite3.Error as exc:
        hint = _hint(exc)
        raise LedgerReadError(path, f"{exc}" + (f" ({hint})" if hint else "")) from exc
    except OSError as exc:
        raise LedgerReadError(path, f"{exc.strerror or exc}") from exc
    finally:
        if db is not None:
            db.close()


def _read(db: sqlite3.Connection, config: Any) -> list[dict[str, Any]]:
    # the ledger grows per-stream keys; read them when present (an older ledger has one implicit stream)
    streamed = "stream" in _columns(db, "runs")
    key = "watch=? AND run=?" + (" AND stream=?" if streamed else "")
    out = []
    for r in db.execute("SELECT * FROM runs ORDER BY watch, run" + (", stream" if streamed else "")).fetchall():
        args = (r["watch"], r["run"], r["stream"]) if streamed else (r["watch"], r["run"])
        watch = next((w for w in config.watches if w.name == r["watch"]), None)
        mode = config.policy_for(watch).metric.mode if watch else "max"
        rows = db.execute(f"SELECT checkpoint_id, source, sha256, metric, step, mtime, file FROM members WHERE {key}",
                          args).fetchall()
        files = {row["checkpoint_id"]: row["file"] for row in rows}
        members = [{"source": m.path, "metric": m.metric, "step": m.step, "sha256": m.sha256,
                    "file": files[m.ckpt_id]}
                   for m in ranked([Record(*tuple(row)[:6]) for row in rows], mode)]
        counts = {status: n for status, n in db.execute(
            f"SELECT status, COUNT(*) FROM checkpoints WHERE {key} GROUP BY status", args).fetchall()}
        invalid = db.execute(f"SELECT path, reason, updated_at FROM checkpoints WHERE {key} AND status='invalid' "
                             "ORDER BY updated_at DESC LIMIT 1", args).fetchone()
        export = db.execute(f"SELECT status, reason, source, metric, finished_at FROM exports WHERE {key} "
                            "AND status != 'abandoned' ORDER BY id DESC LIMIT 1", args).fetchone()
        row: dict[str, Any] = {
            "watch": r["watch"], "run": r["run"], "run_dir": r["run_dir"], "output": r["output"],
            "mode": mode,
            "best": members[0] if members else None,
            "members": members,
            "checkpoints": counts,
            "invalid": counts.get("invalid", 0),
            "last_invalid": ({"source": invalid["path"], "reason": invalid["reason"], "at": invalid["updated_at"]}
                             if invalid else None),
            "last_event": r["last_event"], "last_event_at": r["last_event_at"],
            "last_error": r["last_error"], "last_error_at": r["last_error_at"],
            "export": dict(export) if export else None,
        }
        if streamed:
            row["stream"] = r["stream"]
        out.append(row)
    return out


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    delta = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta / size:.0f}{unit} ago"
    return f"{delta:.0f}s ago"


def print_status(rows: list[dict[str, Any]], stream: TextIO | None = None) -> None:
    """The human view of :func:`collect_status`."""
    out = stream or sys.stdout
    if not rows:
        print(NO_RUNS, file=out)
        return
    for r in rows:
        best = r["best"]
        best_txt = f"{best['metric']:g} from {Path(best['source']).name} (step {best['step']})" if best else "none yet"
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["checkpoints"].items())) or "no checkpoints"
        title = f"{r['watch']}/{r['run']}" + (f" [{r['stream']}]" if r.get("stream", "model") != "model" else "")
        print(f"{title}  ({r['mode']})", file=out)
        print(f"  best      {best_txt}", file=out)
        print(f"  top-k     {len(r['members'])} member(s): "
              + ", ".join(f"{m['metric']:g}" for m in r["members"]), file=out)
        print(f"  seen      {counts}", file=out)
        if r["invalid"]:
            last = r["last_invalid"]
            print(f"  invalid   {r['invalid']} rejected; latest {Path(last['source']).name}: {last['reason']}",
                  file=out)
        print(f"  last      {r['last_event'] or '-'} ({_ago(r['last_event_at'])})", file=out)
        if r["last_error"]:
            print(f"  error     {r['last_error']} ({_ago(r['last_error_at'])})", file=out)
        if r["export"]:
            e = r["export"]
            print(f"  coreml    {e['status']}" + (f": {e['reason']}" if e["reason"] else ""), file=out)
        print(f"  output    {r['output']}", file=out)
