"""Children that run in their own process group (CoreML exports, evaluations), owned by one scheduler.

Why one class: both kinds must die with everything they started (a timeout, the daemon stopping), and a stopping
owner must also kill a child that was being started at that moment. Killing is always of the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading


def kill_group(proc: subprocess.Popen[bytes], wait: float = 30.0) -> None:
    """SIGKILL the child's process group (it was started with ``start_new_session``), then reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=wait)


class ChildProcesses:
    """The children of one owner, so its shutdown kills exactly those, and a stopped owner never leaves a flag
    behind that would kill another owner's children."""

    def __init__(self) -> None:
        self._live: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._live.add(proc)
            stopping = self._stopping
        if stopping:  # the owner began stopping while this one was starting
            kill_group(proc)

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._live.discard(proc)

    def kill_all(self) -> None:
        """On shutdown: stop them now (their work is redone on restart; nothing partial was published)."""
        with self._lock:
            self._stopping = True
            procs = list(self._live)
        for proc in procs:
            kill_group(proc)
