"""Several daemons on one PostgreSQL ledger: throughput of 1 vs 2 daemons on the same work, and failover time.

usage: python bench/multi_daemon.py [--runs 6] [--checkpoints 8] [--width 1024] [--failovers 3]

Throughput: the same checkpoints (``runs`` x ``checkpoints`` training states of an MLP, model + Adam state) are
moved into the watch root at once, and the time until the ledger records every one of them as processed is
measured for: one daemon (``max_parallel_runs: 1``), two daemons (1 each, sharing the runs under leases) and, as a
reference, one daemon with ``max_parallel_runs: 2``. ``lease_ttl: 3s`` (presence is refreshed every second, so
the first daemon knows of the second before the work arrives; with the default 30 s a daemon that starts later
gets its share within about 10 s). All on this host, so "two daemons" shows what sharing the
ledger costs and gains per core, not what two hosts would give.

Failover: two daemons, one trainer writing checkpoints; the daemon holding a run is killed with SIGKILL; the time
until the other daemon logs ``run.lease_acquired`` for it is measured (expected: at most lease_ttl + the poll
interval).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.daemon_process import start_daemon  # noqa: E402
from ckptd.training_state import build_training_state, save_training_state  # noqa: E402
from tests.pg_server import _run_as, _start, _stop, find_bindir  # noqa: E402

FINAL = "('done','invalid','unranked','duplicate','skipped','pruned','resume')"


def write_work(root: Path, runs: int, checkpoints: int, width: int) -> int:
    torch.manual_seed(0)
    for r in range(runs):
        run = root / f"run{r}"
        run.mkdir(parents=True)
        model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        opt = torch.optim.Adam(model.parameters())
        for c in range(checkpoints):
            model(torch.randn(2, width)).sum().backward()
            opt.step()
            state = build_training_state(model, opt, epoch=c, iteration=c + 1, metric=0.5 + 0.01 * c + 0.001 * r)
            save_training_state(state, run / f"checkpoint_{c}.pt")
    return runs * checkpoints


def config(work: Path, name: str, ledger: str, *, parallel: int, watch: Path, ttl: str = "10s",
           poll: str = "0.5s") -> dict[str, Any]:
    return {"state_dir": str(work / f"state-{name}"), "log": {"format": "json", "level": "info"},
            "ledger": ledger, "lease_ttl": ttl, "max_parallel_runs": parallel, "rescan_interval": "5s",
            "shutdown_deadline": "10s",
            "watches": [{"name": "w", "root": str(watch), "runs": "*", "mode": "poll", "poll_interval": poll,
                         "settle": "0.2s", "output": str(work / "out" / "{watch}/{run}")}],
            "policies": {"default": {"average": {"top_k": 3}}}}


def processed(pg: Any, db: str) -> int:
    import psycopg

    with psycopg.connect(pg.url(db), autocommit=True) as conn:
        try:
            return int(conn.execute(f"SELECT count(*) FROM checkpoints WHERE status IN {FINAL}").fetchone()[0])
        except psycopg.errors.UndefinedTable:
            return 0


def throughput(pg: Any, tmp: Path, prepared: Path, total: int, daemons: int, parallel: int) -> float:
    label = f"{daemons}x{parallel}"
    work = tmp / label
    watch = work / "train"
    watch.mkdir(parents=True)
    db = f"bench_{label}"
    with pg.connect() as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    procs = []
    for i in range(daemons):
        d = work / f"d{i}"
        d.mkdir()
        procs.append(start_daemon(config(d, "s", pg.url(db), parallel=parallel, watch=watch, ttl="3s"), d, REPO))
    for run in sorted(prepared.iterdir()):
        shutil.copytree(run, work / "staging" / run.name, copy_function=os.link)  # before the clock starts
    time.sleep(2.5)  # presence leases (heartbeat every ttl/3): each daemon knows the other before the work arrives
    start = time.monotonic()
    for run in sorted(prepared.iterdir()):
        os.rename(work / "staging" / run.name, watch / run.name)
    while processed(pg, db) < total:
        if time.monotonic() - start > 900:
            raise RuntimeError(f"{label}: not finished after 900 s")
        time.sleep(0.2)
    seconds = time.monotonic() - start
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=60)
    return seconds


def lease_holder(pg: Any, db: str) -> str | None:
    """The live holder of run0's lease (from the ledger: the truth, not log lines)."""
    import psycopg

    with psycopg.connect(pg.url(db), autocommit=True) as conn:
        try:
            row = conn.execute("SELECT holder FROM leases WHERE watch='w' AND run='run0' AND "
                               "expires_at > EXTRACT(EPOCH FROM clock_timestamp())").fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    return row[0] if row else None


