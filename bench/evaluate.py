"""Benchmark: what the evaluation gate costs (issue 12). Prints figures; asserts nothing.

1. Evaluations per update, greedy soup vs gated uniform average, as top_k grows (k = 2, 4, 8). Checkpoints of the
   tiny MLP of ``tests/soup_models.py`` (same-basin neighbours, every 4th one from another basin, metric = its
   true loss) are fed one at a time; after each, ``Daemon.run_once`` (in this process) processes it and waits for
   its evaluation. Every evaluation the decisions ask for is counted as run (a real process of
   ``tests/eval_program.py``) or as a cache hit (the ledger already had the value of that member set).
2. Latency of one update, gated vs ungated, in the same run: a real ``ckptd run`` watches three runs (ungated
   uniform, gated uniform, greedy; k = 4); a checkpoint (a new best each time) is renamed into one run at a time
   and timed from the rename to the manifest showing the decision (the new average, or why it was rejected).
   The evaluator's own cost (one process on one member file, run directly) is measured alongside.

    python bench/evaluate.py                      # both parts, about a minute
    python bench/evaluate.py --ks 2,4 --n 10 --latency-n 3   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import daemon_process  # noqa: E402
from tests import soup_models as sm  # noqa: E402

EVAL_PROGRAM = REPO / "tests" / "eval_program.py"
METRIC = {"mode": "min", "sources": [{"checkpoint": "val_loss"}]}
EVALUATE = {"command": [sys.executable, str(EVAL_PROGRAM)], "metric": "loss", "mode": "min", "timeout": "60s",
            "max_per_hour": 100_000}


def config(base: Path, watches: dict[str, dict[str, Any]], *, events: bool = False) -> dict[str, Any]:
    """One watch (and policy) per entry: root ``base/train/<name>``, its runs under it."""
    return {
        "state_dir": str(base / "state"), "log": {"format": "json", "level": "info"},
        "watches": [{"name": name, "root": str(base / "train" / name), "runs": "*", "policy": name,
                     "output": str(base / "out/{watch}/{run}"), "settle": "1s", "mode": "events" if events else "poll"}
                    for name in watches],
        "policies": {name: {"metric": METRIC, **policy} for name, policy in watches.items()},
    }


def save_atomically(path: Path, state: dict[str, Any], *, step: int, val_loss: float) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": state, "step": step, "val_loss": val_loss}, tmp)
    os.replace(tmp, path)


# --- 1. evaluations per update ----------------------------------------------------------------------------------
class Counts:
    """Wraps ``Evaluator.__call__`` (the one door every evaluation the decisions ask for goes through)."""

    def __init__(self) -> None:
        self.ran = self.hits = 0

    def install(self) -> Callable[[], None]:
        from ckptd.daemon.evaluations import Evaluator

        original = Evaluator.__call__
        counts = self

        def counting(evaluator: Any, subset: Sequence[Any]) -> Any:
            ran, hits = evaluator.ran, evaluator.cache_hits
            try:
                return original(evaluator, subset)
            finally:
                counts.ran += evaluator.ran - ran
                counts.hits += evaluator.cache_hits - hits

        Evaluator.__call__ = counting  # type: ignore[method-assign]
        return lambda: setattr(Evaluator, "__call__", original)


def feed(base: Path, k: int, strategy: str, n: int) -> dict[str, Any]:
    from structlog.testing import capture_logs

    from ckptd.daemon.config import load_config
    from ckptd.daemon.service import Daemon

    average = {"top_k": k, "min_members": min(2, k)}
    average |= {"strategy": "greedy"} if strategy == "greedy" else {"gate": True}
    cfg_path = base / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config(base, {"w": {"average": average, "evaluate": EVALUATE}})))
    run = base / "train" / "w" / "exp"
    run.mkdir(parents=True)
    trained = sm.trained()
    counts = Counts()
    restore = counts.install()
    joined = started = published = rejected = 0
    t0 = time.perf_counter()
    try:
        for i in range(n):
            state = sm.nudged(trained, 1000 + i)
            if i % 4 == 3:
                state = sm.permuted(state, seed=i)  # another basin: as good alone, ruinous in an average
            save_atomically(run / f"ckpt_{i:03d}.pt", state, step=i, val_loss=sm.loss_of(state))
            with capture_logs() as logs:
                Daemon(load_config(cfg_path), cfg_path, once=True).run_once()
            names = [e["event"] for e in logs]
            joined += names.count("checkpoint.joined")
            started += names.count("evaluation.started")
            published += names.count("average.published")
            rejected += names.count("average.rejected")
    finally:
        restore()
    if started != counts.ran:
        raise RuntimeError(f"counted {counts.ran} evaluations, the log says {started}")
    return {"k": k, "strategy": strategy, "checkpoints": n, "updates": joined, "ran": counts.ran,
            "hits": counts.hits, "published": published, "rejected": rejected, "seconds": time.perf_counter() - t0}


def evaluations_per_update(ks: list[int], n_for: Callable[[int], int]) -> None:
    rows = []
    for k in ks:
        for strategy in ("uniform+gate", "greedy"):
            with tempfile.TemporaryDirectory(prefix="ckptd-bench-eval-") as tmp:
                rows.append(feed(Path(tmp), k, strategy, n_for(k)))
    print("EVALUATIONS PER UPDATE (one checkpoint at a time; every 4th from another basin; update = it joined "
          "the top-k)")
    print(f"  {'k':>2} {'strategy':<13} {'ckpts':>5} {'updates':>7} {'run':>5} {'hits':>5} {'run/upd':>7} "
          f"{'hit rate':>8} {'published':>9} {'rejected':>8} {'wall':>7}")
    for r in rows:
        asked = r["ran"] + r["hits"]
        print(f"  {r['k']:>2} {r['strategy']:<13} {r['checkpoints']:>5} {r['updates']:>7} {r['ran']:>5} "
              f"{r['hits']:>5} {r['ran'] / max(r['updates'], 1):>7.2f} {r['hits'] / max(asked, 1):>8.0%} "
              f"{r['published']:>9} {r['rejected']:>8} {r['seconds']:>6.1f}s")
    print("  run = evaluation processes started; hits = values the ledger already had (same member set, same "
          "evaluator)")


# --- 2. latency, gated vs ungated -------------------------------------------------------------------------------
def start_daemon(cfg: dict, work: Path) -> subprocess.Popen:
    return daemon_process.start_daemon(cfg, work, REPO)


def decided(manifest: Path, source: str) -> str | None:
    """'published' / 'rejected' once the manifest shows the decision for the top-k holding ``source``."""
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    avg = m.get("average") or {}
    if source in [e["source"] for e in avg.get("members", [])]:
        return "published"
    rejected = (avg.get("evaluation") or {}).get("rejected") or {}
    if source in rejected.get("members", []) and (avg.get("evaluation") or {}).get("current", True):
        return "rejected"
    return None


def latency(n: int) -> None:
    import torch

    modes = {"ungated": {"average": {"top_k": 4, "min_members": 2}},
             "gated": {"average": {"top_k": 4, "min_members": 2, "gate": True}, "evaluate": EVALUATE},
             "greedy": {"average": {"top_k": 4, "min_members": 2, "strategy": "greedy"}, "evaluate": EVALUATE}}
    trained = sm.trained()
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-eval-") as tmp:
        base = Path(tmp)
        for name in modes:
            (base / "train" / name / "exp").mkdir(parents=True)
        proc = start_daemon(config(base, modes, events=True), base)
        times: dict[str, list[float]] = {name: [] for name in modes}
        outcome: dict[str, list[str]] = {name: [] for name in modes}
        try:
            for i in range(3 + n):  # the first 3 fill the top-k; then n new bests, each one update, timed
                for name in modes:
                    run = base / "train" / name / "exp"
                    final = run / f"ckpt_{i:03d}.pt"
                    state = sm.nudged(trained, 2000 + i)
                    tmp_file = run / f"ckpt_{i:03d}.pt.tmp"
                    torch.save({"model": state, "step": i, "val_loss": 1.0 / (i + 1)}, tmp_file)
                    manifest = base / "out" / name / "exp" / "manifest.json"
                    t0 = time.perf_counter()
                    os.replace(tmp_file, final)
                    while (result := decided(manifest, str(final)) if i >= 1 else _listed(manifest, final)) is None:
                        if time.perf_counter() - t0 > 120:
                            raise RuntimeError("timed out: " + (base / "daemon.log").read_text()[-3000:])
                        time.sleep(0.002)
                    if i >= 3:
                        times[name].append(time.perf_counter() - t0)
                        outcome[name].append(result)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        events = [json.loads(line) for line in (base / "daemon.log").read_text().splitlines() if line.startswith("{")]
        member = next((base / "out" / "gated" / "exp" / "members").iterdir())
        alone = evaluator_alone(member)
    per_update = {name: sum(e["event"] == "evaluation.started" and e.get("watch") == name for e in events)
                  for name in modes}
    print(f"\nLATENCY rename -> manifest shows the decision (k = 4, events mode, tiny MLP, median of {n} updates, "
          "each a new best)")
    ungated = statistics.median(times["ungated"])
    for name in modes:
        med = statistics.median(times[name])
        extra = "" if name == "ungated" else f"   +{med - ungated:.3f} s vs ungated"
        print(f"  {name:<8} median {med:.3f} s   min {min(times[name]):.3f}   max {max(times[name]):.3f}{extra}   "
              f"({per_update[name]} evaluations in all; {outcome[name].count('published')} published, "
              f"{outcome[name].count('rejected')} rejected)")
    print(f"  evaluator alone (tests/eval_program.py on one member, run directly): median {alone:.3f} s")


def _listed(manifest: Path, final: Path) -> str | None:
    try:
        return "listed" if str(final) in manifest.read_text() else None
    except OSError:
        return None


def evaluator_alone(weights: Path, repeat: int = 5) -> float:
    env = dict(os.environ, CKPTD_WEIGHTS=str(weights))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(EVAL_PROGRAM)], env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="2,4,8", help="top_k values for part 1 (default 2,4,8)")
    ap.add_argument("--n", type=int, default=0, help="checkpoints fed per k (default 2k + 8)")
    ap.add_argument("--latency-n", type=int, default=5, help="timed updates per mode in part 2 (default 5)")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",") if k]
    evaluations_per_update(ks, lambda k: args.n or 2 * k + 8)
    if not args.skip_latency:
        latency(args.latency_n)


if __name__ == "__main__":
    main()
