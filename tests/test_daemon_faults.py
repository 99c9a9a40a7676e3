"""The main loop survives its own faults: a real `ckptd run` process, real faults injected from outside.

Each test breaks something the loop touches (the metrics textfile's directory, the ledger's lock, the ledger's
filesystem, signals arriving in bursts) and checks that the daemon stays alive, says what happened in one line,
keeps the systemd watchdog fed while it makes progress, and catches up once the fault is gone.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.daemon.loop import StageGuard
from ckptd.daemon.telemetry import Metrics
from tests.conftest import PYTHON, subprocess_env
from tests.daemon_helpers import DaemonProcess, atomic_save, make_run, write_config

pytestmark = pytest.mark.slow


def _ckpt(seed: int, metric: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model_state_dict": {"w": torch.randn(64, 64, generator=g)}, "metric": metric, "iterations": seed}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(daemon: DaemonProcess, name: str, **fields: Any) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e["event"] == name and all(e.get(k) == v for k, v in fields.items())]


class NotifySocket:
    """A real datagram socket standing in for systemd's $NOTIFY_SOCKET; records (arrival time, message)."""

    def __init__(self, path: Path) -> None:
        self.address = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                continue

    def between(self, start: float, end: float, text: str) -> list[float]:
        return [t for t, m in self.messages if start <= t <= end and text in m]

    def close(self) -> None:
        self.sock.close()


class NotifiedDaemon(DaemonProcess):
    """DaemonProcess with systemd's notify environment (socket + a 0.4 s watchdog: pings every 0.2 s)."""

    def __init__(self, config: Path, log_path: Path, notify: NotifySocket) -> None:
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process lifetime
        env = {**subprocess_env(), "NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"}
        self.proc = subprocess.Popen([PYTHON, "-m", "ckptd.cli", "run", "-c", str(config)], stdout=self._log,
                                     stderr=self._log, env=env)
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for _, m in notify.messages):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log_path.read_text()[-4000:]
            notify.pump(0.1)


def test_metrics_textfile_failures_are_logged_counted_and_survived(tmp_path: Path) -> None:
    port = _free_port()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    textfile = prom_dir / "ckptd.prom"
    config = write_config(tmp_path, extra={"metrics": {"listen": f"127.0.0.1:{port}", "textfile": str(textfile)}})
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for(lambda _ev: textfile.exists(), 20, "first textfile write")
        # the fault: the textfile's directory becomes a regular file, so every write raises NotADirectoryError
        # (tests run as root, which ignores permission bits: chmod could not make it fail)
        shutil.rmtree(prom_dir)
        prom_dir.write_text("not a directory any more")
        daemon.wait_for(lambda _ev: bool(_events(daemon, "daemon.loop_error", stage="metrics")), 20, "metrics error")
        line = _events(daemon, "daemon.loop_error", stage="metrics")[0]
        assert "NotADirectoryError" in line["reason"] and str(prom_dir) in line["reason"], line
        assert line["retry_in"] == "1s" and "exception" not in line, "an OSError is one line, no traceback"
        # still working while the fault lasts
        atomic_save(_ckpt(1, 0.5), run / "during.pt")
        daemon.wait_for(daemon.processed(run / "during.pt"), 30, "checkpoint during the fault")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'ckptd_loop_errors_total{stage="metrics"}' in body
        # the fault ends: the textfile comes back with current values, and the recovery is said once
        prom_dir.unlink()
        prom_dir.mkdir()
        daemon.wait_for(lambda _ev: textfile.exists() and 'outcome="done"} 1.0' in textfile.read_text(), 30,
                        "textfile written again")
        daemon.wait_for(lambda _ev: bool(_events(daemon, "daemon.loop_recovered", stage="metrics")), 10, "recovery")
    finally:
        assert daemon.stop() == 0


