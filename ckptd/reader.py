"""Read any checkpoint a trainer wrote: safely, with ordinary reads, and only the model's bytes.

:func:`read_checkpoint` opens the file (or folder) once and loads the whole object with every tensor as a
placeholder (tiny ones real, so a metric such as Lightning's ``current_score`` can be read); nothing else is
read. :meth:`CheckpointReader.weights` then picks the model tensors (any layout :mod:`ckptd.layouts` knows) and
reads just their bytes into ordinary CPU memory, hashing them as it goes: a 720 MB training checkpoint with a
240 MB model costs about 240 MB of reads, and the hash (:func:`content_sha256`) identifies the model's content
whatever file or layout it came in. Nothing is memory-mapped (a trainer rewriting a mapped file in place kills
the reader with SIGBUS); a file that changes while it is read raises
:class:`~ckptd.errors.CheckpointChangedError`, for the caller to retry.

Formats: ``torch.save`` zip (lazy, our restricted unpickler) and legacy files (``torch.load(weights_only=True)``
whole), safetensors, Hugging Face folders (Trainer ``checkpoint-N/`` with ``model.safetensors`` or
``pytorch_model.bin``, sharded ``*.index.json``, PEFT adapters) and ``torch.distributed.checkpoint`` folders.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from ckptd.errors import CheckpointChangedError, CheckpointError, WeightsNotFoundError
from ckptd.file_source import FileSource, HeldSources, LazyTensors
from ckptd.formats import CheckpointFormat, detect_format, hf_index_file, hf_shard_files, hf_weight_file
from ckptd.input_files import open_input
from ckptd.layouts import DEFAULT_STRIP_PREFIXES, FoundWeights, find_model_weights
from ckptd.safe_load import resolve_globals
from ckptd.safetensors_io import as_bytes_view, read_safetensors_placeholders
from ckptd.zip_reader import load_torch_file

ADAPTER_LAYOUT = "hf-peft-adapter"


@dataclass(frozen=True)
class LoadedWeights:
    """Model weights read from a checkpoint: real CPU tensors in memory of their own (never a file mapping)."""

    state: dict[str, torch.Tensor]
    key: str  # dotted key path where they were found ("" = the object itself)
    layout: str  # e.g. "training-state", "lightning", "timm-ema", "plain", "hf-peft-adapter"
    stripped: tuple[str, ...]
    content_sha256: str


def content_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Identity of model weights by content: sha256 over the tensors in sorted-name order, each contributing its
    name, dtype and shape (a length-prefixed JSON list) and its raw little-endian bytes in row-major order
    (length-prefixed). The same weights give the same hash whichever file, layout or memory format held them."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        head = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        data = as_bytes_view(t)
        h.update(struct.pack("<Q", len(head)))
        h.update(head)
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


class _Backend(Protocol):
    def materialize(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def read_flat(self, tensor: torch.Tensor, start: int, stop: int,
                  out: torch.Tensor | None = None) -> torch.Tensor: ...
    def verify_unchanged(self) -> None: ...
    def close(self) -> None: ...


class _Files(HeldSources):
    """Backend for single files and Hugging Face folders: held descriptors plus lazy placeholders."""

    def __init__(self) -> None:
        super().__init__()
        self.lazy = LazyTensors()

    def open(self, path: Path) -> FileSource:
        source = open_input(path)
        self.sources.append(source)
        return source

    def materialize(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.lazy.materialize(tensors)

    def read_flat(self, tensor: torch.Tensor, start: int, stop: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        return self.lazy.read_flat(tensor, start, stop, out)


class StreamedWeights(Mapping[str, torch.Tensor]):
    """Model weights to read piece by piece, so that averaging k checkpoints never holds k models: ``self[name]``
    is a placeholder (``meta``; dtype and shape are free, tiny tensors are real), :meth:`read_flat` reads a chunk.
    Valid while its reader is open; call the reader's ``verify_unchanged()`` after the last read."""

    def __init__(self, reader: CheckpointReader, placeholders: dict[str, torch.Tensor], key: str, layout: str,
                 stripped: tuple[str, ...], backend: _Backend) -> None:
        self.reader, self.key, self.layout, self.stripped = reader, key, layout, stripped
        self._placeholders, self._backend = placeholders, backend

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._placeholders[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._placeholders)

    def __len__(self) -> int:
        return len(self._placeholders)

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of tensor ``name`` flattened row-major, as a 1-D CPU tensor (``out`` when it
        is given and fits: a contiguous buffer of the tensor's dtype and size); for a contiguous tensor only those
        bytes are read."""
        try:
            return self._backend.read_flat(self._placeholders[name], start, stop, out)
        except CheckpointChangedError:
            raise
        except CheckpointError:
            self.reader.verify_unchanged()
            raise


class CheckpointReader:
    """An opened checkpoint. ``obj`` is the whole loaded object, its tensors placeholders (``meta``) except tiny
    ones; ``metadata`` is the safetensors metadata. Use as a context manager: the descriptors stay open (and the
    file's identity pinned) until it closes."""

    def __init__(self, path: Path, fmt: CheckpointFormat, obj: Any, metadata: dict[str, str], backend: _Backend,
                 *, adapter: bool = False, map_location: Any = "cpu") -> None:
        self.path, self.format, self.obj, self.metadata = path, fmt, obj, metadata
        self._backend, self._adapter, self._map_location = backend, adapter, map_location

    def weights(self, *, key: str = "auto", prefer_ema: bool = False,
                strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES) -> LoadedWeights:
        """Find the model weights (or the EMA weights) and read only their bytes; may be called again for
        another stream of the same file without unpickling it again."""
        found, layout = self._find(key, prefer_ema, strip_prefixes)
        try:
            state = self._backend.materialize(found.state)
        except CheckpointChangedError:
            raise
        except CheckpointError:
            self.verify_unchanged()  # a corrupt-looking read of a file that changed is a change
            raise
        except RuntimeError as exc:
            raise CheckpointError(self.path, f"its weights could not be read: {type(exc).__name__}: {exc}") from None
        self.verify_unchanged()
        digest = content_sha256(state)
        device = torch.device(self._map_location or "cpu")  # a str or torch.device; tensors are read to the CPU
        if device.type != "cpu":
            state = {k: v.to(device) for k, v in state.items()}
        return LoadedWeights(state=state, key=found.key, layout=layout, stripped=found.stripped,
                             content_sha256=digest)

    def stream_weights(self, *, key: str = "auto", prefer_ema: bool = False,
                       strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES) -> StreamedWeights:
        """The same weights as :meth:`weights` finds, not read yet (no content hash): for streaming consumers."""
        found, layout = self._find(key, prefer_ema, strip_prefixes)
        return StreamedWeights(self, dict(found.state), found.key, layout, found.stripped, self._backend)

    def _find(self, key: str, prefer_ema: bool, strip: Sequence[str]) -> tuple[FoundWeights, str]:
        try:
            found = find_model_weights(self.obj, key=key, prefer_ema=prefer_ema, strip=strip)
        except LookupError as exc:
            raise WeightsNotFoundError(self.path, str(exc)) from None
        return found, ADAPTER_LAYOUT if self._adapter and found.key == "" else found.layout

    def verify_unchanged(self) -> None:
        """Raise CheckpointChangedError if any file read was truncated, rewritten or replaced since it was opened."""
        self._backend.verify_unchanged()

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_checkpoint(path: str | Path, *, allow_globals: Sequence[str | Any] = (),
                    map_location: Any = "cpu") -> CheckpointReader:
    """Open any supported checkpoint safely (see the module docstring). Raises CheckpointError subclasses:
    UnsafeCheckpointError naming refused globals, IncompleteCheckpointError, CheckpointChangedError."""
    p = Path(path)
    fmt = detect_format(p)
    allow = resolve_globals(allow_globals)
    if fmt is CheckpointFormat.DCP:
        from ckptd.dcp_reader import DcpFolder

        folder = DcpFolder(p, allow)
        return CheckpointReader(p, fmt, folder.obj, {}, folder, map_location=map_location)
    files = _Files()
    try:
        adapter = False
        metadata: dict[str, str] = {}
        if fmt is CheckpointFormat.HF_SHARDED:
            obj: Any = _merge_shards(p, files, allow)
        elif fmt is CheckpointFormat.HF_FOLDER:
            found = hf_weight_file(p)
            assert found is not None
            obj, metadata = _read_file(found[0], files, allow)
            adapter = found[1]
            if not isinstance(obj, Mapping):
                raise CheckpointError(found[0], f"holds a {type(obj).__name__}, not a state dict")
        else:
            obj, metadata = _read_file(p, files, allow)
        return CheckpointReader(p, fmt, obj, metadata, files, adapter=adapter, map_location=map_location)
    except BaseException:
        files.close()
        raise


def _read_file(path: Path, files: _Files, allow: Sequence[Any]) -> tuple[Any, dict[str, str]]:
    fmt = detect_format(path)
    if fmt in (CheckpointFormat.TORCH_ZIP, CheckpointFormat.TORCH_LEGACY):
        return load_torch_file(files.open(path), files.lazy, allow), {}
    if fmt is CheckpointFormat.SAFETENSORS:
        return read_safetensors_placeholders(files.open(path), files.lazy)
    raise CheckpointError(path, f"is {fmt}, expected a single weights file")


def _merge_shards(directory: Path, files: _Files, allow: Sequence[Any]) -> dict[str, Any]:
    """A Hugging Face sharded folder as one state dict of placeholders; shards must agree with the index."""
    merged: dict[str, Any] = {}
    for shard in hf_shard_files(directory):
        part, _ = _read_file(shard, files, allow)
        if not isinstance(part, Mapping):
            raise CheckpointError(shard, f"holds a {type(part).__name__}, not a state dict")
        for name, tensor in part.items():
            if name in merged:
                raise CheckpointError(directory, f"tensor {name!r} appears in more than one shard")
            merged[name] = tensor
    index = hf_index_file(directory)
    assert index is not None
    expected = set(json.loads(index.read_text())["weight_map"])
    missing = expected - set(merged)
    if missing:
        raise CheckpointError(directory, f"shards lack tensors listed in {index.name}: {sorted(missing)[:5]}")
    return merged
