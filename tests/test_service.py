"""Operating the daemon: systemd unit, notify protocol on a real socket, metrics, hooks, retention."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from ckptd.examples import TinyConvNet
from tests.conftest import PYTHON, REPO, subprocess_env
from tests.daemon_helpers import DaemonProcess, atomic_save, make_run, write_config

SECURITY_THRESHOLD = 2.0  # README states it: `systemd-analyze security` exposure must stay at or below this


def _unit_for_analysis(tmp_path: Path) -> Path:
    """The shipped unit, with ExecStart pointing at this machine's ckptd (verify checks the binary exists)."""
    exe = shutil.which("ckptd") or "/bin/true"
    unit = tmp_path / "ckptd.service"
    unit.write_text((REPO / "systemd/ckptd.service").read_text().replace("/usr/local/bin/ckptd", exe))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = _unit_for_analysis(tmp_path)
    text = unit.read_text()
    for directive in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=", "Restart=on-failure",
                      "User=ckptd", "StateDirectory=ckptd", "ProtectSystem=strict", "ReadWritePaths=",
                      "ReadOnlyPaths=", "NoNewPrivileges=true", "PrivateTmp=true", "ProtectHome=true",
                      "PrivateDevices=true", "Nice=", "CPUSchedulingPolicy=batch", "MemoryMax="):
        assert directive in text, directive
    assert "DynamicUser" not in text
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in (res.stdout + res.stderr).splitlines() if str(unit) in line]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= SECURITY_THRESHOLD, m.group(0)


