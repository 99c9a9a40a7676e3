"""Export jobs own their input; superseded requests are dropped; failures are retried; the ledger is the store.

The scheduler is driven in-process through its typed seam (``export_seam.ExportRun``) with a real ledger, real
safetensors member copies and real exports (child process, coremltools conversion, verification); the factories
in ``tests/export_fault_models.py`` misbehave on cue. ``tests/test_daemon_export.py`` covers the same with the
real daemon.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import torch

from ckptd.daemon.config import CoremlPolicy, InputSpec, Policy, Watch
from ckptd.daemon.export_inputs import inputs_dir
from ckptd.daemon.export_state import coreml_block, export_target
from ckptd.daemon.exports import ExportScheduler
from ckptd.daemon.ledger import Ledger, MemberRow
from ckptd.daemon.pipeline import RunContext
from ckptd.daemon.policy import Record
from ckptd.examples import TinyConvNet
from ckptd.weights import write_weights

pytestmark = pytest.mark.slow


class RecordingLog:
    """A bound logger that keeps its lines (the daemon's is structlog; the seam only needs this much)."""

    def __init__(self, lines: list[dict[str, Any]], **context: Any) -> None:
        self.lines = lines
        self.context = context

    def bind(self, **values: Any) -> RecordingLog:
        return RecordingLog(self.lines, **{**self.context, **values})

    def _add(self, level: str, event: str, values: dict[str, Any]) -> None:
        self.lines.append({"event": event, "level": level, **self.context, **values})

    def info(self, event: str, **values: Any) -> None:
        self._add("info", event, values)

    def warning(self, event: str, **values: Any) -> None:
        self._add("warning", event, values)

    def error(self, event: str, **values: Any) -> None:
        self._add("error", event, values)


@dataclass
class Run:
    """The pipeline's side of the seam: context, log, members from the ledger, and what note_export received."""

    ctx: RunContext
    log: RecordingLog
    ledger: Ledger
    notes: list[tuple[dict[str, Any], bool]] = field(default_factory=list)

    def members(self) -> list[MemberRow]:
        rows = self.ledger.members(self.ctx.watch.name, self.ctx.run)
        return sorted(rows, key=lambda m: -(m.record.metric or 0.0))

    def export_target(self) -> str | None:
        return export_target(self.ctx.policy, self.members())

    def note_export(self, block: dict[str, Any], *, ok: bool) -> None:
        self.notes.append((block, ok))

    def lease_held(self) -> bool:
        return True  # one daemon: always its run

    def add_member(self, name: str, seed: int, metric: float) -> MemberRow:
        """Pin a member as the pipeline does: a safetensors copy in members/, then the ledger's member set."""
        torch.manual_seed(seed)
        sha = f"{seed:064x}"
        file = self.ctx.output / "members" / f"{name}-{sha[:12]}.safetensors"
        write_weights(file, TinyConvNet().state_dict())
        source = str(self.ctx.run_dir / name)
        ckpt_id = self.ledger.record(self.ctx.watch.name, self.ctx.run, source, seed, seed, status="done",
                                     sha256=sha, metric=metric, step=seed)
        member = MemberRow(Record(ckpt_id, source, sha, metric, seed, float(seed)), str(file))
        with self.ledger.transaction() as db:
            self.ledger.set_members(db, self.ctx.watch.name, self.ctx.run, [*self.members(), member])
        return member

    def evict(self, member: MemberRow) -> None:
        """What the pipeline does when a member leaves the top-k: drop it from the ledger, delete its copy."""
        with self.ledger.transaction() as db:
            self.ledger.set_members(db, self.ctx.watch.name, self.ctx.run,
                                    [m for m in self.members() if m.record != member.record])
        Path(member.file).unlink()

    def rows(self) -> list[tuple[str, str]]:
        return [(Path(r.source or "").name, r.status) for r in self.ledger.export_rows(self.ctx.watch.name,
                                                                                       self.ctx.run)]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log.lines if e["event"] == name]


