"""Start a real ``ckptd run`` for a benchmark and wait until it is ready (shared by the daemon benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def start_daemon(cfg: dict[str, Any], work: Path, src: Path) -> subprocess.Popen[bytes]:
    """``ckptd run`` from the checkout ``src`` with ``cfg`` written to ``work/config.yaml``; its log is
    ``work/daemon.log``. The cwd is ``work``, outside any checkout: ``python -m`` puts the cwd first on sys.path,
    ahead of PYTHONPATH."""
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(src))
    log = open(work / "daemon.log", "wb")  # noqa: SIM115 - the daemon's stdout for its lifetime
    proc = subprocess.Popen([sys.executable, "-m", "ckptd.cli", "run", "-c", str(path)], stdout=log, stderr=log,
                            env=env, cwd=work)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if b'"daemon.ready"' in (work / "daemon.log").read_bytes():
            return proc
        time.sleep(0.05)
    raise RuntimeError("daemon did not start: " + (work / "daemon.log").read_text()[-2000:])
