"""Waiting for a scheduler to go idle (``ckptd once`` waits for the exports and evaluations it started)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_idle(busy: Callable[[], bool], timeout: float | None = None, interval: float = 0.05) -> None:
    """Poll ``busy`` until it answers False or ``timeout`` seconds pass (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while busy() and (deadline is None or time.monotonic() < deadline):
        time.sleep(interval)
