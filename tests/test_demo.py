"""The newcomer's first run: `ckptd demo`, exactly as the README says, offline."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, subprocess_env

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_without_an_error(tmp_path: Path) -> None:
    # 8 epochs as `ckptd demo` runs by default: several new bests arrive while the first export runs and
    # evict the members it was asked for (the export must own its input, and nothing may fail)
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "demo", "--dir", str(tmp_path), "--epochs", "8"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out/demo/exp1"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["best"]["metric"] > 0 and len(manifest["average"]["members"]) == 3
    assert manifest["coreml"]["status"] == "ok" and manifest["coreml"]["sha256"] == manifest["best"]["sha256"]
    assert os.path.realpath(out / "best.mlpackage") != str(out / "best.mlpackage")
    for text in ("produced:", "average.safetensors", "best.mlpackage", "ckptd status:", "best "):
        assert text in res.stdout, text
    status = res.stdout.split("ckptd status:", 1)[1].split("\nmanifest:", 1)[0]
    lines = [line.strip() for line in status.splitlines()]
    assert not [line for line in lines if line.startswith("error")], status
    assert "coreml    ok" in lines, status
    events = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines()
              if line.startswith("{")]
    assert not [e for e in events if e.get("level") == "error"], [e for e in events if e.get("level") == "error"]
    assert list((out / ".exports/inputs").iterdir()) == []  # every job released its input
