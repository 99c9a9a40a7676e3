"""Read ``torch.distributed.checkpoint`` folders through DCP's public API, with every pickle restricted.

DCP writes ``.metadata`` with plain pickle, and stores each non-tensor item as a ``torch.save`` blob that its
``DefaultLoadPlanner.load_bytes`` loads with the weights-only restriction turned off: a ``__reduce__`` payload in
a watched DCP folder would run. Here ``.metadata`` goes through our own restricted unpickler and every bytes item
through ``torch.load(weights_only=True)`` with the same allowlist as any other checkpoint; one refused item refuses the
folder, naming the global. Nothing private from torch is called: ``dcp.load`` with a ``DefaultLoadPlanner``
subclass over a template state dict built from the metadata.

Two passes, like the zip reader: opening loads the bytes items (and tiny tensors, for metrics) and stands
meta placeholders in for the other tensors; :meth:`DcpFolder.materialize` then loads only the tensors asked for.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta, TensorStorageMetadata

from ckptd.errors import CheckpointError
from ckptd.file_source import EAGER_BYTES, FileSource, HeldSources
from ckptd.formats import CheckpointFormat, detect_format
from ckptd.input_files import open_binary, open_input
from ckptd.restricted_pickle import DATA_ONLY_GLOBALS
from ckptd.safe_load import first_line, resolve_globals, unsafe_or_corrupt

_DCP_METADATA_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "BytesStorageMetadata", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """DCP writes ``.metadata`` with plain pickle and torch reads it with ``pickle.load``: we don't.

    Only DCP's own metadata dataclasses, ``torch.Size``, dtypes and paths may be constructed.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def read_dcp_metadata(source: FileSource) -> Any:
    """The folder's ``Metadata``, unpickled with the restricted unpickler."""
    try:
        return _DcpMetadataUnpickler(io.BytesIO(source.read(0, source.size, ".metadata"))).load()
    except pickle.UnpicklingError as exc:
        raise unsafe_or_corrupt(source.path, exc) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError) as exc:
        raise CheckpointError(source.path, f"is corrupt: {first_line(exc)}") from None


