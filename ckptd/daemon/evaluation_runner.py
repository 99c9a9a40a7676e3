"""Run the user's evaluation program on one candidate and read its verdict. I/O only; no decisions.

The program is an argv list (no shell), started in its own process group with the policy's timeout (the whole
group is killed on timeout or when the daemon stops). It gets the candidate's model-only weights in
``CKPTD_WEIGHTS``; the **last line** of its stdout must be one JSON object holding the metric. Earlier lines and
stderr are returned for the log (their tails only: output is spooled to temp files, never held whole in memory).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ckptd.child_processes import ChildProcesses, kill_group
from ckptd.daemon.config_evaluate import EvaluatePolicy

TAIL_BYTES = 4096  # of each stream, kept for the log and the verdict line


@dataclass(frozen=True)
class Verdict:
    value: float | None
    reason: str | None  # why there is no value: exit code, timeout, bad JSON, missing metric
    seconds: float
    output: str  # the tail of stdout (without the verdict line) and stderr, for the log
    result: dict[str, object] | None = None  # the whole JSON object


EvaluationProcesses = ChildProcesses  # the name the evaluation scheduler knows


def _tail(fh: tempfile.SpooledTemporaryFile[bytes] | object) -> str:
    f = fh  # a real temp file: seek to the last TAIL_BYTES
    f.seek(0, os.SEEK_END)  # type: ignore[attr-defined]
    size = f.tell()  # type: ignore[attr-defined]
    f.seek(max(0, size - TAIL_BYTES))  # type: ignore[attr-defined]
    text = f.read().decode("utf-8", "replace")  # type: ignore[attr-defined]
    return ("…" if size > TAIL_BYTES else "") + text


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"{metric!r} is not a finite number: {value!r}", obj
    return float(value), None, obj


def run_evaluation(policy: EvaluatePolicy, weights: Path, env: Mapping[str, str], workdir: Path,
                   processes: EvaluationProcesses) -> Verdict:
    """Run one evaluation; never raises for the program's own failures (they are the verdict's reason)."""
    started = time.monotonic()
    full_env = {**os.environ, **policy.env, **env, "CKPTD_WEIGHTS": str(weights)}
    with tempfile.TemporaryFile(dir=workdir) as out, tempfile.TemporaryFile(dir=workdir) as err:
        try:
            proc = subprocess.Popen(list(policy.command), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=full_env, start_new_session=True)
        except OSError as exc:
            return Verdict(None, f"cannot run {policy.command[0]!r}: {exc.strerror or exc}",
                           time.monotonic() - started, "")
        processes.add(proc)  # killed at once if the daemon began stopping meanwhile
        timed_out = False
        try:
            code = proc.wait(timeout=policy.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            code = proc.wait()
        finally:
            processes.discard(proc)
        kill_group(proc)  # anything it left running in its group (a forked helper) goes with it
        seconds = time.monotonic() - started
        stdout, stderr = _tail(out), _tail(err)
    lines = stdout.rstrip("\n").rsplit("\n", 1)
    chatter = "\n".join(x for x in (lines[0] if len(lines) > 1 else "", stderr.strip()) if x)
    if processes.stopping:
        return Verdict(None, "the daemon stopped during the evaluation", seconds, chatter)
    if timed_out:
        return Verdict(None, f"timed out after {policy.timeout:g}s (its process group was killed)", seconds,
                       chatter)
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return Verdict(None, f"the evaluator failed ({how})", seconds, chatter)
    value, reason, obj = parse_verdict(stdout, policy.metric)
    return Verdict(value, reason and f"the evaluator's answer is unusable: {reason}", seconds, chatter, obj)
