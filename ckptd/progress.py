"""A quiet progress indicator: silent for quick work, visible once an operation passes ~1.5 s."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, stream: TextIO | None = None, delay_s: float = 1.5, every_s: float = 5.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.delay_s = delay_s
        self.every_s = every_s
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = False
        self._tty = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.start < self.delay_s:
            return
        if not self._tty and now - self._last < self.every_s and done < total:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        text = f"{self.label}: {pct:5.1f}% ({now - self.start:.1f}s)"
        if self._tty:
            self.stream.write("\r" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown and self._tty:
            self.stream.write("\n")
            self.stream.flush()
