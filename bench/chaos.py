"""The fault suite: every fault class against the real daemon (``ckptd run``), one table row per class.

A trial passes when the daemon is alive (or was restarted by the harness where the fault is a kill), no canary
file exists (hostile payloads try to create one), no partial file was ever visible under an output name, and the
final outputs equal an uninterrupted reference run's (``ckptd once`` over the same final checkpoints, in a fresh
state_dir and output): tensors bitwise, manifest best/metric/step and member set. See bench/chaos_*.py.

    python bench/chaos.py --quick                 # small counts, a few minutes
    python bench/chaos.py                         # full counts from issue 9 (~15-20 min on 2 cores)
    python bench/chaos.py --only kill9 hostile --json results.json
    python bench/chaos.py --list

The CI subset is tests/test_chaos.py (same harness, smaller counts). Load figures: bench/load.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chaos_disk import run_disk_full
from bench.chaos_export import run_export_faults
from bench.chaos_files import (
    run_deleted,
    run_replaced,
    run_rewrite_in_place,
    run_truncated,
    run_writer_killed,
)
from bench.chaos_harness import ClassResult
from bench.chaos_hostile import run_hostile
from bench.chaos_kill import run_kill9, run_restarts
from bench.chaos_ledger import run_ledger

Runner = Callable[[Path, dict], list[ClassResult]]

# name -> (runner, quick counts, full counts)
CLASSES: dict[str, tuple[Runner, dict, dict]] = {
    "kill9": (lambda w, c: [run_kill9(w, **c)],
              {"runs": 2, "per_run": 10, "kills": 6}, {"runs": 4, "per_run": 50, "kills": 50}),
    "restarts": (lambda w, c: [run_restarts(w, **c)], {"restarts": 5}, {"restarts": 20}),
    "writer_killed": (lambda w, c: [run_writer_killed(w, **c)], {"trials": 3}, {"trials": 10}),
    "truncated": (lambda w, c: [run_truncated(w, **c)], {"trials": 4}, {"trials": 20}),
    "deleted": (lambda w, c: [run_deleted(w, **c)], {"trials": 4}, {"trials": 20}),
    "replaced": (lambda w, c: [run_replaced(w, **c)], {"trials": 4}, {"trials": 20}),
    "rewrite_inplace": (lambda w, c: [run_rewrite_in_place(w, how="inplace", **c)], {"rewrites": 10},
                        {"rewrites": 60}),
    "rewrite_rplus": (lambda w, c: [run_rewrite_in_place(w, how="rplus", **c)], {"rewrites": 10},
                      {"rewrites": 60}),
    "disk_full": (lambda w, c: [run_disk_full(w, **c)], {"cycles": 3}, {"cycles": 10}),
    "export": (lambda w, c: run_export_faults(w, **c), {"trials": 1, "timeout_s": 30},
               {"trials": 2, "timeout_s": 30}),
    "ledger": (lambda w, c: [run_ledger(w, **c)], {"trials": 3}, {"trials": 9}),
    "hostile": (lambda w, c: run_hostile(w, **c), {"trials": 1}, {"trials": 3}),
}


def run_class(name: str, work: Path, counts: dict) -> list[ClassResult]:
    runner = CLASSES[name][0]
    t0 = time.monotonic()
    try:
        rows = runner(work / name, counts)
    except Exception as exc:  # noqa: BLE001 - a harness failure is a failed row, with the reason
        row = ClassResult(name)
        row.record(False, f"harness error: {type(exc).__name__}: {exc}")
        row.note(traceback.format_exc().strip().splitlines()[-3][:300])
        rows = [row]
    for row in rows:
        row.seconds = (time.monotonic() - t0) / len(rows)
    return rows


def table(rows: list[ClassResult]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"| {'class'.ljust(width)} | trials | passed | notes |",
             f"|{'-' * (width + 2)}|-------:|-------:|-------|"]
    for r in rows:
        passed = "skip" if r.skipped else str(r.passed)
        notes = r.skipped or "; ".join(n if len(n) <= 160 else n[:157] + "..." for n in r.notes)
        lines.append(f"| {r.name.ljust(width)} | {r.trials:6d} | {passed:>6} | {notes.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small trial counts (minutes)")
    ap.add_argument("--only", nargs="+", choices=sorted(CLASSES), help="run only these classes")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-' for stdout)")
    ap.add_argument("--work", help="work directory (default: a new temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, outputs)")
    ap.add_argument("--list", action="store_true", help="list the classes and their counts")
    args = ap.parse_args(argv)
    if args.list:
        for name, (_, quick, full) in CLASSES.items():
            print(f"{name:16} quick {quick}  full {full}")
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ckptd-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    rows: list[ClassResult] = []
    try:
        for name in args.only or list(CLASSES):
            counts = CLASSES[name][1 if args.quick else 2]
            print(f"... {name} {counts}", file=sys.stderr, flush=True)
            new = run_class(name, work, counts)
            for r in new:
                print(f"    {r.name}: {r.passed}/{r.trials}{' SKIPPED: ' + r.skipped if r.skipped else ''}",
                      file=sys.stderr, flush=True)
            rows += new
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - t0
    mode = "quick" if args.quick else "full"
    print(f"ckptd fault suite ({mode}), started {started}, {elapsed:.0f} s")
    print(table(rows))
    failed = [r for r in rows if not r.ok and not r.skipped]
    print(f"{len(rows) - len(failed)}/{len(rows)} classes passed every trial"
          + (f" ({sum(1 for r in rows if r.skipped)} skipped)" if any(r.skipped for r in rows) else ""))
    if args.json:
        doc = {"mode": mode, "started": started, "seconds": round(elapsed, 1),
               "rows": [{"class": r.name, "trials": r.trials, "passed": r.passed, "notes": r.notes,
                         "skipped": r.skipped, "seconds": round(r.seconds, 1)} for r in rows]}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.keep or args.work:
        print(f"work directory: {work}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
