"""Helper processes of the fault suite: the writer subprocess (bench/chaos_writer.py) and an RSS sampler."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import PYTHON, REPO, subprocess_env


class WriterProc:
    """A writer subprocess (bench/chaos_writer.py) doing real torch.save writes on command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([PYTHON, "-m", "bench.chaos_writer"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=subprocess_env(), cwd=REPO, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if self.read(120) is None:
            raise RuntimeError("writer process did not start")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.lines.put(json.loads(line))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def until(self, key: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.read(max(0.01, deadline - time.monotonic()))
            if msg is not None and key in msg:
                return msg
        return None

    def save(self, path: Path, seed: int, metric: float, step: int, *, kb: int, how: str = "atomic",
             **kw: Any) -> None:
        self.send(op="save", path=str(path), seed=seed, metric=metric, step=step, kb=kb, how=how, **kw)
        if self.until("ok", 120) is None:
            raise RuntimeError(f"writer did not finish {path}")

    def prepare(self, path: Path, seed: int, metric: float, step: int, *, kb: int, how: str) -> None:
        self.send(op="prepare", path=str(path), seed=seed, metric=metric, step=step, kb=kb, how=how)
        if self.until("prepared", 120) is None:
            raise RuntimeError(f"writer did not prepare {path}")

    def commit(self) -> None:
        self.send(op="commit")
        if self.until("ok", 120) is None:
            raise RuntimeError("writer did not commit")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="exit")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Samples a process's RSS every ``interval`` seconds; ``peak_between(t0, t1)`` for attribution."""

    def __init__(self, pid_of: Callable[[], int], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid_of, self.interval = pid_of, interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic(), rss_bytes(self.pid_of())))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()

    def peak_between(self, t0: float, t1: float) -> int:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0)
