"""Object-store watches list on threads of their own: the daemon's loop thread only takes what a listing found.

Real components: moto's S3 and SQS server on 127.0.0.1 (``tests/s3_server.py``), real bucket notifications, the
real daemon (its discovery in-process; ``run_once`` for the ledger). The one fake is an injected fault: a listing
that hangs until the test lets it go (``ObjectMirror.list`` wrapped), standing in for a prefix with 10,000s of
objects or a slow store.
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.daemon.config import load_config
from ckptd.remote.mirror import MirrorChange, ObjectMirror, lookup
from ckptd.remote.roots import RemoteRoots, merge
from tests.daemon_helpers import write_config
from tests.s3_server import S3Endpoint


def _checkpoint(seed: int, metric: float) -> bytes:
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"model_state_dict": torch.nn.Linear(64, 64).state_dict(), "metric": metric, "iterations": seed}, buf)
    return buf.getvalue()


class Gate:
    """FAULT INJECTION: every listing of the mirror waits here until the test opens the gate (a slow listing)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.listings = 0
        real = ObjectMirror.list

        def slow_list(mirror: ObjectMirror) -> Any:
            self.listings += 1
            self.entered.set()
            self.open.wait(30)
            return real(mirror)

        monkeypatch.setattr(ObjectMirror, "list", slow_list)

    def hold(self) -> None:
        self.open.clear()
        self.entered.clear()


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def daemon_factory() -> Iterator[Any]:
    made: list[Any] = []

    def make(config: Path) -> Any:
        from ckptd.daemon.service import Daemon

        daemon = Daemon(load_config(config), config)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.remote.stop()
        daemon._pool.shutdown(wait=True)
        daemon.ledger.close()


def test_the_loop_stays_responsive_while_a_slow_listing_runs(s3: S3Endpoint, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             daemon_factory: Any) -> None:
    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="runs/exp/epoch1.pt", Body=_checkpoint(1, 0.3))
    config = write_config(tmp_path, watch={"root": f"s3://{bucket}/runs", "mode": "poll", "poll_interval": "60s"})
    gate = Gate(monkeypatch)
    daemon = daemon_factory(config)
    daemon.remote.setup(daemon.config.watches, daemon.log, hints=False)
    assert gate.entered.wait(10)  # the first listing started at once, on the watch's thread
    daemon._rediscover = False
    started = time.monotonic()
    daemon._discover()  # the listing hangs: discovery does not wait for it
    assert time.monotonic() - started < 0.1
    assert not daemon.runs and not daemon.remote.available(daemon.config.watches[0])  # nothing known yet
    gate.open.set()
    _wait(lambda: daemon._rediscover, 10, "the listing thread to wake the loop")
    daemon._discover()
    ((key, state),) = daemon.runs.items()
    run_dir = daemon.config.watches[0].root / "exp"
    assert key == ("w", run_dir) and state.dirty
    assert run_dir / "epoch1.pt" in state.tracker._moved_in  # a listed object is committed (PUT is atomic)
    assert (run_dir / "epoch1.pt").is_file()  # written by the listing thread (small: downloaded whole)
    # a second listing, slow again: discovery keeps answering; the change is applied once the listing completes
    gate.hold()
    s3.client().put_object(Bucket=bucket, Key="runs/exp/epoch2.pt", Body=_checkpoint(2, 0.4))
    state.dirty = False
    daemon._rediscover = False
    daemon.remote._listers["w"].trigger()
    assert gate.entered.wait(10)
    timings = []
    for _ in range(5):
        started = time.monotonic()
        daemon._discover()
        timings.append(time.monotonic() - started)
    assert max(timings) < 0.1, timings
    assert not state.dirty and run_dir / "epoch2.pt" not in state.tracker._moved_in
    gate.open.set()
    _wait(lambda: daemon._rediscover, 10, "the second listing to wake the loop")
    daemon._discover()
    assert daemon.runs[key] is state and state.dirty and run_dir / "epoch2.pt" in state.tracker._moved_in
    samples = {s.name: s.value for m in daemon.metrics.registry.collect() for s in m.samples
               if s.labels.get("watch") == "w" and s.name.startswith("ckptd_listing")}
    assert samples["ckptd_listing_objects"] == 2 and samples["ckptd_listing_seconds_count"] == 2
    assert samples["ckptd_listing_seconds_sum"] > 0


