"""Fault classes: the daemon killed with SIGKILL at random moments, and restarted many times in a row."""

from __future__ import annotations

import random
import time
from pathlib import Path

from bench.chaos_harness import ClassResult, Scenario, WriterProc, describe_exit


def settle(res: ClassResult, trials: list[tuple[bool, str | None]], problems: list[str]) -> ClassResult:
    """Per-trial results gated by the scenario's end checks (a failed end check fails every trial)."""
    for ok, note in trials:
        res.record(ok and not problems, note)
    for p in problems:
        res.note(p)
    return res


def _kill_and_check(sc: Scenario) -> tuple[bool, str | None]:
    """SIGKILL now; right after it every file under an output name must be whole (checked synchronously)."""
    assert sc.daemon is not None
    died = None if sc.daemon.alive() else f"died on its own: {describe_exit(sc.daemon.proc.returncode)}"
    before = len(sc.validator.violations)
    sc.kill()  # a death before the kill is also recorded in sc.deaths
    sc.validator.scan()
    new = sc.validator.violations[before:]
    if died:
        return False, died
    if new:
        return False, f"after a kill: {new[0]}"
    return True, None


def run_kill9(work: Path, *, runs: int = 4, per_run: int = 50, kills: int = 50, kb: int = 512,
              seed: int = 1) -> ClassResult:
    """A writer process renames checkpoints into several runs while the daemon is killed at random moments
    (uniform 0.05-2.5 s after each restart's ready) and restarted at once."""
    res = ClassResult("kill -9 at random moments")
    rng = random.Random(seed)
    sc = Scenario(work, "kill9", kb=kb, seed=seed)
    items = []
    for j in range(per_run):
        for i in range(runs):
            path = sc.run_dir(f"r{i}") / f"ckpt_{j:03d}.pt"
            s = seed * 100000 + i * 1000 + j
            sc.register(path, s)
            items.append({"path": str(path), "seed": s, "metric": sc.metrics.final(), "step": j + 1})
    sc.start()
    writer = WriterProc()
    pace = 4.5 * kills / max(1, len(items))  # spread the writes over the expected duration of the kills
    writer.send(op="loop", items=items, kb=kb, how="atomic", pause=[0.3 * pace, 1.7 * pace], seed=seed)
    trials: list[tuple[bool, str | None]] = []
    for _ in range(kills):
        time.sleep(rng.uniform(0.05, 2.5))
        trials.append(_kill_and_check(sc))
        try:
            sc.start()
        except RuntimeError as exc:
            trials[-1] = (False, f"restart failed: {str(exc)[:200]}")
            sc.start()
    done = writer.until("ok", 60 + 3 * len(items))
    writer.close()
    problems = [] if done else ["the writer did not finish"]
    problems += sc.finish(timeout=120)
    res.note(f"info: {len(items)} checkpoints in {runs} runs, {kills} kills")
    return settle(res, trials, problems)


def run_restarts(work: Path, *, restarts: int = 20, runs: int = 3, per_run: int = 8, kb: int = 512,
                 seed: int = 2) -> ClassResult:
    """A backlog, then ``restarts`` kills in a row, each 0.3-4 s after the spawn (before ready, during the
    reconcile, or mid catch-up); a new checkpoint lands before each restart. Then an undisturbed run."""
    res = ClassResult(f"{restarts} restarts in a row")
    rng = random.Random(seed)
    sc = Scenario(work, "restarts", kb=kb, seed=seed)
    dirs = [sc.run_dir(f"r{i}") for i in range(runs)]
    n = 0
    for j in range(per_run):
        for d in dirs:
            sc.write(d / f"ckpt_{j:03d}.pt", seed * 100000 + n, sc.metrics.final())
            n += 1
    trials: list[tuple[bool, str | None]] = []
    for _ in range(restarts):
        sc.start(wait_ready=False)
        time.sleep(rng.uniform(0.3, 4.0))
        trials.append(_kill_and_check(sc))
        d = rng.choice(dirs)
        sc.write(d / f"late_{n:03d}.pt", seed * 100000 + n, sc.metrics.final())
        n += 1
    sc.start()
    problems = sc.finish(timeout=120)
    res.note(f"info: {n} checkpoints in {runs} runs")
    return settle(res, trials, problems)
