"""Every one-shot command ends quietly when its reader goes away (`ckptd status | head -1`): killed by SIGPIPE
like any Unix tool, no traceback, no "Exception ignored ... BrokenPipeError". The daemon does not die of SIGPIPE.

Real commands over the shared real ledger (tests/test_status.py ``build_fleet``), in real pipes."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ckptd.cli import main
from ckptd.daemon.logs import _SafeStream
from tests.conftest import PYTHON, subprocess_env
from tests.daemon_helpers import DaemonProcess, write_config
from tests.test_status import Fleet, build_fleet, ckptd_cli

PIPE_SIZE = 4096  # the smallest pipe Linux allows (one page): an output a few times larger cannot fit in it
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return build_fleet(tmp_path_factory)


def _assert_quiet_sigpipe(returncode: int, stderr: str) -> None:
    assert returncode == -signal.SIGPIPE, (returncode, stderr)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr


def _into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess[str]:
    """The command writes into a pipe whose reader has already gone (`ckptd ... | true`)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([PYTHON, "-m", "ckptd.cli", *args], stdout=write, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(), timeout=120)
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [
    ["status"], ["status", "-v"], ["status", "--errors"], ["history", "w/exp"], ["check"], ["--help"],
    ["inspect", "CHECKPOINT"]], ids=["status", "status-v", "status-errors", "history", "check", "help", "inspect"])
def test_one_shot_command_into_a_closed_pipe(fleet: Fleet, args: list[str]) -> None:
    if args[0] in ("status", "history", "check"):
        args = [*args, "-c", str(fleet.config)]
    args = [str(fleet.root / "train/exp/ep00.pt") if a == "CHECKPOINT" else a for a in args]
    res = _into_closed_pipe(args)
    _assert_quiet_sigpipe(res.returncode, res.stderr)


@pytest.mark.parametrize("args", [["status", "--json"], ["history", "w/exp", "--json"]], ids=["status", "history"])
def test_reader_that_stops_after_the_first_line(fleet: Fleet, args: list[str]) -> None:
    """`ckptd ... | head -1`, made deterministic: the pipe holds one page and the output is several, so the
    command is still writing when the reader, having read its first line byte by byte, closes the pipe."""
    args = [*args, "-c", str(fleet.config)]
    full = ckptd_cli(*args)
    assert full.returncode == 0 and len(full.stdout) > 1.5 * PIPE_SIZE, len(full.stdout)
    read, write = os.pipe()
    fcntl.fcntl(write, F_SETPIPE_SZ, PIPE_SIZE)
    proc = subprocess.Popen([PYTHON, "-m", "ckptd.cli", *args], stdout=write, stderr=subprocess.PIPE,
                            env=subprocess_env())
    os.close(write)
    line = b""
    try:
        while not line.endswith(b"\n"):
            byte = os.read(read, 1)
            assert byte, "the command ended before writing a line"
            line += byte
    finally:
        os.close(read)
    _, err = proc.communicate(timeout=60)
    assert line.decode() == full.stdout.splitlines(keepends=True)[0]
    _assert_quiet_sigpipe(proc.returncode, err.decode())


def test_in_process_main_leaves_the_sigpipe_handler_as_it_found_it(fleet: Fleet, capsys) -> None:
    before = signal.getsignal(signal.SIGPIPE)
    assert main(["status", "-c", str(fleet.config), "--run", "broken"]) == 0
    assert signal.getsignal(signal.SIGPIPE) == before
    assert "w/broken" in capsys.readouterr().out


def test_daemon_survives_sigpipe(tmp_path: Path) -> None:
    """`ckptd run` keeps Python's handling of SIGPIPE (ignored): a log reader that goes away must not kill it."""
    daemon = DaemonProcess(write_config(tmp_path), tmp_path / "daemon.log")
    try:
        daemon.signal(signal.SIGPIPE)
        time.sleep(0.3)
        assert daemon.proc.poll() is None, daemon.log_path.read_text()[-2000:]
    finally:
        assert daemon.stop() == 0


