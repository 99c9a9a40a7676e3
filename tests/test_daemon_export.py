"""CoreML export driven by the daemon: new bests produce verified versions, swapped in atomically."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch

from ckptd.examples import TinyConvNet
from tests.daemon_helpers import TINY_COREML, DaemonProcess, atomic_save, make_run, write_config

REPO = str(Path(__file__).resolve().parent.parent)

pytestmark = pytest.mark.slow

COREML = TINY_COREML


def _save(path: Path, seed: int, metric: float) -> None:
    torch.manual_seed(seed)
    atomic_save({"model_state_dict": TinyConvNet().state_dict(), "metric": metric, "iterations": seed}, path)


def test_new_bests_publish_verified_versions_never_partial(tmp_path: Path) -> None:
    config = write_config(tmp_path, policy={"export": {"coreml": COREML}})
    run = make_run(tmp_path)
    out = tmp_path / "out/w/exp"
    link = out / "best.mlpackage"
    seen: list[str] = []
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:  # polls every 10 ms: whenever best.mlpackage exists it must be a complete package
        while not stop.is_set():
            if os.path.lexists(link):
                target = os.path.realpath(link)
                if not (Path(target) / "Manifest.json").is_file() or \
                        not (Path(target) / "Data/com.apple.CoreML/model.mlmodel").is_file():
                    bad.append(target)
                elif not seen or seen[-1] != target:
                    seen.append(target)
            time.sleep(0.01)

    thread = threading.Thread(target=reader)
    thread.start()
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        _save(run / "a.pt", 1, 0.5)
        daemon.wait_for(lambda ev: sum(e["event"] == "export.published" for e in ev) >= 1, 180, "first export")
        _save(run / "b.pt", 2, 0.9)
        daemon.wait_for(lambda ev: sum(e["event"] == "export.published" for e in ev) >= 2, 180, "second export")
        _save(run / "c.pt", 3, 0.1)  # not a new best: no export
        daemon.wait_for(daemon.processed(run / "c.pt"), 30, "non-best checkpoint")
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
        assert daemon.stop() == 0
    assert not bad, f"reader saw incomplete packages: {bad}"
    assert len(seen) == 2 and seen[0] != seen[1]
    published = [e for e in daemon.events() if e["event"] == "export.published"]
    assert len(published) == 2 and all(e["verification"]["package_run"] == "ok" for e in published)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["coreml"]["status"] == "ok" and manifest["coreml"]["source"] == str(run / "b.pt")
    assert manifest["coreml"]["verification"]["graph_parity"] == "ok"
    assert manifest["coreml"]["verification"]["spec"] == "ok"
    # keep: 1 -> the current and one previous version
    assert len([p for p in (out / "coreml").iterdir() if p.name.startswith("best-v")]) == 2
    db = sqlite3.connect(tmp_path / "state/ledger.sqlite3")
    assert [r[0] for r in db.execute("SELECT status FROM exports ORDER BY id")] == ["ok", "ok"]


def test_failed_export_keeps_outputs_and_reports_once(tmp_path: Path) -> None:
    coreml = {**COREML, "factory": "no_such_module:build"}
    config = write_config(tmp_path, policy={"export": {"coreml": coreml}})
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        _save(run / "a.pt", 1, 0.5)
        _save(run / "b.pt", 2, 0.6)
        daemon.wait_for(lambda ev: sum(e["event"] == "export.failed" for e in ev) >= 1, 120, "export failure")
        daemon.wait_for(daemon.processed(run / "b.pt"), 30, "b")
    finally:
        assert daemon.stop() == 0
    out = tmp_path / "out/w/exp"
    assert (out / "best.safetensors").exists() and (out / "average.safetensors").exists()
    assert not os.path.lexists(out / "best.mlpackage")
    failed = [e for e in daemon.events() if e["event"] == "export.failed"]
    assert "cannot import factory 'no_such_module:build'" in failed[0]["reason"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["coreml"]["status"] == "failed" and "no_such_module" in manifest["coreml"]["reason"]


def test_burst_of_new_bests_exports_only_the_newest_next(tmp_path: Path) -> None:
    coreml = {**COREML, "factory": "tests.export_models:build_slow", "factory_kwargs": {"seconds": 2},
              "python_path": [str(Path(__file__).resolve().parent.parent)]}
    config = write_config(tmp_path, policy={"export": {"coreml": coreml}, "average": {"top_k": 5}})
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        _save(run / "c1.pt", 1, 0.5)
        daemon.wait_for(lambda ev: any(e["event"] == "export.started" for e in ev), 60, "first export started")
        for i, metric in ((2, 0.6), (3, 0.7), (4, 0.8)):
            _save(run / f"c{i}.pt", i, metric)
            daemon.wait_for(daemon.processed(run / f"c{i}.pt"), 30, f"c{i}")
        daemon.wait_for(lambda ev: sum(e["event"] == "export.published" for e in ev) >= 2, 180, "second export")
        time.sleep(1)
    finally:
        assert daemon.stop() == 0
    events = daemon.events()
    started = [e["checkpoint"] for e in events if e["event"] == "export.started"]
    assert started == [str(run / "c1.pt"), str(run / "c4.pt")]
    assert sum(e["event"] == "export.debounced" for e in events) == 3


def _export_rows(tmp_path: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(tmp_path / "state/ledger.sqlite3")
    try:
        rows = db.execute("SELECT source, status FROM exports ORDER BY id").fetchall()
        return [(Path(src).name, status) for src, status in rows]
    finally:
        db.close()


def _export_children(pid: int) -> list[int]:
    """The daemon's export worker processes (children of any of its threads)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"ckptd.export.worker" in cmdline:
                found.append(int(child))
    return found


