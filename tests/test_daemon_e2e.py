"""The daemon end to end: a real `ckptd run` process watching real directories written by real writers."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptd.examples import TinyConvNet
from tests.conftest import PYTHON, subprocess_env
from tests.daemon_helpers import DaemonProcess, atomic_save, make_run, mean_of, run_trainer, write_config

pytestmark = pytest.mark.slow


def _assert_outputs_match(out: Path, expected_members: list[Path]) -> None:
    """average.safetensors equals an independent float64 mean; best equals the best checkpoint exactly."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["source"] for m in manifest["average"]["members"]] == [str(p) for p in expected_members]
    expected = mean_of(expected_members)
    got = load_file(out / "average.safetensors")
    for k, v in expected.items():
        assert got[k].dtype == v.dtype
        assert torch.allclose(got[k].double(), v.double(), rtol=1e-6, atol=1e-7), k
    best = load_file(out / "best.safetensors")
    ref = torch.load(expected_members[0], weights_only=True)["model_state_dict"]
    assert all(torch.equal(best[k], ref[k]) for k in ref)
    assert not [p for p in out.rglob("*") if p.name.startswith(".ckptd-tmp-")], "temp files left behind"


def test_training_run_watched_end_to_end(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        run_dir = tmp_path / "train" / "exp1"
        saved = run_trainer(run_dir, 6)
        for item in saved:
            daemon.wait_for(daemon.processed(item["path"]), 30, item["path"])
        top = sorted(saved, key=lambda s: (-s["metric"], -s["epoch"]))[:3]
        out = tmp_path / "out" / "w" / "exp1"
        _assert_outputs_match(out, [Path(s["path"]) for s in top])
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["best"]["metric"] == top[0]["metric"] and manifest["best"]["step"] == (top[0]["epoch"] + 1) * 4
        assert len(manifest["best"]["sha256"]) == 64
        # status works while the daemon runs
        status = subprocess.run([PYTHON, "-m", "ckptd.cli", "status", "-c", str(config), "--json"], capture_output=True,
                                text=True, env=subprocess_env(), check=True)
        rows = json.loads(status.stdout)
        assert rows[0]["run"] == "exp1" and rows[0]["best"]["metric"] == top[0]["metric"]
        assert len(rows[0]["members"]) == 3
        joined = [e for e in daemon.events() if e["event"] == "checkpoint.joined"]
        assert all({"run", "checkpoint", "metric", "action", "reason"} <= set(e) for e in joined)
        # nothing was written into the training directory
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(Path(s["path"]).name for s in saved)
    finally:
        assert daemon.stop() == 0
    assert any(e["event"] == "daemon.stopped" for e in daemon.events())


def test_bad_files_are_reported_once_and_daemon_keeps_going(tmp_path: Path, tiny) -> None:
    config = write_config(tmp_path)
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        good = run / "good.pt"
        atomic_save({"model_state_dict": tiny(seed=1).state_dict(), "metric": 0.5}, good)
        daemon.wait_for(daemon.processed(good), 20, "good checkpoint")
        marker = tmp_path / "pwned"

        class Boom:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"model_state_dict": tiny().state_dict(), "metric": 0.99, "x": Boom()}, run / "evil.pt")
        (run / "empty.pt").write_bytes(b"")
        (run / "garbage.pt").write_bytes(b"definitely not a checkpoint" * 100)
        full = run / "whole.bin"
        torch.save({"model_state_dict": tiny().state_dict()}, full)
        (run / "truncated.pt").write_bytes(full.read_bytes()[:700])
        full.unlink()
        (run / "pickle.pth").write_bytes(pickle.dumps({"a": 1}))
        bad = ["evil.pt", "empty.pt", "garbage.pt", "truncated.pt", "pickle.pth"]
        for name in bad:
            daemon.wait_for(daemon.processed(run / name), 20, name)
        time.sleep(2.5)  # a safety rescan passes: no repeated lines
        events = daemon.events()
        for name in bad:
            lines = [e for e in events if e.get("checkpoint") == str(run / name)]
            assert len(lines) == 1, (name, lines)
            assert lines[0]["level"] in ("warning", "error") and lines[0]["reason"], lines
        assert not marker.exists(), "malicious pickle code ran"
        evil_line = next(e for e in events if e.get("checkpoint") == str(run / "evil.pt"))
        assert "posix.system" in evil_line["reason"] or "os.system" in evil_line["reason"]
        # still alive and still working
        later = run / "later.pt"
        atomic_save({"model_state_dict": tiny(seed=2).state_dict(), "metric": 0.7}, later)
        daemon.wait_for(daemon.processed(later), 20, "checkpoint after bad files")
        manifest = json.loads((tmp_path / "out/w/exp/manifest.json").read_text())
        assert manifest["best"]["source"] == str(later)
    finally:
        assert daemon.stop() == 0