def test_locked_ledger_stalls_only_the_run_never_the_loop(tmp_path: Path) -> None:
    """Another process holds the ledger's write lock for 4 s while a new run appears: the loop keeps pinging
    systemd's watchdog and answers SIGHUP meanwhile; the run is processed once the lock is released."""
    config = write_config(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = NotifiedDaemon(config, tmp_path / "daemon.log", notify)
    holder = sqlite3.connect(tmp_path / "state" / "ledger.sqlite3", isolation_level=None)
    try:
        notify.pump(0.5)
        holder.execute("BEGIN EXCLUSIVE")  # the fault: every writer now waits on SQLite's lock
        locked_at = time.monotonic()
        run = make_run(tmp_path, "late")  # a new run: its ledger row cannot be written while the lock is held
        atomic_save(_ckpt(2, 0.7), run / "c.pt")
        notify.pump(1.0)
        daemon.signal(signal.SIGHUP)
        notify.pump(3.0)
        released_at = time.monotonic()
        holder.execute("COMMIT")
        pings = notify.between(locked_at + 0.5, released_at, "WATCHDOG=1")
        assert len(pings) >= 8, f"the loop stopped pinging while the ledger was locked: {len(pings)} pings"
        reloads = notify.between(locked_at, released_at, "RELOADING=1")
        assert reloads and notify.between(reloads[0], released_at, "READY=1"), "SIGHUP not answered under the lock"
        # nobody reads the notify socket from here on: its queue fills, and the loop must not block on it
        daemon.wait_for(daemon.processed(run / "c.pt"), 60, "the run once the ledger is free")
    finally:
        holder.close()
        assert daemon.stop() == 0
        notify.close()


def test_a_notify_socket_nobody_reads_never_stalls_the_loop(tmp_path: Path) -> None:
    """A service manager that stops reading: its datagram queue fills (net.unix.max_dgram_qlen) and a blocking
    sendto would stall the loop for good. Sends are non-blocking, so work goes on."""
    config = write_config(tmp_path)
    run = make_run(tmp_path)
    notify = NotifySocket(tmp_path / "notify.sock")
    daemon = NotifiedDaemon(config, tmp_path / "daemon.log", notify)  # reads until READY=1, then never again
    try:
        time.sleep(3)  # 15 watchdog pings at 0.2 s: more than the queue holds
        for i in range(3):
            atomic_save(_ckpt(10 + i, 0.1 * i), run / f"c{i}.pt")
            daemon.wait_for(daemon.processed(run / f"c{i}.pt"), 30, f"c{i}.pt with a full notify queue")
    finally:
        assert daemon.stop() == 0
        notify.close()


def _mount_tmpfs(path: Path, size: str) -> None:
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({res.stderr.strip()}): the disk-full fault needs one")


def test_ledger_on_a_full_disk_fails_the_job_then_resumes_by_itself(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _mount_tmpfs(state, "8m")
    daemon: DaemonProcess | None = None
    try:
        config = write_config(tmp_path)
        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        # the fault: fill the ledger's filesystem (a real ENOSPC for SQLite's next write)
        filler = state / "filler"
        # unbuffered: a buffered file keeps the tail of a partial write and raises ENOSPC again when it is closed
        with open(filler, "wb", buffering=0) as fh, pytest.raises(OSError):
            while True:
                fh.write(b"\0" * 65536)
        run = make_run(tmp_path, "new")
        atomic_save(_ckpt(3, 0.9), run / "c.pt")
        daemon.wait_for(lambda ev: any(e["event"] == "run.failed" and "full" in e["reason"] for e in ev), 30,
                        "the job failing on the full ledger")
        failed = next(e for e in daemon.events() if e["event"] == "run.failed")
        assert failed["run"] == "new" and failed["retry_in"] == "2s" and "exception" not in failed, failed
        time.sleep(3)
        assert daemon.proc.poll() is None, "the daemon died on a full ledger disk"
        filler.unlink()  # space returns: the pending work is retried on its own (no new checkpoint needed)
        daemon.wait_for(daemon.processed(run / "c.pt"), 60, "the checkpoint once space returned")
        assert any(e["event"] == "run.recovered" for e in daemon.events())
    finally:
        try:
            if daemon is not None:
                assert daemon.stop() == 0
        finally:
            subprocess.run(["umount", "-l", str(state)], check=False)


def test_signal_bursts_while_busy_reload_then_stop_cleanly(tmp_path: Path) -> None:
    """Hundreds of SIGHUPs, then a burst of SIGTERMs, while jobs run: handlers only set flags, so nothing can
    deadlock in a handler; the reloads coalesce, the stop is graceful and exits 0."""
    config = write_config(tmp_path, extra={"max_parallel_runs": 2})
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    paths = []
    for r in range(3):
        run = make_run(tmp_path, f"r{r}")
        for i in range(6):
            g = torch.Generator().manual_seed(r * 10 + i)
            p = run / f"c{i}.pt"
            atomic_save({"model_state_dict": {"w": torch.randn(512, 1024, generator=g)}, "metric": float(i)}, p)
            paths.append(p)
    try:
        daemon.wait_for(lambda ev: any(e["event"] == "checkpoint.joined" for e in ev), 60, "busy")
        for _ in range(300):
            daemon.signal(signal.SIGHUP)
            time.sleep(0.002)
        daemon.wait_for(lambda ev: any(e["event"] == "config.reloaded" for e in ev), 20, "a reload")
        for p in paths:
            daemon.wait_for(daemon.processed(p), 120, str(p))
        reloads = len(_events(daemon, "config.reloaded"))
        assert 1 <= reloads < 300, reloads  # coalesced: one reload per loop pass, not one per signal
        for _ in range(50):
            daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=30) == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
        else:
            daemon.stop()
    events = daemon.events()
    assert events[-1]["event"] == "daemon.stopped"
    assert not [e for e in events if e["level"] == "error"], [e for e in events if e["level"] == "error"]
    assert "Traceback" not in daemon.log_path.read_text()


def test_stage_guard_backs_off_and_recovers() -> None:
    """The guard's schedule (1 s, 2 s, 4 s … capped), with a real Prometheus counter; the fault is an OSError."""
    metrics = Metrics()
    guard = StageGuard("metrics", metrics.loop_errors, first=1.0, cap=4.0)

    def fail() -> None:
        raise OSError(28, "No space left on device")

    assert guard.run(100.0, fail) is False and guard.until == 101.0
    assert guard.run(100.5, fail) is False and guard.failures == 1  # backing off: not even tried
    assert guard.run(101.0, fail) is False and guard.until == 103.0
    guard.run(103.0, fail)
    guard.run(107.0, fail)
    assert guard.until == 111.0  # capped at 4 s
    assert metrics.registry.get_sample_value("ckptd_loop_errors_total", {"stage": "metrics"}) == 4
    assert guard.run(111.0, lambda: None) is True and guard.healthy and guard.due(111.0)
