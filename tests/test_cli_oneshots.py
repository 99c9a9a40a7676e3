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


def test_average_refuses_to_silently_average_fewer(tmp_path: Path, tiny) -> None:
    states = [tiny(seed=i).state_dict() for i in range(3)]
    for sd, score in zip(states, ("0.7000", "-0.2500_it40", "0.9000")):
        torch.save(sd, tmp_path / f"checkpoint_score_{score}.pt")
    torch.save(tiny(seed=5).state_dict(), tmp_path / "checkpoint_last.pt")  # no score in its name
    files = sorted(str(p) for p in tmp_path.glob("checkpoint_*.pt"))
    regex = r"filename:_score_(?P<metric>[-+]?[0-9]*\.?[0-9]+)(?:_it[0-9]+)?\.pt$"
    out = str(tmp_path / "avg.safetensors")
    res = ckptd("average", *files, "-o", out, "--top-k", "2", "--metric", regex)
    assert res.returncode == 2 and "checkpoint_last.pt" in res.stderr and "--skip-unranked" in res.stderr
    assert not Path(out).exists()
    # --skip-unranked with fewer ranked files than K: averages the ranked ones and says so
    res = ckptd("average", *files, "-o", out, "--top-k", "5", "--metric", regex, "--skip-unranked")
    assert res.returncode == 0, res.stderr
    assert "skipped 1 file(s) without a metric" in res.stderr and "averaging 3 ranked file(s), fewer than the 5" \
        in res.stderr
    # negative scores and _it<N> names rank; integer buffers come from the best, and the output says which
    assert "taken from checkpoint_score_0.9000.pt: the best by" in res.stdout
    assert "checkpoint_score_-0.2500_it40.pt (-0.25)" in res.stdout
    assert load_file(out)["bn.num_batches_tracked"].item() == 2
    # without --metric every file is averaged and buffers come from the first file given, said so
    res = ckptd("average", files[1], files[0], "-o", out)
    assert res.returncode == 0 and f"taken from {Path(files[1]).name}: the first file given" in res.stdout
    assert ckptd("average", *files, "-o", out, "--skip-unranked").returncode == 2  # needs --metric


def test_extract_ema_without_ema_weights_is_an_error(tmp_path: Path, tiny) -> None:
    model, ema = tiny(seed=1), tiny(seed=2)
    torch.save({"model_state_dict": model.state_dict(), "iterations": 1}, tmp_path / "no_ema.pt")
    torch.save({"model_state_dict": model.state_dict(), "ema_state_dict": ema.state_dict()}, tmp_path / "ema.pt")
    res = ckptd("extract", str(tmp_path / "no_ema.pt"), "-o", str(tmp_path / "x.safetensors"), "--ema")
    assert res.returncode == 2 and "has no EMA weights" in res.stderr
    assert not (tmp_path / "x.safetensors").exists()
    res = ckptd("extract", str(tmp_path / "ema.pt"), "-o", str(tmp_path / "e.safetensors"), "--ema")
    assert res.returncode == 0, res.stderr
    assert torch.equal(load_file(tmp_path / "e.safetensors")["conv.weight"], ema.state_dict()["conv.weight"])


class _Payload:
    """Would create a canary file if unpickled (it never is)."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.canary}",))


def test_unsafe_dcp_folder_is_refused_with_exit_2_and_nothing_runs(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    canary = tmp_path / "canary"
    folder = tmp_path / "dcp"
    dcp.save({"model": {"w": torch.randn(4, 4)}, "extra": _Payload(canary)}, checkpoint_id=str(folder))
    assert not canary.exists()
    for command in (("inspect", str(folder)), ("extract", str(folder), "-o", str(tmp_path / "x.safetensors"))):
        res = ckptd(*command)
        assert res.returncode == 2, res.stderr
        assert "os.system" in res.stderr or "posix.system" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
    assert not canary.exists() and not (tmp_path / "x.safetensors").exists()
