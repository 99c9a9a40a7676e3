"""The watchdog adapter against the real kernel: a real inotify queue overflow reaches the daemon's callback.

Why in-process and not through `ckptd run`: the kernel reads fs.inotify.max_queued_events once, when an inotify
instance is created, and the sysctl is machine-wide. Here it is lowered only for the instant EventWatcher creates
its instance (restored in a finally), so other processes on the machine keep the normal limit; a daemon
subprocess would need it lowered for the seconds it takes to start.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from ckptd.daemon.watcher import EventWatcher

LIMIT = Path("/proc/sys/fs/inotify/max_queued_events")


def _watcher_with_tiny_queue(on_overflow: threading.Event) -> EventWatcher:
    try:
        old = LIMIT.read_text()
        LIMIT.write_text("16\n")
    except OSError as exc:
        pytest.skip(f"cannot lower {LIMIT} here ({exc}); the overflow needs a tiny kernel queue")
    try:
        return EventWatcher(lambda _path, _moved_in: None, on_overflow.set)
    finally:
        LIMIT.write_text(old)


def test_real_inotify_overflow_is_detected_whatever_the_log_level(tmp_path: Path) -> None:
    """watchdog signals IN_Q_OVERFLOW only through its WatchCallback.on_queue_overflow (and a log line). The daemon
    used to match that log line, so `log.level: error` (root logger at ERROR) or a quieted watchdog logger hid
    every overflow. Quiet it here exactly that way; the overflow must still arrive."""
    quiet = logging.getLogger("watchdog")
    previous = quiet.level
    quiet.setLevel(logging.ERROR)
    overflowed = threading.Event()
    watcher = _watcher_with_tiny_queue(overflowed)
    try:
        watcher.add(tmp_path)
        deadline = time.monotonic() + 20
        i = 0
        while not overflowed.is_set() and time.monotonic() < deadline:
            (tmp_path / f"f{i}.pt").touch()  # each touch queues several events; the queue holds 16
            i += 1
        assert overflowed.wait(5), f"no overflow reported after {i} files"
    finally:
        watcher.stop()
        quiet.setLevel(previous)


def test_events_still_flow_with_the_overflow_callback_registered(tmp_path: Path) -> None:
    """The overflow callback shares the root's inotify watch (IN_MASK_ADD): the emitter's events are intact,
    on the root itself and below it."""
    seen: list[tuple[Path, bool]] = []
    moved = threading.Event()

    def notify(path: Path, moved_in: bool) -> None:
        seen.append((path, moved_in))
        if moved_in and path.name == "c.pt":
            moved.set()

    (tmp_path / "run").mkdir()
    watcher = EventWatcher(notify, lambda: None)
    try:
        watcher.add(tmp_path)
        for where in (tmp_path, tmp_path / "run"):
            moved.clear()
            (where / "c.pt.tmp").write_bytes(b"x")
            (where / "c.pt.tmp").rename(where / "c.pt")
            assert moved.wait(10), seen
            assert (where / "c.pt", True) in seen
    finally:
        watcher.stop()
