"""Load checkpoints without running pickle code.

Every torch file is loaded with ``weights_only=True``; zip files with ``mmap=True`` so that tensors are mapped,
not read: touching only the model's tensors of a training checkpoint reads only the model's bytes. Extra types
are allowed only through an explicit allowlist. There is no unsafe fallback.

All failures (truncated, corrupt, foreign, unsafe) surface as :class:`~ckptd.errors.CheckpointError` naming
the file and the reason; raw zipfile/pickle tracebacks never reach the user.
"""

from __future__ import annotations

import importlib
import io
import pickle
import re
import struct
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptd.errors import CheckpointError, UnsafeCheckpointError
from ckptd.formats import CheckpointFormat, check_complete, detect_format

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_GLOBAL_ANY = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def resolve_globals(names: Iterable[str | Any]) -> list[Any]:
    """Turn ``"pkg.mod.Name"`` strings (or objects) into objects for ``torch.serialization.safe_globals``."""
    out: list[Any] = []
    for item in names:
        if not isinstance(item, str):
            out.append(item)
            continue
        module, _, attr = item.rpartition(".")
        if not module:
            raise CheckpointError(item, "allow_globals entries must be dotted names like 'pkg.module.Class'")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError) as exc:
            raise CheckpointError(item, f"cannot allowlist {item!r}: {exc}") from exc
    return out


def load_torch(
    path: str | Path,
    *,
    allow_globals: Sequence[str | Any] = (),
    map_location: Any = "cpu",
    mmap: bool = True,
) -> Any:
    """``torch.load(weights_only=True)`` with clear errors; ``mmap`` applies to zip-format files."""
    p = Path(path)
    fmt = check_complete(p)
    if fmt not in (CheckpointFormat.TORCH_ZIP, CheckpointFormat.TORCH_LEGACY):
        raise CheckpointError(p, f"is {fmt}, not a torch.save file")
    use_mmap = mmap and fmt is CheckpointFormat.TORCH_ZIP
    try:
        with torch.serialization.safe_globals(resolve_globals(allow_globals)):
            try:
                return torch.load(p, map_location=map_location, weights_only=True, mmap=use_mmap)
            except RuntimeError as exc:
                if not use_mmap or "mmap" not in str(exc).lower():
                    raise
                # some FUSE/network filesystems cannot map files: read it instead (same safety)
                return torch.load(p, map_location=map_location, weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise _unsafe_or_corrupt(p, exc) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError, IndexError,
            TypeError, MemoryError, UnicodeDecodeError, struct.error) as exc:
        raise CheckpointError(p, f"could not be loaded: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _unsafe_or_corrupt(p: Path, exc: BaseException) -> CheckpointError:
    text = str(exc)
    names = sorted(set(_UNSUPPORTED_GLOBAL.findall(text)) | set(_GLOBAL_ANY.findall(text)))
    if names or "Weights only load failed" in text:
        return UnsafeCheckpointError(p, names, "" if names else _summarise_weights_only(text))
    return CheckpointError(p, f"is corrupt: {_first_line(exc)}")


def _summarise_weights_only(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Weights only load failed", "(1)", "(2)", "Please", "WeightsUnpickler")):
            return line[:200]
    return "the weights-only unpickler rejected it"


# --- torch.distributed.checkpoint ------------------------------------------------------------------------

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


def load_dcp(path: str | Path) -> dict[str, Any]:
    """Load a whole ``torch.distributed.checkpoint`` folder into one nested dict, in this process, safely."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    p = Path(path)
    if detect_format(p) is not CheckpointFormat.DCP:
        raise CheckpointError(p, "is not a torch.distributed.checkpoint folder")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            meta_path = p / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                metadata = _DcpMetadataUnpickler(io.BytesIO(meta_path.read_bytes())).load()
            except pickle.UnpicklingError as exc:
                raise _unsafe_or_corrupt(meta_path, exc) from None
            except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
                raise CheckpointError(meta_path, f"is corrupt: {_first_line(exc)}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            return _load_state_dict_from_keys(storage_reader=SafeReader(str(p)))
    except CheckpointError:
        raise
    except Exception as exc:  # DCP wraps reader failures in its own CheckpointException type  # noqa: BLE001
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, CheckpointError):
            raise cause from None
        raise CheckpointError(p, f"could not be loaded as a distributed checkpoint: {_first_line(exc)}") from None
