"""Lease faults: a daemon stalled inside its publishing transaction, colliding holder ids, a daemon killed -9 on a
single host, who holds what in ``ckptd status``, malformed PostgreSQL URLs.

Real servers and processes throughout: PostgreSQL (tests/pg_server.py), real ``ckptd`` processes. The stalled
publisher is a real second connection holding the lease row in an open transaction (what a SIGSTOPped daemon
leaves behind); a dead local holder is a pid above the kernel's pid_max (never alive).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckptd.daemon.config import load_config
from ckptd.daemon.leases import LeaseStore, default_holder, display_holder, host_of, pid_of
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.ledger_db import PgError, check_target, describe, session_settings
from ckptd.daemon.status import collect_status, print_status, print_table
from ckptd.errors import ConfigError
from tests.conftest import PYTHON, subprocess_env
from tests.daemon_helpers import DaemonProcess, atomic_save, write_config
from tests.pg_server import connect

DEAD_PID = 2**22 + 999  # above Linux's largest pid_max: never a live process
SECRET = "S3cretPw"


# --- 1. a publisher stalled inside its transaction ------------------------------------------------------------


def test_session_timeouts_fit_the_lease_ttl(pg_url: str) -> None:
    """Every PostgreSQL session of a daemon bounds lock waits (min(5s, ttl/6)) and idle transactions (ttl: the
    server ends a stalled publisher's session), has a generous statement timeout and TCP keepalives both ways."""
    assert session_settings(30)["lock_timeout"] == "5000ms"
    assert session_settings(3)["lock_timeout"] == "500ms"
    ledger = Ledger(pg_url)
    store = LeaseStore(ledger, "host-a:1.aaaaaa", 3)
    try:
        for led in (ledger, store.db):
            assert led is ledger or led._db.conn is not ledger._db.conn  # the store has a connection of its own
            show = {name: led.query(f"SHOW {name}")[0][0] for name in (
                "lock_timeout", "idle_in_transaction_session_timeout", "statement_timeout")}
            assert show == {"lock_timeout": "500ms", "idle_in_transaction_session_timeout": "3s",
                            "statement_timeout": "10min"}, show
            params = led._db.conn.info.get_parameters()
            assert params.get("keepalives") == "1" and params.get("keepalives_idle") == "10", params
            # on a TCP session the server probes the client too (a vanished daemon host loses its locks)
            assert led.query("SHOW tcp_keepalives_idle")[0][0] in ("10", "10s")
    finally:
        ledger.close()
    assert store.db._db.conn.closed  # closed with the ledger


def test_a_stalled_publisher_never_blocks_claims_or_heartbeats(pg_url: str) -> None:
    """Another daemon's transaction holds the lease row (it fenced, then stalled): a claim gives up after the lock
    timeout with None instead of waiting, and the store's heartbeat is not stuck behind this daemon's own long
    job transaction either."""
    ledger = Ledger(pg_url, holder="host-b:2.bbbbbb")
    store = LeaseStore(ledger, "host-b:2.bbbbbb", 3)  # lock timeout 0.5 s
    try:
        with connect(pg_url) as stalled:
            stalled.execute("INSERT INTO leases (watch, run, holder, held_since, expires_at, generation) VALUES "
                            "('w', 'r0', 'host-a:1.aaaaaa', 0, 1, 0)")  # expired: takeable, were it not locked
            stalled.execute("BEGIN")
            stalled.execute("UPDATE leases SET generation = generation + 1 WHERE watch='w' AND run='r0'")
            assert store.claim("w", "r1") is not None
            started = time.monotonic()
            assert store.claim("w", "r0") is None  # locked: not claimable now
            assert time.monotonic() - started < 2.0
            # the jobs' connection is busy in a long transaction (holding the ledger's lock): heartbeats go on
            busy, done = threading.Event(), threading.Event()

            def long_job() -> None:
                with ledger.transaction() as db:
                    db.execute("SELECT 1")
                    busy.set()
                    done.wait(10)

            job = threading.Thread(target=long_job)
            job.start()
            assert busy.wait(10)
            try:
                started = time.monotonic()
                assert store.renew([("w", "r1")]) == {("w", "r1")}
                assert store.holders()[("w", "r1")][0] == "host-b:2.bbbbbb"
                assert time.monotonic() - started < 1.0
            finally:
                done.set()
                job.join(10)
            stalled.execute("ROLLBACK")
        lease = store.claim("w", "r0")  # the row is free again: taken over
        assert lease is not None and lease.generation == 1
    finally:
        ledger.close()


def test_the_server_ends_a_stalled_publishers_transaction_after_the_ttl(pg_url: str) -> None:
    """A daemon stalled inside its fenced transaction for longer than its ttl loses its session: its publication
    rolls back (an error when it wakes up), its row lock goes, and another daemon takes the run over."""
    a_ledger, b_ledger = Ledger(pg_url, holder="host-a:1.aaaaaa"), Ledger(pg_url, holder="host-b:2.bbbbbb")
    a, b = LeaseStore(a_ledger, "host-a:1.aaaaaa", 1), LeaseStore(b_ledger, "host-b:2.bbbbbb", 1)
    outcome: list[BaseException | None] = []

    def stalled_publication() -> None:
        try:
            with a_ledger.transaction() as db:
                a.fence(db, "w", "exp")
                db.execute("UPDATE leases SET holder = holder WHERE watch='w' AND run='exp'")
                time.sleep(2.5)  # SIGSTOP, a VM pause: idle in transaction past the ttl
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    try:
        assert a.claim("w", "exp") is not None
        thread = threading.Thread(target=stalled_publication)
        thread.start()
        deadline, lease = time.monotonic() + 10, None
        while lease is None and time.monotonic() < deadline:
            lease = b.claim("w", "exp")
            time.sleep(0.1)
        taken_after = time.monotonic()
        assert lease is not None and lease.holder == "host-b:2.bbbbbb"
        thread.join(10)
        assert isinstance(outcome[0], sqlite3.Error), outcome  # PgError: the commit failed, nothing published
        assert taken_after < deadline - 7  # within ~ttl (+ the claim retries), not after the stall ended
        assert b.get("w", "exp").generation == lease.generation  # type: ignore[union-attr]
    finally:
        a_ledger.close()
        b_ledger.close()


# --- 2. holder ids ---------------------------------------------------------------------------------------------------


def test_holder_ids_carry_a_per_process_token() -> None:
    me = default_holder()
    assert re.fullmatch(rf"{re.escape(socket.gethostname())}:{os.getpid()}\.[0-9a-f]{{6}}", me), me
    assert default_holder() == me  # one id for the life of the process
    assert (host_of(me), pid_of(me), display_holder(me)) == (socket.gethostname(), os.getpid(),
                                                             f"{socket.gethostname()}:{os.getpid()}")
    assert (host_of("old-host:42"), pid_of("old-host:42"), display_holder("old-host:42")) == \
        ("old-host", 42, "old-host:42")  # rows written before the token
    assert pid_of("h:x.abc") is None and display_holder(None) is None
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports and exits
        os.write(write, default_holder().encode())
        os._exit(0)
    os.waitpid(child, 0)
    os.close(write)
    theirs = os.read(read, 200).decode()
    os.close(read)
    assert theirs.split(".")[1] != me.split(".")[1] and pid_of(theirs) == child


def test_two_daemons_with_the_same_host_and_pid_are_different_holders(pg_url: str) -> None:
    """Containers sharing the host's name (host networking), each with ckptd as pid 1, one PostgreSQL ledger:
    their leases exclude each other. (On SQLite, one host and one daemon, the same id under another token is a
    predecessor: see below.)"""
    ledger = Ledger(pg_url)
    try:
        a = LeaseStore(ledger, "box:1.aaaaaa", 30)
        b = LeaseStore(ledger, "box:1.bbbbbb", 30)
        assert a.claim("w", "r0") is not None
        assert b.claim("w", "r0") is None
        assert b.renew([("w", "r0")]) == set()
    finally:
        ledger.close()


# --- 3. a single host after kill -9 ----------------------------------------------------------------------------------


def test_sqlite_takes_a_dead_local_holders_lease_at_once(tmp_path: Path) -> None:
    """On one host the pid check is authoritative: a lease of a dead pid, or of our pid under another token (a
    predecessor), is taken now; a live pid's is not."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    host = socket.gethostname()
    me = default_holder()
    try:
        for run, holder in (("dead", f"{host}:{DEAD_PID}.abcdef"), ("old-form", f"{host}:{DEAD_PID}"),
                            ("predecessor", f"{host}:{os.getpid()}.000000"), ("live", f"{host}:1.abcdef"),
                            ("elsewhere", f"other-host:{DEAD_PID}.abcdef")):
            ledger.write("INSERT INTO leases (watch, run, holder, held_since, expires_at, generation) VALUES "
                         "('w', ?, ?, 0, ?, 3)", (run, holder, time.time() + 3600))
        store = LeaseStore(ledger, me, 30)
        claimed = {run: store.claim("w", run) for run in ("dead", "old-form", "predecessor", "live", "elsewhere")}
        assert {run for run, lease in claimed.items() if lease} == {"dead", "old-form", "predecessor"}
        assert all(lease.generation == 4 and lease.holder == me for lease in claimed.values() if lease)
    finally:
        ledger.close()


def test_postgres_waits_for_the_ttl_of_a_dead_looking_local_holder(pg_url: str) -> None:
    """Not on PostgreSQL: daemons in containers share a host name with separate pid namespaces, where another
    daemon's pid looks dead (or like ours); only expiry frees its lease there."""
    ledger = Ledger(pg_url)
    try:
        ledger.write("INSERT INTO leases (watch, run, holder, held_since, expires_at, generation) VALUES "
                     f"('w', 'r', ?, 0, {ledger.now_sql} + 3600, 0)", (f"{socket.gethostname()}:{DEAD_PID}.abc",))
        assert LeaseStore(ledger, default_holder(), 30).claim("w", "r") is None
    finally:
        ledger.close()


@pytest.mark.slow
def test_once_after_a_killed_daemon_processes_the_run(tmp_path: Path) -> None:
    """The default SQLite ledger: `ckptd run` killed -9 (OOM) leaves its leases; `ckptd once` right after
    processes the new checkpoint instead of skipping the run for lease_ttl (30s)."""
    cfg = write_config(tmp_path, watch={"mode": "poll", "poll_interval": "0.5s", "settle": "0.5s"})
    run = tmp_path / "train" / "exp"
    run.mkdir()
    atomic_save({"model_state_dict": {"w": __import__("torch").ones(4)}, "metric": 0.1}, run / "e0.pt")
    daemon = DaemonProcess(cfg, tmp_path / "d.log")
    try:
        daemon.wait_for(lambda ev: any(e["event"] == "checkpoint.joined" for e in ev), 30, "e0 joined")
    finally:
        daemon.kill()
    atomic_save({"model_state_dict": {"w": __import__("torch").zeros(4)}, "metric": 0.9}, run / "e1.pt")
    started = time.monotonic()
    done = subprocess.run([PYTHON, "-m", "ckptd.cli", "once", "-c", str(cfg)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 20  # not after the 30 s ttl
    events = [json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line.startswith("{")]
    taken = [e for e in events if e["event"] == "run.lease_acquired"]
    assert taken and pid_of(taken[0].get("taken_over_from", "")) == daemon.proc.pid, taken
    assert any(e["event"] == "checkpoint.joined" and e["checkpoint"].endswith("e1.pt") for e in events), events
    manifest = json.loads((tmp_path / "out" / "w" / "exp" / "manifest.json").read_text())
    assert manifest["best"]["source"] == str(run / "e1.pt")


# --- 4. ckptd status names the holder ------------------------------------------------------------------------------


def _status_config(tmp_path: Path, ledger: Path | str) -> Any:
    (tmp_path / "train").mkdir(exist_ok=True)
    cfg = {"state_dir": str(tmp_path / "state"), "ledger": str(ledger),
           "watches": [{"name": "w", "root": str(tmp_path / "train"), "output": str(tmp_path / "out/{watch}/{run}")}],
           "policies": {"default": {"average": {"top_k": 2}}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, check_paths=False)


def test_status_table_shows_who_holds_each_run_and_since_when(tmp_path: Path) -> None:
    target = tmp_path / "state" / "ledger.sqlite3"
    ledger = Ledger(target)
    try:
        for run in ("held", "free"):
            ledger.touch_run("w", run, f"/t/{run}", f"/o/{run}")
            ledger.record("w", run, f"/t/{run}/c.pt", 1, 2, status="done", metric=0.5)
        config = _status_config(tmp_path, target)
        plain = io.StringIO()
        print_table(collect_status(config), plain)  # nobody holds a run: the table as before
        assert "HELD" not in plain.getvalue()
        store = LeaseStore(ledger, "gpu-node-7:4242.c0ffee", 60)
        lease = store.claim("w", "held")
        assert lease is not None
        rows = collect_status(config)
        table = io.StringIO()
        print_table(rows, table, now=lease.held_since + 125)
        header, *body = table.getvalue().splitlines()
        assert header.split()[-3:] == ["HELD", "BY", "HELD"], header
        cells = {line.split()[0]: line.split() for line in body}
        assert cells["w/held"][-2:] == ["gpu-node-7:4242", "2m"], body  # host:pid, without the token
        assert cells["w/free"][-2:] == ["-", "-"], body
        verbose = io.StringIO()
        print_status(rows, verbose)
        assert "held by   gpu-node-7:4242 since " in verbose.getvalue()
        assert "lease holder gpu-node-7:4242.c0ffee" in verbose.getvalue()
        assert {r["run"]: r["holder"] for r in rows} == {"held": "gpu-node-7:4242.c0ffee", "free": None}
    finally:
        ledger.close()


# --- 5. malformed PostgreSQL URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [f"postgresql://u:pa[{SECRET}@127.0.0.1:1/db",
                                 f"postgresql://u:{SECRET}@127.0.0.1:notaport/db"])
def test_a_malformed_postgres_url_is_a_config_error_without_the_password(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        check_target(url)
    assert SECRET not in str(info.value)
    assert SECRET not in describe(url) and describe(url).startswith("postgresql://")  # never raises
    cfg = write_config(tmp_path, extra={"ledger": url})
    with pytest.raises(ConfigError) as err:
        load_config(cfg, check_paths=False)
    assert SECRET not in str(err.value) and "not a valid PostgreSQL URL" in str(err.value)
    for command in ("run", "status") if "[" in url else ("status",):  # `run` loads the config the same way
        res = subprocess.run([PYTHON, "-m", "ckptd.cli", command, "-c", str(cfg)], capture_output=True, text=True,
                             env=subprocess_env(), timeout=60)
        out = res.stdout + res.stderr
        assert res.returncode == 2 and "Traceback" not in out and SECRET not in out, (command, out)
        assert "ledger" in out and "not a valid PostgreSQL URL" in out, out


def test_a_pg_error_message_never_repeats_the_password_of_an_odd_url() -> None:
    from ckptd.daemon.ledger_db import _pg_message

    url = f"postgresql://u:{SECRET}%21@h1:5432,h2/db"  # libpq's multi-host form: Python cannot parse it
    message = _pg_message(RuntimeError(f"password {SECRET}! rejected for {SECRET}%21"), url)
    assert SECRET not in message, message
    assert isinstance(PgError("x"), sqlite3.OperationalError)
