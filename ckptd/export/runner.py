"""Run an export in a child process with a timeout, and publish verified packages atomically.

The child gets its own TMPDIR (coremltools leaves temporary packages there until the process exits) and its own
process group, so a timeout kills it and everything it started; the temp dir is removed afterwards.

Its own process group also means that a parent killed with ``kill -9`` (a worker or daemon outside systemd, whose
control group would otherwise be killed as a whole) does not take it down: it would run on, an orphan, and write
into a staging directory the next attempt is about to reuse. So on Linux the child asks the kernel to SIGKILL it
when its parent goes (``PR_SET_PDEATHSIG``, set first thing in the child by :func:`die_with_parent`, not in a
``preexec_fn``, which is unsafe in the threaded worker). The kernel's "parent" is the *thread* that started the
child: here the thread that then waits for it, so it never exits first.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ckptd.atomic import TEMP_PREFIX, fsync_dir
from ckptd.child_processes import ChildProcesses, kill_group
from ckptd.export.request import ExportRequest, ExportResult

VERSIONS_DIR = "coreml"
_VERSION_RE = re.compile(r"^best-v(\d+)(?:-.*)?\.mlpackage$")


ExportProcesses = ChildProcesses  # the name the export scheduler knows
PARENT_ENV = "CKPTD_EXPORT_PARENT"  # the pid of the process that started the export child
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> bool:
    """In the export child: be SIGKILLed when the parent that started it dies (Linux ``PR_SET_PDEATHSIG``). If
    the parent died already (before this ran), die now. Elsewhere, or when prctl is unavailable, a no-op; returns
    whether the death signal is set."""
    parent = os.environ.get(PARENT_ENV, "")
    if not sys.platform.startswith("linux") or not parent.isdigit():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != int(parent):  # reparented: the parent died between the fork and the prctl
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def run_export(req: ExportRequest, timeout: float, processes: ExportProcesses | None = None) -> ExportResult:
    """Export in a subprocess; never raises for export problems (the result says failed, with the reason).
    ``processes``: register the child there, so its owner can kill it on shutdown."""
    processes = processes or ExportProcesses()
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="ckptd-export-"))
    try:
        (tmp / "request.json").write_text(req.to_json())
        env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1", **{PARENT_ENV: str(os.getpid())})
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        with open(tmp / "worker.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "ckptd.export.worker", str(tmp / "request.json"),
                                     str(tmp / "result.json")], stdout=log, stderr=log, env=env,
                                    start_new_session=True)
        processes.add(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return ExportResult(status="failed", reason=f"export timed out after {timeout:g}s and was killed",
                                seconds=time.monotonic() - start)
        finally:
            processes.discard(proc)
        if (tmp / "result.json").exists():
            result = ExportResult.read(tmp / "result.json")
            result.seconds = time.monotonic() - start
            return result
        tail = (tmp / "worker.log").read_text(errors="replace").strip().splitlines()[-3:]
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return ExportResult(status="failed", reason=f"export process died ({how}): {' | '.join(tail)[:400]}",
                            seconds=time.monotonic() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def staging_path(output: Path) -> Path:
    """Where the worker builds the package: next to its final place (same filesystem), under a temp name.
    The daemon's ``ExportScheduler.reconcile_inputs`` removes those no running export owns."""
    versions = output / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    return versions / f"{TEMP_PREFIX}staging-{uuid.uuid4().hex[:8]}.mlpackage"


def _versions(output: Path) -> list[tuple[int, Path]]:
    versions = output / VERSIONS_DIR
    found = []
    if versions.is_dir():
        for p in versions.iterdir():
            m = _VERSION_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def publish_package(staging: Path, output: Path, *, label: str, keep: int, name: str = "best.mlpackage") -> Path:
    """Move a verified package into a new version directory and switch ``<output>/<name>`` to it in one
    atomic symlink replacement; keep ``keep`` previous versions. Returns the version directory."""
    versions = output / VERSIONS_DIR
    number = (max((n for n, _ in _versions(output)), default=0)) + 1
    final = versions / f"best-v{number:04d}-{re.sub(r'[^A-Za-z0-9._-]', '_', label)[:60]}.mlpackage"
    os.rename(staging, final)
    fsync_dir(versions)
    link = output / name
    if link.exists() and not link.is_symlink():  # a real directory left by something else: version it
        os.rename(link, versions / "best-v0000-previous.mlpackage")
    tmp_link = output / f"{TEMP_PREFIX}link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(final, output), tmp_link)
    os.replace(tmp_link, link)
    fsync_dir(output)
    current = final.resolve()
    for _, old in _versions(output)[: -(keep + 1)]:
        if old.resolve() != current:
            shutil.rmtree(old, ignore_errors=True)
    return final
