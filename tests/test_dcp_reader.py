"""torch.distributed.checkpoint folders written by real ``dcp.save``: pickled items go through the restricted
loader (data loads, code is refused by name and never runs), and only the chosen tensors are read."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckptd.cli import main
from ckptd.errors import UnsafeCheckpointError
from ckptd.reader import read_checkpoint
from ckptd.safe_load import load_dcp
from ckptd.weights import open_checkpoint
from tests.conftest import assert_same_state


class Canary:
    """Unpickling this creates a file: proof of code execution."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class Settings:
    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr


def _save(folder: Path, state: dict) -> Path:
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


@pytest.mark.parametrize("nested", [False, True])
def test_a_reduce_payload_item_refuses_the_folder_and_never_runs(tmp_path: Path, tiny, nested: bool) -> None:
    """Regression (issue 9, item 1): DCP's default planner torch.load-ed bytes items with weights_only=False."""
    canary = tmp_path / "pwned"
    extra = {"deep": [1, Canary(canary)]} if nested else Canary(canary)
    folder = _save(tmp_path / "dcp", {"model": tiny().state_dict(), "extra": extra, "step": 3})
    with pytest.raises(UnsafeCheckpointError) as info:
        open_checkpoint(folder)
    assert info.value.globals_needed == ["posix.system"]
    assert str(folder) in str(info.value) and "extra" in str(info.value)
    for call in (lambda: load_dcp(folder), lambda: read_checkpoint(folder)):
        with pytest.raises(UnsafeCheckpointError):
            call()
    assert not canary.exists(), "pickle code ran"


def test_cli_refuses_a_poisoned_folder_with_one_line(tmp_path: Path, tiny, capsys: pytest.CaptureFixture) -> None:
    canary = tmp_path / "pwned"
    folder = _save(tmp_path / "dcp", {"model": tiny().state_dict(), "extra": Canary(canary)})
    for argv in (["inspect", str(folder)], ["extract", str(folder), "-o", str(tmp_path / "w.safetensors")]):
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert "posix.system" in err and "Traceback" not in err
    assert not canary.exists() and not (tmp_path / "w.safetensors").exists()


def test_data_only_items_load_and_nesting_is_restored(tmp_path: Path, tiny) -> None:
    model = tiny(seed=1, width=32)  # conv weights over the 1 KiB read-eagerly limit
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 7, "name": "run-1",
             "meta": {"history": [0.1, 0.2], "nested": {"score": torch.tensor(0.75), "tag": "best"}},
             "args": argparse.Namespace(lr=0.1)}
    folder = _save(tmp_path / "dcp", state)
    with read_checkpoint(folder) as reader:
        obj = reader.obj
        assert obj["step"] == 7 and obj["name"] == "run-1" and obj["args"].lr == 0.1
        assert obj["meta"]["history"] == [0.1, 0.2] and obj["meta"]["nested"]["tag"] == "best"
        assert float(obj["meta"]["nested"]["score"]) == 0.75  # tiny tensors are read for metric lookups
        assert obj["model"]["conv.weight"].device.type == "meta"  # the rest waits until picked
        found = reader.weights()
        assert found.key == "model"
        assert_same_state(found.state, model.state_dict())
        # (DCP itself turns the optimizer's integer keys into strings)
        assert obj["optim"]["state"]["0"]["exp_avg"].device.type == "meta", "optimizer state must not be read"
    # the whole-folder loader gives everything, real
    whole = load_dcp(folder)
    assert torch.equal(whole["optim"]["state"]["0"]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert whole["optim"]["param_groups"][0]["lr"] == opt.state_dict()["param_groups"][0]["lr"]
    assert_same_state(whole["model"], model.state_dict())


def test_allowlisted_class_in_an_item_loads_only_when_asked(tmp_path: Path, tiny) -> None:
    folder = _save(tmp_path / "dcp", {"model": tiny().state_dict(), "settings": Settings(0.5)})
    with pytest.raises(UnsafeCheckpointError, match="Settings"):
        read_checkpoint(folder)
    with read_checkpoint(folder, allow_globals=[f"{__name__}.Settings"]) as reader:
        assert reader.obj["settings"].lr == 0.5


def test_no_private_torch_loader_is_used() -> None:
    """The old code imported torch's private _load_state_dict_from_keys; nothing in ckptd may."""
    out = subprocess.run(["grep", "-rn", "_load_state_dict_from_keys\\|_weights_only_unpickler\\|from torch._utils",
                          str(Path(__file__).resolve().parent.parent / "ckptd")], capture_output=True, text=True)
    assert out.stdout == ""
