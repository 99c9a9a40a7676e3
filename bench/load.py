"""Load figures for the daemon (issue 9), against the real ``ckptd run`` process:

1. startup: N existing small checkpoints in R runs before the daemon starts -> time to caught-up (every file has
   its decision line), peak RSS, no checkpoint decided twice, no duplicate ledger rows;
2. burst: B checkpoints renamed into 20 runs within S seconds -> all processed, latency percentiles from the
   rename to the decision line (the ledger row is committed before it is logged);
3. steady: M checkpoints processed one after another -> RSS, open fds and threads sampled along the way
   (/proc/PID/status, /proc/PID/fd): flat means no growth after warm-up.

    python bench/load.py                  # full: 10,000 in 200 runs; burst 1,000 in 10 s; steady 1,000
    python bench/load.py --quick          # 1,000 in 20 runs; burst 200 in 2 s; steady 200
    python bench/load.py --only startup --json load.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chaos_data import checkpoint, serialize
from bench.chaos_harness import FINAL_EVENTS, ChaosDaemon, RssSampler
from tests.daemon_helpers import write_config

KB = 4  # ~8 KB files: the figures are about the daemon's per-file overhead, not I/O


class Decisions:
    """Incremental view of the decision lines: first decision time per checkpoint, and repeats."""

    def __init__(self, daemon: ChaosDaemon) -> None:
        self.daemon, self.index = daemon, 0
        self.first: dict[str, float] = {}
        self.repeats = 0

    def update(self) -> int:
        events = self.daemon.events()
        for e in events[self.index:]:
            if e.get("event") in FINAL_EVENTS and e.get("checkpoint"):
                path = e["checkpoint"]
                if path in self.first:
                    self.repeats += 1 if e.get("event") != "checkpoint.incomplete" else 0
                    continue
                self.first[path] = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        self.index = len(events)
        return len(self.first)

    def wait(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.update() < n:
            if time.monotonic() > deadline or not self.daemon.alive():
                return False
            time.sleep(0.1)
        return True


def proc_sample(pid: int) -> dict[str, int]:
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            status[key] = int(value.split()[0])
    return {"rss_mib": status.get("VmRSS", 0) // 1024, "threads": status.get("Threads", 0),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def duplicate_ledger_rows(state: Path) -> int | str:
    try:
        db = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True)
        cols = {r[1] for r in db.execute("PRAGMA table_info(checkpoints)")}
        ident = [c for c in ("watch", "run", "stream", "path", "size", "mtime_ns") if c in cols]
        q = f"SELECT COUNT(*) FROM (SELECT 1 FROM checkpoints GROUP BY {', '.join(ident)} HAVING COUNT(*) > 1)"
        return int(db.execute(q).fetchone()[0])
    except sqlite3.Error as exc:
        return f"unreadable: {exc}"


def setup(work: Path, name: str, extra: dict | None = None) -> tuple[Path, Path]:
    d = work / name
    d.mkdir(parents=True)
    cfg = write_config(d, policy={"average": {"top_k": 5}}, watch={"settle": "1s"},
                       extra={"rescan_interval": "5m", **(extra or {})})
    return d, cfg


def startup(work: Path, n: int, runs: int) -> dict[str, Any]:
    d, cfg = setup(work, "startup")
    rng = random.Random(1)
    for i in range(n):
        run = d / "train" / f"run{i % runs:03d}"
        run.mkdir(parents=True, exist_ok=True)
        (run / f"c_{i // runs:05d}.pt").write_bytes(serialize(checkpoint(i, rng.random(), i // runs, KB)))
    old = time.time() - 60  # written a while ago: nothing waits for settle
    for p in (d / "train").rglob("*.pt"):
        os.utime(p, (old, old))
    t0 = time.monotonic()
    daemon = ChaosDaemon(cfg, d / "daemon.log", wait_ready=False)
    sampler = RssSampler(lambda: daemon.proc.pid, interval=0.05)
    sampler.start()
    decisions = Decisions(daemon)
    daemon.until(lambda ev: any(e.get("event") == "daemon.ready" for e in ev), 120)
    ready = time.monotonic() - t0
    ok = decisions.wait(n, 1800)
    caught_up = time.monotonic() - t0
    sampler.stop()
    daemon.stop()
    return {"checkpoints": n, "runs": runs, "ready_s": round(ready, 1), "caught_up_s": round(caught_up, 1),
            "all_processed": ok, "processed": len(decisions.first), "peak_rss_mib": max(r for _, r in sampler.samples)
            >> 20, "decided_twice": decisions.repeats, "duplicate_ledger_rows": duplicate_ledger_rows(d / "state")}


def burst(work: Path, n: int, seconds: float, runs: int = 20) -> dict[str, Any]:
    d, cfg = setup(work, "burst")
    dirs = [d / "train" / f"run{r:02d}" for r in range(runs)]
    for r in dirs:
        r.mkdir(parents=True)
    rng = random.Random(2)
    blobs = [serialize(checkpoint(10_000 + i, rng.random(), i, KB)) for i in range(n)]
    daemon = ChaosDaemon(cfg, d / "daemon.log")
    decisions = Decisions(daemon)
    renamed: dict[str, float] = {}
    t0 = time.monotonic()
    for i, blob in enumerate(blobs):
        final = dirs[i % runs] / f"b_{i:05d}.pt"
        tmp = final.with_name(final.name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, final)
        renamed[str(final)] = time.time()
        delay = t0 + (i + 1) * seconds / n - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    wrote = time.monotonic() - t0
    ok = decisions.wait(n, 600)
    drained = time.monotonic() - t0
    daemon.stop()
    lat = sorted(max(0.0, decisions.first[p] - t) for p, t in renamed.items() if p in decisions.first)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else lat * 99

    return {"checkpoints": n, "runs": runs, "written_in_s": round(wrote, 1), "all_processed": ok,
            "processed": len(lat), "drained_s": round(drained, 1), "p50_s": round(q[49], 3), "p95_s": round(q[94], 3),
            "p99_s": round(q[98], 3), "max_s": round(max(lat, default=0), 3), "decided_twice": decisions.repeats}


def steady(work: Path, n: int, runs: int = 5) -> dict[str, Any]:
    d, cfg = setup(work, "steady")
    dirs = [d / "train" / f"run{r}" for r in range(runs)]
    for r in dirs:
        r.mkdir(parents=True)
    daemon = ChaosDaemon(cfg, d / "daemon.log")
    decisions = Decisions(daemon)
    rng = random.Random(3)
    samples: list[dict[str, int]] = []
    step = max(1, n // 10)
    for i in range(n):
        final = dirs[i % runs] / f"s_{i:05d}.pt"
        tmp = final.with_name(final.name + ".tmp")
        tmp.write_bytes(serialize(checkpoint(20_000 + i, rng.random(), i, KB)))
        os.replace(tmp, final)
        if not decisions.wait(i + 1, 60):
            break
        if (i + 1) % step == 0:
            samples.append({"processed": i + 1, **proc_sample(daemon.proc.pid)})
    daemon.stop()
    warm = samples[len(samples) // 5] if samples else {}
    last = samples[-1] if samples else {}
    growth = {k: last.get(k, 0) - warm.get(k, 0) for k in ("rss_mib", "threads", "fds")}
    flat = bool(samples) and growth["rss_mib"] <= 20 and growth["threads"] <= 2 and growth["fds"] <= 2
    return {"checkpoints": n, "processed": len(decisions.first), "samples": samples,
            "growth_after_warmup": growth, "flat": flat, "decided_twice": decisions.repeats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ckptd load figures")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=["startup", "burst", "steady"])
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--work")
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ckptd-load-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    q = args.quick
    out: dict[str, Any] = {"started": started, "mode": "quick" if q else "full"}
    try:
        for name in args.only or ["startup", "burst", "steady"]:
            print(f"... {name}", file=sys.stderr, flush=True)
            if name == "startup":
                out[name] = startup(work, 1000 if q else 10_000, 20 if q else 200)
            elif name == "burst":
                out[name] = burst(work, 200 if q else 1000, 2.0 if q else 10.0)
            else:
                out[name] = steady(work, 200 if q else 1000)
            print(json.dumps({k: v for k, v in out[name].items() if k != "samples"}), file=sys.stderr, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"ckptd load ({out['mode']}), started {started}")
    if "startup" in out:
        s = out["startup"]
        print(f"startup  {s['checkpoints']} checkpoints in {s['runs']} runs: ready {s['ready_s']} s, caught up "
              f"{s['caught_up_s']} s, peak RSS {s['peak_rss_mib']} MiB, decided twice {s['decided_twice']}, "
              f"duplicate ledger rows {s['duplicate_ledger_rows']}, all processed {s['all_processed']}")
    if "burst" in out:
        b = out["burst"]
        print(f"burst    {b['checkpoints']} in {b['written_in_s']} s over {b['runs']} runs: all processed "
              f"{b['all_processed']} (drained {b['drained_s']} s), rename->decision p50 {b['p50_s']} s, "
              f"p95 {b['p95_s']} s, p99 {b['p99_s']} s, max {b['max_s']} s")
    if "steady" in out:
        s = out["steady"]
        first, last = (s["samples"][0], s["samples"][-1]) if s["samples"] else ({}, {})
        print(f"steady   {s['processed']} processed: RSS {first.get('rss_mib')} -> {last.get('rss_mib')} MiB, "
              f"threads {first.get('threads')} -> {last.get('threads')}, fds {first.get('fds')} -> "
              f"{last.get('fds')}; growth after warm-up {s['growth_after_warmup']}: flat {s['flat']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    bad = [k for k in ("startup", "burst") if k in out and not out[k]["all_processed"]]
    bad += ["steady"] if "steady" in out and not out["steady"]["flat"] else []
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
