"""Several daemons sharing one PostgreSQL ledger: runs are shared under leases, a killed daemon's runs are taken
over, and the outputs equal a single daemon's, each checkpoint processed and published once.

Real parts only: a PostgreSQL server started by the fixture, `ckptd run` subprocesses, real trainer processes
writing checkpoints, kill -9.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ckptd.daemon.leases import pid_of
from tests.conftest import PYTHON, subprocess_env
from tests.daemon_helpers import DaemonProcess

pytestmark = pytest.mark.slow

RUNS = ("r0", "r1", "r2")
EPOCHS = 6
FINAL = {"checkpoint.joined", "checkpoint.skipped", "checkpoint.duplicate", "checkpoint.unranked"}


def _config(tmp_path: Path, name: str, *, ledger: str | None, state: str) -> Path:
    cfg: dict[str, Any] = {
        "state_dir": str(tmp_path / state),
        "log": {"format": "json", "level": "info"},
        "rescan_interval": "2s",
        "shutdown_deadline": "10s",
        "lease_ttl": "3s",
        "watches": [{"name": "w", "root": str(tmp_path / "train"), "runs": "*", "mode": "poll",
                     "poll_interval": "0.5s", "settle": "0.5s",
                     "output": str(tmp_path / ("out" if ledger else "ref") / "{watch}/{run}")}],
        "policies": {"default": {"average": {"top_k": 3}}},
    }
    if ledger:
        cfg["ledger"] = ledger
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start_trainers(train: Path, pause: float) -> list[subprocess.Popen[str]]:
    script = Path(__file__).resolve().parent / "trainer_script.py"
    return [subprocess.Popen([PYTHON, str(script), str(train / run), str(EPOCHS), "--pause", str(pause)],
                             stdout=subprocess.PIPE, text=True, env=subprocess_env()) for run in RUNS]


def _finished(trainers: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    saved = []
    for proc in trainers:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        saved += [json.loads(line) for line in out.splitlines()]
    return saved


def _final_events(*daemons: DaemonProcess) -> Counter[str]:
    return Counter(e["checkpoint"] for d in daemons for e in d.events() if e["event"] in FINAL)


def _done_in_ledger(pg_url: str) -> set[str]:
    """Checkpoints the shared ledger records as processed, one row each (the ledger is the truth)."""
    import psycopg

    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT path, count(*) FROM checkpoints WHERE stream='model' AND status IN "
                            "('done','duplicate','unranked','skipped') GROUP BY path").fetchall()
    assert all(n == 1 for _, n in rows), rows
    return {r[0] for r in rows}


def _status(config: Path) -> list[dict[str, Any]]:
    done = subprocess.run([PYTHON, "-m", "ckptd.cli", "status", "-c", str(config), "--json"], capture_output=True,
                          text=True, env=subprocess_env(), check=True, timeout=60)
    return json.loads(done.stdout)


def _outputs(root: Path, run: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    out = root / "w" / run
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, load_file(out / "best.safetensors"), load_file(out / "average.safetensors")


def test_two_daemons_share_runs_and_take_over_a_killed_ones(tmp_path: Path, pg_url: str) -> None:
    a_cfg = _config(tmp_path, "a.yaml", ledger=pg_url, state="state-a")
    b_cfg = _config(tmp_path, "b.yaml", ledger=pg_url, state="state-b")
    (tmp_path / "train").mkdir()
    trainers = _start_trainers(tmp_path / "train", pause=0.6)
    a = DaemonProcess(a_cfg, tmp_path / "a.log")
    b = DaemonProcess(b_cfg, tmp_path / "b.log")
    try:
        # both daemons work: each holds some runs (three runs, two daemons)
        def lease_holders() -> set[int]:
            return {i for i, d in enumerate((a, b)) if any(e["event"] == "run.lease_acquired" for e in d.events())}

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (lease_holders() != {0, 1} or not _final_events(a)):
            time.sleep(0.1)
        assert lease_holders() == {0, 1}, "both daemons should hold runs"
        # status (read by either daemon's config) names each run's holder, host:pid.token
        holders = {r["run"]: r.get("holder") for r in _status(b_cfg)}
        assert set(holders) == set(RUNS), holders
        pids = {pid_of(h) for h in holders.values() if h}
        assert pids <= {a.proc.pid, b.proc.pid} and len(pids) == 2, holders
        a_runs = {run for run, h in holders.items() if h and pid_of(h) == a.proc.pid}
        assert len(a_runs) in (1, 2), holders  # the fair share: ceil(3 runs / 2 daemons)

        a.kill()  # kill -9 mid-run: the trainers keep writing
        killed_at = time.monotonic()
        b.wait_for(lambda ev: {e["run"] for e in ev if e["event"] == "run.lease_acquired"
                               and pid_of(e.get("taken_over_from", "")) == a.proc.pid} >= a_runs, 30,
                   "takeover of the killed daemon's runs")
        takeover_s = time.monotonic() - killed_at
        assert takeover_s < 3 + 0.5 + 5, f"takeover took {takeover_s:.1f}s (lease_ttl 3s + poll 0.5s)"

        saved = _finished(trainers)
        paths = {s["path"] for s in saved}
        b.wait_for(lambda ev: _done_in_ledger(pg_url) >= paths, 60, "every checkpoint processed")
    finally:
        for t in trainers:
            if t.poll() is None:
                t.kill()
        b.stop()
        if a.proc.poll() is None:
            a.kill()

    # each checkpoint was processed (and published) by exactly one daemon, once: at most one decision logged
    # (a daemon killed between its commit and its log line processed one without logging it), one ledger row each
    counts = _final_events(a, b)
    assert set(counts) <= paths
    assert max(counts.values()) == 1, {p: n for p, n in counts.items() if n > 1}
    assert _done_in_ledger(pg_url) == paths

    # status names the holder of each run: the surviving daemon (it released them at its clean stop)
    # the reference: one daemon, the default SQLite ledger, the same checkpoints
    ref_cfg = _config(tmp_path, "ref.yaml", ledger=None, state="state-ref")
    done = subprocess.run([PYTHON, "-m", "ckptd.cli", "once", "-c", str(ref_cfg)], capture_output=True,
                          text=True, env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in RUNS:
        manifest, best, average = _outputs(tmp_path / "out", run)
        ref_manifest, ref_best, ref_average = _outputs(tmp_path / "ref", run)
        assert [m["source"] for m in manifest["average"]["members"]] == \
            [m["source"] for m in ref_manifest["average"]["members"]]
        assert manifest["best"]["sha256"] == ref_manifest["best"]["sha256"]
        assert best.keys() == ref_best.keys() and all(torch.equal(best[k], ref_best[k]) for k in best)
        assert average.keys() == ref_average.keys() and all(torch.equal(average[k], ref_average[k]) for k in average)
