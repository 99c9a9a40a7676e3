"""Daemon-side commands: ``run``, ``once``, ``check``, ``status``, ``history`` (and ``demo``)."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--explain", action="store_true",
                   help="dry run: per run and stream, each candidate's metric and step (and where from), the "
                        "ignored files and why, the top-k it would pick; writes nothing")
    p.add_argument("--json", action="store_true", help="with --explain: the same as JSON")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("status", help="one line per run and stream: best, top-k, last event, export, errors "
                                      "(reads the ledger; most recent activity first)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--run", metavar="GLOB", help="only runs whose name or watch/run matches this glob")
    p.add_argument("--watch", metavar="NAME", help="only runs of this watch")
    p.add_argument("--errors", action="store_true",
                   help="only runs with an error: a current last error, or a newest checkpoint that was rejected")
    p.add_argument("-v", "--verbose", action="store_true", help="a detailed block per run instead of the table")
    p.add_argument("--json", action="store_true", help="every field, as JSON (filters apply)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("history", help="one run's timeline: every checkpoint seen and the decision, exports, "
                                       "evaluations (reads the ledger)")
    p.add_argument("run", metavar="RUN", help="watch/run, or a run name that only one watch has")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--watch", metavar="NAME", help="the watch of RUN")
    p.add_argument("--stream", default="model", help="the weight stream (default: model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)
    p = sub.add_parser("demo", help="a tiny real training run, watched by the daemon, end to end")
    p.add_argument("--dir", default=None, help="where to put the demo (default: a new temporary directory)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--no-export", action="store_true", help="skip the CoreML export")
    p.set_defaults(func=cmd_demo)


def _load(path: str, *, check_paths: bool = True) -> Any:
    """The config; ``check_paths=False`` for the read-only commands (``status``, ``history``): they read only the
    ledger, and must answer while a watch root is missing (an unmounted share), when they are needed most.
    Structural config errors still exit 2."""
    from ckptd.daemon.config import load_config

    return load_config(path, check_paths=check_paths)


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
    from ckptd.daemon.status import terminal_safe
    from ckptd.daemon.watcher import watch_summary
    from ckptd.errors import CkptdError
    from ckptd.remote.display import shown_output, shown_path

    config = _load(args.config)
    if getattr(args, "explain", False):
        from ckptd.daemon.explain import explain_config, render_text

        explained = explain_config(config)
        print(json.dumps(explained, indent=2) if args.json else render_text(explained))  # render_text: made safe
        return 0 if not any("error" in r for r in explained) else 1
    from ckptd.daemon.config import run_plan

    def say(line: str) -> None:  # the lines name run directories and trainer files: made terminal-safe
        print(terminal_safe(line))

    say(f"{args.config}: OK (state_dir {config.state_dir}, {len(config.watches)} watch(es), "
        f"policies: {', '.join(config.policies)})")
    problems = 0
    for watch in config.watches:
        info = watch_summary(watch)
        say(f"watch {watch.name}: {info['root']} ({info['fstype'] or '?'}, {info['mode']} mode), "
            f"runs '{watch.runs}', policy {watch.policy}, settle {watch.settle:g}s")
        runs = list_runs(watch)
        if not runs:
            say("  (no run directories yet)")
        for run_dir in runs:
            try:
                name = run_name(watch.root, run_dir)
                output = shown_output(watch, name, resolve_output(watch.output, watch.name, name))
                say(f"  run {name}: {shown_path(watch, run_dir)} -> {output}")
                plan = run_plan(watch, config.policy_for(watch), run_dir)
                say(f"    trainer {plan.trainer}: {plan.detected_because}; streams "
                    + ", ".join(s.name for s in plan.streams))
                for problem in plan.problems:
                    say(f"    PROBLEM: {problem}")
            except CkptdError as exc:
                problems += 1
                say(f"  run {shown_path(watch, run_dir)}: SKIPPED: {exc}")
    return 0 if not problems else 1


def cmd_status(args: argparse.Namespace) -> int:
    from ckptd.daemon.status import (
        by_activity,
        collect_status,
        filter_rows,
        print_status,
        print_table,
        terminal_safe,
    )

    config = _load(args.config, check_paths=False)
    recorded = collect_status(config)  # an unreadable ledger raises LedgerReadError (a CkptdError): exit 1
    rows = filter_rows(recorded, run=args.run, watch=args.watch, errors=args.errors)
    if args.json:  # ordered by watch, run, stream as always; last_activity_at gives the recency
        print(json.dumps(rows, indent=2))
    elif recorded and not rows:
        wanted = " ".join(f"{flag} {value!r}" for flag, value in (("--run", args.run), ("--watch", args.watch))
                          if value is not None)
        what = "with errors" + (f" matching {wanted}" if wanted else "") if args.errors else f"match {wanted}"
        print(terminal_safe(f"no runs {what} ({len(recorded)} recorded; plain `ckptd status` lists them all)"))
    elif args.verbose:
        print_status(by_activity(rows))
    else:
        print_table(rows)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    import sys

    from ckptd.daemon.history import AmbiguousRunError, collect_history, print_history
    from ckptd.daemon.status import terminal_safe

    config = _load(args.config, check_paths=False)
    try:
        history = collect_history(config, args.watch, args.run, args.stream)
    except AmbiguousRunError as exc:  # a usage error: the user names the watch (run names come from the ledger)
        print(terminal_safe(f"ckptd history: {exc}"), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(history, indent=2))
    else:
        print_history(history)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ckptd.demo import run_demo

    return run_demo(args.dir, epochs=args.epochs, export=not args.no_export)