def test_a_hint_triggers_a_listing_at_once(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    queue = s3.queue_with_notifications(bucket)
    config = write_config(tmp_path, watch={"root": f"s3://{bucket}/runs", "mode": "poll", "poll_interval": "60s",
                                           "events": {"sqs": queue}})
    watch = load_config(config).watches[0]
    listed: list[MirrorChange] = []
    woken: list[str] = []
    roots = RemoteRoots(woken.append, on_listed=lambda name, change: listed.append(change))
    log = _Log()
    try:
        roots.setup([watch], log)
        _wait(lambda: woken, 10, "the first listing")  # the first listing works: news (the watch is available)
        assert len(listed) == 1 and not listed[0] and roots.available(watch)
        started = time.monotonic()
        s3.client().put_object(Bucket=bucket, Key="runs/exp/a.pt", Body=_checkpoint(1, 0.5))
        _wait(lambda: len(woken) > 1, 12, "a listing after the notification")  # poll_interval is 60 s
        elapsed = time.monotonic() - started
        assert elapsed < 10, elapsed
        change = roots.take(watch, log)
        assert change is not None and change.changed == (watch.root / "exp/a.pt",)
        assert roots.take(watch, log) == MirrorChange()  # taken: nothing pending any more
        assert woken[-1] == f"s3://{bucket}/runs"
    finally:
        started = time.monotonic()
        roots.stop()
        assert time.monotonic() - started < 2  # the SQS long poll and the listing thread are not waited for


def test_stop_and_reload_return_promptly_and_a_late_listing_hands_over_nothing(
        s3: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="runs/exp/a.pt", Body=b"x" * (2 << 20))
    config = write_config(tmp_path, watch={"root": f"s3://{bucket}/runs", "mode": "poll", "poll_interval": "60s"})
    watch = load_config(config).watches[0]
    gate = Gate(monkeypatch)
    listed: list[str] = []
    woken: list[str] = []
    roots = RemoteRoots(woken.append, on_listed=lambda name, change: listed.append(name))
    log = _Log()
    roots.setup([watch], log)
    assert gate.entered.wait(10)
    lister = roots._listers["w"]
    started = time.monotonic()
    roots.stop()  # a listing is in flight (hung): stop does not wait for it
    assert time.monotonic() - started < 0.5
    gate.open.set()
    _wait(lambda: not lister._thread.is_alive(), 10, "the listing thread to end")
    assert not listed and not woken and lister.take() is None  # nothing handed over after stop
    # a reload that drops the watch while its listing hangs: returns at once; the stubs are forgotten after
    gate.open.set()
    roots = RemoteRoots(woken.append, on_listed=lambda name, change: listed.append(name))
    roots.setup([watch], log, hints=False)
    _wait(lambda: woken, 10, "a listing")
    stub = watch.root / "exp/a.pt"
    assert lookup(stub) is not None
    gate.hold()
    roots._listers["w"].trigger()
    assert gate.entered.wait(10)
    started = time.monotonic()
    roots.setup([], log)
    assert time.monotonic() - started < 0.5 and not roots._listers
    gate.open.set()
    _wait(lambda: lookup(stub) is None, 10, "the dropped watch's stubs to be forgotten")
    roots.stop()


def test_a_small_object_new_since_the_last_listing_is_fetched(s3: S3Endpoint, tmp_path: Path) -> None:
    """Regression: the filesystem's cached listing of a sub-folder made the fetch of a small object that is new
    since the previous listing fail ("not found") at every refresh."""
    from types import SimpleNamespace

    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="runs/exp/a.json", Body=b'{"metric": 1}')
    watch = SimpleNamespace(name="w", root=tmp_path / "state/mirror/w", remote=f"s3://{bucket}/runs",
                            storage_options={})
    mirror = ObjectMirror(watch, _Log())
    mirror.refresh()
    s3.client().put_object(Bucket=bucket, Key="runs/exp/b.json", Body=b'{"metric": 2}')
    change = mirror.refresh()
    assert change.changed == (watch.root / "exp/b.json",)
    assert (watch.root / "exp/b.json").read_bytes() == b'{"metric": 2}'


