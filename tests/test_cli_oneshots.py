"""The one-shot CLI commands as a user runs them: real subprocesses, exit codes 0/1/2, readable output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import PYTHON, subprocess_env


def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "ckptd.cli", *args], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)


def test_inspect_extract_average(tmp_path: Path, tiny) -> None:
    states = [tiny(seed=i).state_dict() for i in range(3)]
    for i, (sd, score) in enumerate(zip(states, (0.7, 0.9, 0.8))):
        torch.save({"model_state_dict": sd, "optim_state_dict": {}, "iterations": i * 100, "best_metric": 0.99},
                   tmp_path / f"checkpoint_score_{score:.4f}.pt")
    first = tmp_path / "checkpoint_score_0.7000.pt"

    res = ckptd("inspect", str(first), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["layout"] == "training-state" and info["tensors"] == len(states[0])
    assert info["metric_candidates"]["iterations"] == 0
    assert info["metric_candidates"]["filename:score"] == 0.7
    assert "training-state" in ckptd("inspect", str(first)).stdout

    res = ckptd("extract", str(first), "-o", str(tmp_path / "m.safetensors"), "--dtype", "fp16")
    assert res.returncode == 0, res.stderr
    out = load_file(tmp_path / "m.safetensors")
    assert out["conv.weight"].dtype == torch.float16
    assert torch.equal(out["conv.weight"], states[0]["conv.weight"].half())
    with safe_open(tmp_path / "m.safetensors", "pt") as fh:
        md = fh.metadata()
    assert md["source"] == str(first.resolve()) and len(md["source_sha256"]) == 64

    files = sorted(str(p) for p in tmp_path.glob("checkpoint_score_*.pt"))
    res = ckptd("average", *files, "-o", str(tmp_path / "avg.safetensors"), "--top-k", "2",
                "--metric", r"filename:score_(?P<metric>[0-9.]+)\.pt", "--mode", "max")
    assert res.returncode == 0, res.stderr
    assert "checkpoint_score_0.9000.pt (0.9)" in res.stdout
    avg = load_file(tmp_path / "avg.safetensors")
    expected = (states[1]["head.weight"].double() + states[2]["head.weight"].double()) / 2
    assert torch.allclose(avg["head.weight"].double(), expected, atol=1e-7)
    # integer buffers come from the best (0.9) checkpoint
    assert avg["bn.num_batches_tracked"].item() == 1


def test_errors_have_exit_codes_and_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    res = ckptd("inspect", str(bad))
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and str(bad) in res.stderr and "Traceback" not in res.stderr
    res = ckptd("extract", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.safetensors"))
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert ckptd("average").returncode == 2  # usage
    assert ckptd("average", str(bad), "-o", "x.safetensors", "--top-k", "2").returncode == 2
    assert not (tmp_path / "x.safetensors").exists()
