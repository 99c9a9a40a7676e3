"""The one way ckptd opens a trainer's file for reading: a local file as it always was, or, for a stub in an
object-store watch's mirror (:mod:`ckptd.remote.mirror`), the object itself through ranged GETs.

Every reader of input bytes (the checkpoint readers' sources, the format and completeness checks, the JSON
reader) goes through here, so discovery and the pipeline can keep working on paths. Importing this module
loads neither torch nor fsspec.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING

from ckptd.remote import mirror

if TYPE_CHECKING:
    from ckptd.file_source import FileSource


def open_input(path: str | Path) -> FileSource:
    """A source for ``path``: :class:`FileSource` (ordinary reads on a held descriptor) or, for a registered
    mirror stub, an :class:`~ckptd.remote.object_source.ObjectSource` with the same interface."""
    ref = mirror.lookup(path)
    if ref is None:
        from ckptd.file_source import FileSource  # here: this module stays importable without torch

        return FileSource(path)
    from ckptd.remote.object_source import ObjectSource

    return ObjectSource(path, ref)


def open_binary(path: str | Path) -> IO[bytes]:
    """A readable, seekable binary file object for ``path`` (``open(path, "rb")`` for a local file)."""
    ref = mirror.lookup(path)
    if ref is None:
        return open(path, "rb")
    from ckptd.remote.object_source import ObjectSource

    return ObjectSource(path, ref).fh  # type: ignore[return-value]


def is_remote_input(path: str | Path) -> bool:
    """Is ``path`` a stub whose bytes live in an object store (not on this disk)?"""
    return mirror.lookup(path) is not None
