"""Read and write safetensors without materialising whole state dicts.

The layout is simple (8-byte header length, JSON header with dtype/shape/offsets, raw little-endian data), so
we stream it ourselves: the writer computes the header from (name, dtype, shape) up front and then appends each
tensor's bytes as they are produced (in chunks if needed). Two readers: :func:`open_safetensors` maps the file and
hands out zero-copy tensors — only for files ckptd wrote itself (its outputs are never rewritten in place; a
trainer's file rewritten under a map kills the process with SIGBUS); :func:`read_safetensors_placeholders` is for
everyone else's files: placeholders first, then ordinary reads of only the tensors picked. Files are validated by
the official ``safetensors`` package in the tests.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from ckptd.atomic import atomic_open
from ckptd.errors import CheckpointError
from ckptd.file_source import FileSource, LazyTensors, StorageRef, TensorRef
from ckptd.formats import parse_safetensors_header, safetensors_header

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _code
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def as_bytes_view(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included) without an extra copy when contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsStreamWriter:
    """Write tensors in the declared order into an open binary file; checks every byte count."""

    def __init__(self, fh: IO[bytes], specs: list[TensorSpec], metadata: Mapping[str, str] | None = None) -> None:
        self._fh = fh
        self._specs = specs
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for spec in specs:
            if spec.dtype not in DTYPE_TO_ST:
                raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors")
            header[spec.name] = {"dtype": DTYPE_TO_ST[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        self._index = 0
        self._remaining = specs[0].nbytes if specs else 0

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append ``data`` (a whole tensor or the next chunk of it) for tensor ``name``."""
        while self._index < len(self._specs) and self._remaining == 0 and self._specs[self._index].name != name:
            self._advance()
        if self._index >= len(self._specs) or self._specs[self._index].name != name:
            raise ValueError(f"tensor {name!r} written out of order")
        spec = self._specs[self._index]
        if data.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r}: got {data.dtype}, declared {spec.dtype}")
        view = as_bytes_view(data)
        if len(view) > self._remaining:
            raise ValueError(f"tensor {name!r}: more bytes than its declared shape {spec.shape}")
        self._fh.write(view)
        self._remaining -= len(view)
        if self._remaining == 0:
            self._advance()

    def _advance(self) -> None:
        self._index += 1
        self._remaining = self._specs[self._index].nbytes if self._index < len(self._specs) else 0

    def close(self) -> None:
        while self._index < len(self._specs) and self._remaining == 0:
            self._advance()
        if self._index < len(self._specs):
            raise ValueError(f"tensor {self._specs[self._index].name!r} was not (fully) written")


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> None:
    """Atomically write a state dict as safetensors, one tensor at a time."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    total, done = sum(s.nbytes for s in specs), 0
    with atomic_open(path, "wb") as fh:
        writer = SafetensorsStreamWriter(fh, specs, metadata)
        for spec, (k, v) in zip(specs, tensors.items()):
            writer.write(k, v)
            done += spec.nbytes
            if progress is not None:
                progress(done, total)
        writer.close()


def _entries(p: Path, header: dict) -> Iterator[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """(name, dtype, shape, start, stop) of each tensor in a parsed header, checked: a size that disagrees with
    the shape, a negative dimension or an unknown dtype is corruption, named."""
    for name, info in header.items():
        try:
            dtype = ST_TO_DTYPE[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(p, f"is corrupt: bad header entry for tensor {name!r} ({exc})") from None
        if any(n < 0 for n in shape) or stop - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(p, f"is corrupt: tensor {name!r} size disagrees with its shape {shape}")
        yield name, dtype, shape, start, stop


@dataclass
class MappedSafetensors:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def open_safetensors(path: str | Path) -> MappedSafetensors:
    """Map a safetensors file ckptd wrote; tensors are zero-copy views whose pages are read only when touched.
    Never for a trainer's file (see the module docstring): use :func:`read_safetensors_placeholders`."""
    p = Path(path)
    header = safetensors_header(p)
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, torch.Tensor] = {}
    with open(p, "rb") as fh:
        base = 8 + struct.unpack("<Q", fh.read(8))[0]
        size = os.fstat(fh.fileno()).st_size
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    for name, dtype, shape, start, _stop in _entries(p, header):
        count = math.prod(shape)
        if count == 0 or mm is None:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start).reshape(shape)
    return MappedSafetensors(tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()})


def read_safetensors_placeholders(source: FileSource, lazy: LazyTensors) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, str]]:
    """(name -> placeholder tensor, metadata) of a safetensors file opened with ordinary reads; the tensors'
    bytes are read later by ``lazy.materialize``, only for those asked for."""
    p = source.path
    header, base = parse_safetensors_header(p, source.size, lambda offset, n: source.read(offset, n, "header"))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(p, "is corrupt: safetensors __metadata__ is not an object")
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, start, stop in _entries(p, header):
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        ref = TensorRef(StorageRef(source, base + start, stop - start, name), dtype, shape, stride, 0)
        tensors[name] = lazy.placeholder(ref)
    return tensors, {str(k): str(v) for k, v in metadata.items()}
