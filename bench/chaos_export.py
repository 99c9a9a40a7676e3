"""Fault classes: the CoreML export child killed, hung past its timeout, or failing (real conversions of a tiny
model steered by ``bench.chaos_factory``): the previous package stays, the daemon keeps going, and the next
export of a new best succeeds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from bench.chaos_data import width_for
from bench.chaos_harness import ClassResult, Scenario
from bench.chaos_kill import settle

KINDS = {"killed": "slow", "hung": "hang", "failing": "fail"}
TITLES = {"killed": "export child killed", "hung": "export hung past timeout", "failing": "export failing"}


def export_children(daemon_pid: int) -> list[int]:
    """Export worker processes started by the daemon."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == daemon_pid and b"ckptd.export.worker" in cmd:
            found.append(int(entry))
    return found


def package(out_run: Path) -> Path | None:
    link = out_run / "best.mlpackage"
    return Path(os.path.realpath(link)) if os.path.lexists(link) else None


def complete(pkg: Path | None) -> bool:
    return pkg is not None and (pkg / "Manifest.json").is_file() and \
        (pkg / "Data/com.apple.CoreML/model.mlmodel").is_file()


def _published_for(sc: Scenario, source: Path, since: int, timeout: float) -> bool:
    assert sc.daemon is not None
    return sc.daemon.until(lambda ev: any(e.get("event") == "export.published" and e.get("checkpoint") == str(source)
                                          for e in ev[since:]), timeout)


def run_export_faults(work: Path, trials: int, *, kb: int = 64, timeout_s: int = 60, seed: int = 31,
                      kinds: tuple[str, ...] = tuple(KINDS)) -> list[ClassResult]:
    """One daemon with CoreML export enabled; per trial a new best whose export is killed / hangs / fails, then
    a recovery: the factory behaves again and the next new best is exported."""
    results = {k: ClassResult(TITLES[k]) for k in kinds}
    control = work / "export_control"
    control.parent.mkdir(parents=True, exist_ok=True)
    control.write_text("ok")
    width = width_for(kb)
    coreml = {"enabled": True, "factory": "bench.chaos_factory:build",
              "factory_kwargs": {"width": width, "control": str(control)},
              "inputs": [{"name": "x", "shape": [1, width, 8, 8]}], "precision": "float32",
              "timeout": f"{timeout_s}s", "keep": 2}
    sc = Scenario(work, "export", kb=kb, seed=seed, policy={"export": {"coreml": coreml}})
    run = sc.run_dir("exp")
    out_run = sc.out / "w" / "exp"
    metric = 0.5
    first = run / "c_000.pt"
    sc.write(first, seed * 1000, metric)
    sc.start()
    per: dict[str, list[tuple[bool, str | None]]] = {k: [] for k in kinds}
    if not _published_for(sc, first, 0, 300):
        for k in kinds:
            per[k].append((False, "the first export never published"))
        return [settle(results[k], per[k], sc.finish(timeout=60)) for k in kinds]
    n = 0
    for _ in range(trials):
        for kind in kinds:
            n += 1
            before = package(out_run)
            control.write_text(KINDS[kind])
            metric += 0.01
            bad = run / f"c_{n:03d}_{kind}.pt"
            since = len(sc.events())
            sc.write(bad, seed * 1000 + n, metric)
            problems: list[str] = []
            if kind == "killed":
                deadline = time.monotonic() + 120
                while not export_children(sc.daemon.proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(1.0)
                kids = export_children(sc.daemon.proc.pid)
                for pid in kids:
                    os.kill(pid, signal.SIGKILL)
                if not kids:
                    problems.append("no export child to kill appeared")
            failed = sc.daemon.until(lambda ev, s=since, b=str(bad): any(
                e.get("event") == "export.failed" and e.get("checkpoint") == b for e in ev[s:]),
                timeout_s + 90)
            if not failed:
                problems.append("no export.failed line for the faulty export")
            now = package(out_run)
            if now != before or not complete(now):
                problems.append(f"previous package not kept: {before} -> {now} (complete={complete(now)})")
            why = sc.check_alive()
            if why:
                problems.append(why)
            control.write_text("ok")  # recovery: the next new best must be exported
            metric += 0.01
            good = run / f"c_{n:03d}_recovery.pt"
            since = len(sc.events())
            sc.write(good, seed * 1000 + 500 + n, metric)
            if not sc.wait_best("exp", good, 60):
                problems.append("the daemon did not go on processing after the export fault")
            elif not _published_for(sc, good, since, 300):
                problems.append("the next new best was not exported after the fault")
            elif not complete(package(out_run)):
                problems.append("best.mlpackage incomplete after recovery")
            per[kind].append((not problems, "; ".join(problems) or None))
    end = sc.finish(timeout=60)
    return [settle(results[k], per[k], end) for k in kinds]
