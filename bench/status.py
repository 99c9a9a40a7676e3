"""Benchmark: `ckptd status` and `ckptd history` on a large ledger.

The ledger holds 200 runs x 50 checkpoints (top-5 members, one export per run, every 10th run with a rejected
checkpoint last). Its rows are written directly through ``ckptd.daemon.ledger.Ledger``'s public methods (the ones
the daemon's pipeline calls), not by a daemon processing 10,000 real checkpoints: that would take many minutes and
measure the pipeline, not the read path. The commands then run as real subprocesses, the way an operator runs
them (interpreter start and imports included); each figure is the median of 5.

    python bench/status.py                    # 200 runs x 50 checkpoints
    python bench/status.py --runs 20 --checkpoints 10 --repeat 3   # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ckptd.daemon.ledger import LEDGER_NAME, Ledger, MemberRow  # noqa: E402
from ckptd.daemon.policy import Record  # noqa: E402

TOP_K = 5


def write_config(work: Path) -> Path:
    (work / "train").mkdir(parents=True, exist_ok=True)
    cfg = {"state_dir": str(work / "state"), "log": {"format": "json"},
           "watches": [{"name": "w", "root": str(work / "train"), "runs": "*",
                        "output": str(work / "out/{watch}/{run}")}],
           "policies": {"default": {"average": {"top_k": TOP_K}}}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def build_ledger(work: Path, runs: int, checkpoints: int) -> None:
    ledger = Ledger(work / "state" / LEDGER_NAME)
    try:
        for r in range(runs):
            run = f"run{r:03d}"
            run_dir, output = work / "train" / run, work / "out" / "w" / run
            ledger.touch_run("w", run, str(run_dir), str(output))
            members: list[MemberRow] = []
            with ledger.transaction() as db:
                for i in range(checkpoints):
                    path = str(run_dir / f"ep{i:03d}.pt")
                    metric = 0.5 + 0.4 * ((i * 37 + r) % checkpoints) / checkpoints
                    rejected = r % 10 == 0 and i == checkpoints - 1
                    ckpt_id = ledger.record("w", run, path, 1 << 20, 1_000_000 + i, db=db,
                                            status="invalid" if rejected else "done",
                                            reason="not a checkpoint" if rejected else "ranked",
                                            sha256=None if rejected else f"{r:04x}{i:060x}",
                                            metric=None if rejected else metric, step=None if rejected else i * 100)
                    if not rejected:
                        record = Record(ckpt_id, path, f"{r:04x}{i:060x}", metric, i * 100, float(i))
                        members = sorted([*members, MemberRow(record, str(output / f"members/{i}.safetensors"))],
                                         key=lambda m: -(m.record.metric or 0))[:TOP_K]
                ledger.set_members(db, "w", run, members)
            best = members[0].record
            export = ledger.export_started("w", run, best.path, best.sha256, best.metric, best.step)
            ledger.export_finished(export, "ok", path=str(output / "coreml/best-v1.mlpackage"))
            if r % 10 == 0:
                ledger.note_event("w", run, "invalid", error=f"{run_dir}/ep{checkpoints - 1:03d}.pt: not a checkpoint")
            else:
                ledger.note_event("w", run, "new_best")
    finally:
        ledger.close()


def time_command(args: list[str], repeat: int) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ckptd.cli", *args], capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - t0)
        size = len(done.stdout)
    return statistics.median(times), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--checkpoints", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-status-") as tmp:
        work = Path(tmp)
        config = str(write_config(work))
        t0 = time.perf_counter()
        build_ledger(work, args.runs, args.checkpoints)
        print(f"ledger: {args.runs} runs x {args.checkpoints} checkpoints written in {time.perf_counter() - t0:.1f}s "
              f"({(work / 'state' / LEDGER_NAME).stat().st_size / 1e6:.1f} MB)")
        baseline, _ = time_command(["--version"], args.repeat)
        print(f"  ckptd --version (interpreter + CLI start)  {baseline * 1000:7.0f} ms")
        run = f"run{args.runs // 2:03d}"
        for label, cmd in (("ckptd status", ["status", "-c", config]),
                           ("ckptd status --json", ["status", "-c", config, "--json"]),
                           ("ckptd status --errors", ["status", "-c", config, "--errors"]),
                           (f"ckptd history {run}", ["history", run, "-c", config]),
                           (f"ckptd history {run} --json", ["history", run, "-c", config, "--json"])):
            median, size = time_command(cmd, args.repeat)
            print(f"  {label:42} {median * 1000:7.0f} ms  (median of {args.repeat}, {size / 1024:.0f} KiB out)")


if __name__ == "__main__":
    main()
