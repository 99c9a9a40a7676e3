"""Format detection, structural completeness, and weights-only safety on real files."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
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


# --- hostile files: nothing runs, the refused global is named, no huge allocation -------------------------------

class _Payload:
    """``__reduce__`` returning (callable, args): what unpickling would call."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _payloads(marker: Path) -> dict[str, tuple[object, str]]:
    import subprocess

    return {
        "os.system nested in containers": ({"a": [{"b": OrderedDict(x=_Payload(os.system, f"touch {marker}"))}]},
                                           "posix.system"),
        "subprocess": (_Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
        "eval": (_Payload(eval, f"__import__('os').system('touch {marker}')"), "builtins.eval"),
        "exec": (_Payload(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        # a torch name is no way around the allowlist: torch.save would write the marker file
        "torch-named callable": (_Payload(torch.save, {"x": 1}, str(marker)), "torch.serialization.save"),
    }


@pytest.mark.parametrize("kind", list(_payloads(Path("x"))))
def test_reduce_payloads_in_zip_files_are_refused_by_name(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload, global_name = _payloads(marker)[kind]
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(512)}, "extra": payload}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        open_checkpoint(path)
    assert global_name in str(info.value) and str(path) in str(info.value)
    assert info.value.globals_needed == [global_name]
    assert not marker.exists(), "pickle code ran"


def _op_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _op_int(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _op_global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _handmade_torch_zip(path: Path, *, numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0,
                        record: bytes = bytes(40)) -> None:
    """A torch.save-format zip whose one tensor record says exactly what we tell it (true or not)."""
    storage = _op_tuple(_op_str("storage"), _op_global("torch", "FloatStorage"), _op_str("0"), _op_str("cpu"),
                        _op_int(numel)) + b"Q"
    tensor = _op_global("torch._utils", "_rebuild_tensor_v2") + _op_tuple(
        storage, _op_int(offset), _op_tuple(*map(_op_int, size)), _op_tuple(*map(_op_int, stride)), b"\x89",
        _op_global("collections", "OrderedDict") + b")R") + b"R"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}" + _op_str("w") + tensor + b"s.")
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", record)
        zf.writestr("archive/version", "3\n")


def test_handmade_zip_reads_like_torch(tmp_path: Path) -> None:
    record = torch.arange(10, dtype=torch.float32).numpy().tobytes()
    _handmade_torch_zip(tmp_path / "ok.pt", numel=10, size=(2, 3), stride=(1, 2), offset=3, record=record)
    expected = torch.load(tmp_path / "ok.pt", weights_only=True)["w"]
    got = open_checkpoint(tmp_path / "ok.pt").weights["w"]
    assert torch.equal(got, expected) and got.stride() == expected.stride() == (1, 2)


@pytest.mark.parametrize("lie", ["numel_past_record", "shape_past_storage", "negative_stride", "absurd_shape",
                                 "huge_broadcast"])
def test_zip_records_that_lie_about_sizes_are_refused_without_allocating(tmp_path: Path, lie: str) -> None:
    kwargs = {
        "numel_past_record": {"numel": 10**15, "size": (10,), "stride": (1,)},
        "shape_past_storage": {"numel": 10, "size": (10, 10), "stride": (10, 1)},
        "negative_stride": {"numel": 10, "size": (5,), "stride": (-1,), "offset": 4},
        "absurd_shape": {"numel": 10, "size": (1 << 40, 1 << 40), "stride": (0, 0)},
        "huge_broadcast": {"numel": 10, "size": (1 << 20, 1 << 20), "stride": (0, 0)},  # 4 TiB if copied
    }[lie]
    path = tmp_path / f"{lie}.pt"
    _handmade_torch_zip(path, **kwargs)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def _raw_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


@pytest.mark.parametrize("lie", ["offsets_past_eof", "overlapping", "huge_shape", "huge_header", "negative"])
def test_safetensors_headers_that_lie_are_refused(tmp_path: Path, lie: str) -> None:
    f32 = "F32"
    header, data, header_len = {
        "offsets_past_eof": ({"w": {"dtype": f32, "shape": [4], "data_offsets": [0, 16]}}, bytes(8), None),
        "overlapping": ({"a": {"dtype": f32, "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": f32, "shape": [4], "data_offsets": [8, 24]}}, bytes(24), None),
        "huge_shape": ({"w": {"dtype": f32, "shape": [10**12], "data_offsets": [0, 16]}}, bytes(16), None),
        "huge_header": ({"w": {"dtype": f32, "shape": [4], "data_offsets": [0, 16]}}, bytes(16), 1 << 62),
        "negative": ({"w": {"dtype": f32, "shape": [-4], "data_offsets": [0, 0]}}, b"", None),
    }[lie]
    path = tmp_path / f"{lie}.safetensors"
    _raw_safetensors(path, header, data, header_len)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("target", [("torch", "Tensor"), ("_codecs", "encode"), ("torch", "FloatStorage")])
def test_build_cannot_set_attributes_on_what_the_allowlist_hands_out(tmp_path: Path, target: tuple[str, str]) -> None:
    """A pickle's BUILD opcode sets attributes on the object below it; the stand-ins our unpickler returns for
    allowlisted names have none to set (they are shared by every later load)."""
    build = _op_global(*target) + b"}" + _op_str("__setstate__") + _op_str("x") + b"sb"
    with zipfile.ZipFile(tmp_path / "build.pt", "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}" + _op_str("x") + build + b"s.")
        zf.writestr("archive/byteorder", "little")
    with pytest.raises(CheckpointError, match="corrupt"):
        open_checkpoint(tmp_path / "build.pt")
