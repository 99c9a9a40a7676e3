"""Open a ``torch.save`` file lazily and safely: unpickle ``data.pkl`` with our restricted unpickler, read no
tensor bytes until the caller picks the tensors it wants.

A ``torch.save`` zip holds ``<archive>/data.pkl`` (the object, with each storage as a persistent id) and one
uncompressed record ``<archive>/data/<key>`` per storage, plus ``<archive>/byteorder``. The central directory is
parsed by ``zipfile`` over our held descriptor (ordinary reads); a storage becomes a :class:`StorageRef` to its
record's bytes, a tensor a placeholder from :class:`~ckptd.file_source.LazyTensors`.

Files the lazy path does not cover (legacy pre-1.6 pickles, sparse/quantized tensors, compressed records) are
loaded whole by ``torch.load(weights_only=True, mmap=False)`` from the same descriptor: safe, and never mapped.
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any

import torch

from ckptd.errors import CheckpointChangedError, CheckpointError, IncompleteCheckpointError, UnsafeCheckpointError
from ckptd.file_source import FileSource, LazyTensors, StorageRef, TensorRef
from ckptd.restricted_pickle import (
    DATA_ONLY_GLOBALS,
    NeedsTorchLoader,
    RefusedGlobal,
    RestrictedUnpickler,
    StorageType,
    allowlist_names,
)
from ckptd.safe_load import first_line, unsafe_or_corrupt

_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


class _Storage:
    """What a storage's persistent id unpickles to: its bytes' location and its element type."""

    def __init__(self, ref: StorageRef, dtype: torch.dtype, untyped: bool) -> None:
        self.ref, self.dtype, self.untyped = ref, dtype, untyped


class _ZipUnpickler(RestrictedUnpickler):
    def __init__(self, data: bytes, *, zf: zipfile.ZipFile, prefix: str, source: FileSource, lazy: LazyTensors,
                 big_endian: bool, allowed: dict[str, Any]) -> None:
        super().__init__(io.BytesIO(data), allowed=allowed)
        self._zf, self._prefix, self._source, self._lazy = zf, prefix, source, lazy
        self._big_endian = big_endian
        self._storages: dict[str, _Storage] = {}

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType) or not isinstance(key, str) or not isinstance(numel, int) \
                or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage record {str(pid)[:80]}")
        if key not in self._storages:
            item = stype.dtype.itemsize
            offset, size = self._record(f"{self._prefix}data/{key}")
            nbytes = numel * item
            if nbytes > size:
                raise CheckpointError(self._source.path, f"is corrupt: storage {key} declares {nbytes} bytes, "
                                      f"its record holds {size}")
            swap = item if self._big_endian and item > 1 and not stype.untyped else 0
            ref = StorageRef(self._source, offset, nbytes, key, swap)
            self._storages[key] = _Storage(ref, stype.dtype, stype.untyped)
        return self._storages[key]

    def _record(self, name: str) -> tuple[int, int]:
        """(absolute offset, size) of an uncompressed record's bytes, from its local header."""
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            raise CheckpointError(self._source.path, f"is corrupt: record {name} is missing") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise NeedsTorchLoader(f"record {name} is compressed")
        header = self._source.read(info.header_offset, _LOCAL_HEADER.size, f"zip header of {name}")
        magic, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        if magic != _ZIP_MAGIC:
            raise CheckpointError(self._source.path, f"is corrupt: bad zip header for record {name}")
        offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        self._source.check_range(offset, info.file_size, f"record {name}")
        return offset, info.file_size

    def make_tensor(self, storage: Any, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
        if storage.untyped and self._big_endian and dtype.itemsize > 1:
            raise NeedsTorchLoader("big-endian untyped storage")
        return self._lazy.placeholder(TensorRef(storage.ref, dtype, size, stride, storage_offset))


def load_torch_file(source: FileSource, lazy: LazyTensors, allow_objects: Sequence[Any] = ()) -> Any:
    """The object saved in ``source`` (a torch.save zip or legacy file). Zip tensors are placeholders from
    ``lazy`` (read later, only those asked for); otherwise the file is loaded whole with torch's weights-only
    loader. Raises UnsafeCheckpointError naming refused globals, CheckpointChangedError, CheckpointError."""
    try:
        head = source.read(0, min(4, source.size), "file header")
        if head != _ZIP_MAGIC:
            return _torch_load_whole(source, allow_objects)
        try:
            return _load_zip_lazily(source, lazy, allow_objects)
        except (NeedsTorchLoader, RefusedGlobal) as exc:
            if isinstance(exc, RefusedGlobal) and not exc.torch_internal:
                raise UnsafeCheckpointError(source.path, [exc.name]) from None
            return _torch_load_whole(source, allow_objects)
    except CheckpointChangedError:
        raise
    except CheckpointError as exc:  # garbage read from a file being rewritten is a change, not a verdict
        reason = source.changed()
        if reason is not None:
            raise CheckpointChangedError(source.path, reason) from None
        raise exc from None


def _load_zip_lazily(source: FileSource, lazy: LazyTensors, allow_objects: Sequence[Any]) -> Any:
    try:
        zf = zipfile.ZipFile(source.fh)
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error, NotImplementedError) as exc:
        raise IncompleteCheckpointError(
            source.path, f"is truncated or corrupt: zip central directory not found ({exc}); "
            "it may still be being written") from None
    pickles = [i for i in zf.infolist()
               if i.filename == "data.pkl" or (i.filename.endswith("/data.pkl") and i.filename.count("/") == 1)]
    if not pickles:
        raise CheckpointError(source.path, "is a zip file but not a torch.save checkpoint (no data.pkl inside)")
    info = pickles[0]
    prefix = info.filename[: -len("data.pkl")]
    for needed in (info, *(i for i in zf.infolist() if i.filename == f"{prefix}byteorder")):
        if max(needed.file_size, needed.compress_size) > source.size:
            raise CheckpointError(source.path, f"is corrupt: record {needed.filename} declares "
                                  f"{needed.file_size} bytes in a file of {source.size}")
    try:
        byteorder = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip() \
            if f"{prefix}byteorder" in zf.NameToInfo else "little"
        data = zf.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(source.path, f"is corrupt: {first_line(exc)}") from None
    if byteorder not in ("little", "big"):
        raise CheckpointError(source.path, f"is corrupt: byteorder record says {byteorder[:20]!r}")
    unpickler = _ZipUnpickler(data, zf=zf, prefix=prefix, source=source, lazy=lazy,
                              big_endian=byteorder == "big", allowed=allowlist_names(allow_objects))
    try:
        return unpickler.load()
    except (RefusedGlobal, NeedsTorchLoader, CheckpointError):
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(source.path, f"is corrupt: {first_line(exc)}") from None
    except (EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError,
            MemoryError, OverflowError, UnicodeDecodeError, RuntimeError, struct.error) as exc:
        raise CheckpointError(source.path, f"is corrupt: {first_line(exc)}") from None


def _torch_load_whole(source: FileSource, allow_objects: Sequence[Any]) -> Any:
    """torch's own weights-only loader over the held descriptor, everything read (never mapped)."""
    source.fh.seek(0)
    try:
        with torch.serialization.safe_globals([*DATA_ONLY_GLOBALS, *allow_objects]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(source.fh, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise unsafe_or_corrupt(source.path, exc) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError, IndexError, TypeError,
            MemoryError, UnicodeDecodeError, struct.error, AssertionError, NotImplementedError,
            RecursionError, OverflowError, zipfile.BadZipFile) as exc:
        raise CheckpointError(source.path, f"could not be loaded: {first_line(exc)}") from None
