"""Daemon-side commands: ``run``, ``once``, ``check``, ``status`` (and ``demo``)."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any


def add_daemon_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("once", help="process every checkpoint present now, then exit")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_once)
    p = sub.add_parser("check", help="validate a config; list watches and the runs they resolve to")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("status", help="per run: best, top-k members, last event, errors (reads the ledger)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("demo", help="a tiny real training run, watched by the daemon, end to end")
    p.add_argument("--dir", default=None, help="where to put the demo (default: a new temporary directory)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--no-export", action="store_true", help="skip the CoreML export")
    p.set_defaults(func=cmd_demo)


def _load(path: str) -> Any:
    from ckptd.daemon.config import load_config

    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    from ckptd.daemon.logs import configure_logging
    from ckptd.daemon.service import Daemon

    config = _load(args.config)
    configure_logging(config.log.format, config.log.level)
    return Daemon(config, args.config).run()


def cmd_once(args: argparse.Namespace) -> int:
    from ckptd.daemon.logs import configure_logging
    from ckptd.daemon.service import Daemon

    config = _load(args.config)
    configure_logging(config.log.format, config.log.level)
    return Daemon(config, args.config, once=True).run_once()


def cmd_check(args: argparse.Namespace) -> int:
    from ckptd.daemon.discovery import list_runs
    from ckptd.daemon.paths import resolve_output, run_name
    from ckptd.daemon.service import watch_summary
    from ckptd.errors import CkptdError

    config = _load(args.config)
    print(f"{args.config}: OK (state_dir {config.state_dir}, {len(config.watches)} watch(es), "
          f"policies: {', '.join(config.policies)})")
    problems = 0
    for watch in config.watches:
        info = watch_summary(watch)
        print(f"watch {watch.name}: {watch.root} ({info['fstype'] or '?'}, {info['mode']} mode), "
              f"runs '{watch.runs}', policy {watch.policy}, settle {watch.settle:g}s")
        runs = list_runs(watch)
        if not runs:
            print("  (no run directories yet)")
        for run_dir in runs:
            try:
                name = run_name(watch.root, run_dir)
                print(f"  run {name}: {run_dir} -> {resolve_output(watch.output, watch.name, name)}")
            except CkptdError as exc:
                problems += 1
                print(f"  run {run_dir}: SKIPPED: {exc}")
    return 0 if not problems else 1


def collect_status(config: Any) -> list[dict[str, Any]]:
    """Per-run status from the ledger (read-only; safe while the daemon runs)."""
    from ckptd.daemon.ledger import Ledger
    from ckptd.daemon.policy import Record, ranked
    from ckptd.daemon.service import LEDGER_NAME

    db_path = config.state_dir / LEDGER_NAME
    if not db_path.exists():
        return []
    db = Ledger.open_readonly(db_path)
    try:
        runs = db.execute("SELECT * FROM runs ORDER BY watch, run").fetchall()
        out = []
        for r in runs:
            watch = next((w for w in config.watches if w.name == r["watch"]), None)
            mode = config.policy_for(watch).metric.mode if watch else "max"
            rows = db.execute("SELECT checkpoint_id, source, sha256, metric, step, mtime, file FROM members "
                              "WHERE watch=? AND run=?", (r["watch"], r["run"])).fetchall()
            files = {row["checkpoint_id"]: row["file"] for row in rows}
            members = [{"source": m.path, "metric": m.metric, "step": m.step, "sha256": m.sha256,
                        "file": files[m.ckpt_id]}
                       for m in ranked([Record(*tuple(row)[:6]) for row in rows], mode)]
            counts = dict(db.execute("SELECT status, COUNT(*) FROM checkpoints WHERE watch=? AND run=? GROUP BY status",
                                     (r["watch"], r["run"])).fetchall())
            export = db.execute("SELECT status, reason, source, metric, finished_at FROM exports "
                                "WHERE watch=? AND run=? AND status != 'abandoned' ORDER BY id DESC LIMIT 1",
                                (r["watch"], r["run"])).fetchone()
            out.append({
                "watch": r["watch"], "run": r["run"], "run_dir": r["run_dir"], "output": r["output"],
                "mode": mode,
                "best": members[0] if members else None,
                "members": members,
                "checkpoints": counts,
                "last_event": r["last_event"], "last_event_at": r["last_event_at"],
                "last_error": r["last_error"], "last_error_at": r["last_error_at"],
                "export": dict(export) if export else None,
            })
        return out
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    delta = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta / size:.0f}{unit} ago"
    return f"{delta:.0f}s ago"


def print_status(rows: list[dict[str, Any]], stream: Any = None) -> None:
    stream = stream or sys.stdout
    if not rows:
        print("no runs recorded yet (is the daemon running, and does the state_dir match?)", file=stream)
        return
    for r in rows:
        best = r["best"]
        best_txt = f"{best['metric']:g} from {Path(best['source']).name} (step {best['step']})" if best else "none yet"
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["checkpoints"].items())) or "no checkpoints"
        print(f"{r['watch']}/{r['run']}  ({r['mode']})", file=stream)
        print(f"  best      {best_txt}", file=stream)
        print(f"  top-k     {len(r['members'])} member(s): "
              + ", ".join(f"{m['metric']:g}" for m in r["members"]), file=stream)
        print(f"  seen      {counts}", file=stream)
        print(f"  last      {r['last_event'] or '-'} ({_ago(r['last_event_at'])})", file=stream)
        if r["last_error"]:
            print(f"  error     {r['last_error']} ({_ago(r['last_error_at'])})", file=stream)
        if r["export"]:
            e = r["export"]
            print(f"  coreml    {e['status']}" + (f": {e['reason']}" if e["reason"] else ""), file=stream)
        print(f"  output    {r['output']}", file=stream)


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args.config)
    rows = collect_status(config)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_status(rows)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ckptd.demo import run_demo

    return run_demo(args.dir, epochs=args.epochs, export=not args.no_export)
