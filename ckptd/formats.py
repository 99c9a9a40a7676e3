"""Recognise a checkpoint's on-disk format and check that it is structurally complete.

Pure file inspection: no unpickling happens here. ``torch.save`` writes the zip central directory last and a
safetensors header states the exact data size, so both checks catch a truncated or still-growing file cheaply.
"""

from __future__ import annotations

import enum
import itertools
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from ckptd.errors import CheckpointError, IncompleteCheckpointError
from ckptd.input_files import open_binary

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar", ".pkl")
_ZIP_MAGIC = b"PK\x03\x04"
# Legacy (pre-1.6) torch.save files and plain pickles start with a pickle protocol opcode.
_PICKLE_PROTO = 0x80
_SAFETENSORS_MAX_FILE = 1 << 46  # 64 TiB: a header declaring more is a lie, not a file still being written
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


class CheckpointFormat(str, enum.Enum):
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    SAFETENSORS = "safetensors"
    HF_SHARDED = "hf-sharded"
    HF_FOLDER = "hf-folder"  # a Trainer checkpoint-N/ (or save_pretrained) folder with one weights file
    DCP = "torch-dcp"

    def __str__(self) -> str:
        return self.value


def hf_index_file(directory: Path) -> Path | None:
    """The ``*.index.json`` of a Hugging Face sharded folder, if there is exactly one usable."""
    indexes = sorted(directory.glob("*.index.json"))
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / name) in indexes:
            return directory / name
    return indexes[0] if indexes else None


# Hugging Face file names, in the order HF itself prefers them. Nothing else in such a folder is ever read:
# optimizer.pt, scheduler.pt, rng_state.pth and training_args.bin (a pickled TrainingArguments) are left alone.
HF_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
HF_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
HF_ADAPTER_CONFIG = "adapter_config.json"


def hf_weight_file(directory: Path) -> tuple[Path, bool] | None:
    """(the unsharded weights file, whether it is a PEFT adapter) of a Hugging Face folder, if it is one."""
    for name in HF_MODEL_FILES:
        if (directory / name).is_file():
            return directory / name, False
    if (directory / HF_ADAPTER_CONFIG).is_file():
        for name in HF_ADAPTER_FILES:
            if (directory / name).is_file():
                return directory / name, True
    return None


def detect_format(path: str | Path) -> CheckpointFormat:
    """Tell which format ``path`` holds, from its magic bytes (not its name)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "does not exist (it may have been deleted by the trainer)")
    if p.is_dir():
        if (p / ".metadata").is_file():
            return CheckpointFormat.DCP
        if hf_index_file(p) is not None:
            return CheckpointFormat.HF_SHARDED
        if hf_weight_file(p) is not None:
            return CheckpointFormat.HF_FOLDER
        raise CheckpointError(
            p, "is a directory but not a checkpoint folder: no torch.distributed.checkpoint .metadata, no Hugging "
            "Face *.index.json, model.safetensors or pytorch_model.bin, and no adapter_model.safetensors/.bin "
            "with adapter_config.json"
        )
    try:
        size = p.stat().st_size
        with open_binary(p) as fh:
            head = fh.read(16)
    except OSError as exc:
        raise CheckpointError(p, f"cannot be read: {exc.strerror or exc}") from exc
    if size == 0:
        raise IncompleteCheckpointError(p, "is empty (0 bytes)")
    if head.startswith(_ZIP_MAGIC):
        return CheckpointFormat.TORCH_ZIP
    if len(head) >= 8:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= _SAFETENSORS_MAX_HEADER and head[8:9] == b"{":
            return CheckpointFormat.SAFETENSORS
    if head[0] == _PICKLE_PROTO:
        return CheckpointFormat.TORCH_LEGACY
    raise CheckpointError(p, "is not a checkpoint: neither a torch.save zip, a legacy torch pickle, nor safetensors")


def check_complete(path: str | Path) -> CheckpointFormat:
    """Structural completeness check; raises :class:`CheckpointError` for truncated or malformed files."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt is CheckpointFormat.TORCH_ZIP:
        _check_zip(p)
    elif fmt is CheckpointFormat.SAFETENSORS:
        safetensors_header(p)
    elif fmt is CheckpointFormat.HF_SHARDED:
        for shard in hf_shard_files(p):
            check_complete(shard)
    elif fmt is CheckpointFormat.HF_FOLDER:
        found = hf_weight_file(p)
        assert found is not None
        check_complete(found[0])
    elif fmt is CheckpointFormat.DCP:
        if (p / ".metadata").stat().st_size == 0:
            raise IncompleteCheckpointError(p, ".metadata is empty: the checkpoint is still being written")
    return fmt


