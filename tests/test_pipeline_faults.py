"""Regression tests for the pipeline's trust defects (issue 9 items 3, 5, 6): poison checkpoints, one commit
point, ledger rebuild from rewritten files, unreadable reference members, bounded caches, restore ties.

Real torch.save checkpoints, a real SQLite ledger, real output files. The one injected fault (a disk that fills
while the average is written) replaces the average writer with one raising ENOSPC, and says so.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptd.atomic import atomic_path, cleanup_stale_temps
from ckptd.daemon import outputs
from ckptd.daemon.config import parse_config
from ckptd.daemon.discovery import Observation
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.logs import get_logger
from ckptd.daemon.pipeline import OutputUnavailable, RunContext, RunProcessor


def _processor(tmp_path: Path, ledger: Ledger | None = None, **policy: object) -> tuple[RunProcessor, Path, Ledger]:
    (tmp_path / "train").mkdir(exist_ok=True)
    cfg = parse_config({"state_dir": str(tmp_path / "state"),
                        "watches": [{"name": "w", "root": str(tmp_path / "train"),
                                     "output": str(tmp_path / "out/{watch}/{run}"), "settle": "0s"}],
                        "policies": {"default": {"average": {"top_k": 3}, **policy}}})
    run_dir = tmp_path / "train" / "exp"
    run_dir.mkdir(exist_ok=True)
    ctx = RunContext(watch=cfg.watches[0], policy=cfg.policies["default"], run="exp", run_dir=run_dir,
                     output=tmp_path / "out" / "w" / "exp")
    ledger = ledger or Ledger(tmp_path / "state" / "ledger.sqlite3")
    return RunProcessor(ctx, ledger, get_logger()), run_dir, ledger


def _obs(path: Path) -> Observation:
    st = path.stat()
    return Observation(path, st.st_size, st.st_mtime_ns)


def _save(tiny, path: Path, seed: int, metric: float, **extra: object) -> Path:
    torch.save({"model_state_dict": tiny(seed=seed).state_dict(), "metric": metric, **extra}, path)
    return path


def _published(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("best.safetensors", "average.safetensors", "manifest.json")
            if (out / name).exists()}


def test_nan_new_best_is_rejected_before_anything_is_published_and_does_not_block(tmp_path: Path, tiny) -> None:
    proc, run_dir, ledger = _processor(tmp_path)
    for i, metric in enumerate((0.3, 0.5)):
        assert proc.process(_obs(_save(tiny, run_dir / f"c{i}.pt", i, metric))) == "done"
    before = _published(proc.ctx.output)
    poison = tiny(seed=9).state_dict()
    poison["head.weight"][0, 0] = float("nan")
    torch.save({"model_state_dict": poison, "metric": 0.99}, run_dir / "poison.pt")
    assert proc.process(_obs(run_dir / "poison.pt")) == "invalid"
    assert _published(proc.ctx.output) == before  # not even best.safetensors was touched
    row = ledger.find("w", "exp", str(run_dir / "poison.pt"), *_obs(run_dir / "poison.pt").signature)
    assert row is not None and row.status == "invalid" and "NaN" in (row.reason or "")
    # the run is not blocked: a later checkpoint is processed (and a restart does not retry the poison)
    assert proc.process(_obs(_save(tiny, run_dir / "c2.pt", 2, 0.7))) == "done"
    manifest = json.loads((proc.ctx.output / "manifest.json").read_text())
    assert manifest["best"]["metric"] == 0.7 and manifest["average"]["k"] == 3
    assert RunProcessor(proc.ctx, ledger, get_logger()).known(_obs(run_dir / "poison.pt"))
    ledger.close()


def test_average_failure_after_best_publishes_nothing(tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    proc, run_dir, ledger = _processor(tmp_path)
    for i, metric in enumerate((0.3, 0.5)):
        proc.process(_obs(_save(tiny, run_dir / f"c{i}.pt", i, metric)))
    before = _published(proc.ctx.output)
    members_before = [m.record.sha256 for m in proc.members()]

    def disk_full(*_a: object, **_k: object) -> None:  # injected fault: the disk fills while averaging
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "stage_average", disk_full)
    path = _save(tiny, run_dir / "c2.pt", 2, 0.9)
    with pytest.raises(OutputUnavailable, match="No space left"):
        proc.process(_obs(path))
    assert _published(proc.ctx.output) == before  # the new best was not published alone
    assert [m.record.sha256 for m in proc.members()] == members_before  # the ledger did not move either
    assert not [p for p in (proc.ctx.output / ".generations").iterdir() if not p.name.isdigit()]
    monkeypatch.undo()  # space is back: the same candidate goes through
    assert proc.process(_obs(path)) == "done"
    assert json.loads((proc.ctx.output / "manifest.json").read_text())["best"]["metric"] == 0.9
    ledger.close()


def test_readers_always_see_best_average_and_manifest_from_one_update(tmp_path: Path, tiny) -> None:
    proc, run_dir, ledger = _processor(tmp_path)
    out = proc.ctx.output
    proc.process(_obs(_save(tiny, run_dir / "c0.pt", 0, 0.1)))
    stop, seen, bad = threading.Event(), [0], []

    def reader() -> None:
        while not stop.is_set():
            current = out / os.readlink(out / "current")  # resolve once: one consistent generation
            try:
                manifest = json.loads((current / "manifest.json").read_text())
                with safe_open(str(current / "best.safetensors"), "pt") as f:
                    best_sha = f.metadata()["source_sha256"]
            except FileNotFoundError:
                continue  # an old generation was removed under a slow reader: it retries, never mixes
            seen[0] += 1
            if manifest["best"]["sha256"] != best_sha:
                bad.append((manifest["best"]["sha256"], best_sha))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 15):
            proc.process(_obs(_save(tiny, run_dir / f"c{i}.pt", i, 0.1 + i / 100)))
    finally:
        stop.set()
        t.join()
    assert seen[0] > 10 and not bad
    assert os.readlink(out / "best.safetensors") == "current/best.safetensors"
    ledger.close()


def test_ledger_rebuild_with_two_members_from_one_rewritten_file(tmp_path: Path, tiny) -> None:
    proc, run_dir, ledger = _processor(tmp_path)
    last = run_dir / "last.ckpt"
    _save(tiny, last, 1, 0.4)
    assert proc.process(_obs(last)) == "done"
    first = _obs(last)
    _save(tiny, last, 2, 0.6)
    os.utime(last, ns=(first.mtime_ns + 10**8, first.mtime_ns + 10**8))
    assert proc.process(_obs(last)) == "done"
    assert len(proc.members()) == 2
    ledger.close()
    for f in (tmp_path / "state").iterdir():
        f.unlink()
    proc2, _, ledger2 = _processor(tmp_path)
    proc2.reconcile()
    assert sorted(m.record.metric for m in proc2.members()) == [0.4, 0.6]
    # the rebuilt run is not stuck: the next checkpoint joins (old code: primary-key error on every job)
    assert proc2.process(_obs(_save(tiny, run_dir / "c3.pt", 3, 0.5))) == "done"
    assert [m.record.metric for m in proc2.members()] == [0.6, 0.5, 0.4]
    ledger2.close()


def test_restore_breaks_ties_on_the_source_mtime_not_the_copy(tmp_path: Path, tiny) -> None:
    proc, run_dir, ledger = _processor(tmp_path)
    a, b = _save(tiny, run_dir / "a.pt", 1, 0.5), _save(tiny, run_dir / "b.pt", 2, 0.5)
    now = time.time_ns()
    os.utime(a, ns=(now + 10**11, now + 10**11))  # a is the newer checkpoint, processed first
    proc.process(_obs(a))
    time.sleep(0.02)
    proc.process(_obs(b))
    order = [m.record.path for m in proc.members()]
    assert order == [str(a), str(b)]
    ledger.close()
    for f in (tmp_path / "state").iterdir():
        f.unlink()
    proc2, _, ledger2 = _processor(tmp_path)
    proc2.reconcile()
    assert [m.record.path for m in proc2.members()] == order
    ledger2.close()


def test_unreadable_reference_member_is_not_taken_as_compatible(tmp_path: Path, tiny) -> None:
    proc, run_dir, ledger = _processor(tmp_path)
    for i, metric in enumerate((0.3, 0.5)):
        proc.process(_obs(_save(tiny, run_dir / f"c{i}.pt", i, metric)))
    best_member = Path(proc.members()[0].file)
    best_member.write_bytes(b"garbage" * 10)  # our own copy damaged (a disk error, a stray write)
    torch.save({"model_state_dict": tiny(width=4).state_dict(), "metric": 0.9}, run_dir / "other.pt")
    assert proc.process(_obs(run_dir / "other.pt")) == "invalid"
    row = ledger.find("w", "exp", str(run_dir / "other.pt"), *_obs(run_dir / "other.pt").signature)
    assert row is not None and "architecture differs" in (row.reason or "")
    ledger.close()


def test_final_identity_cache_is_bounded_by_the_files_present(tmp_path: Path, tiny) -> None:
    proc, run_dir, ledger = _processor(tmp_path)
    paths = [_save(tiny, run_dir / f"c{i}.pt", i, i / 10) for i in range(5)]
    for p in paths:
        proc.process(_obs(p))
        assert proc.known(_obs(p))
    for p in paths[:4]:
        p.unlink()
    proc.forget_missing({paths[4]})
    assert set(proc._final) == {str(paths[4])}
    ledger.close()


def test_cleanup_never_removes_a_temp_file_still_being_written(tmp_path: Path) -> None:
    final = tmp_path / "x.bin"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"partial")
        assert cleanup_stale_temps(tmp_path) == []  # a re-created processor reconciling meanwhile
        assert tmp.exists()
        tmp.write_bytes(b"complete")
    assert final.read_bytes() == b"complete"


# --- found by attacking the integrated daemon (a trainer's and an attacker's files) -----------------------------

def _streams(tmp_path: Path, **policy: object):
    from ckptd.daemon.run_streams import RunStreams

    proc, run_dir, ledger = _processor(tmp_path, **policy)
    streams = RunStreams(proc.ctx, ledger, get_logger(), lambda ctx: RunProcessor(ctx, ledger, get_logger()))
    return streams, run_dir, ledger


def _job(streams) -> None:
    from ckptd.daemon.readiness import ReadinessTracker

    streams.job(ReadinessTracker(), 0.0, lambda: False, lambda _text: None)


def test_hf_folder_whose_weights_link_outside_the_root_is_refused(tmp_path: Path, tiny) -> None:
    from safetensors.torch import save_file

    streams, run_dir, ledger = _streams(tmp_path, metric={"sources": [{"trainer_state": "eval_loss"}], "mode": "min"})
    secret = tmp_path / "elsewhere" / "private.safetensors"
    secret.parent.mkdir()
    save_file(tiny(seed=5).state_dict(), secret)
    folder = run_dir / "checkpoint-2"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(secret)
    (folder / "trainer_state.json").write_text(json.dumps(
        {"global_step": 2, "log_history": [{"step": 2, "eval_loss": 0.1}]}))
    _job(streams)
    assert not (streams.ctx.output / "best.safetensors").exists()
    [row] = ledger.known_files("w", "exp")
    assert row.status == "invalid" and "outside the watch root" in (row.reason or "")
    ledger.close()


@pytest.mark.timeout(60)
def test_a_fifo_sidecar_or_checkpoint_never_hangs_the_run(tmp_path: Path, tiny) -> None:
    streams, run_dir, ledger = _streams(tmp_path, metric={"sources": [{"sidecar": "{stem}.json"}], "mode": "max"})
    torch.save({"model_state_dict": tiny(seed=1).state_dict()}, run_dir / "a.pt")
    os.mkfifo(run_dir / "a.json")  # the sidecar: a read would block forever
    os.mkfifo(run_dir / "b.pt")  # a "checkpoint": the same
    torch.save({"model_state_dict": tiny(seed=2).state_dict()}, run_dir / "c.pt")
    (run_dir / "c.json").write_text(json.dumps({"metric": 0.7}))
    _job(streams)
    rows = {Path(r.path).name: r for r in ledger.known_files("w", "exp")}
    assert rows["a.pt"].status == "unranked"  # its sidecar is refused as a FIFO: no metric, not a hang
    assert rows["b.pt"].status == "invalid" and "FIFO" in (rows["b.pt"].reason or "")
    assert rows["c.pt"].status == "done"
    ledger.close()


def test_a_file_name_that_is_not_utf8_does_not_block_its_run(tmp_path: Path, tiny) -> None:
    streams, run_dir, ledger = _streams(tmp_path)
    bad = os.path.join(os.fsencode(run_dir), b"latin1-\xe9poch_score_0.9.pt")
    with open(bad, "wb") as fh:
        torch.save({"model_state_dict": tiny(seed=1).state_dict(), "metric": 0.9}, fh)
    _save(tiny, run_dir / "good.pt", 2, 0.5)
    _job(streams)
    _job(streams)  # and again: still not stuck, logged once
    assert [Path(r.path).name for r in ledger.known_files("w", "exp")] == ["good.pt"]
    assert json.loads((streams.ctx.output / "manifest.json").read_text())["best"]["metric"] == 0.5
    ledger.close()


def test_a_reader_of_the_fixed_names_never_sees_the_manifest_name_a_missing_file(tmp_path: Path, tiny) -> None:
    proc, run_dir, ledger = _processor(tmp_path)
    out = proc.ctx.output
    stop, bad, seen = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                manifest = json.loads((out / "manifest.json").read_text())
            except (OSError, ValueError):
                continue
            seen[0] += 1
            if manifest.get("best") and not (out / "best.safetensors").exists():
                bad.append("best")
            if (manifest.get("average") or {}).get("path") and not (out / "average.safetensors").exists():
                bad.append("average")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(8):  # the first publication and the first average are the risky moments
            proc.process(_obs(_save(tiny, run_dir / f"c{i}.pt", i, 0.1 + i / 10)))
    finally:
        stop.set()
        t.join()
    assert seen[0] > 5 and not bad
    ledger.close()