def make_run(tmp_path: Path, factory: str, **kwargs: str) -> Run:
    coreml = CoremlPolicy(enabled=True, factory=f"tests.export_fault_models:{factory}",
                          factory_kwargs=MappingProxyType(dict(kwargs)),
                          inputs=(InputSpec("image", (1, 3, 8, 8)),), outputs=("logits",), precision="float32",
                          timeout=180.0, keep=1)
    watch = Watch(name="w", root=tmp_path / "train")
    ctx = RunContext(watch=watch, policy=Policy(name="default", coreml=coreml), run="exp",
                     run_dir=tmp_path / "train/exp", output=tmp_path / "out/w/exp")
    ctx.output.mkdir(parents=True)
    ledger = Ledger(tmp_path / "state/ledger.sqlite3")
    ledger.touch_run("w", "exp", str(ctx.run_dir), str(ctx.output))
    return Run(ctx, RecordingLog([], watch="w", run="exp"), ledger)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, run: Run) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; export rows {run.rows()}; log {run.log.lines[-8:]}")


def links(run: Run) -> list[Path]:
    folder = inputs_dir(run.ctx.output)
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_superseded_requests_are_dropped_and_the_running_input_survives_eviction(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    run = make_run(tmp_path, "build_waiting_while", marker=str(hold))
    scheduler = ExportScheduler(run.ledger, run.log)
    try:
        a = run.add_member("a.pt", 1, 0.5)
        scheduler.request_best(run, a)
        wait_until(lambda: run.rows() == [("a.pt", "running")], 60, "a's export to start", run)
        previous = a
        for name, seed, metric in (("b.pt", 2, 0.6), ("c.pt", 3, 0.7), ("d.pt", 4, 0.8)):
            member = run.add_member(name, seed, metric)
            scheduler.request_best(run, member)  # the link is taken here, before the eviction below
            run.evict(previous)  # top-1: the new best evicts the previous member's copy at once
            previous = member
        # a's export still holds its own input; b and c were superseded and their links are gone already
        assert len(links(run)) == 2 and not Path(a.file).exists()
        hold.unlink()
        wait_until(lambda: run.rows() == [("a.pt", "ok"), ("d.pt", "ok")] and not scheduler.busy(), 180,
                   "a and d exported", run)
    finally:
        scheduler.shutdown()
    assert [Path(e["checkpoint"]).name for e in run.events("export.superseded")] == ["b.pt", "c.pt"]
    assert [Path(e["checkpoint"]).name for e in run.events("export.started")] == ["a.pt", "d.pt"]
    assert not run.events("export.failed")
    assert links(run) == []  # released when each job ended
    block = coreml_block(run.ledger, "w", "exp", run.ctx.output)
    assert block is not None and block["status"] == "ok" and block["source"].endswith("d.pt")
    assert block["verification"]["package_run"] == "ok" and block["path"] == "best.mlpackage"
    assert [ok for _, ok in run.notes] == [True, True]


def test_failed_export_of_the_current_best_is_retried_on_its_own(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    run = make_run(tmp_path, "build_failing_while", marker=str(broken))
    scheduler = ExportScheduler(run.ledger, run.log, retry_delays=(3.0,))
    try:
        scheduler.request_best(run, run.add_member("a.pt", 1, 0.5))
        wait_until(lambda: run.rows() == [("a.pt", "failed")], 60, "the first attempt to fail", run)
        broken.unlink()  # the environment is fixed; no new checkpoint arrives
        wait_until(lambda: run.rows() == [("a.pt", "failed"), ("a.pt", "ok")], 120, "the retry", run)
        wait_until(lambda: len(run.notes) == 2, 10, "the manifest update", run)
    finally:
        scheduler.shutdown()
    failed = run.events("export.failed")
    assert len(failed) == 1 and "simulated failure" in failed[0]["reason"]
    assert "do not fit" not in failed[0]["reason"]
    assert [e["attempt"] for e in run.events("export.retry_scheduled")] == [2]
    assert [e["attempt"] for e in run.events("export.published")] == [2]
    assert [(b["status"], ok) for b, ok in run.notes] == [("failed", False), ("ok", True)]
    assert links(run) == []


def test_a_newer_request_cancels_a_pending_retry(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    run = make_run(tmp_path, "build_failing_while", marker=str(broken))
    scheduler = ExportScheduler(run.ledger, run.log, retry_delays=(600.0,))
    try:
        scheduler.request_best(run, run.add_member("a.pt", 1, 0.5))
        wait_until(lambda: bool(run.events("export.retry_scheduled")), 60, "a retry to be scheduled", run)
        assert len(links(run)) == 1  # the retry keeps its input through the backoff
        broken.unlink()
        scheduler.request_best(run, run.add_member("b.pt", 2, 0.9))
        wait_until(lambda: run.rows() == [("a.pt", "failed"), ("b.pt", "ok")] and not scheduler.busy(), 120,
                   "b exported", run)
    finally:
        scheduler.shutdown()
    assert [Path(e["checkpoint"]).name for e in run.events("export.retry_cancelled")] == ["a.pt"]
    assert links(run) == []
    block = coreml_block(run.ledger, "w", "exp", run.ctx.output)
    assert block is not None and block["status"] == "ok" and block["source"].endswith("b.pt")


def test_reconcile_during_an_export_keeps_its_staging_package_and_input(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    output = tmp_path / "out/w/exp"
    run = make_run(tmp_path, "build_pausing_after_save", output=str(output), marker=str(hold))
    stale_input = inputs_dir(output) / "00ff-1-1.safetensors"
    stale_input.parent.mkdir(parents=True)
    stale_input.write_bytes(b"left by a killed daemon")
    stale_staging = output / "coreml/.ckptd-tmp-staging-dead.mlpackage"
    stale_staging.mkdir(parents=True)
    scheduler = ExportScheduler(run.ledger, run.log)

    def saved_package() -> list[Path]:
        return [p for p in (output / "coreml").glob(".ckptd-tmp-staging-*") if (p / "Manifest.json").exists()]

    try:
        scheduler.request_best(run, run.add_member("a.pt", 1, 0.5))
        wait_until(lambda: bool(saved_package()), 120, "the package to be saved (verification paused)", run)
        live_input = [p for p in links(run) if p != stale_input]
        removed = scheduler.reconcile_inputs(output)  # what recovery does when a processor is re-created
        assert sorted(removed) == sorted([stale_input, stale_staging])
        assert saved_package() and all(p.exists() for p in live_input) and len(live_input) == 1
        hold.unlink()
        wait_until(lambda: run.rows() == [("a.pt", "ok")] and not scheduler.busy(), 120, "the export", run)
    finally:
        hold.unlink(missing_ok=True)
        scheduler.shutdown()
    assert (output / "best.mlpackage/Manifest.json").is_file()
    assert links(run) == [] and not list((output / "coreml").glob(".ckptd-tmp-*"))


def test_rows_left_running_by_a_crash_are_abandoned_at_startup(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    crashed = ledger.export_started("w", "exp", "/train/exp/a.pt", "ab" * 32, 0.5, 1)
    ledger.close()
    lines: list[dict[str, Any]] = []
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ExportScheduler(ledger, RecordingLog(lines)).shutdown()
    [row] = ledger.export_rows("w", "exp")
    assert (row.id, row.status) == (crashed, "abandoned") and row.finished_at is not None
    assert "crash or kill" in (row.reason or "")
    assert [e.get("count") for e in lines if e["event"] == "export.abandoned"] == [1]


def test_a_missing_input_is_reported_as_missing_not_as_a_model_mismatch(tmp_path: Path) -> None:
    from ckptd.errors import ExportError
    from ckptd.export.coreml import build_model
    from ckptd.export.request import ExportRequest

    req = ExportRequest(weights="", factory="ckptd.examples:build_tiny_convnet", output=str(tmp_path / "x"),
                        inputs=[{"name": "image", "shape": [1, 3, 8, 8]}])
    gone = tmp_path / "members/a-0123.safetensors"
    with pytest.raises(ExportError) as missing:
        build_model(req, str(gone))
    assert str(missing.value) == f"the weights to export do not exist: {gone}"
    wrong = tmp_path / "wide.safetensors"
    write_weights(wrong, TinyConvNet(width=4).state_dict())
    with pytest.raises(ExportError, match="do not fit the factory's model"):
        build_model(req, str(wrong))
