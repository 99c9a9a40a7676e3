"""The daemon's side of leases (``ckptd.daemon.run_leases``) on a real SQLite ledger: fair shares, runs that no
other daemon takes, losses reported by the heartbeat, and a lost lease never counted against a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.daemon.config import load_config
from ckptd.daemon.discovery import observe
from ckptd.daemon.leases import LeaseStore
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.logs import get_logger
from ckptd.daemon.pipeline import RunContext, RunProcessor
from ckptd.daemon.run_leases import PRESENCE, RunLeases
from ckptd.errors import LeaseLost
from ckptd.examples import TinyConvNet
from tests.daemon_helpers import atomic_save, make_run, write_config


class Log:
    """Collects log calls (what the daemon would write as JSON lines)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    info = warning = error = debug = _add

    def events(self) -> list[str]:
        return [e for e, _ in self.lines]


def _leases(ledger: Ledger, holder: str, ttl: float, log: Log, lost: list[Any] | None = None) -> RunLeases:
    return RunLeases(LeaseStore(ledger, holder, ttl), log, on_lost=(lost.append if lost is not None else print))


def test_a_daemon_claims_its_fair_share_then_what_nobody_else_takes(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ttl = 0.4
    other = LeaseStore(ledger, "host-b:2", 30)
    other.claim(PRESENCE, "host-b:2")  # a second live daemon, which cannot see these runs
    log = Log()
    mine = _leases(ledger, "host-a:1", ttl, log)
    mine.start()
    try:
        assert mine.live == 2
        mine.total = 2  # two runs seen, two daemons: a share of one
        assert mine.ensure(("w", "r0"))
        assert not mine.ensure(("w", "r1")), "beyond its share: left to the other daemon for a ttl"
        time.sleep(ttl + 0.05)
        assert mine.ensure(("w", "r1")), "nobody took it for a whole ttl: claimed anyway"
        assert ("w", "r1") in mine.sticky and ("w", "r0") not in mine.sticky
        assert [k for k, (h, _) in LeaseStore(ledger, "x:3", 30).holders().items() if h == "host-a:1"
                and k[0] != PRESENCE] == [("w", "r0"), ("w", "r1")]
    finally:
        mine.stop()
        ledger.close()


def test_the_heartbeat_reports_a_lease_taken_over_while_this_daemon_stalled(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    lost: list[Any] = []
    log = Log()
    mine = _leases(ledger, "host-a:1", 0.2, log, lost)
    mine.total = 1
    assert mine.ensure(("w", "r0"))
    time.sleep(0.25)  # stalled past the ttl (no heartbeat ran): another daemon takes the run
    assert LeaseStore(ledger, "host-b:2", 30).claim("w", "r0") is not None
    mine.renew_once()
    assert lost == [("w", "r0")] and not mine.holds(("w", "r0"))
    assert "run.lease_lost" in log.events()
    ledger.close()


def _one_checkpoint_run(tmp_path: Path) -> tuple[Path, Ledger, RunProcessor]:
    """A run with one good checkpoint (a.pt), its SQLite ledger and the processor of its model stream."""
    config = load_config(write_config(tmp_path))
    run = make_run(tmp_path)
    atomic_save({"model_state_dict": TinyConvNet().state_dict(), "metric": 0.5}, run / "a.pt")
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    watch = config.watches[0]
    ctx = RunContext(watch=watch, policy=config.policy_for(watch), run="exp", run_dir=run,
                     output=tmp_path / "out/w/exp")
    return run, ledger, RunProcessor(ctx, ledger, get_logger())


def test_a_lost_lease_is_not_the_checkpoints_failure(tmp_path: Path) -> None:
    """The candidate is read, then the lease is found gone: nothing is recorded, no attempt is counted (a good
    checkpoint must never end 'invalid: processing failed 3 times' because its daemon stalled)."""
    run, ledger, proc = _one_checkpoint_run(tmp_path)
    store = LeaseStore(ledger, "host-a:1", 30)
    LeaseStore(ledger, "host-b:2", 30).claim("w", "exp")  # another daemon holds the run
    proc.fence = lambda db: store.fence(db, "w", "exp")
    obs = observe(run / "a.pt", False)
    assert obs is not None
    for _ in range(4):  # more than MAX_ATTEMPTS: a counted failure would have given up on the checkpoint
        with pytest.raises(LeaseLost):
            proc.process(obs)
    assert ledger.known_files("w", "exp") == []  # nothing recorded for the file
    assert not (tmp_path / "out/w/exp/manifest.json").exists()
    assert torch.load(run / "a.pt", weights_only=True)["metric"] == 0.5  # the trainer's file untouched
    ledger.close()


def test_a_ledger_error_while_processing_is_the_runs_retry_not_the_checkpoints_failure(tmp_path: Path) -> None:
    """FAULT INJECTION: the ledger connection breaks during a read (a PostgreSQL restart, a dropped idle
    connection, noticed at the lease check). The job retries; the checkpoint is charged nothing."""
    import sqlite3

    run, ledger, proc = _one_checkpoint_run(tmp_path)

    def broken(db: Any) -> int:
        raise sqlite3.OperationalError("consuming input failed: server closed the connection unexpectedly")

    proc.fence = broken
    obs = observe(run / "a.pt", False)
    assert obs is not None
    for _ in range(4):
        with pytest.raises(sqlite3.Error):
            proc.process(obs)
    assert ledger.known_files("w", "exp") == []  # no 'failed' row, no attempt counted
    proc.fence = None  # the ledger is back
    assert proc.process(obs) == "done"
    ledger.close()


def test_runs_this_daemon_cannot_reach_are_given_back_at_the_heartbeat(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    lost: list[Any] = []
    reachable = {("w", "r0"): True, ("w", "r1"): True}
    mine = RunLeases(LeaseStore(ledger, "host-a:1", 30), Log(), on_lost=lost.append,
                     renewable=lambda key: reachable[key])
    mine.total = 2
    assert mine.ensure(("w", "r0")) and mine.ensure(("w", "r1"))
    reachable[("w", "r1")] = False  # its watch root is gone here for longer than the ttl
    mine.renew_once()
    assert mine.held() == {("w", "r0")} and lost == [("w", "r1")]
    assert LeaseStore(ledger, "host-b:2", 30).claim("w", "r1") is not None  # another daemon takes it at once
    ledger.close()
