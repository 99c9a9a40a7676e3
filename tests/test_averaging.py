"""Streaming averaging: values against an independent float64 computation, dtypes, buffers, refusals, memory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptd.averaging import average_checkpoints
from ckptd.errors import NonFiniteError, WeightsMismatchError
from ckptd.selection import select_top_k
from tests.conftest import PYTHON, subprocess_env


def _reference_mean(states: list[dict[str, torch.Tensor]], ref: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in states[ref].items():
        if v.is_floating_point():
            out[k] = (sum(s[k].double() for s in states) / len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


@pytest.mark.parametrize("chunk", [5, 1 << 18])
def test_average_matches_float64_reference(tmp_path: Path, tiny, chunk: int) -> None:
    states = [tiny(seed=i).state_dict() for i in range(4)]
    paths = []
    for i, sd in enumerate(states):  # mixed layouts on purpose
        p = tmp_path / f"c{i}.pt"
        torch.save({"model_state_dict": sd, "optim_state_dict": {}} if i % 2 else sd, p)
        paths.append(p)
    result = average_checkpoints(paths, tmp_path / "avg.safetensors", reference=2, chunk_elems=chunk)
    got = load_file(tmp_path / "avg.safetensors")
    expected = _reference_mean(states, ref=2)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype
        assert torch.allclose(got[k], v, rtol=0, atol=1e-7), k
    # the integer buffer comes from the reference, not averaged through float64
    assert got["bn.num_batches_tracked"].item() == 2
    assert result.copied == 1 and result.averaged == len(expected) - 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_half_and_is_accurate(tmp_path: Path, tiny, dtype: torch.dtype) -> None:
    states = [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tiny(seed=i).state_dict().items()}
              for i in range(3)]
    for i, sd in enumerate(states):
        torch.save(sd, tmp_path / f"h{i}.pt")
    average_checkpoints([tmp_path / f"h{i}.pt" for i in range(3)], tmp_path / "avg.safetensors")
    got = load_file(tmp_path / "avg.safetensors")
    for k, v in _reference_mean(states, 0).items():
        assert got[k].dtype == v.dtype
        assert torch.equal(got[k], v), k  # float64 accumulation, one rounding at the end: exact match


def test_requested_dtype_and_pt_output(tmp_path: Path, tiny) -> None:
    for i in range(2):
        torch.save(tiny(seed=i).state_dict(), tmp_path / f"c{i}.pt")
    average_checkpoints([tmp_path / "c0.pt", tmp_path / "c1.pt"], tmp_path / "a.safetensors", dtype=torch.float16)
    assert load_file(tmp_path / "a.safetensors")["conv.weight"].dtype == torch.float16
    average_checkpoints([tmp_path / "c0.pt", tmp_path / "c1.pt"], tmp_path / "a.pt", chunk_elems=7)
    pt = torch.load(tmp_path / "a.pt", weights_only=True)
    st = load_file(tmp_path / "a.safetensors")
    assert pt["conv.weight"].shape == st["conv.weight"].shape
    assert torch.allclose(pt["conv.weight"].half(), st["conv.weight"])


def test_refuses_nan_naming_the_file(tmp_path: Path, tiny) -> None:
    good, bad = tiny(seed=1).state_dict(), tiny(seed=2).state_dict()
    bad["head.weight"][0, 0] = float("nan")
    torch.save(good, tmp_path / "good.pt")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(NonFiniteError, match=r"head\.weight.*bad\.pt"):
        average_checkpoints([tmp_path / "good.pt", tmp_path / "bad.pt"], tmp_path / "avg.safetensors")
    assert not (tmp_path / "avg.safetensors").exists()


def test_refuses_mismatched_keys_and_shapes(tmp_path: Path, tiny) -> None:
    torch.save(tiny(width=8).state_dict(), tmp_path / "w8.pt")
    torch.save(tiny(width=4).state_dict(), tmp_path / "w4.pt")
    other = tiny().state_dict()
    other["extra.weight"] = torch.zeros(1)
    torch.save(other, tmp_path / "extra.pt")
    with pytest.raises(WeightsMismatchError, match=r"conv\.weight.*\[8, 3, 3, 3\].*w8\.pt.*\[4, 3, 3, 3\].*w4\.pt"):
        average_checkpoints([tmp_path / "w8.pt", tmp_path / "w4.pt"], tmp_path / "a.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"extra\.weight.*extra\.pt.*not in.*w8\.pt"):
        average_checkpoints([tmp_path / "w8.pt", tmp_path / "extra.pt"], tmp_path / "a.safetensors")


def test_select_top_k_by_filename_metric(tmp_path: Path, tiny) -> None:
    for score in (0.5, 0.9, 0.7, 0.8):
        torch.save(tiny().state_dict(), tmp_path / f"checkpoint_score_{score:.4f}.pt")
    torch.save(tiny().state_dict(), tmp_path / "no_metric.pt")
    paths = sorted(tmp_path.glob("*.pt"))
    best = select_top_k(paths, r"filename:score_(?P<metric>[0-9.]+)\.pt", 2, "max")
    assert [c.metric for c in best] == [0.9, 0.8]
    worst = select_top_k(paths, r"filename:score_(?P<metric>[0-9.]+)\.pt", 1, "min")
    assert [c.metric for c in worst] == [0.5]


_MEM_SCRIPT = r"""
import sys, threading, time, json, torch
from ckptd.averaging import average_checkpoints
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
paths = sys.argv[2:]
base = anon(); peak = [base]; stop = False
def sample():
    while not stop:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
average_checkpoints(paths, sys.argv[1])
stop = True; t.join()
print(json.dumps({"peak_above_base": peak[0] - base}))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_number_of_checkpoints(tmp_path: Path) -> None:
    # 64 MiB fp32 model with one 32 MiB tensor: whole-tensor accumulation would need 64 MiB of float64 for it
    sd = {"big": torch.randn(4096, 2048), "small": torch.randn(4096, 2048)}
    paths = []
    for i in range(10):
        p = tmp_path / f"c{i}.pt"
        torch.save({k: v + i for k, v in sd.items()}, p)
        paths.append(str(p))
    del sd
    peaks = {}
    for n in (2, 10):
        out = subprocess.run([PYTHON, "-c", _MEM_SCRIPT, str(tmp_path / f"avg{n}.safetensors"), *paths[:n]],
                             capture_output=True, text=True, env=subprocess_env(), check=True)
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_base"]
    model_bytes = 64 * 2**20
    assert peaks[10] < model_bytes / 4, peaks
    assert peaks[10] <= peaks[2] + 4 * 2**20, peaks
