"""Hostile inputs for the fault suite. Each builder puts one hostile item under a watched root and returns its
path (the path log lines must name). Payloads only ever try to create a canary file.

Kinds and what the daemon must do with them (``EXPECT``):
  reject      the item is refused: one warning/error line naming it with a reason, never published
  any         a legal but odd name: processed or refused, one line naming it
  refuse_run  a run directory that must not be followed: one warning/error line naming it, no outputs from it
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import struct
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.chaos_data import checkpoint, model_state, save


class Call:
    """Pickles as ``fn(*args)`` (a ``__reduce__`` gadget); callable so gadgets can nest (getattr chains)."""

    def __init__(self, fn: Any, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)

    def __call__(self, *a: Any) -> None:  # never called here
        raise AssertionError


def _touch_code(canary: Path) -> str:
    return f"open({str(canary)!r}, 'w').close()"


def _obj(kb: int, payload: Any) -> dict[str, Any]:
    obj = checkpoint(7, 0.99, 99, kb)
    obj["extra"] = payload
    return obj


def zip_payload(fn: Callable[[Path], Any]) -> Callable[[Path, Path, int], Path]:
    def build(run: Path, canary: Path, kb: int) -> Path:
        path = run / "evil_score_0.99.pt"
        save(_obj(kb, fn(canary)), path)  # a real torch.save zip; data.pkl holds the gadget
        return path
    return build


def crafted_zip(run: Path, canary: Path, kb: int) -> Path:
    """A real torch.save zip whose data.pkl is replaced by a protocol-0 pickle with a getattr/__import__ chain."""
    system = Call(getattr, (Call(builtins.__import__, ("os",)), "system"))
    gadget = {"metric": 0.99, "model_state_dict": {}, "x": [Call(system, (f"touch {canary}",))]}
    evil = pickle.dumps(gadget, protocol=0)
    buf = io.BytesIO()
    torch.save(checkpoint(7, 0.99, 99, kb), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, evil if info.filename.endswith("/data.pkl") else src.read(info))
    return _place(run / "crafted_score_0.99.pt", out.getvalue())


def legacy_pickle(run: Path, canary: Path, kb: int) -> Path:
    path = run / "legacy_score_0.99.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(_obj(kb, Call(os.system, (f"touch {canary}",))), tmp, _use_new_zipfile_serialization=False)
    os.replace(tmp, path)
    return path


def raw_pickle(run: Path, canary: Path, kb: int) -> Path:
    """A plain pickle (no tensors, so the gadget is the only foreign global), named like a checkpoint."""
    return _place(run / "raw_score_0.99.pth",
                  pickle.dumps({"metric": 0.99, "extra": Call(os.system, (f"touch {canary}",))}, 2))


def dcp_item(run: Path, canary: Path, kb: int) -> Path:
    """torch.distributed.checkpoint.save of a dict with a gadget among its non-tensor items."""
    import warnings

    import torch.distributed.checkpoint as dcp

    final = run / "dcp_step_99"
    tmp = run / "tmp-dcp-writing"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_state(7, kb, channels_last=False), "metric": 0.99,
                  "extra": Call(os.system, (f"touch {canary}",))}, checkpoint_id=str(tmp))
    os.replace(tmp, final)
    return final


def _st(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _place(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def st_past_eof(run: Path, canary: Path, kb: int) -> Path:
    return _place(run / "st_eof_score_0.99.safetensors",
                  _st({"w": {"dtype": "F32", "shape": [1 << 38], "data_offsets": [0, 1 << 40]}}, b"\0" * 16))


def st_overlap(run: Path, canary: Path, kb: int) -> Path:
    return _place(run / "st_overlap_score_0.99.safetensors",
                  _st({"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
                       "b": {"dtype": "F32", "shape": [16], "data_offsets": [32, 96]}}, b"\1" * 96))


def st_huge_shape(run: Path, canary: Path, kb: int) -> Path:
    return _place(run / "st_huge_score_0.99.safetensors",
                  _st({"w": {"dtype": "F32", "shape": [1 << 31, 1 << 31, 1 << 31], "data_offsets": [0, 16]}},
                      b"\0" * 16))


def st_negative_offset(run: Path, canary: Path, kb: int) -> Path:
    return _place(run / "st_negative_score_0.99.safetensors",
                  _st({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, b""))


def _patch_sizes(data: bytes, member: str, size: int) -> bytes:
    """Declare ``size`` bytes (compressed and uncompressed) for ``member`` in its local and central headers."""
    buf = bytearray(data)
    name = member.encode()
    i = 0
    while (i := buf.find(b"PK\x01\x02", i)) != -1:  # central directory entries
        n, m, k = struct.unpack_from("<HHH", buf, i + 28)
        if bytes(buf[i + 46:i + 46 + n]) == name:
            struct.pack_into("<II", buf, i + 20, size, size)
            (local,) = struct.unpack_from("<I", buf, i + 42)
            struct.pack_into("<II", buf, local + 18, size, size)
        i += 46 + n + m + k
    return bytes(buf)


def zip_absurd(member_suffix: str) -> Callable[[Path, Path, int], Path]:
    def build(run: Path, canary: Path, kb: int) -> Path:
        buf = io.BytesIO()
        torch.save(checkpoint(7, 0.99, 99, kb), buf)
        names = zipfile.ZipFile(io.BytesIO(buf.getvalue())).namelist()
        member = next(n for n in names if n.endswith(member_suffix))
        return _place(run / f"absurd{member_suffix.replace('/', '_')}_score_0.99.pt",
                      _patch_sizes(buf.getvalue(), member, 0xFFFFFFF0))
    return build


def poisoned(kind: str) -> Callable[[Path, Path, int], Path]:
    def build(run: Path, canary: Path, kb: int) -> Path:
        path = run / f"{kind}_weights.pt"
        save(checkpoint(8, 0.99, 99, kb, poison=kind), path)
        return path
    return build


def wrong_arch(run: Path, canary: Path, kb: int) -> Path:
    path = run / "other_arch.pt"
    save(checkpoint(9, 0.99, 99, kb, arch="b"), path)
    return path


def symlink_run(run: Path, canary: Path, kb: int) -> Path:
    outside = run.parent.parent / "outside" / run.name
    outside.mkdir(parents=True, exist_ok=True)
    save(checkpoint(10, 0.99, 99, kb), outside / "secret.pt")
    link = run.parent / f"{run.name}_linked_run"
    link.symlink_to(outside, target_is_directory=True)
    return link


def symlink_file(run: Path, canary: Path, kb: int) -> Path:
    outside = run.parent.parent / "outside" / run.name
    outside.mkdir(parents=True, exist_ok=True)
    save(checkpoint(11, 0.99, 99, kb), outside / "secret.pt")
    link = run / "linked_score_0.99.pt"
    link.symlink_to(outside / "secret.pt")
    return link


def odd_file(name: str | bytes) -> Callable[[Path, Path, int], Path]:
    def build(run: Path, canary: Path, kb: int) -> Path:
        raw = os.fsencode(run) + b"/" + (name if isinstance(name, bytes) else name.encode())
        path = Path(os.fsdecode(raw))
        save(checkpoint(12, 0.3, 12, kb), path)
        return path
    return build


def odd_run(name: str) -> Callable[[Path, Path, int], Path]:
    def build(run: Path, canary: Path, kb: int) -> Path:
        d = run.parent / f"{run.name}{name}"
        d.mkdir()
        save(checkpoint(13, 0.3, 13, kb), d / "c.pt")
        return d
    return build


KINDS: dict[str, tuple[str, Callable[[Path, Path, int], Path]]] = {
    "zip: os.system": ("reject", zip_payload(lambda c: Call(os.system, (f"touch {c}",)))),
    "zip: subprocess.Popen": ("reject", zip_payload(lambda c: Call(subprocess.Popen, (["touch", str(c)],)))),
    "zip: builtins.exec": ("reject", zip_payload(lambda c: Call(builtins.exec, (_touch_code(c),)))),
    "zip: builtins.eval": ("reject", zip_payload(lambda c: Call(builtins.eval, (_touch_code(c),)))),
    "zip: nested in list/dict": ("reject", zip_payload(
        lambda c: {"deep": [1, {"deeper": (Call(os.system, (f"touch {c}",)),)}]})),
    "zip: crafted data.pkl": ("reject", crafted_zip),
    "legacy torch pickle": ("reject", legacy_pickle),
    "raw pickle .pth": ("reject", raw_pickle),
    "DCP item __reduce__": ("reject", dcp_item),
    "safetensors offsets past EOF": ("reject", st_past_eof),
    "safetensors overlapping": ("reject", st_overlap),
    "safetensors huge shape": ("reject", st_huge_shape),
    "safetensors negative offset": ("reject", st_negative_offset),
    "zip absurd size (data.pkl)": ("reject", zip_absurd("/data.pkl")),
    "zip absurd size (tensor)": ("reject", zip_absurd("/data/0")),
    "NaN weights": ("reject", poisoned("nan")),
    "Inf weights": ("reject", poisoned("inf")),
    "wrong architecture": ("reject", wrong_arch),
    "symlinked run dir (outside)": ("refuse_run", symlink_run),
    "symlinked checkpoint (outside)": ("reject", symlink_file),
    "name with ..": ("any", odd_file("a..b.pt")),
    "name with newline": ("any", odd_file("new\nline.pt")),
    "name unicode": ("any", odd_file("模型_ünï_ckpt.pt")),
    "name invalid utf-8": ("any", odd_file(b"bad_\xff\xfe.pt")),
    "run dir with newline": ("any_run", odd_run("_new\nline")),
    "run dir unicode": ("any_run", odd_run("_ünï")),
}