def failover(pg: Any, tmp: Path, n: int) -> list[float]:
    times = []
    for i in range(n):
        work = tmp / f"failover{i}"
        watch = work / "train"
        (watch / "run0").mkdir(parents=True)
        db = f"bench_failover_{i}"
        with pg.connect() as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        daemons = {}
        for j in range(2):
            d = work / f"d{j}"
            d.mkdir()
            proc = start_daemon(config(d, "s", pg.url(db), parallel=1, watch=watch, ttl="5s", poll="1s"), d, REPO)
            daemons[proc.pid] = proc
        model = nn.Linear(64, 64)
        save_training_state(build_training_state(model, epoch=0, metric=0.1), watch / "run0" / "checkpoint_0.pt")
        deadline = time.monotonic() + 60
        holder = None
        while holder is None and time.monotonic() < deadline:
            holder = lease_holder(pg, db)
            time.sleep(0.05)
        assert holder is not None, "no daemon took the run"
        victim = daemons[int(holder.split(":")[1].split(".")[0])]
        victim.kill()
        killed = time.monotonic()
        while (now := lease_holder(pg, db)) is None or now == holder:
            if time.monotonic() - killed > 60:
                raise RuntimeError("no takeover within 60 s")
            time.sleep(0.02)
        times.append(time.monotonic() - killed)
        for proc in daemons.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--failovers", type=int, default=3)
    args = ap.parse_args()
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries not found (install the Debian package postgresql)")
    tmp = Path(tempfile.mkdtemp(prefix="ckptd-bench-multi-"))
    ids = _run_as()
    pgdir = Path(tempfile.mkdtemp(prefix="ckptd-bench-pg-"))  # its own: _start hands it to the server's user
    pg = _start(bindir, pgdir, ids)
    try:
        prepared = tmp / "prepared"
        total = write_work(prepared, args.runs, args.checkpoints, args.width)
        size = sum(f.stat().st_size for f in prepared.rglob("*.pt")) / total / 1e6
        print(f"work: {args.runs} runs x {args.checkpoints} checkpoints ({size:.1f} MB each, model + Adam state); "
              f"{os.cpu_count()} cores")
        rows = []
        for daemons, parallel in ((1, 1), (2, 1), (1, 2)):
            seconds = throughput(pg, tmp, prepared, total, daemons, parallel)
            rows.append((daemons, parallel, seconds, total / seconds * 60))
        base = rows[0][3]
        print("| daemons | max_parallel_runs each | seconds | checkpoints/min | vs 1 daemon |")
        print("|---|---|---|---|---|")
        for daemons, parallel, seconds, rate in rows:
            print(f"| {daemons} | {parallel} | {seconds:.1f} | {rate:.0f} | {rate / base:.2f}x |")
        if args.failovers:
            times = failover(pg, tmp, args.failovers)
            print(f"failover after kill -9 (lease_ttl 5 s, poll 1 s): median {statistics.median(times):.1f} s, "
                  f"max {max(times):.1f} s over {len(times)} kills: {json.dumps([round(t, 2) for t in times])}")
    finally:
        _stop(pg, ids, pgdir)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(pgdir, ignore_errors=True)


if __name__ == "__main__":
    main()
