"""Fault class: the ledger deleted, overwritten with garbage or truncated while the daemon is stopped. On restart
it must be rebuilt with a warning, the outputs must stay the same, and every run must go on processing, also
when the trainer deleted member sources meanwhile and when a rewritten ``last.pt`` has two members."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from bench.chaos_harness import ClassResult, Scenario
from bench.chaos_kill import settle
from bench.chaos_outputs import compare_outputs, wait_until

MODES = ("garbage", "deleted", "truncated")
VARIANTS = ("rewritten_last", "sources_deleted", "plain")
LEDGER_FILES = ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm")


def corrupt(state: Path, mode: str, rng: random.Random) -> None:
    db = state / "ledger.sqlite3"
    if mode == "deleted":
        for name in LEDGER_FILES:
            (state / name).unlink(missing_ok=True)
    elif mode == "garbage":
        db.write_bytes(rng.randbytes(64 << 10))
        for name in LEDGER_FILES[1:]:
            (state / name).unlink(missing_ok=True)
    elif mode == "truncated":
        os.truncate(db, db.stat().st_size // 2)
        for name in LEDGER_FILES[1:]:
            (state / name).unlink(missing_ok=True)
    else:
        raise ValueError(mode)


def _fill_run(sc: Scenario, run: Path, variant: str, base: int) -> list[Path]:
    """Checkpoints of one run per variant; returns the paths whose processing must be awaited."""
    paths = []
    if variant == "rewritten_last":
        # two versions of last.pt, both ranking into the top-3: two members with the same source path
        for i in range(2):
            sc.write(run / f"c_{i}.pt", base + i, sc.metrics.orphan())
        for i in range(2):
            path = run / "last.pt"
            since = len(sc.events())
            sc.write(path, base + 10 + i, sc.metrics.final())
            sc.wait_processed(path, 30, since=since)
            wait_until(lambda p=path, i=i: sum(m[0] == str(p) for m in _members(sc, run.name)) == i + 1, 30)
        return []
    for i in range(5):
        path = run / f"c_{i}.pt"
        sc.write(path, base + i, sc.metrics.final())
        paths.append(path)
    return paths


def _members(sc: Scenario, run: str) -> list[tuple[str, float]]:
    m = sc.manifest(run) or {}
    return [(x["source"], x["metric"]) for x in (m.get("average") or {}).get("members", [])]


def run_ledger(work: Path, trials: int, *, kb: int = 128, seed: int = 41) -> ClassResult:
    """Trial t adds a run (variant cycles every len(MODES) trials), stops the daemon, damages the ledger (mode
    cycles), restarts: a warning names the ledger, every run's outputs equal their copy from before, and a new
    best in the trial's run is then processed (runs stuck on a rebuilt ledger fail here)."""
    res = ClassResult("ledger deleted/corrupted")
    rng = random.Random(seed)
    sc = Scenario(work, "ledger", kb=kb, seed=seed)
    sc.start()
    plain_runs: list[str] = []
    trials_out: list[tuple[bool, str | None]] = []
    for t in range(trials):
        mode, variant = MODES[t % len(MODES)], VARIANTS[(t // len(MODES)) % len(VARIANTS)]
        name = f"t{t}_{variant}"
        run = sc.run_dir(name)
        problems: list[str] = []
        for path in _fill_run(sc, run, variant, seed * 10000 + t * 100):
            if not sc.wait_processed(path, 30):
                problems.append(f"{path.name} not processed before the fault")
        if variant == "sources_deleted":
            for src, _ in _members(sc, name)[:2]:
                Path(src).unlink(missing_ok=True)
        elif variant == "plain":
            plain_runs.append(name)
        assert sc.daemon is not None
        rc = sc.daemon.stop()
        if rc != 0:
            problems.append(f"graceful stop before the fault: rc {rc}")
        before = sc.dir / f"before_{t}"
        shutil.copytree(sc.out, before, symlinks=False)
        corrupt(sc.dir / "state", mode, rng)
        try:
            sc.start()
        except RuntimeError as exc:
            last = [ln for ln in str(exc).splitlines() if ln.strip()][-1:]
            trials_out.append((False, f"{mode}/{variant}: the daemon does not start: {' '.join(last)[:300]}"))
            corrupt(sc.dir / "state", "deleted", rng)  # go on with the other trials
            sc.start()
            continue
        since = sc.daemon.start_index
        warned = sc.daemon.until(lambda ev, s=since: any(
            e.get("level") in ("warning", "error") and "ledger" in json.dumps(e) for e in ev[s:]), 30)
        if not warned:
            problems.append("no warning line about the ledger being rebuilt")
        deadline = time.monotonic() + 30
        diffs = compare_outputs(sc.out, before)
        while diffs and time.monotonic() < deadline:
            time.sleep(0.5)
            diffs = compare_outputs(sc.out, before)
        if diffs:
            problems.append(f"outputs changed by the rebuild: {diffs[:2]}")
        top = max((m for _, m in _members(sc, name)), default=0.95)
        new = run / "after.pt"
        sc.write(new, seed * 10000 + t * 100 + 99, min(0.999, top + 0.01 + rng.random() * 0.001))
        if not sc.wait_best(name, new, 40):
            problems.append("a new best after the rebuild was not published (run stuck?)")
        why = sc.check_alive()
        if why:
            problems.append(why)
        trials_out.append((not problems, f"{mode}/{variant}: " + "; ".join(problems) if problems else None))
    # the plain runs (no source deleted, no rewritten file) must equal an uninterrupted reference run
    ref_out, note = sc.reference()
    end: list[str] = [note] if note else []
    deadline = time.monotonic() + 60
    diffs = [d for d in compare_outputs(sc.out, ref_out) if d.split(":")[0].split("/")[1] in plain_runs]
    while diffs and time.monotonic() < deadline:
        time.sleep(0.5)
        diffs = [d for d in compare_outputs(sc.out, ref_out) if d.split(":")[0].split("/")[1] in plain_runs]
    end += [f"differs from the reference: {d}" for d in diffs[:3]]
    end += sc.finish(compare=False)
    return settle(res, trials_out, end)
