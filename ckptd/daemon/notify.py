"""systemd notify protocol: one datagram to ``$NOTIFY_SOCKET`` (abstract sockets included).

Written here instead of depending on PyPI's ``sdnotify`` (unmaintained since 2017); the protocol is a single
``sendto``. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.

Sends never block: the main loop calls these, and a datagram socket whose reader stopped reading (a hung
manager, a test harness) blocks ``sendto`` once its queue is full, which would stall the loop. A message that
cannot be queued is dropped; STATUS is sent only when its text changes, so the queue rarely fills.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and (not pid or pid == str(os.getpid())) \
            else None
        self._last_ping = 0.0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
                sock.sendto("\n".join(fields).encode(), addr)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *( [f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        """STATUS=, only when it changed (the loop calls this every pass)."""
        if text != self._last_status and self.send(f"STATUS={text}"):
            self._last_status = text

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self, now: float) -> None:
        """Ping at half the configured interval; call only from the main loop, so a stuck loop stops the pings."""
        if self.watchdog_interval is not None and now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.send("WATCHDOG=1")
