"""Queued exports of runs with an object-store output: host-independent workers, packages under versioned prefixes.

Real components: PostgreSQL (``tests/pg_server.py``), moto's S3 server (``tests/s3_server.py``), ``ckptd run`` and
``ckptd worker`` as subprocesses, each with its OWN ``state_dir`` (nothing local is shared: the worker sees only
the ledger, the queue and the bucket), real CoreML conversions. Fault injection, said so where used: a slow export
is the factory ``tests.export_fault_models:build_waiting_while`` (it waits while a marker file exists), so that a
worker can be killed with ``kill -9`` in the middle of it; the state a worker killed mid-upload leaves (a partial
prefix, its row ``running``) is staged by hand, since no signal can be timed to land there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from ckptd.examples import TinyConvNet
from ckptd.remote.object_outputs import (
    RemoteOutputError,
    Staged,
    StagedFile,
    plan_publication,
    read_manifest,
)
from ckptd.remote.urls import filesystem
from tests.daemon_helpers import TINY_COREML as COREML
from tests.daemon_helpers import DaemonProcess, WorkerProcess, atomic_save, make_run, write_config
from tests.s3_server import S3Endpoint
from tests.test_export_queue import _has, _rows

REPO = Path(__file__).resolve().parent.parent
V = "best-v{0:04d}-q{0}-a{2}-{1}.mlpackage"  # export id, sha256[:12], attempt


# --- the publication plan: a worker's package, and one it uploaded that no manifest names yet ------------------------
def _staged(version: str | None, url: str | None, sha: str = "m") -> Staged:
    best = StagedFile("best.safetensors", Path("/s/best.safetensors"), 10, "a" * 64)
    manifest: dict[str, Any] = {"best": {"path": best.name}, "top_k_members": [], "average": None}
    if version is not None:
        manifest["coreml"] = {"status": "ok", "path": url, "version": f"coreml/{version}"}
    return Staged(manifest, sha * 64, (best,), version, None, url)


def test_plan_names_a_workers_package_and_never_deletes_a_newer_one() -> None:
    v5, v7, v9 = V.format(5, "a" * 12, 0), V.format(7, "b" * 12, 0), V.format(9, "c" * 12, 1)
    listing = {f"objects/{'a' * 64}.safetensors": 10, f"coreml/{v5}/Manifest.json": 2,
               f"coreml/{v7}/Manifest.json": 2, f"coreml/{v7}/Data/model.mlmodel": 5,
               f"coreml/{v9}/Manifest.json": 2,  # a worker's upload, committed after this publication read the ledger
               "coreml/best-v0001-local.mlpackage/Manifest.json": 2}  # an old local export nobody names
    plan = plan_publication(_staged(v7, f"s3://b/out/run/coreml/{v7}"), listing, None)
    assert plan.manifest["coreml"]["path"] == f"coreml/{v7}"
    assert {f"coreml/{v7}/Manifest.json", f"coreml/{v7}/Data/model.mlmodel"} <= set(plan.manifest["objects"])
    assert not plan.uploads  # the worker uploaded it: never again
    assert set(plan.deletes) == {f"coreml/{v5}/Manifest.json", "coreml/best-v0001-local.mlpackage/Manifest.json"}
    # the next publication names v9; v7 (the previous manifest's) is kept one publication longer
    listing2 = {k: s for k, s in listing.items() if k not in plan.deletes}
    nxt = plan_publication(_staged(v9, f"s3://b/out/run/coreml/{v9}", "n"), listing2, plan.manifest)
    assert nxt.manifest["coreml"]["path"] == f"coreml/{v9}" and not nxt.deletes
    assert {f"coreml/{v7}/Manifest.json", f"coreml/{v7}/Data/model.mlmodel"} <= set(nxt.manifest["retained"])
    # a manifest without any package deletes no worker's package
    assert not plan_publication(_staged(None, None, "o"), listing2, None).deletes
    with pytest.raises(RemoteOutputError, match="not in the object store"):
        plan_publication(_staged(V.format(11, "d" * 12, 0), "s3://b/out/run/coreml/x"), listing, None)


# --- the worker's task against the real store: a retry after a kill mid-upload -------------------------------------
def _save(path: Path, seed: int, metric: float) -> None:
    torch.manual_seed(seed)
    atomic_save({"model_state_dict": TinyConvNet().state_dict(), "metric": metric, "iterations": seed}, path)


def _configs(tmp_path: Path, pg_url: str, bucket: str, coreml: dict[str, Any]) -> tuple[Path, Path]:
    """The daemon's config and the worker's: the same ledger and watch, each its own state_dir."""
    daemon = write_config(tmp_path, watch={"output": f"s3://{bucket}/out/{{watch}}/{{run}}",
                                           "retain_grace": "0s"},  # superseded objects: one publication longer
                          policy={"export": {"executor": "queue", "coreml": coreml}},
                          extra={"ledger": pg_url, "lease_ttl": "5s"})
    cfg = yaml.safe_load(daemon.read_text())
    cfg["state_dir"] = str(tmp_path / "worker-state")
    worker = tmp_path / "worker.yaml"
    worker.write_text(yaml.safe_dump(cfg))
    return daemon, worker


def _keys(fs: Any, base: str, prefix: str) -> list[str]:
    fs.invalidate_cache(f"{base}/{prefix}")
    try:
        return sorted(p[len(base) + 1:] for p in fs.find(f"{base}/{prefix}"))
    except FileNotFoundError:
        return []


def _prefixes(fs: Any, base: str) -> set[str]:
    return {k.split("/")[1] for k in _keys(fs, base, "coreml")}


def test_a_retry_after_a_kill_mid_upload_uploads_its_own_prefix_and_commits_once(
        s3: S3Endpoint, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection by hand: the state a worker killed while uploading leaves (part of the prefix, a stale
    file in it, its row ``running``); then a superseded request's late attempt, which must delete its prefix."""
    from ckptd.daemon.config import load_config
    from ckptd.daemon.ledger import Ledger
    from ckptd.daemon.logs import get_logger
    from ckptd.queue import store
    from ckptd.queue.app import ensure_schema
    from ckptd.queue.payload import Payload, input_key, remote_version
    from ckptd.queue.task import ExportTask

    bucket = s3.bucket()
    _, worker_config = _configs(tmp_path, pg_url, bucket, COREML)
    config = load_config(worker_config, check_paths=False)
    fs, base = filesystem(f"s3://{bucket}/out/w/exp")
    ensure_schema(pg_url)
    ledger = Ledger(pg_url, holder="daemon-host:1")
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(TinyConvNet().state_dict(), str(weights))
    request = {"factory": COREML["factory"], "factory_kwargs": COREML["factory_kwargs"],
               "inputs": [{"name": "image", "shape": [1, 3, 8, 8]}], "outputs": ["logits"], "precision": "float32"}

    def payload(export_id: int, sha: str) -> Payload:
        key = input_key(export_id, sha)
        fs.put_file(str(weights), f"{base}/{key}")
        return Payload(export_id=export_id, watch="w", run="exp", stream="model", policy="default",
                       output="/daemon/host/only", input="", source="a.pt", sha256=sha, metric=0.5, step=1,
                       request=request, timeout=120, keep=1, publish_partial=False, remote_input=key,
                       remote_base=f"s3://{bucket}/out/w/exp")

    sha = "a" * 64
    export_id = store.insert_queued(ledger, "w", "exp", "model", "a.pt", sha, 0.5, 1)
    p = payload(export_id, sha)
    assert store.claim(ledger, export_id, "worker@dead:1") == "claimed"
    killed = remote_version(export_id, sha, attempt=0)  # what the killed attempt left: part of its own prefix
    fs.pipe_file(f"{base}/coreml/{killed}/stale-from-the-killed-attempt", b"x")
    task = ExportTask(ledger, get_logger(), "worker@live:2", config)
    assert task.run(SimpleNamespace(id=1, attempts=1), p.to_args()) == "published"
    version = remote_version(export_id, sha, attempt=1)  # each attempt its own prefix: a zombie never mixes in
    assert killed not in _prefixes(fs, base)  # the committing attempt deleted the killed one's leftovers
    rows = _rows(pg_url)
    assert [(r[1], r[2], r[3]) for r in rows] == [("ok", "worker@live:2", f"s3://{bucket}/out/w/exp/coreml/{version}")]
    files = _keys(fs, base, f"coreml/{version}")
    assert f"coreml/{version}/Manifest.json" in files and not any("stale" in k for k in files)
    assert _keys(fs, base, "exports/inputs") == []  # the input is deleted once committed
    assert task.run(SimpleNamespace(id=1, attempts=2), p.to_args()) == "published"  # again: nothing new
    assert len(_rows(pg_url)) == 1 and _keys(fs, base, f"coreml/{version}") == files
    assert not [d for d in (tmp_path / "worker-state/worker-scratch").rglob("q*")]  # scratch removed

    # a request superseded while its export ran: the refused commit deletes what it uploaded
    old_sha, new_sha = "b" * 64, "c" * 64
    old = store.insert_queued(ledger, "w", "exp", "model", "b.pt", old_sha, 0.6, 2)
    p_old = payload(old, old_sha)
    assert store.claim(ledger, old, "worker@live:2") == "claimed"
    store.insert_queued(ledger, "w", "exp", "model", "c.pt", new_sha, 0.7, 3)  # arrives while it would run
    # FAULT INJECTION: skip the claim's newest check, as if the newer request arrived right after the claim
    with monkeypatch.context() as patched:
        patched.setattr(store, "claim", lambda *a, **k: "claimed")
        assert task.run(SimpleNamespace(id=2, attempts=0), p_old.to_args()) == "superseded"
    assert not [v for v in _prefixes(fs, base) if v.startswith(f"best-v{old:04d}-q{old}-")]
    assert f"exports/inputs/q{old}-{old_sha[:12]}.safetensors" not in _keys(fs, base, "exports/inputs")
    assert [r[1] for r in _rows(pg_url)] == ["ok", "superseded", "queued"]
    ledger.close()