def test_pending_changes_merge_until_the_loop_takes_them(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    first = MirrorChange(changed=(a, b), removed=(c,), objects=2)
    second = MirrorChange(changed=(c,), removed=(b,), objects=2, seconds=1.5)
    merged = merge(first, second)
    assert merged.changed == (a, c) and merged.removed == (b,) and merged.objects == 2 and merged.seconds == 1.5
    assert merge(None, second) is second


@pytest.mark.slow
def test_the_ledger_and_the_views_name_urls_not_this_hosts_mirror(s3: S3Endpoint, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from ckptd.cli import main
    from ckptd.daemon.service import Daemon

    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="runs/exp/epoch1.pt", Body=_checkpoint(1, 0.5))
    config = write_config(tmp_path, watch={"root": f"s3://{bucket}/runs", "mode": "poll",
                                           "output": f"s3://{bucket}/out/{{run}}"})
    daemon = Daemon(load_config(config), config, once=True)
    assert daemon.run_once() == 0  # once: one listing on the calling thread, before discovery
    assert daemon.metrics.registry.get_sample_value("ckptd_listing_objects", {"watch": "w"}) == 1
    db = sqlite3.connect(tmp_path / "state/ledger.sqlite3")
    assert db.execute("SELECT run_dir, output FROM runs").fetchall() == [
        (f"s3://{bucket}/runs/exp", f"s3://{bucket}/out/exp")]
    db.close()
    capsys.readouterr()
    assert main(["status", "-c", str(config), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["run_dir"], row["output"]) == (f"s3://{bucket}/runs/exp", f"s3://{bucket}/out/exp")
    assert main(["status", "-c", str(config), "-v"]) == 0
    assert f"output    s3://{bucket}/out/exp" in capsys.readouterr().out
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"watch w: s3://{bucket}/runs (s3, poll mode)" in out
    assert f"run exp: s3://{bucket}/runs/exp -> s3://{bucket}/out/exp" in out
    assert "mirror" not in out.split("\n", 1)[1] and "staging" not in out  # the first line names the state_dir


class _Log:
    """Records log calls (the listers' logger is injected)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((event, kw))


def test_check_explain_lists_an_object_store_watch_and_reads_its_checkpoints(s3: S3Endpoint, tmp_path: Path) -> None:
    """``check --explain`` is a dry run that reads checkpoints: for an object-store watch it lists the store first,
    so the candidates' metrics come from the objects (a stub read without its registry would be zeros)."""
    import subprocess

    from tests.conftest import PYTHON, subprocess_env

    bucket = s3.bucket()
    client = s3.client()
    for i, metric in enumerate((0.3, 0.9)):
        client.put_object(Bucket=bucket, Key=f"runs/exp/ckpt_{i}.pt", Body=_checkpoint(i, metric))
    config = write_config(tmp_path, watch={"root": f"s3://{bucket}/runs", "mode": "poll"})
    done = subprocess.run([PYTHON, "-m", "ckptd.cli", "check", "-c", str(config), "--explain", "--json"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(done.stdout)
    rows = runs[0]["streams"][0]["candidates"]
    assert sorted(r["metric"] for r in rows) == [0.3, 0.9] and not any(r["error"] for r in rows), rows