class DcpFolder(HeldSources):
    """One DCP folder, opened: ``obj`` is the nested object with bytes items loaded and tensors as placeholders
    (tiny ones real); :meth:`materialize` loads chosen tensors. Holds descriptors of its files to notice changes."""

    def __init__(self, path: str | Path, allow_objects: Sequence[Any] = ()) -> None:
        self.path = Path(path)
        if detect_format(self.path) is not CheckpointFormat.DCP:
            raise CheckpointError(self.path, "is not a torch.distributed.checkpoint folder")
        super().__init__()
        self._allow = [*DATA_ONLY_GLOBALS, *allow_objects]
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        for f in sorted(self.path.iterdir()):
            if f.is_file():
                self.sources.append(open_input(f))
        meta_source = next(s for s in self.sources if s.path.name == ".metadata")
        self.metadata = read_dcp_metadata(meta_source)
        entries = getattr(self.metadata, "state_dict_metadata", None)
        if not isinstance(entries, dict):
            raise CheckpointError(meta_source.path, "is corrupt: no state_dict_metadata")
        folder_bytes = sum(s.size for s in self.sources)
        flat: dict[str, Any] = {}
        first_pass: dict[str, Any] = {}
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for fqn, md in entries.items():
            if isinstance(md, BytesStorageMetadata):
                first_pass[fqn] = None
            elif isinstance(md, TensorStorageMetadata):
                size, dtype = tuple(int(s) for s in md.size), md.properties.dtype
                self._specs[fqn] = (size, dtype)
                nbytes = math.prod(size) * dtype.itemsize
                if any(n < 0 for n in size) or nbytes > folder_bytes + (1 << 20):
                    raise CheckpointError(meta_source.path, f"is corrupt: item {fqn!r} declares shape {list(size)}, "
                                          f"more than the folder's {folder_bytes} bytes hold")
                if nbytes <= EAGER_BYTES:
                    first_pass[fqn] = torch.empty(size, dtype=dtype)
                else:
                    flat[fqn] = torch.empty(size, dtype=dtype, device="meta")
            else:
                raise CheckpointError(meta_source.path, f"is corrupt: item {fqn!r} has unknown metadata")
        self._load(first_pass)
        flat = {fqn: first_pass[fqn] if fqn in first_pass else flat[fqn] for fqn in entries}
        self._fqn: dict[int, tuple[torch.Tensor, str]] = {
            id(v): (v, fqn) for fqn, v in flat.items() if isinstance(v, torch.Tensor)}
        mappings = getattr(self.metadata, "planner_data", None)
        self.obj = _unflatten(flat, mappings if isinstance(mappings, dict) else {}, meta_source.path)

    def materialize(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Real CPU tensors for ``tensors`` (placeholders from :attr:`obj`), loading only those items."""
        fqns: dict[str, str] = {}
        for name, t in tensors.items():
            entry = self._fqn.get(id(t))
            if entry is None or entry[0] is not t:
                raise ValueError(f"tensor {name!r} is not an item of {self.path}")
            fqns[name] = entry[1]
        template: dict[str, Any] = {}
        for fqn in set(fqns.values()):
            size, dtype = self._specs[fqn]
            try:
                template[fqn] = torch.empty(size, dtype=dtype)
            except (RuntimeError, MemoryError) as exc:
                raise CheckpointError(self.path, f"item {fqn!r} of shape {list(size)}: {first_line(exc)}") from None
        self._load(template)
        return {name: template[fqn] for name, fqn in fqns.items()}

    def read_flat(self, tensor: torch.Tensor, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of one placeholder, flattened (the item is loaded whole once, then kept
        until another is asked for: DCP reads items, not byte ranges)."""
        if self._last is None or self._last[0] is not tensor:
            self._last = (tensor, self.materialize({"": tensor})[""].reshape(-1))
        return self._last[1][start:stop].clone()

    def _load(self, template: dict[str, Any]) -> None:
        """``dcp.load`` into ``template`` (flat, by fqn) in this process; bytes items through the restricted
        loader. DCP wraps failures in its own BaseException: the first of ours is raised instead."""
        if not template:
            return
        planner = _RestrictedPlanner(self.path, self._allow)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(template, storage_reader=_Reader(self.path, self.metadata), planner=planner, no_dist=True)
        except (Exception, dcp.CheckpointException) as exc:  # noqa: BLE001 (any DCP failure becomes ours)
            self.verify_unchanged()
            if planner.error is not None:
                raise planner.error from None
            raise CheckpointError(self.path, "could not be loaded as a distributed checkpoint: "
                                  f"{_root_cause(exc)}") from None


def load_dcp_folder(path: str | Path, *, allow_globals: Sequence[str | Any] = ()) -> dict[str, Any]:
    """The whole folder as one nested dict with every tensor real (for callers that want everything)."""
    folder = DcpFolder(path, resolve_globals(allow_globals))
    try:
        real = folder.materialize({fqn: t for t, fqn in folder._fqn.values()})
        by_id = {id(t): real[fqn] for t, fqn in folder._fqn.values()}
        return _replace_tensors(folder.obj, by_id)
    finally:
        folder.close()


def _replace_tensors(obj: Any, by_id: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return by_id.get(id(obj), obj)
    if isinstance(obj, dict):
        return {k: _replace_tensors(v, by_id) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_tensors(v, by_id) for v in obj]
    return obj


def _root_cause(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            exc = inner[0]
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return first_line(exc)


def _unflatten(flat: Mapping[str, Any], mappings: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """DCP's flat ``fqn -> value`` back into nested dicts and lists, following ``planner_data`` paths."""
    root: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = mappings.get(fqn, (fqn,))
        if not isinstance(path, tuple) or not path or not all(isinstance(p, (str, int)) for p in path):
            raise CheckpointError(where, f"is corrupt: bad key path for item {fqn!r}")
        try:
            node: Any = root
            for key, nxt in itertools.pairwise(path):
                node = _child(node, key, [] if isinstance(nxt, int) else {})
            _put(node, path[-1], value)
        except (TypeError, IndexError) as exc:
            raise CheckpointError(where, f"is corrupt: item {fqn!r} does not fit its key path ({exc})") from None
    return root


def _child(node: Any, key: str | int, empty: Any) -> Any:
    if isinstance(node, list):
        _put(node, key, node[key] if isinstance(key, int) and key < len(node) and node[key] is not None else empty)
        return node[key]
    if not isinstance(node, dict) or not isinstance(key, str):
        raise TypeError(f"key {key!r} in a {type(node).__name__}")
    return node.setdefault(key, empty)


def _put(node: Any, key: str | int, value: Any) -> None:
    if isinstance(node, list) and isinstance(key, int) and 0 <= key < 1 << 20:
        node.extend([None] * (key + 1 - len(node)))
        node[key] = value
    elif isinstance(node, dict) and isinstance(key, str):
        node[key] = value
    else:
        raise TypeError(f"key {key!r} in a {type(node).__name__}")


class _InputFiles(FileSystem):
    """DCP's file access with reads through :func:`ckptd.input_files.open_binary` (an object-store watch's stub
    reads its object; a local file opens as before)."""

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if mode != "rb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with open_binary(path) as stream:
            yield stream


class _Reader(FileSystemReader):
    """FileSystemReader whose ``read_metadata`` returns the metadata we already unpickled safely."""

    def __init__(self, path: Path, metadata: Any) -> None:
        super().__init__(str(path))
        self.fs = _InputFiles()
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _RestrictedPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner over a flat template, partial loads allowed; bytes items go through
    ``torch.load(weights_only=True)`` with our allowlist instead of an unrestricted load."""

    def __init__(self, folder: Path, allow: Sequence[Any]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)
        self.folder, self.allow = folder, list(allow)
        self.error: CheckpointError | None = None

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            with torch.serialization.safe_globals(self.allow):
                self.state_dict[fqn] = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            self.error = self.error or unsafe_or_corrupt(self.folder, exc, detail=f"item {fqn!r}")
            raise self.error from None
        except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError, IndexError, TypeError,
                MemoryError) as exc:
            self.error = self.error or CheckpointError(self.folder, f"item {fqn!r} is corrupt: {first_line(exc)}")
            raise self.error from None
