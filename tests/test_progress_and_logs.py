"""Progress lines for slow one-shots, and the log format chosen by whether stderr is a terminal."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
from pathlib import Path

import torch

from ckptd.progress import Progress
from tests.conftest import PYTHON, subprocess_env
from tests.daemon_helpers import write_config


def test_progress_is_silent_when_quick_and_reports_when_slow() -> None:
    quiet = io.StringIO()
    p = Progress("averaging", stream=quiet, delay_s=60)
    p(1, 2)
    p(2, 2)
    assert quiet.getvalue() == ""
    out = io.StringIO()
    p = Progress("averaging", stream=out, delay_s=0, every_s=0)
    p(1, 4)
    p(4, 4)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("averaging:  25.0%") and lines[-1].startswith("averaging: 100.0%")


def test_logs_are_json_in_pipes_and_console_on_a_tty(tmp_path: Path, tiny) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("format: json", "format: auto"))
    (tmp_path / "train" / "exp").mkdir(parents=True)
    torch.save({"model_state_dict": tiny().state_dict(), "metric": 0.5}, tmp_path / "train/exp/a.pt")
    piped = subprocess.run([PYTHON, "-m", "ckptd.cli", "once", "-c", str(config)], capture_output=True, text=True,
                           env=subprocess_env(), timeout=120)
    lines = [line for line in piped.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["event"] for line in lines)
    # on a real pseudo-terminal: readable console lines, not JSON
    (tmp_path / "state" / "ledger.sqlite3").unlink()
    master, slave = pty.openpty()
    proc = subprocess.Popen([PYTHON, "-m", "ckptd.cli", "once", "-c", str(config)], stdout=slave, stderr=slave,
                            env=subprocess_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    # the ledger was deleted: the member is restored from its pinned copy, with its source's identity (size, mtime),
    # so the unchanged source is known and not read again
    assert "ledger.restored" in text and "run.summary" in text and "checkpoint.joined" not in text
    assert not any(line.strip().startswith("{") for line in text.splitlines())
