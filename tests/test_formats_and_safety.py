"""Format detection, structural completeness, and weights-only safety on real files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from ckptd.errors import CheckpointError, UnsafeCheckpointError
from ckptd.formats import CheckpointFormat, check_complete, detect_format
from ckptd.safe_load import load_torch
from ckptd.safetensors_io import save_safetensors
from ckptd.weights import open_checkpoint


class Boom:
    """Unpickling this would create a file: proof of code execution."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class Trusted:
    def __init__(self, value: int = 3) -> None:
        self.value = value


def test_detects_each_format(tmp_path: Path, tiny) -> None:
    sd = tiny().state_dict()
    torch.save(sd, tmp_path / "a.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_safetensors(tmp_path / "a.safetensors", sd)
    assert detect_format(tmp_path / "a.pt") is CheckpointFormat.TORCH_ZIP
    assert detect_format(tmp_path / "legacy.pt") is CheckpointFormat.TORCH_LEGACY
    assert detect_format(tmp_path / "a.safetensors") is CheckpointFormat.SAFETENSORS
    # the legacy format loads too (without mmap) and gives the same values
    assert torch.equal(open_checkpoint(tmp_path / "legacy.pt").weights["conv.weight"], sd["conv.weight"])


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated_zip", "truncated_safetensors", "zip_not_torch"])
def test_bad_files_raise_one_clear_error(tmp_path: Path, tiny, case: str) -> None:
    sd = tiny().state_dict()
    path = tmp_path / ("x.safetensors" if "safetensors" in case else "x.pt")
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"this is not a checkpoint at all" * 10)
    elif case == "truncated_zip":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "truncated_safetensors":
        save_safetensors(path, sd)
        path.write_bytes(path.read_bytes()[:-10])
    else:
        import zipfile

        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("hello.txt", "hi")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    expected = {"empty": "empty", "garbage": "not a checkpoint", "truncated_zip": "truncated",
                "truncated_safetensors": "truncated", "zip_not_torch": "not a torch.save"}[case]
    assert expected in message
    with pytest.raises(CheckpointError):
        check_complete(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_does_not_run(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": Boom(str(marker))}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as info:
        open_checkpoint(path)
    assert not marker.exists(), "pickle code ran"
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    assert "allow_globals" in str(info.value)
    # raw pickle file (not torch.save) as well
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Boom(str(marker)), protocol=2))
    with pytest.raises(CheckpointError):
        load_torch(raw)
    assert not marker.exists()


def test_allowlisted_global_loads_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "cfg": Trusted(5)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        open_checkpoint(path)
    assert f"{__name__}.Trusted" in str(info.value) or "Trusted" in str(info.value)
    ckpt = open_checkpoint(path, allow_globals=[f"{__name__}.Trusted"])
    assert ckpt.obj["cfg"].value == 5
    assert torch.equal(ckpt.weights["w"], torch.ones(2))