# --- end to end -----------------------------------------------------------------------------------------------------
def _export_children(pid: int) -> list[int]:
    """The export children (``python -m ckptd.export.worker``) of process ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), -1)
        if ppid == pid and "ckptd.export.worker" in cmdline:
            found.append(int(entry.name))
    return found


def _dead(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status  # killed, not reaped yet by whoever inherited it


@pytest.mark.slow
def test_workers_on_other_hosts_publish_under_versioned_prefixes_once_even_after_a_kill(
        s3: S3Endpoint, pg_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "hold-export"
    coreml = {**COREML, "factory": "tests.export_fault_models:build_waiting_while",
              "factory_kwargs": {"marker": str(marker)}, "python_path": [str(REPO)]}
    bucket = s3.bucket()
    daemon_config, worker_config = _configs(tmp_path, pg_url, bucket, coreml)
    fs, base = filesystem(f"s3://{bucket}/out/w/exp")
    run = make_run(tmp_path)
    staging = tmp_path / "state/staging/w/exp"
    daemon = DaemonProcess(daemon_config, tmp_path / "daemon.log")
    workers: list[WorkerProcess] = []
    try:
        workers.append(WorkerProcess(worker_config, tmp_path / "worker1.log"))
        # 1. a new best, exported by a worker that sees nothing of the daemon's disk
        _save(run / "a.pt", 1, 0.5)
        daemon.wait_for(_has("export.published"), 90, "the first export published")
        first = _wait_manifest(fs, base, lambda m: (m.get("coreml") or {}).get("status") == "ok")
        (a_row,) = _rows(pg_url)
        v_a = V.format(a_row[0], first["coreml"]["sha256"][:12], 0)
        assert a_row[1] == "ok" and a_row[3] == f"s3://{bucket}/out/w/exp/coreml/{v_a}"
        assert first["coreml"]["path"] == f"coreml/{v_a}" and first["coreml"]["source"] == str(run / "a.pt")
        assert f"coreml/{v_a}/Manifest.json" in first["objects"]
        assert all(fs.exists(f"{base}/{k}") for k in first["objects"])
        assert _keys(fs, base, "exports/inputs") == []
        assert not (staging / "best.mlpackage").exists() and not (staging / "coreml").exists()  # no local package
        # 2. the next best's export is held (fault injection); its worker is killed with kill -9 mid-export
        marker.touch()
        _save(run / "b.pt", 2, 0.9)
        workers[0].wait_for(_has("export.started", 2), 60, "the second export started")
        time.sleep(0.5)
        children = _export_children(workers[0].proc.pid)
        assert len(children) == 1, children
        workers[0].kill()
        deadline = time.monotonic() + 10
        while not _dead(children[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _dead(children[0]), "the killed worker's export child is still running (PR_SET_PDEATHSIG)"
        marker.unlink()
        workers.append(WorkerProcess(worker_config, tmp_path / "worker2.log"))
        workers[1].wait_for(_has("export.published"), 90, "the retried export published")
        second = _wait_manifest(fs, base, lambda m: (m.get("coreml") or {}).get("source") == str(run / "b.pt"))
        # 3. a checkpoint that is not a new best: one more publication, which drops what the previous one kept
        _save(run / "c.pt", 3, 0.1)
        daemon.wait_for(daemon.processed(run / "c.pt"), 30, "c.pt")
        third = _wait_manifest(fs, base, lambda m: (m.get("last") or {}).get("source") == str(run / "c.pt"))
    finally:
        marker.unlink(missing_ok=True)
        codes = [w.stop() for w in workers[1:]]
        assert daemon.stop() == 0 and codes == [0]
    rows = _rows(pg_url)
    assert [r[1] for r in rows] == ["ok", "ok"] and rows[1][2] == workers[1].events()[0]["worker"]
    v_b = V.format(rows[1][0], second["coreml"]["sha256"][:12], 1)  # the retry after the kill
    assert rows[1][3] == f"s3://{bucket}/out/w/exp/coreml/{v_b}"
    assert second["coreml"]["path"] == third["coreml"]["path"] == f"coreml/{v_b}"
    assert second["coreml"]["status"] == "ok" and second["coreml"]["verification"]["package_run"] == "ok"
    assert _prefixes(fs, base) == {v_b}  # exactly one package in the bucket once the manifest moved on
    assert _keys(fs, base, "exports/inputs") == []
    assert all(fs.exists(f"{base}/{k}") for k in third["objects"])
    started = [e["attempt"] for w in workers for e in w.events() if e["event"] == "export.started"
               and e["checkpoint"] == str(run / "b.pt")]
    assert started == [1, 2]  # one job, retried once after the kill: never a second job nor a second row
    assert sum(e["event"] == "export.published" for w in workers for e in w.events()) == 2
    assert sum(e["event"] == "export.published" for e in daemon.events()) == 2
    assert not list((tmp_path / "worker-state/worker-scratch").iterdir())  # the killed worker's too
    local = json.loads((staging / "manifest.json").read_text())
    assert local["coreml"]["path"] == rows[1][3]  # the local manifest names the URL: no link to follow
    assert not any(e["event"] in ("outputs.remote_failed", "export.note_failed") for e in daemon.events())


def _wait_manifest(fs: Any, base: str, predicate: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fs.invalidate_cache(base)
        manifest = read_manifest(fs, base)
        if manifest is not None and predicate(manifest):
            return manifest
        time.sleep(0.1)
    raise AssertionError(f"the remote manifest under {base} never matched: {read_manifest(fs, base)}")


def test_pdeathsig_is_only_asked_for_by_an_export_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside an export child (no parent pid in the environment) nothing is set: ckptd's own processes never
    die with their parent."""
    from ckptd.export.runner import PARENT_ENV, die_with_parent

    monkeypatch.delenv(PARENT_ENV, raising=False)
    assert die_with_parent() is False
