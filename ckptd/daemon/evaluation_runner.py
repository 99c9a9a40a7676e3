"""Run the user's evaluation program on one candidate and read its verdict. I/O only; no decisions.

The program is an argv list (no shell), started in its own session and process group with the policy's timeout
(the whole group is killed on timeout, when the daemon stops, and by the next daemon if this one died: its pid,
which is its group's id, goes to ``on_start`` for the ledger, and its environment carries
``CKPTD_EVALUATION_ID``). A grandchild that calls ``setsid`` itself leaves the group and escapes that; under
systemd, ``KillMode=mixed`` and the unit's cgroup still end it when the service stops.

It gets a candidate's model-only weights in ``CKPTD_WEIGHTS`` (a scratch copy of its own, never a file ckptd
publishes); the **last line** of its stdout must be one JSON object holding the metric. Its output is read
through pipes and never written to disk: only the last ``STDOUT_TAIL`` bytes of stdout (1 MiB, so the verdict
line may be up to about 1 MiB long) and the last ``STDERR_TAIL`` bytes of stderr (8 KiB) are kept in memory;
what came before is dropped, so a chatty evaluator costs neither disk nor memory.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ckptd.child_processes import ChildProcesses, kill_group
from ckptd.daemon.config_evaluate import EvaluatePolicy

STDOUT_TAIL = 1 << 20  # bytes of stdout kept: the verdict line may be up to this long
STDERR_TAIL = 8 << 10  # bytes of stderr kept, for the log
LOG_TAIL = 4096  # bytes of stdout chatter (before the verdict line) that go to the log
DRAIN_SECONDS = 2.0  # after the group is killed: how long to read what is left in the pipes (an escaped
#                      grandchild may hold them open; it is not waited for)


@dataclass(frozen=True)
class Verdict:
    value: float | None
    reason: str | None  # why there is no value: exit code, timeout, bad JSON, missing metric
    seconds: float
    output: str  # the tail of stdout (without the verdict line) and stderr, for the log
    result: dict[str, object] | None = None  # the whole JSON object


EvaluationProcesses = ChildProcesses  # the name the evaluation scheduler knows


class _Tail(threading.Thread):
    """Reads one pipe to its end, keeping only its last ``limit`` bytes; ``finish`` bounds how long it may
    still read once the program is gone."""

    def __init__(self, fd: int, limit: int) -> None:
        super().__init__(daemon=True, name="ckptd-eval-output")
        self.fd, self.limit = fd, limit
        self.buf = bytearray()
        self.total = 0
        self._deadline: float | None = None

    def run(self) -> None:
        poller = select.poll()  # not select.select: a busy daemon's fd numbers may pass FD_SETSIZE
        poller.register(self.fd, select.POLLIN)
        try:
            while True:
                deadline = self._deadline
                if deadline is not None and time.monotonic() >= deadline:
                    return
                if not poller.poll(100):
                    continue
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    return
                self.total += len(chunk)
                self.buf += chunk
                if len(self.buf) > 2 * self.limit:  # trim now and then, not on every read
                    del self.buf[:-self.limit]
        except OSError:
            return

    def finish(self, deadline: float) -> bytes:
        """What it read, once the pipe ended or at ``deadline`` (monotonic), whichever comes first."""
        self._deadline = deadline
        self.join()
        os.close(self.fd)
        return bytes(self.buf[-self.limit:])

    @property
    def truncated(self) -> bool:
        return self.total > self.limit


def _text(data: bytes, truncated: bool) -> str:
    return ("…" if truncated else "") + data.decode("utf-8", "replace")


def _finite(value: object) -> bool:
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer too large for a float
        return False


def parse_verdict(stdout_tail: str, metric: str) -> tuple[float | None, str | None, dict[str, object] | None]:
    """The metric from the last non-empty stdout line, or why not."""
    lines = [line for line in stdout_tail.splitlines() if line.strip()]
    if not lines:
        return None, "it printed nothing on stdout (the last line must be a JSON object with the metric)", None
    last = lines[-1].strip()
    try:
        obj = json.loads(last)
    except ValueError:
        return None, f"its last stdout line is not JSON: {last[:200]!r}", None
    if not isinstance(obj, dict):
        return None, f"its last stdout line is JSON but not an object: {last[:200]!r}", None
    if metric not in obj:
        return None, f"its JSON has no {metric!r} (keys: {', '.join(sorted(map(str, obj))[:10])})", obj
    value = obj[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        shown = repr(value)
        return None, f"{metric!r} is not a finite number: {shown[:100]}{'…' if len(shown) > 100 else ''}", obj
    return float(value), None, obj


def run_evaluation(policy: EvaluatePolicy, weights: Path, env: Mapping[str, str], processes: EvaluationProcesses,
                   on_start: Callable[[int], None] | None = None) -> Verdict:
    """Run one evaluation; never raises for the program's own failures (they are the verdict's reason).
    ``on_start`` gets the program's pid (its process group's id) as soon as it runs; if it raises, the program
    is killed and the error propagates."""
    started = time.monotonic()
    full_env = {**os.environ, **policy.env, **env, "CKPTD_WEIGHTS": str(weights)}
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(list(policy.command), stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                env=full_env, start_new_session=True)
    except OSError as exc:
        os.close(out_r)
        os.close(err_r)
        return Verdict(None, f"cannot run {policy.command[0]!r}: {exc.strerror or exc}",
                       time.monotonic() - started, "")
    finally:
        os.close(out_w)  # the child has its own copies: EOF comes when the last holder closes them
        os.close(err_w)
    readers = _Tail(out_r, STDOUT_TAIL), _Tail(err_r, STDERR_TAIL)
    for reader in readers:
        reader.start()
    processes.add(proc)  # killed at once if the daemon began stopping meanwhile
    timed_out = False
    try:
        if on_start is not None:
            on_start(proc.pid)
        try:
            code = proc.wait(timeout=policy.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            code = proc.wait()
    finally:
        processes.discard(proc)
        kill_group(proc)  # anything it left running in its group (a forked helper) goes with it
        deadline = time.monotonic() + DRAIN_SECONDS
        out, err = (reader.finish(deadline) for reader in readers)
    seconds = time.monotonic() - started
    stdout, stderr = _text(out, readers[0].truncated), _text(err, readers[1].truncated)
    lines = stdout.rstrip("\n").rsplit("\n", 1)
    before = lines[0] if len(lines) > 1 else ""
    before = ("…" + before[-LOG_TAIL:]) if len(before) > LOG_TAIL else before
    chatter = "\n".join(x for x in (before, stderr.strip()) if x)
    if processes.stopping:
        return Verdict(None, "the daemon stopped during the evaluation", seconds, chatter)
    if timed_out:
        return Verdict(None, f"timed out after {policy.timeout:g}s (its process group was killed)", seconds,
                       chatter)
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return Verdict(None, f"the evaluator failed ({how})", seconds, chatter)
    if readers[0].truncated and b"\n" not in out.rstrip(b"\n"):
        return Verdict(None, f"the evaluator's answer is unusable: its last stdout line is longer than the "
                             f"{STDOUT_TAIL >> 20} MiB ckptd reads", seconds, chatter)
    value, reason, obj = parse_verdict(stdout, policy.metric)
    return Verdict(value, reason and f"the evaluator's answer is unusable: {reason}", seconds, chatter, obj)


def input_checked(verdict: Verdict, copy: Path, before: os.stat_result) -> Verdict:
    """A value from an evaluator that deleted, replaced or modified its input copy is not trusted (that copy is
    its own, so nothing published is affected; its answer may not be about these weights)."""
    if verdict.value is None:
        return verdict
    try:
        after: os.stat_result | None = copy.stat()
    except FileNotFoundError:
        after = None
    if after is None or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        why = "the evaluator deleted or replaced its input weights file"
    elif (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        why = "the evaluator modified its input weights file"
    else:
        return verdict
    return replace(verdict, value=None, reason=f"{why}; its answer is not trusted", result=None)