def test_slow_in_place_writer_is_read_once_when_done(tmp_path: Path, tiny) -> None:
    config = write_config(tmp_path)  # settle 1s
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        src = tmp_path / "src.pt"
        torch.save({"model_state_dict": tiny(seed=3).state_dict(), "metric": 0.6}, src)
        data = src.read_bytes()
        target = run / "slow.pt"
        chunk = max(1, len(data) // 12)
        with open(target, "wb") as fh:  # written in place over ~5 s, pausing 0.4 s (< settle) between chunks
            for i in range(0, len(data), chunk):
                fh.write(data[i:i + chunk])
                fh.flush()
                os.fsync(fh.fileno())
                time.sleep(0.4)
        daemon.wait_for(daemon.processed(target), 20, "slow file")
        time.sleep(2.5)
        lines = [e for e in daemon.events() if e.get("checkpoint") == str(target)]
        assert [e["event"] for e in lines] == ["checkpoint.joined"], lines
    finally:
        assert daemon.stop() == 0


def test_trainer_deleting_its_files_and_ledger_rebuild(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    run_dir = tmp_path / "train" / "exp"
    try:
        saved = run_trainer(run_dir, 7, "--delete-non-topk", "2")
        last = saved[-1]["path"]
        daemon.wait_for(daemon.processed(last), 30, "last checkpoint")
    finally:
        assert daemon.stop() == 0
    out = tmp_path / "out/w/exp"
    manifest = json.loads((out / "manifest.json").read_text())
    top = sorted(saved, key=lambda s: (-s["metric"], -s["epoch"]))[:3]
    assert [m["metric"] for m in manifest["average"]["members"]] == [s["metric"] for s in top]
    gone = [s for s in top if not Path(s["path"]).exists()]
    assert gone, "the trainer kept fewer files than the top-3: at least one member's source must be gone"
    before = {k: v.clone() for k, v in load_file(out / "average.safetensors").items()}
    # the pinned copies keep the average exact even though sources are gone
    for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "once", "-c", str(config)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    manifest2 = json.loads((out / "manifest.json").read_text())
    shas = [m["sha256"] for m in manifest["average"]["members"]]
    assert [m["sha256"] for m in manifest2["average"]["members"]] == shas
    after = load_file(out / "average.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_kill_9_mid_update_then_restart(tmp_path: Path, tiny) -> None:
    config = write_config(tmp_path, policy={"average": {"top_k": 4}})
    run = make_run(tmp_path)
    # big enough that averaging takes a moment, so the kill lands mid-work
    def big_model(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"w": torch.randn(1024, 2048, generator=g), "b": torch.randn(2048, generator=g),
                "n": torch.tensor(seed)}

    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    paths = []
    for i in range(12):
        p = run / f"ckpt_{i:02d}.pt"
        atomic_save({"model_state_dict": big_model(i), "metric": float((i * 7) % 12), "iterations": i}, p)
        paths.append(p)
    daemon.wait_for(lambda ev: sum(e["event"] == "checkpoint.joined" for e in ev) >= 3, 60, "some progress")
    daemon.kill()  # SIGKILL mid-update
    daemon2 = DaemonProcess(config, tmp_path / "daemon2.log")
    try:
        for p in paths:
            daemon2.wait_for(lambda ev, p=p: daemon2.processed(p)(ev) or daemon.processed(p)(daemon.events()), 60,
                             str(p))
        # wait until the final member set is published
        expected = sorted(range(12), key=lambda i: (-((i * 7) % 12), -i))[:4]
        out = tmp_path / "out/w/exp"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = json.loads((out / "manifest.json").read_text())
            if [x["source"] for x in m["average"]["members"]] == [str(paths[i]) for i in expected]:
                break
            time.sleep(0.1)
        _assert_outputs_match(out, [paths[i] for i in expected])
        # the 4 members, plus at most the copy the previous generation (kept for readers) still names
        on_disk = {p.name for p in (out / "members").iterdir()}
        assert {Path(x["path"]).name for x in m["average"]["members"]} <= on_disk and len(on_disk) <= 5
    finally:
        assert daemon2.stop() == 0


def test_sighup_with_broken_config_keeps_old_one(tmp_path: Path, tiny) -> None:
    config = write_config(tmp_path)
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        good_text = config.read_text()
        config.write_text(good_text.replace("top_k: 3", "top_k: zero").replace("settle: 1s", "settle: soon"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(lambda ev: any(e["event"] == "config.reload_rejected" for e in ev), 20, "reload rejected")
        line = next(e for e in daemon.events() if e["event"] == "config.reload_rejected")
        assert any("settle" in p for p in line["problems"]) and any("top_k" in p for p in line["problems"])
        p = run / "after.pt"
        atomic_save({"model_state_dict": tiny().state_dict(), "metric": 0.3}, p)
        daemon.wait_for(daemon.processed(p), 20, "processing with the old config")
        config.write_text(good_text.replace("top_k: 3", "top_k: 2"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(lambda ev: any(e["event"] == "config.reloaded" for e in ev), 20, "reload accepted")
    finally:
        assert daemon.stop() == 0


def test_polling_mode_watch(tmp_path: Path, tiny) -> None:
    config = write_config(tmp_path, watch={"mode": "poll", "poll_interval": "0.5s", "settle": "0.5s"},
                          extra={"rescan_interval": "1h"})
    run = make_run(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        assert not any(e["event"] == "watch.events" for e in daemon.events())
        p = run / "polled.pt"
        torch.save({"model_state_dict": tiny().state_dict(), "metric": 0.4}, p)  # in place, no rename
        daemon.wait_for(daemon.processed(p), 20, "polled checkpoint")
        new_run = tmp_path / "train" / "exp2"
        new_run.mkdir()
        p2 = new_run / "late.pt"
        torch.save({"model_state_dict": tiny().state_dict(), "metric": 0.4}, p2)
        daemon.wait_for(daemon.processed(p2), 20, "checkpoint in a run created later")
    finally:
        assert daemon.stop() == 0


def test_burst_of_500_files_across_20_runs(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra={"max_parallel_runs": 2})
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    sd = TinyConvNet().state_dict()
    paths = []
    for r in range(20):
        run = tmp_path / "train" / f"run{r:02d}"
        run.mkdir()
        for i in range(25):
            p = run / f"c{i:02d}.pt"
            paths.append(p)
    try:
        def writer(chunk: list[Path]) -> None:
            for p in chunk:
                atomic_save({"model_state_dict": sd, "metric": float(hash(p.name) % 1000), "iterations": 1}, p)

        threads = [threading.Thread(target=writer, args=(paths[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            peak = max(peak, daemon.rss_bytes())
            done = {e.get("checkpoint") for e in daemon.events() if e["event"].startswith("checkpoint.")}
            if all(str(p) in done for p in paths):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("burst not fully processed in time")
        assert peak < 1.5 * 2**30, f"daemon RSS peaked at {peak / 2**20:.0f} MiB"
        for r in range(20):
            assert (tmp_path / f"out/w/run{r:02d}/manifest.json").exists()
    finally:
        assert daemon.stop() == 0