@pytest.mark.slow
@pytest.mark.parametrize("abstract", [False, True])
def test_notify_protocol_on_a_real_socket(tmp_path: Path, abstract: bool) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"\0ckptd-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify.sock")
    sock.bind(address)
    sock.settimeout(0.2)
    messages: list[str] = []

    def drain(until: str, timeout: float = 20, start: int = 0) -> int:
        """Read until a message containing ``until`` arrives at index >= start; returns its index."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(start, len(messages)):
                if until in messages[i]:
                    return i
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
        raise AssertionError(f"no {until!r} in {messages}")

    def drain_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    config = write_config(tmp_path)
    env = {**subprocess_env(), "NOTIFY_SOCKET": "@" + address[1:] if abstract else address,
           "WATCHDOG_USEC": "400000"}
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([PYTHON, "-m", "ckptd.cli", "run", "-c", str(config)], stdout=log, stderr=log, env=env)
    try:
        drain("READY=1", 60)
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=" in ready and "runs" in ready
        drain_for(1.0)
        assert sum("WATCHDOG=1" in m for m in messages) >= 2  # pinged at half the 0.4 s interval while alive
        proc.send_signal(signal.SIGHUP)
        at = drain("RELOADING=1", start=len(messages))
        usec = int(re.search(r"MONOTONIC_USEC=(\d+)", messages[at]).group(1))
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 30_000_000
        drain("READY=1", start=at + 1)  # reload done
        proc.send_signal(signal.SIGTERM)
        drain("STOPPING=1", start=at + 1)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_metrics_endpoint_and_textfile(tmp_path: Path) -> None:
    port = _free_port()
    textfile = tmp_path / "textfile" / "ckptd.prom"
    textfile.parent.mkdir()
    config = write_config(tmp_path, extra={"metrics": {"listen": f"127.0.0.1:{port}", "textfile": str(textfile)}})
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        atomic_save({"model_state_dict": TinyConvNet().state_dict(), "metric": 0.5}, run / "good.pt")
        (run / "junk.pt").write_bytes(b"junk" * 100)
        daemon.wait_for(daemon.processed(run / "good.pt"), 20, "good")
        daemon.wait_for(daemon.processed(run / "junk.pt"), 20, "junk")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        assert daemon.stop() == 0
    assert 'ckptd_checkpoints_processed_total{outcome="done"} 1.0' in body
    assert 'ckptd_checkpoints_rejected_total{reason="foreign"} 1.0' in body
    assert 'ckptd_build_info{version="0.1.0"}' in body
    assert 'ckptd_job_duration_seconds_bucket{action="process"' in body
    assert 'ckptd_last_success_timestamp_seconds{action="best"}' in body
    assert "ckptd_scan_duration_seconds_count" in body and "ckptd_queue_depth" in body
    assert str(tmp_path) not in body, "paths must never be label values"
    prom = textfile.read_text()
    assert 'ckptd_checkpoints_processed_total{outcome="done"} 1.0' in prom
    assert not list(textfile.parent.glob(".ckptd-tmp-*"))


def _once(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "ckptd.cli", "once", "-c", str(config)], capture_output=True, text=True,
                          env={**subprocess_env(), **env}, timeout=120)


@pytest.mark.slow
def test_hooks_get_the_event_and_failures_do_not_stop_the_pipeline(tmp_path: Path) -> None:
    record = tmp_path / "hook.jsonl"
    script = ("import json, os; open(os.environ['HOOK_OUT'], 'a').write(json.dumps("
              "{k: v for k, v in os.environ.items() if k.startswith('CKPTD_')}) + '\\n')")
    hooks = {"on_new_best": [[PYTHON, "-c", script], [PYTHON, "-c", "import sys; print('boom'); sys.exit(3)"]],
             "on_average": [[PYTHON, "-c", "import time; time.sleep(5)"]], "timeout": "1s"}
    config = write_config(tmp_path, policy={"hooks": hooks})
    run = make_run(tmp_path)
    for i, metric in enumerate((0.2, 0.4)):
        torch.manual_seed(i)
        torch.save({"model_state_dict": TinyConvNet().state_dict(), "metric": metric, "iterations": i},
                   run / f"c{i}.pt")
    res = _once(config, HOOK_OUT=str(record))
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert [x["CKPTD_CHECKPOINT"] for x in lines] == [str(run / "c0.pt"), str(run / "c1.pt")]
    assert lines[1]["CKPTD_EVENT"] == "on_new_best" and lines[1]["CKPTD_METRIC"] == "0.4"
    assert lines[1]["CKPTD_RUN"] == "exp" and lines[1]["CKPTD_BEST"].endswith("best.safetensors")
    events = [json.loads(x) for x in res.stderr.splitlines() if x.startswith("{")]
    failed = [e for e in events if e["event"] == "hook.failed"]
    assert any(e["reason"] == "exit code 3" and "boom" in e["output"] for e in failed)
    assert any("timed out after 1s" in e["reason"] for e in failed)
    assert (tmp_path / "out/w/exp/average.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dry_run", [True, False])
def test_retention_prunes_only_what_policy_allows(tmp_path: Path, dry_run: bool) -> None:
    retention = {"enabled": True, "keep_last": 1, "min_age": "0s", "dry_run": dry_run}
    config = write_config(tmp_path, policy={"retention": retention, "average": {"top_k": 2}})
    run = make_run(tmp_path)
    metrics = [0.9, 0.1, 0.8, 0.2, 0.3]
    for i, metric in enumerate(metrics):
        torch.manual_seed(i)
        torch.save({"model_state_dict": TinyConvNet().state_dict(), "metric": metric, "iterations": i},
                   run / f"c{i}.pt")
    (run / "broken.pt").write_bytes(b"not processed as complete")
    res = _once(config)
    assert res.returncode == 0, res.stderr
    events = [json.loads(x) for x in res.stderr.splitlines() if x.startswith("{")]
    left = sorted(p.name for p in run.iterdir())
    # kept: top-2 sources (c0 0.9, c2 0.8), the newest (c4), the file the ledger does not know as complete
    if dry_run:
        assert left == ["broken.pt", "c0.pt", "c1.pt", "c2.pt", "c3.pt", "c4.pt"]
        assert sorted(Path(e["checkpoint"]).name for e in events if e["event"] == "retention.would_delete") == \
            ["c1.pt", "c3.pt"]
    else:
        assert left == ["broken.pt", "c0.pt", "c2.pt", "c4.pt"]
        assert sorted(Path(e["checkpoint"]).name for e in events if e["event"] == "retention.deleted") == \
            ["c1.pt", "c3.pt"]
