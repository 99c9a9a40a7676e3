"""Main-loop plumbing: waking the loop safely from signal handlers and threads, and guarding its stages.

Why a self-pipe: a Python signal handler runs on the main thread between two bytecodes, possibly while that thread
holds a lock (an ``Event``'s condition, a logging lock). Calling ``Event.set()`` from the handler can therefore
deadlock. Here handlers only set plain flags (uvicorn style); ``signal.set_wakeup_fd`` makes the C-level handler
write a byte to a pipe, and threads (workers finishing, the inotify observer) write a byte to the same pipe. The
loop waits on the pipe with a selector, so no wakeup is ever lost and nothing in a handler can block.

Why stage guards: the loop must never die from one failing piece of work (an OSError writing the metrics
textfile, a listing error on a watch root, a bug). Each stage's failure is logged once (event + reason), counted,
and the stage backs off (1 s, 2 s, 4 s … capped) while the rest of the loop keeps running.
"""

from __future__ import annotations

import os
import selectors
import signal
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from ckptd.daemon.logs import get_logger
from ckptd.errors import CkptdError

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


class Wakeup:
    """A self-pipe the loop sleeps on; signal handlers set flags only, threads call :meth:`wake`."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._r, selectors.EVENT_READ)
        self.stop_requested = False  # SIGTERM / SIGINT
        self.reload_requested = False  # SIGHUP
        self.signals = 0  # how many stop/reload signals arrived (for the log line; a plain int is handler-safe)
        self._installed: dict[int, Any] = {}
        self._old_wakeup_fd: int | None = None
        self._closed = False

    # --- signals (main thread only) ---------------------------------------------------------------------------
    def install_signals(self) -> None:
        """Route SIGTERM/SIGINT (stop) and SIGHUP (reload) to flags. Only possible on the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._old_wakeup_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for signum, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop),
                                (getattr(signal, "SIGHUP", None), self._on_reload)):
            if signum is not None:
                self._installed[signum] = signal.signal(signum, handler)

    def _on_stop(self, _signum: int, _frame: Any) -> None:
        self.stop_requested = True  # nothing else: the loop notices (the wakeup fd already woke it)
        self.signals += 1

    def _on_reload(self, _signum: int, _frame: Any) -> None:
        self.reload_requested = True
        self.signals += 1

    # --- waking and waiting -------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Wake the loop (any thread). A full pipe means a wakeup is already pending, which is enough."""
        if self._closed:
            return  # never write to a closed (possibly reused) descriptor
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def wait(self, timeout: float) -> None:
        """Sleep until woken or ``timeout`` seconds pass, then drain the pipe (the loop re-checks all state)."""
        if self._closed:
            return
        self._selector.select(max(timeout, 0.0))
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._old_wakeup_fd is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._old_wakeup_fd)
            for signum, previous in self._installed.items():
                signal.signal(signum, previous)
        self._selector.close()
        os.close(self._r)
        os.close(self._w)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def expected(exc: BaseException) -> bool:
    """Failures of the environment (files, the ledger, our own errors): no traceback in the log line."""
    return isinstance(exc, (OSError, sqlite3.Error, CkptdError))


class StageGuard:
    """One stage of the main loop: run it when due; on an exception log one line, count it, back off.

    ``counter`` is a Prometheus counter with a ``stage`` label (``ckptd_loop_errors_total``).
    """

    def __init__(self, name: str, counter: Any, *, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> None:
        self.name = name
        self.counter = counter
        self.first = first
        self.cap = cap
        self.failures = 0
        self.until = 0.0

    @property
    def healthy(self) -> bool:
        return self.failures == 0

    def due(self, now: float) -> bool:
        return now >= self.until

    def run(self, now: float, fn: Callable[[], object]) -> bool:
        """Run ``fn`` unless backing off. True when it ran and succeeded."""
        if not self.due(now):
            return False
        try:
            fn()
        except Exception as exc:  # the loop's guard: log, count, back off, keep running  # noqa: BLE001
            self.failed(now, exc)
            return False
        self.succeeded()
        return True

    def failed(self, now: float, exc: BaseException) -> float:
        self.failures += 1
        delay = min(self.first * 2 ** (self.failures - 1), self.cap)
        self.until = now + delay
        self.counter.labels(stage=self.name).inc()
        get_logger().error("daemon.loop_error", stage=self.name, reason=describe(exc), failures=self.failures,
                           retry_in=f"{delay:g}s", exc_info=not expected(exc))
        return delay

    def succeeded(self) -> None:
        if self.failures:
            get_logger().info("daemon.loop_recovered", stage=self.name, after_failures=self.failures)
        self.failures = 0
        self.until = 0.0
