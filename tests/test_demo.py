"""The newcomer's first run: `ckptd demo`, exactly as the README says, offline."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, subprocess_env

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "demo", "--dir", str(tmp_path), "--epochs", "4"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out/demo/exp1"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["best"]["metric"] > 0 and len(manifest["average"]["members"]) == 3
    assert manifest["coreml"]["status"] == "ok" and manifest["coreml"]["sha256"] == manifest["best"]["sha256"]
    assert os.path.realpath(out / "best.mlpackage") != str(out / "best.mlpackage")
    for text in ("produced:", "average.safetensors", "best.mlpackage", "ckptd status:", "best "):
        assert text in res.stdout, text
