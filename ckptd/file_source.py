"""Read tensors out of a trainer's file with ordinary reads, and notice when the file changes underneath us.

Why not ``mmap``: trainers rewrite some files in place (Lightning truncates ``last.ckpt`` and writes it again,
ml-cvnets re-saves ``checkpoint_last.pt``). Touching a mapped page past the new end of file raises SIGBUS, which
kills the process and cannot be caught in Python. ``pread`` on a held descriptor just comes back short instead;
with the size/mtime recorded at open, that becomes :class:`~ckptd.errors.CheckpointChangedError` ("retry later").

A reader first turns every tensor into a placeholder (a ``meta`` tensor plus a :class:`TensorRef` saying where its
bytes live); once the caller knows which tensors it wants (the model's), :meth:`LazyTensors.materialize` reads only
their byte ranges into ordinary CPU memory. Tiny tensors are read eagerly so a scalar metric can be looked up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from ckptd.errors import CheckpointChangedError, CheckpointError

EAGER_BYTES = 1024  # tensors this small are read while unpickling (metrics such as current_score)
_READ_CHUNK = 64 << 20


@dataclass(frozen=True)
class FileStamp:
    size: int
    mtime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class FileSource:
    """One file opened once for ordinary reads. The descriptor stays open until :meth:`close`, so a trainer that
    replaces the file by rename cannot swap the content we read mid-way; one that rewrites it in place is caught
    by :meth:`changed`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.fh: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        except FileNotFoundError:
            raise CheckpointError(self.path, "does not exist (it may have been deleted by the trainer)") from None
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot be read: {exc.strerror or exc}") from None
        self.fd = self.fh.fileno()
        self.stamp = FileStamp.of(os.fstat(self.fd))

    @property
    def size(self) -> int:
        return self.stamp.size

    def changed(self) -> str | None:
        """Why the file is no longer what we opened (size/mtime differ, or another file now has its name);
        None when it is the same. A deleted file is not "changed": the held descriptor still reads it whole."""
        try:
            now = FileStamp.of(os.fstat(self.fd))
        except OSError as exc:
            return f"cannot stat the open file: {exc}"
        if (now.size, now.mtime_ns) != (self.stamp.size, self.stamp.mtime_ns):
            return f"size {self.stamp.size} -> {now.size} bytes, mtime changed" if now.size != self.stamp.size \
                else "rewritten in place (mtime changed)"
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot stat: {exc}"
        if (at_path.st_ino, at_path.st_dev) != (self.stamp.ino, self.stamp.dev):
            return "replaced by another file under the same name"
        return None

    def verify_unchanged(self) -> None:
        reason = self.changed()
        if reason is not None:
            raise CheckpointChangedError(self.path, reason)

    def check_range(self, offset: int, nbytes: int, what: str) -> None:
        """Refuse a byte range outside the file as it was at open (corrupt or lying header), before allocating."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.stamp.size:
            raise CheckpointError(self.path, f"is corrupt: {what} spans bytes {offset}..{offset + nbytes}, "
                                  f"past the end of the file ({self.stamp.size} bytes)")

    def read(self, offset: int, nbytes: int, what: str = "data") -> bytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.read_into(buf, offset, what)
        return bytes(buf.numpy()) if nbytes else b""

    def read_into(self, buf: torch.Tensor, offset: int, what: str = "data") -> None:
        """Fill the 1-D uint8 tensor ``buf`` from ``offset``; a short read means the file shrank under us."""
        self.check_range(offset, buf.numel(), what)
        view = memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done:done + _READ_CHUNK]], offset + done)
            except OSError as exc:
                raise CheckpointError(self.path, f"cannot be read: {exc.strerror or exc}") from None
            if n == 0:
                raise CheckpointChangedError(
                    self.path, f"short read of {what} at byte {offset + done}: {self.changed() or 'file shrank'}")
            done += n

    def close(self) -> None:
        self.fh.close()


class HeldSources:
    """The files a checkpoint reader holds open: it checks them all for changes and closes them all."""

    def __init__(self) -> None:
        self.sources: list[FileSource] = []

    def verify_unchanged(self) -> None:
        for source in self.sources:
            source.verify_unchanged()

    def close(self) -> None:
        for source in self.sources:
            source.close()


@dataclass(frozen=True)
class StorageRef:
    """Where one storage's bytes live: ``nbytes`` from absolute ``offset`` in ``source``. ``key`` identifies the
    storage within its source (tensors sharing it share memory once read). ``swap`` > 1 means big-endian elements
    of that size (a ``byteorder`` record saying ``big``)."""

    source: FileSource
    offset: int
    nbytes: int
    key: str
    swap: int = 0


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements of dtype

    def byte_span(self) -> tuple[int, int]:
        """[start, stop) in bytes within the storage; validated so a lying header cannot read out of bounds."""
        item = _itemsize(self.dtype)
        if len(self.size) != len(self.stride) or any(s < 0 for s in (*self.size, *self.stride)) \
                or self.storage_offset < 0:
            raise CheckpointError(self.storage.source.path,
                                  f"is corrupt: tensor with size {self.size}, stride {self.stride}, "
                                  f"offset {self.storage_offset} in storage {self.storage.key}")
        start = self.storage_offset * item
        if math.prod(self.size) == 0:
            return start, start
        stop = (self.storage_offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1) * item
        if stop > self.storage.nbytes:
            raise CheckpointError(self.storage.source.path,
                                  f"is corrupt: a tensor of shape {list(self.size)} needs {stop} bytes of storage "
                                  f"{self.storage.key}, which has {self.storage.nbytes}")
        return start, stop


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


class LazyTensors:
    """Placeholders for tensors not read yet, and the reads that turn chosen ones into real CPU tensors."""

    def __init__(self, eager_bytes: int = EAGER_BYTES) -> None:
        self.eager_bytes = eager_bytes
        self._refs: dict[int, tuple[torch.Tensor, TensorRef]] = {}  # id(placeholder) -> (placeholder, ref)
        self._flat: tuple[torch.Tensor, torch.Tensor] | None = None  # last strided tensor read_flat read whole

    def placeholder(self, ref: TensorRef) -> torch.Tensor:
        """A meta tensor standing for ``ref``; a tensor whose bytes span at most ``eager_bytes`` (a metric, a step
        counter, even as a view into a large storage) is read right away instead."""
        start, stop = ref.byte_span()
        storage = ref.storage
        logical = math.prod(ref.size) * _itemsize(ref.dtype)
        if logical > storage.source.size + (1 << 20):  # stride-0 broadcasts can claim any size: no huge copies
            raise CheckpointError(storage.source.path, f"is corrupt: a tensor of shape {list(ref.size)} "
                                  f"({logical} bytes) cannot come from a file of {storage.source.size} bytes")
        if stop - start <= self.eager_bytes:
            tensor = self._read({"": ref})[""]
        else:
            try:
                tensor = torch.empty_strided(ref.size, ref.stride, dtype=ref.dtype, device="meta")
            except (RuntimeError, ValueError, OverflowError) as exc:
                raise CheckpointError(storage.source.path, f"is corrupt: tensor size {ref.size}: {exc}") from None
        self._refs[id(tensor)] = (tensor, ref)
        return tensor

    def ref_of(self, tensor: torch.Tensor) -> TensorRef | None:
        entry = self._refs.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def materialize(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Real CPU tensors (owned memory, strides kept) for ``tensors``; only their byte ranges are read, each
        storage once. Tensors this object did not create (loaded whole by torch) are passed through."""
        refs: dict[str, TensorRef] = {}
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            ref = self.ref_of(t)
            if ref is not None:
                refs[name] = ref
            elif t.device.type == "meta":
                raise ValueError(f"tensor {name!r} is a placeholder this reader did not create")
            else:
                out[name] = t
        out.update(self._read(refs))
        return {name: out[name] for name in tensors}

    def read_flat(self, tensor: torch.Tensor, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of ``tensor`` flattened in row-major order, as a new 1-D CPU tensor: for a
        contiguous tensor only those bytes are read (averaging streams k checkpoints chunk by chunk this way);
        a strided one is read whole once and kept until another tensor is asked for."""
        ref = self.ref_of(tensor)
        if ref is None:
            return tensor.reshape(-1)[start:stop]
        numel = math.prod(ref.size)
        if not 0 <= start <= stop <= numel:
            raise IndexError(f"elements {start}..{stop} of a tensor of {numel}")
        if ref.stride == _contiguous_strides(ref.size):
            item, storage = _itemsize(ref.dtype), ref.storage
            usable = out is not None and out.dtype == ref.dtype and out.is_contiguous() and out.numel() == stop - start
            # reading into the caller's scratch buffer: no allocation per chunk (averaging k files chunk by chunk)
            buf = out.view(torch.uint8).reshape(-1) if usable else torch.empty((stop - start) * item, dtype=torch.uint8)
            storage.source.read_into(buf, storage.offset + (ref.storage_offset + start) * item,
                                     f"storage {storage.key}")
            return _byteswapped(buf, storage.swap).view(ref.dtype)
        if self._flat is None or self._flat[0] is not tensor:
            self._flat = (tensor, self._read({"": ref})[""].reshape(-1))
        return self._flat[1][start:stop].clone()

    @staticmethod
    def _read(refs: Mapping[str, TensorRef]) -> dict[str, torch.Tensor]:
        groups: dict[tuple[int, str], list[tuple[str, TensorRef]]] = {}
        for name, ref in refs.items():
            groups.setdefault((id(ref.storage.source), ref.storage.key), []).append((name, ref))
        out: dict[str, torch.Tensor] = {}
        for members in groups.values():
            storage = members[0][1].storage
            spans = [ref.byte_span() for _, ref in members]
            start = min(s for s, _ in spans) // 16 * 16  # aligned for every element size
            stop = max(e for _, e in spans)
            if storage.swap > 1:
                stop = min(storage.nbytes, -(-stop // storage.swap) * storage.swap)
            storage.source.check_range(storage.offset + start, stop - start, f"storage {storage.key}")
            base = torch.empty(stop - start, dtype=torch.uint8)
            storage.source.read_into(base, storage.offset + start, f"storage {storage.key}")
            base = _byteswapped(base, storage.swap)
            for name, ref in members:
                out[name] = _view(base, start, ref)
        return out


def _byteswapped(buf: torch.Tensor, swap: int) -> torch.Tensor:
    if swap <= 1 or buf.numel() == 0:
        return buf
    usable = buf.numel() // swap * swap
    buf[:usable] = buf[:usable].view(-1, swap).flip(1).reshape(-1)
    return buf


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(size[i + 1:]) for i in range(len(size)))


def _view(base: torch.Tensor, base_start: int, ref: TensorRef) -> torch.Tensor:
    """``ref``'s tensor over ``base`` (uint8 bytes of its storage from ``base_start``) without copying."""
    item = _itemsize(ref.dtype)
    if math.prod(ref.size) == 0:
        return torch.empty_strided(ref.size, ref.stride, dtype=ref.dtype)
    typed = base[: base.numel() // item * item].view(ref.dtype)
    return torch.as_strided(typed, ref.size, ref.stride, ref.storage_offset - base_start // item)