def test_daemon_whose_log_reader_went_away_still_does_its_work(tmp_path: Path) -> None:
    """`ckptd once 2>&1 | head -1`: the log pipe closes after one line; the daemon drops the rest of its log lines
    instead of dying on EPIPE in the middle of a job, and publishes as usual."""
    import torch

    config = write_config(tmp_path, watch={"settle": 0})
    run = tmp_path / "train" / "exp"
    run.mkdir(parents=True)
    for i in range(3):
        torch.save({"model": {"w": torch.full((4,), float(i))}, "metric": float(i)}, run / f"ckpt_{i}.pt")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([PYTHON, "-m", "ckptd.cli", "once", "-c", str(config)], stdout=write_end,
                            stderr=write_end, env=subprocess_env(), cwd=tmp_path)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        first = reader.readline()  # one log line, then the reader is gone
    assert first.startswith(b"{"), first
    assert proc.wait(timeout=120) == 0
    manifest = (tmp_path / "out" / "w" / "exp" / "manifest.json").read_text()
    assert '"metric": 2.0' in manifest and "average.safetensors" in manifest


def _with_closed(fd: int, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`ckptd ARGS >&-` (fd 1) or `ckptd ARGS 2>&-` (fd 2): the command starts with that descriptor closed (Python
    then sets sys.stdout or sys.stderr to None); the other one is captured."""
    return subprocess.run([PYTHON, "-m", "ckptd.cli", *args], capture_output=True, preexec_fn=lambda: os.close(fd),
                          text=True, env=subprocess_env(), cwd=cwd, timeout=120)


@pytest.mark.parametrize("args", [["status"], ["status", "-v"], ["status", "--json"], ["history", "w/exp"],
                                  ["--help"]], ids=["status", "status-v", "status-json", "history", "help"])
def test_one_shot_command_with_stdout_closed(fleet: Fleet, args: list[str]) -> None:
    """`ckptd status >&-`: no traceback; the lost output is an error (exit 1, one line), like a Unix tool's write
    error."""
    if args[0] != "--help":
        args = [*args, "-c", str(fleet.config)]
    res = _with_closed(1, args)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert res.stderr == "ckptd: error: standard output is closed: the output was lost\n", res.stderr


def test_one_shot_command_with_stderr_closed_keeps_its_errors_off_stdout(tmp_path: Path) -> None:
    """`ckptd status --json 2>&-` over a damaged ledger: exit 1, and the error message is dropped, not printed
    on stdout (where a JSON reader would get it); a good run prints its output as usual."""
    config = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "ledger.sqlite3").write_bytes(b"garbage, not SQLite " * 500)
    res = _with_closed(2, ["status", "--json", "-c", str(config)])
    assert res.returncode == 1 and res.stdout == "", (res.returncode, res.stdout)
    (tmp_path / "state" / "ledger.sqlite3").unlink()
    res = _with_closed(2, ["status", "-c", str(config)])
    assert res.returncode == 0 and "no runs recorded yet" in res.stdout, res


def test_log_stream_that_is_none_is_broken_from_the_start() -> None:
    stream = _SafeStream(None)
    assert stream.broken and not stream.isatty()
    assert stream.write("a log line\n") == len("a log line\n")
    stream.flush()


def test_daemon_started_with_stderr_closed_still_does_its_work(tmp_path: Path) -> None:
    """`ckptd once 2>&-` (the same start as `ckptd run 2>&-`): sys.stderr is None; the daemon logs nowhere and
    publishes as usual, instead of exiting 1 at its first log line."""
    import torch

    config = write_config(tmp_path, watch={"settle": 0})
    run = tmp_path / "train" / "exp"
    run.mkdir(parents=True)
    for i in range(3):
        torch.save({"model": {"w": torch.full((4,), float(i))}, "metric": float(i)}, run / f"ckpt_{i}.pt")
    res = _with_closed(2, ["once", "-c", str(config)], cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    manifest = (tmp_path / "out" / "w" / "exp" / "manifest.json").read_text()
    assert '"metric": 2.0' in manifest and "average.safetensors" in manifest
