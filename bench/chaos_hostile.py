"""Fault class: hostile input, one row per kind (``bench.chaos_payloads.KINDS``).

Each kind gets its own run with a good checkpoint before (metric 0.5) and after (0.6) the hostile item (which
claims 0.99 where it can). Passed: no canary, daemon alive, the later good checkpoint becomes the run's best (the
item neither blocked the run nor got published), the right number of log lines naming the item (once, with a
reason, also after a safety re-scan), and the daemon's RSS stayed within 256 MiB of its baseline meanwhile.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.chaos_harness import ClassResult, RssSampler, Scenario, rss_bytes
from bench.chaos_kill import settle
from bench.chaos_payloads import KINDS

RSS_LIMIT = 256 << 20
LOUD = ("warning", "error", "critical")


def _judge(sc: Scenario, expect: str, item: Path, since: int) -> str | None:
    lines = sc.lines_naming(item, since)
    loud = [e for e in lines if e.get("level") in LOUD]
    joined = [e for e in lines if e.get("event") == "checkpoint.joined"]
    if expect == "reject":
        if joined:
            return f"accepted: {joined[0].get('event')} (metric {joined[0].get('metric')})"
        if len(loud) != 1:
            return f"{len(loud)} warning/error lines naming it (expected exactly 1): " + \
                   "; ".join(f"{e.get('event')}: {str(e.get('reason'))[:100]}" for e in loud[:2])
        if not loud[0].get("reason"):
            return f"its line {loud[0].get('event')} gives no reason"
        return None
    if expect == "refuse_run":
        if len(loud) != 1:
            return f"{len(loud)} warning/error lines naming the run dir (expected exactly 1)"
        m = sc.manifest(item.name) or {}
        if m.get("best"):
            return "a run outside the watch root was processed and published"
        return None
    # any / any_run: processed or refused, but named, and not a flood
    if not lines:
        return "no log line names it"
    if len(loud) > 1:
        return f"{len(loud)} warning/error lines naming it (a refusal must be logged once)"
    return None


def run_hostile(work: Path, trials: int = 1, *, kb: int = 64, seed: int = 51, kinds: list[str] | None = None,
                batch: bool = False) -> list[ClassResult]:
    """``batch``: place every kind's item at once and wait for all (CI); else one kind after another, so a
    death or an RSS peak is attributed to its kind."""
    kinds = kinds or list(KINDS)
    results = {k: ClassResult(f"hostile: {k}") for k in kinds}
    sc = Scenario(work, "hostile", kb=kb, seed=seed)
    plan = [(t, i, k) for t in range(trials) for i, k in enumerate(kinds)]
    for t, i, _ in plan:
        sc.write(sc.run_dir(f"h{t}_{i:02d}") / "good_1.pt", seed * 1000 + t * 100 + i, 0.5)
    sc.start()
    assert sc.daemon is not None
    sampler = RssSampler(lambda: sc.daemon.proc.pid if sc.daemon else 0)
    sampler.start()
    for t, i, _ in plan:
        sc.wait_processed(sc.train / f"h{t}_{i:02d}" / "good_1.pt", 60)
    time.sleep(0.5)
    baseline = rss_bytes(sc.daemon.proc.pid)
    def place(t: int, i: int, kind: str) -> dict[str, Any] | None:
        expect, build = KINDS[kind]
        run = sc.train / f"h{t}_{i:02d}"
        canary = sc.canary / f"t{t}_k{i:02d}"
        since, t0 = len(sc.events()), time.monotonic()
        try:
            item = build(run, canary, kb)
        except Exception as exc:  # noqa: BLE001 - a harness problem: report it in the row
            results[kind].record(False, f"could not build the payload: {type(exc).__name__}: {exc}")
            return None
        time.sleep(0.05)
        sc.write(run / "good_2.pt", seed * 1000 + 500 + t * 100 + i, 0.6)
        return {"kind": kind, "run": run.name, "expect": expect, "item": item, "canary": canary, "since": since,
                "t0": t0}

    def wait(d: dict[str, Any], deadline: float) -> None:
        d["best"] = sc.wait_best(d["run"], sc.train / d["run"] / "good_2.pt", max(1.0, deadline - time.monotonic()))
        d["t1"], d["alive"] = time.monotonic(), sc.daemon.alive()
        if not d["alive"]:
            sc.check_alive()

    done: list[dict[str, Any]] = []
    if batch:  # all items at once, then all the good checkpoints (fast; RSS is attributed to the whole batch)
        done = [d for t, i, kind in plan if (d := place(t, i, kind)) is not None]
        deadline = time.monotonic() + 20
        for d in done:
            wait(d, deadline)
        for d in done:
            d["t0"], d["t1"] = done[0]["t0"], max(x["t1"] for x in done)
    else:
        for t, i, kind in plan:
            if (d := place(t, i, kind)) is not None:
                wait(d, time.monotonic() + 15)
                done.append(d)
    time.sleep(2.5)  # a safety re-scan passes (rescan_interval 2s): refusals must not be logged again
    sampler.stop()
    per: dict[str, list[tuple[str, list[str]]]] = {k: [] for k in kinds}
    for d in done:
        problems = []
        if not d["alive"]:
            problems.append("daemon died")
        if not d["best"]:
            m = sc.manifest(d["run"]) or {}
            problems.append(f"later good checkpoint not best (best: {(m.get('best') or {}).get('source')})")
        why = _judge(sc, d["expect"], d["item"], d["since"])
        if why:
            problems.append(why)
        peak = sampler.peak_between(d["t0"], d["t1"] + 0.5)
        if peak - baseline > RSS_LIMIT:
            problems.append(f"RSS grew {(peak - baseline) >> 20} MiB (limit {RSS_LIMIT >> 20})")
        per[d["kind"]].append((d["run"], problems))
    end = sc.finish(timeout=20, split_runs=True)  # every run had its decision already
    for d in done:  # after the reference run too: `ckptd once` must not run payloads either
        if d["canary"].exists():
            per[d["kind"]] = [(run, [*probs, "CANARY CREATED: the payload ran"]) if run == d["run"]
                              else (run, probs) for run, probs in per[d["kind"]]]
    runs = {run for k in kinds for run, _ in per[k]}
    end += [f"differs from the reference: {d}" for run, diffs in sc.run_diffs.items() if run not in runs
            for d in diffs[:1]]  # runs no kind owns (e.g. an odd run directory itself) fail every kind
    out = []
    for k in kinds:
        trials = []
        for run, problems in per[k]:
            problems = problems + [f"differs from the reference: {x}" for x in sc.run_diffs.get(run, [])[:1]]
            trials.append((not problems, "; ".join(problems) or None))
        out.append(settle(results[k], trials, end))
    return out