def test_new_bests_evicting_the_exported_member_do_not_break_the_export(tmp_path: Path) -> None:
    """Issue 9 item 4: the running export owns its input; the waiting requests a burst supersedes are dropped."""
    hold = tmp_path / "hold"
    hold.touch()  # the first export waits (before reading its weights) until the burst is processed
    coreml = {**COREML, "factory": "tests.export_fault_models:build_waiting_while",
              "factory_kwargs": {"marker": str(hold)}, "python_path": [REPO]}
    config = write_config(tmp_path, policy={"export": {"coreml": coreml}, "average": {"top_k": 2}})
    run = make_run(tmp_path)
    out = tmp_path / "out/w/exp"
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        _save(run / "c1.pt", 1, 0.5)
        daemon.wait_for(lambda ev: any(e["event"] == "export.started" for e in ev), 60, "c1's export started")
        for i, metric in ((2, 0.6), (3, 0.7), (4, 0.8)):
            _save(run / f"c{i}.pt", i, metric)
            daemon.wait_for(daemon.processed(run / f"c{i}.pt"), 30, f"c{i}")
        assert not list((out / "members").glob("c1-*")), "c3 joining the top-2 must have evicted c1's member"
        hold.unlink()
        daemon.wait_for(lambda ev: sum(e["event"] in ("export.published", "export.failed") for e in ev) >= 2, 180,
                        "two exports finished")
        time.sleep(1)
    finally:
        hold.unlink(missing_ok=True)
        assert daemon.stop() == 0
    events = daemon.events()
    assert not [e for e in events if e["event"] == "export.failed"]
    assert _export_rows(tmp_path) == [("c1.pt", "ok"), ("c4.pt", "ok")]  # c2, c3 never ran
    assert [Path(e["checkpoint"]).name for e in events if e["event"] == "export.superseded"] == ["c2.pt", "c3.pt"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["coreml"]["status"] == "ok" and manifest["coreml"]["source"] == str(run / "c4.pt")
    assert list((out / ".exports/inputs").iterdir()) == []
    db = sqlite3.connect(tmp_path / "state/ledger.sqlite3")
    assert [r[0] for r in db.execute("SELECT last_error FROM runs")] == [None]


def test_export_left_running_by_a_killed_daemon_is_abandoned_and_redone(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    coreml = {**COREML, "factory": "tests.export_fault_models:build_waiting_while",
              "factory_kwargs": {"marker": str(hold)}, "python_path": [REPO]}
    config = write_config(tmp_path, policy={"export": {"coreml": coreml}})
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        _save(run / "a.pt", 1, 0.5)
        daemon.wait_for(lambda ev: any(e["event"] == "export.started" for e in ev), 60, "export started")
        deadline = time.monotonic() + 30
        while not (children := _export_children(daemon.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children, "no export child process found"
    finally:
        daemon.kill()  # SIGKILL: no shutdown path runs
    for child in children:  # its own session (process group): the export child would outlive the daemon, but
        with contextlib.suppress(ProcessLookupError):  # on Linux it dies with it (PR_SET_PDEATHSIG), maybe reaped
            os.killpg(child, signal.SIGKILL)
    assert _export_rows(tmp_path) == [("a.pt", "running")]
    hold.unlink()
    again = DaemonProcess(config, tmp_path / "daemon2.log")
    try:
        again.wait_for(lambda ev: any(e["event"] in ("export.published", "export.failed") for e in ev), 180,
                       "the export redone")
    finally:
        assert again.stop() == 0
    assert _export_rows(tmp_path) == [("a.pt", "abandoned"), ("a.pt", "ok")]
    assert [e.get("count") for e in again.events() if e["event"] == "export.abandoned"] == [1]


def test_reload_during_an_export_keeps_its_staging_package(tmp_path: Path) -> None:
    """A reload re-creates the run's processor, whose recovery must not delete the package being verified."""
    hold = tmp_path / "hold"
    hold.touch()
    out = tmp_path / "out/w/exp"
    coreml = {**COREML, "factory": "tests.export_fault_models:build_pausing_after_save",
              "factory_kwargs": {"output": str(out), "marker": str(hold)}, "python_path": [REPO]}
    config = write_config(tmp_path, policy={"export": {"coreml": coreml}})
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")

    def saved() -> list[Path]:
        return list((out / "coreml").glob(".ckptd-tmp-staging-*/Manifest.json"))

    try:
        _save(run / "a.pt", 1, 0.5)
        deadline = time.monotonic() + 120
        while not saved() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert saved(), "the export never saved its package"
        write_config(tmp_path, policy={"export": {"coreml": coreml}, "average": {"top_k": 4}})  # a new policy
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(lambda ev: any(e["event"] == "config.reloaded" for e in ev), 30, "reload")
        _save(run / "b.pt", 2, 0.1)  # the re-created processor's first job reconciles the outputs
        daemon.wait_for(daemon.processed(run / "b.pt"), 30, "b")
        assert saved(), "recovery removed the staging package of the export in flight"
        hold.unlink()
        daemon.wait_for(lambda ev: any(e["event"] in ("export.published", "export.failed") for e in ev), 120,
                        "the export finished")
    finally:
        hold.unlink(missing_ok=True)
        assert daemon.stop() == 0
    assert not [e for e in daemon.events() if e["event"] == "export.failed"]
    assert _export_rows(tmp_path) == [("a.pt", "ok")]
