"""Beyond one host, end to end: two daemons and export workers against one PostgreSQL ledger and one S3 store.

A writer uploads the checkpoints of several runs to S3 while two ``ckptd run`` processes (each with its own
state_dir: nothing local is shared) share the runs under leases and publish to S3; a ``ckptd worker`` exports each
new best from the queue. One daemon is killed with kill -9 mid-run and the first worker is killed with kill -9
mid-export (the export is held by a marker file: fault injection); a second worker takes over. The outputs in S3
must equal a single-host reference run's (tensors bitwise, manifest members and best), each checkpoint processed
once, each package published once.

Real parts only: a PostgreSQL server, moto's S3 in server mode, `ckptd run` / `ckptd worker` subprocesses,
real torch.save checkpoints from a real (tiny) training run, real CoreML conversions, kill -9.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from tests.conftest import PYTHON, REPO, subprocess_env
from tests.daemon_helpers import TINY_COREML as COREML
from tests.daemon_helpers import DaemonProcess, WorkerProcess
from tests.s3_server import S3Endpoint

pytestmark = pytest.mark.slow

RUNS = ("r0", "r1", "r2")
EPOCHS = 5
FINAL = {"checkpoint.joined", "checkpoint.skipped", "checkpoint.duplicate", "checkpoint.unranked"}


def _train(local: Path) -> list[dict[str, Any]]:
    """The real tiny training run, once per run, written locally first (uploaded later by the writer)."""
    script = Path(__file__).resolve().parent / "trainer_script.py"
    procs = [subprocess.Popen([PYTHON, str(script), str(local / run), str(EPOCHS), "--pause", "0"],
                              stdout=subprocess.PIPE, text=True, env=subprocess_env()) for run in RUNS]
    saved = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        saved += [json.loads(line) for line in out.splitlines()]
    return saved


def _config(tmp_path: Path, name: str, *, bucket: str, pg_url: str | None, marker: Path | None) -> Path:
    policy: dict[str, Any] = {"average": {"top_k": 3}}
    if marker is not None:
        policy["export"] = {"executor": "queue", "coreml": {
            **COREML, "factory": "tests.export_fault_models:build_waiting_while",
            "factory_kwargs": {"marker": str(marker)}, "python_path": [str(REPO)]}}
    remote = pg_url is not None
    cfg: dict[str, Any] = {
        "state_dir": str(tmp_path / f"state-{name}"),
        "log": {"format": "json", "level": "info"},
        "rescan_interval": "2s", "shutdown_deadline": "10s", "lease_ttl": "3s",
        "watches": [{"name": "w", "runs": "*", "settle": "0.5s",
                     "root": f"s3://{bucket}/runs" if remote else str(tmp_path / "local"),
                     "output": f"s3://{bucket}/out/{{run}}" if remote else str(tmp_path / "ref/{run}"),
                     **({"poll_interval": "0.5s"} if remote else {"mode": "poll"})}],
        "policies": {"default": policy},
    }
    if pg_url:
        cfg["ledger"] = pg_url
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Writer(threading.Thread):
    """Uploads the checkpoints of every run, interleaved, one every ``pause`` seconds (a PUT is atomic)."""

    def __init__(self, s3: S3Endpoint, bucket: str, saved: list[dict[str, Any]], local: Path, pause: float) -> None:
        super().__init__(daemon=True)
        self.client, self.bucket, self.pause = s3.client(), bucket, pause
        self.files = sorted((Path(s["path"]) for s in saved), key=lambda p: (int(p.stem.rsplit("_", 1)[1]),
                                                                             p.parent.name))
        self.local = local
        self.uploaded = 0

    def run(self) -> None:
        for path in self.files:
            key = f"runs/{path.relative_to(self.local).as_posix()}"
            self.client.put_object(Bucket=self.bucket, Key=key, Body=path.read_bytes())
            self.uploaded += 1
            time.sleep(self.pause)


def _final_events(*procs: Any) -> Counter[str]:
    return Counter(e["checkpoint"] for p in procs for e in p.events() if e["event"] in FINAL)


def _done_in_ledger(pg_url: str) -> set[str]:
    """Checkpoints the shared ledger records as processed (a daemon killed between its commit and its log line
    processed one without logging it: the ledger is the truth)."""
    import psycopg

    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT path FROM checkpoints WHERE stream='model' AND status IN "
                            "('done','duplicate','unranked','skipped')").fetchall()
    return {r[0] for r in rows}


def _remote(s3: S3Endpoint, bucket: str, key: str) -> bytes:
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def test_two_daemons_and_workers_on_postgresql_and_s3_equal_a_single_host_run(
        tmp_path: Path, pg_url: str, s3: S3Endpoint) -> None:
    bucket = s3.bucket()
    local = tmp_path / "local"
    saved = _train(local)
    marker = tmp_path / "hold-export"
    marker.touch()
    a_cfg = _config(tmp_path, "a", bucket=bucket, pg_url=pg_url, marker=marker)
    b_cfg = _config(tmp_path, "b", bucket=bucket, pg_url=pg_url, marker=marker)
    w_cfg = _config(tmp_path, "w", bucket=bucket, pg_url=pg_url, marker=marker)
    a = DaemonProcess(a_cfg, tmp_path / "a.log")
    b = DaemonProcess(b_cfg, tmp_path / "b.log")
    w1 = WorkerProcess(w_cfg, tmp_path / "w1.log")
    writer = Writer(s3, bucket, saved, local, pause=0.4)
    w2 = None
    try:
        writer.start()
        w1.wait_for(lambda ev: any(e["event"] == "export.started" for e in ev), 90, "the first export started")
        w1.kill()  # kill -9 mid-export (held by the marker)
        a.wait_for(lambda ev: any(e["event"] == "checkpoint.joined" for e in ev), 60, "daemon a published")
        a_held = {e["run"] for e in a.events() if e["event"] == "run.lease_acquired"}
        a.kill()  # kill -9 mid-run: the writer keeps uploading
        marker.unlink()
        w2 = WorkerProcess(w_cfg, tmp_path / "w2.log")
        writer.join(timeout=120)
        assert writer.uploaded == len(saved)
        paths = {f"s3://{bucket}/runs/{Path(s['path']).relative_to(local).as_posix()}" for s in saved}
        b.wait_for(lambda ev: _done_in_ledger(pg_url) >= paths, 120, "every checkpoint processed")
        assert a_held, "daemon a held runs before it was killed"
        assert {e["run"] for e in b.events() if e["event"] == "run.lease_acquired"} >= a_held

        def exported(run: str) -> bool:
            try:
                manifest = json.loads(_remote(s3, bucket, f"out/{run}/manifest.json"))
            except Exception:  # noqa: BLE001 (not there yet)
                return False
            coreml = manifest.get("coreml") or {}
            return coreml.get("status") == "ok" and coreml.get("sha256") == manifest["best"]["sha256"]

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(exported(r) for r in RUNS):
            time.sleep(0.5)
        assert all(exported(r) for r in RUNS), "every run's best exported and named by its manifest"
    finally:
        marker.unlink(missing_ok=True)
        code_b = b.stop()
        code_w = w2.stop() if w2 else 0
        if a.proc.poll() is None:
            a.kill()
        if w1.proc.poll() is None:
            w1.kill()
    assert code_b == 0 and code_w == 0

    # each checkpoint processed once (by one daemon; at most one decision logged), and recorded once in the ledger
    counts = _final_events(a, b)
    assert max(counts.values()) == 1, {p: n for p, n in counts.items() if n > 1}
    assert _done_in_ledger(pg_url) == paths
    import psycopg

    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT path, count(*) FROM checkpoints WHERE stream='model' GROUP BY path").fetchall()
        ok = conn.execute("SELECT run, id, path FROM exports WHERE status='ok' ORDER BY id").fetchall()
    assert len(rows) == len(saved) and all(n == 1 for _, n in rows)
    # each package published once: one worker publication per ok row, under its own versioned prefix
    published = [e for w in (w1, w2) if w for e in w.events() if e["event"] == "export.published"]
    assert sorted(e["export_id"] for e in published) == sorted(r[1] for r in ok)
    for run in RUNS:
        manifest = json.loads(_remote(s3, bucket, f"out/{run}/manifest.json"))
        prefix = manifest["coreml"]["path"]
        assert prefix.startswith("coreml/")
        listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"out/{run}/{prefix}/")
        assert any(o["Key"].endswith("Manifest.json") for o in listed.get("Contents", []))

    # the single-host reference: one daemon, SQLite, the same checkpoints on a local root
    ref_cfg = _config(tmp_path, "ref", bucket=bucket, pg_url=None, marker=None)
    done = subprocess.run([PYTHON, "-m", "ckptd.cli", "once", "-c", str(ref_cfg)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in RUNS:
        manifest = json.loads(_remote(s3, bucket, f"out/{run}/manifest.json"))
        ref = json.loads((tmp_path / "ref" / run / "manifest.json").read_text())
        assert manifest["best"]["sha256"] == ref["best"]["sha256"]
        assert [(m["sha256"], m["metric"]) for m in manifest["average"]["members"]] == \
            [(m["sha256"], m["metric"]) for m in ref["average"]["members"]]
        for name in ("best.safetensors", "average.safetensors"):
            got = load_safetensors(_remote(s3, bucket, f"out/{run}/{manifest['files'][name]}"))
            want = load_file(tmp_path / "ref" / run / name)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), (run, name)