def _check_zip(p: Path) -> None:
    try:
        with open_binary(p) as fh, zipfile.ZipFile(fh) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise IncompleteCheckpointError(
            p, f"is truncated or corrupt: zip central directory not found ({exc}); it may still be being written"
        ) from exc
    except OSError as exc:
        raise CheckpointError(p, f"cannot be read: {exc}") from exc
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointError(p, "is a zip file but not a torch.save checkpoint (no data.pkl inside)")


def safetensors_header(path: str | Path) -> dict:
    """Parse and validate a safetensors header: JSON, offsets in range, and data size equal to the file's."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open_binary(p) as fh:
            header, _ = parse_safetensors_header(p, size, lambda offset, n: (fh.seek(offset), fh.read(n))[1])
    except OSError as exc:
        raise CheckpointError(p, f"cannot be read: {exc}") from exc
    return header


def parse_safetensors_header(p: Path, size: int, read: Callable[[int, int], bytes]) -> tuple[dict, int]:
    """(header, offset of the data) of a safetensors file of ``size`` bytes, read through ``read(offset, n)``.
    Every tensor's byte range must lie inside the data and not overlap another, so a lying header cannot make a
    reader allocate or read past the end; the data must end exactly at the end of the file."""
    raw_len = read(0, 8) if size >= 8 else b""
    if len(raw_len) < 8:
        raise IncompleteCheckpointError(p, "is truncated: safetensors header length missing")
    (n,) = struct.unpack("<Q", raw_len)
    if n > _SAFETENSORS_MAX_HEADER or 8 + n > size:
        raise IncompleteCheckpointError(p, f"is truncated or corrupt: safetensors header of {n} bytes exceeds the file")
    try:
        header = json.loads(read(8, n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(p, f"is corrupt: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(p, "is corrupt: safetensors header is not a JSON object")
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(p, f"is corrupt: tensor {name!r} has no valid data_offsets") from exc
        if not 0 <= start <= stop:
            raise CheckpointError(p, f"is corrupt: tensor {name!r} has data_offsets {start}..{stop}")
        ranges.append((start, stop, name))
    ranges.sort()
    for (_, prev_stop, prev), (start, _, name) in itertools.pairwise(ranges):
        if start < prev_stop:
            raise CheckpointError(p, f"is corrupt: tensors {prev!r} and {name!r} overlap")
    end = max((stop for _, stop, _ in ranges), default=0)
    expected = 8 + n + end
    if expected > _SAFETENSORS_MAX_FILE:
        raise CheckpointError(p, f"is corrupt: its safetensors header declares {expected} bytes of data, more than "
                                 "any real checkpoint (not waited for)")
    if expected != size:
        if size < expected:
            raise IncompleteCheckpointError(
                p, f"is truncated (still being written?): safetensors header says {expected} bytes, file has {size}")
        raise CheckpointError(p, f"has trailing bytes: safetensors header says {expected} bytes, file has {size}")
    return header, 8 + n


def hf_shard_files(directory: str | Path) -> list[Path]:
    """Shard files named by a Hugging Face ``*.index.json`` (``weight_map``)."""
    d = Path(directory)
    index = hf_index_file(d)
    if index is None:
        raise CheckpointError(d, "has no *.index.json")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(index, f"is not a valid sharded-checkpoint index: {exc}") from exc
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = (d / name).resolve()
        if d.resolve() not in shard.parents:
            raise CheckpointError(index, f"names a shard outside its folder: {name!r}")
        if not shard.is_file():
            raise CheckpointError(d, f"shard {name} listed in {index.name} is missing")
        shards.append(shard)
    return shards
