"""CoreML exports on the procrastinate queue (``export.executor: queue``) with ``ckptd worker``, on a real PostgreSQL.

Real components: the PostgreSQL server of ``tests/pg_server.py``, the real daemon and workers as subprocesses, real
CoreML conversions. Fault injection, said so where used: a slow export is the factory
``tests.export_fault_models:build_waiting_while`` (it waits while a marker file exists); a worker killed between
moving its package into place and its ledger commit is staged by hand (the ledger row and version directory that
such a kill leaves), since no signal can be timed to land there.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.examples import TinyConvNet
from tests.conftest import PYTHON, subprocess_env
from tests.daemon_helpers import TINY_COREML as COREML
from tests.daemon_helpers import DaemonProcess, WorkerProcess, atomic_save, make_run, write_config

REPO = Path(__file__).resolve().parent.parent


def _save(path: Path, seed: int, metric: float) -> None:
    torch.manual_seed(seed)
    atomic_save({"model_state_dict": TinyConvNet().state_dict(), "metric": metric, "iterations": seed}, path)


def _has(event: str, n: int = 1, **match: Any) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda ev: sum(e["event"] == event and all(e.get(k) == v for k, v in match.items()) for e in ev) >= n


def _rows(pg_url: str, run: str = "exp") -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT id, status, holder, path FROM exports WHERE run=%s ORDER BY id", (run,)).fetchall()


def _versions(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "coreml").iterdir() if p.name.startswith("best-v"))


def _queue_config(tmp_path: Path, pg_url: str, coreml: dict[str, Any]) -> Path:
    return write_config(tmp_path, policy={"export": {"executor": "queue", "coreml": coreml}},
                        extra={"ledger": pg_url, "lease_ttl": "5s"})


# --- the ledger side: conditioned updates (no subprocesses) ---------------------------------------------------


def test_claim_and_publish_are_conditioned_on_the_newest_request(pg_url: str, tmp_path: Path) -> None:
    from ckptd.daemon.ledger import Ledger
    from ckptd.queue import store

    ledger = Ledger(pg_url, holder="daemon-host:1")
    old = store.insert_queued(ledger, "w", "r", "model", "a.pt", "a" * 64, 0.5, 1)
    assert store.claim(ledger, old, "worker@h:1") == "claimed"
    new = store.insert_queued(ledger, "w", "r", "model", "b.pt", "b" * 64, 0.9, 2)
    switched: list[str] = []
    # the older export finished after the newer request arrived: it must not switch best.mlpackage
    assert store.publish(ledger, old, "worker@h:1", "ok", lambda: switched.append("old") or tmp_path) is None
    assert store.mark_superseded(ledger, old, "worker@h:1", "newer request")
    assert store.claim(ledger, old, "worker@h:2") == "dropped"  # a retry of it does nothing either
    assert store.claim(ledger, new, "worker@h:1") == "claimed"
    assert store.claim(ledger, new, "worker@h:2") == "claimed"  # the job retried after worker h:1 died
    assert store.publish(ledger, new, "worker@h:1", "ok", lambda: switched.append("zombie") or tmp_path) is None
    assert store.publish(ledger, new, "worker@h:2", "ok", lambda: switched.append("new") or tmp_path) == tmp_path
    assert store.publish(ledger, new, "worker@h:2", "ok", lambda: switched.append("twice") or tmp_path) is None
    assert store.claim(ledger, new, "worker@h:3") == "published"
    assert switched == ["new"]
    assert [(r[1], r[2]) for r in _rows(pg_url, "r")] == [("superseded", "worker@h:1"), ("ok", "worker@h:2")]
    # a daemon starting up never marks a worker's running row abandoned (its holder is no daemon's host:pid)
    third = store.insert_queued(ledger, "w", "r", "model", "c.pt", "c" * 64, 1.0, 3)
    assert store.claim(ledger, third, f"worker@{os.uname().nodename}:{os.getpid() + 10**6}") == "claimed"
    assert ledger.abandon_running_exports("test") == 0
    ledger.close()


def test_retry_after_a_kill_between_move_and_commit_publishes_that_package_once(pg_url: str, tmp_path: Path) -> None:
    """Fault injection by hand: the state a worker leaves when killed after ``publish_package`` moved the package
    into its version directory and switched the link, before the ledger commit."""
    from types import SimpleNamespace

    from ckptd.daemon.ledger import Ledger
    from ckptd.daemon.logs import get_logger
    from ckptd.queue import store
    from ckptd.queue.app import ensure_schema
    from ckptd.queue.payload import Payload, version_label
    from ckptd.queue.task import ExportTask

    assert ensure_schema(pg_url) and not ensure_schema(pg_url)  # created once, then left alone
    ledger = Ledger(pg_url, holder="daemon-host:1")
    out = tmp_path / "out"
    (out / ".exports/inputs").mkdir(parents=True)
    link_input = out / ".exports/inputs/x.safetensors"
    link_input.write_bytes(b"weights")
    export_id = store.insert_queued(ledger, "w", "r", "model", "a.pt", "a" * 64, 0.5, 1)
    assert store.claim(ledger, export_id, "worker@dead:1") == "claimed"
    version = out / "coreml" / f"best-v0001-{version_label(export_id, 'a' * 64)}.mlpackage"
    (version / "Data").mkdir(parents=True)
    (version / "Manifest.json").write_text("{}")
    (out / "best.mlpackage").symlink_to(os.path.relpath(version, out))
    payload = Payload(export_id=export_id, watch="w", run="r", stream="model", policy="default", output=str(out),
                      input=str(link_input), source="a.pt", sha256="a" * 64, metric=0.5, step=1,
                      request={"factory": "no_such:factory"}, timeout=60, keep=1, publish_partial=False)
    task = ExportTask(ledger, get_logger(), "worker@live:2")
    result = task.run(SimpleNamespace(id=1, attempts=1), payload.to_args())  # the factory would fail: not called
    assert result == "published"
    assert [(r[1], r[2], r[3]) for r in _rows(pg_url, "r")] == [("ok", "worker@live:2", str(version))]
    assert _versions(out) == [version.name] and os.path.realpath(out / "best.mlpackage") == str(version)
    assert not link_input.exists()  # the job's input is released once published
    assert task.run(SimpleNamespace(id=1, attempts=2), payload.to_args()) == "published"  # again: nothing new
    assert _versions(out) == [version.name] and len(_rows(pg_url, "r")) == 1
    ledger.close()


def test_a_failed_attempt_is_recorded_and_retried_with_the_ledgers_backoff(pg_url: str, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ckptd.daemon.ledger import Ledger
    from ckptd.daemon.logs import get_logger
    from ckptd.queue import store
    from ckptd.queue.app import AttemptFailed, WorkerStopping, ensure_schema, retry_strategy
    from ckptd.queue.payload import Payload
    from ckptd.queue.task import ExportTask

    strategy = retry_strategy()

    def decide(exc: BaseException, attempts: int) -> Any:
        return strategy.get_retry_decision(exception=exc, job=SimpleNamespace(attempts=attempts))

    now = time.time()
    assert [round(decide(AttemptFailed("x", retry=True), n).retry_at.timestamp() - now) for n in (0, 1, 2)] == \
        [30, 120, 600]
    assert decide(AttemptFailed("x", retry=True), 3) is None and decide(AttemptFailed("x", retry=False), 0) is None
    assert round(decide(WorkerStopping(), 5).retry_at.timestamp() - now) == 0  # a stopping worker: back at once

    ensure_schema(pg_url)
    ledger = Ledger(pg_url, holder="daemon-host:1")
    out = tmp_path / "out"
    (out / ".exports/inputs").mkdir(parents=True)
    link_input = out / ".exports/inputs/x.safetensors"
    link_input.write_bytes(b"not even weights")
    export_id = store.insert_queued(ledger, "w", "r", "model", "a.pt", "a" * 64, 0.5, 1)
    request = {"factory": "no_such_module:build", "inputs": [{"name": "image", "shape": [1, 3, 8, 8]}]}
    payload = Payload(export_id=export_id, watch="w", run="r", stream="model", policy="default", output=str(out),
                      input=str(link_input), source="a.pt", sha256="a" * 64, metric=0.5, step=1, request=request,
                      timeout=60, keep=1, publish_partial=False)
    with pytest.raises(AttemptFailed) as failed:
        ExportTask(ledger, get_logger(), "worker@h:1").run(SimpleNamespace(id=1, attempts=0), payload.to_args())
    assert failed.value.retry and "no_such_module" in str(failed.value)
    assert [r[1] for r in _rows(pg_url, "r")] == ["failed"] and link_input.exists()  # kept for the retry
    assert store.claim(ledger, export_id, "worker@h:2") == "claimed"  # the retry takes the row over
    ledger.close()


def test_queue_needs_a_postgresql_ledger(tmp_path: Path) -> None:
    from ckptd.daemon.config import load_config
    from ckptd.errors import ConfigError

    config = write_config(tmp_path, policy={"export": {"executor": "queue", "capability": "macos", "coreml": COREML}})
    with pytest.raises(ConfigError, match=r"policies.default.export.executor: queue needs a PostgreSQL ledger"):
        load_config(config)
    done = subprocess.run([PYTHON, "-m", "ckptd.cli", "worker", "-c", str(config)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)
    assert done.returncode == 2 and "queue needs a PostgreSQL ledger" in done.stderr


# --- end to end: daemon + workers as subprocesses ---------------------------------------------------------------


@pytest.mark.slow
def test_daemon_queues_worker_exports_newest_only_and_capabilities_route(pg_url: str, tmp_path: Path) -> None:
    config = _queue_config(tmp_path, pg_url, COREML)
    run = make_run(tmp_path)
    out = tmp_path / "out/w/exp"
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    workers: list[WorkerProcess] = []
    try:
        _save(run / "a.pt", 1, 0.5)
        daemon.wait_for(_has("export.queued"), 60, "first request queued")
        _save(run / "b.pt", 2, 0.9)  # a new best before any worker ran the first: only this one is exported
        daemon.wait_for(_has("export.queued", 2), 60, "second request queued")
        daemon.wait_for(_has("export.superseded"), 10, "the first request cancelled")
        # a macOS worker takes only macOS jobs: not this one, but a macOS job of another run (superseded: cheap)
        macos_job = _defer_superseded_macos_job(pg_url, tmp_path)
        workers.append(WorkerProcess(config, tmp_path / "worker-macos.log", "--capability", "macos"))
        workers[-1].wait_for(_has("export.superseded", export_id=macos_job), 30, "the macOS job")
        time.sleep(1.5)
        assert not _has("export.started")(workers[-1].events())
        assert workers[-1].stop() == 0  # SIGTERM: a clean stop
        workers.append(WorkerProcess(config, tmp_path / "worker.log"))
        daemon.wait_for(_has("export.published"), 120, "the export published by the worker")
        time.sleep(1)
    finally:
        codes = [w.stop() for w in workers]
        assert daemon.stop() == 0 and codes == [0, 0]
    rows = _rows(pg_url)
    assert [r[1] for r in rows] == ["superseded", "ok"] and rows[1][2].startswith("worker@")
    started = [e for e in workers[1].events() if e["event"] == "export.started"]
    assert [e["checkpoint"] for e in started] == [str(run / "b.pt")]
    assert _versions(out) == [Path(rows[1][3]).name] and f"-q{rows[1][0]}-" in rows[1][3]
    assert (out / "best.mlpackage/Manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["coreml"]["status"] == "ok" and manifest["coreml"]["source"] == str(run / "b.pt")
    assert manifest["coreml"]["verification"]["package_run"] == "ok"
    assert not list((out / ".exports/inputs").iterdir())  # both jobs' inputs released
    assert not [p for p in (out / "coreml").iterdir() if p.name.startswith(".ckptd-tmp-")]


def _defer_superseded_macos_job(pg_url: str, tmp_path: Path) -> int:
    """A job on the macOS queue whose request is already superseded: a worker claims it and drops it at once."""
    from ckptd.daemon.ledger import Ledger
    from ckptd.queue import store
    from ckptd.queue.app import TASK, ensure_schema, make_app, queue_name, queueing_lock, run_key

    ensure_schema(pg_url)
    ledger = Ledger(pg_url, holder="test:1")
    export_id = store.insert_queued(ledger, "w", "other", "model", "x.pt", "x" * 64, 0.1, 1)
    store.insert_queued(ledger, "w", "other", "model", "y.pt", "y" * 64, 0.2, 2)
    ledger.close()
    app = make_app(pg_url)
    with app.open():
        key = run_key("w", "other", "model")
        app.configure_task(TASK, lock=key, queueing_lock=queueing_lock(key), queue=queue_name("macos")).defer(
            export_id=export_id, watch="w", run="other", stream="model", policy="default",
            output=str(tmp_path / "out/w/other"), input=str(tmp_path / "nothing"), source="x.pt", sha256="x" * 64,
            metric=0.1, step=1, request={}, timeout=60.0, keep=1, publish_partial=False)
    return export_id


@pytest.mark.slow
def test_worker_killed_mid_export_is_retried_and_published_once(pg_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "hold-export"
    marker.touch()
    coreml = {**COREML, "factory": "tests.export_fault_models:build_waiting_while",
              "factory_kwargs": {"marker": str(marker)}, "python_path": [str(REPO)]}
    config = _queue_config(tmp_path, pg_url, coreml)
    run = make_run(tmp_path)
    out = tmp_path / "out/w/exp"
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    last: WorkerProcess | None = None
    try:
        first = WorkerProcess(config, tmp_path / "worker1.log")
        _save(run / "a.pt", 1, 0.5)
        first.wait_for(_has("export.started"), 60, "the export started")
        time.sleep(0.5)
        first.kill()  # kill -9 mid-export (the export waits on the marker: fault injection)
        assert [r[1] for r in _rows(pg_url)] == ["running"]
        second = WorkerProcess(config, tmp_path / "worker2.log")
        second.wait_for(_has("export.stalled_job_retried"), 30, "the dead worker's job retried")
        second.wait_for(_has("export.started"), 30, "the retried export started")
        assert second.stop() == 0  # SIGTERM mid-export: a clean stop, the job goes back to the queue
        assert _has("export.requeued")(second.events()) and [r[1] for r in _rows(pg_url)] == ["queued"]
        marker.unlink()
        last = WorkerProcess(config, tmp_path / "worker3.log")
        daemon.wait_for(_has("export.published"), 120, "the retried export published")
        time.sleep(1)
    finally:
        marker.unlink(missing_ok=True)
        code = last.stop() if last else 0
        assert daemon.stop() == 0 and code == 0
    rows = _rows(pg_url)
    assert [r[1] for r in rows] == ["ok"] and rows[0][2] == last.events()[0]["worker"]
    assert _versions(out) == [Path(rows[0][3]).name]
    assert sum(e["event"] == "export.published" for e in daemon.events()) == 1
    assert sum(e["event"] == "export.published" for e in last.events()) == 1
    started = [e["attempt"] for e in [*first.events(), *second.events(), *last.events()] if e["event"] ==
               "export.started"]
    assert started == [1, 2, 3]  # one job, retried twice: never a second job nor a second row
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["coreml"]["status"] == "ok" and (out / "best.mlpackage/Manifest.json").is_file()


def test_worker_command_and_unit() -> None:
    """The systemd unit's command line parses (``ckptd worker --help`` lists its options)."""
    done = subprocess.run([PYTHON, "-m", "ckptd.cli", "worker", "--help"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)
    assert done.returncode == 0 and "--capability" in done.stdout and "--concurrency" in done.stdout
    unit = (REPO / "systemd/ckptd-worker.service").read_text()
    assert "ExecStart=/usr/local/bin/ckptd worker -c /etc/ckptd/config.yaml" in unit
