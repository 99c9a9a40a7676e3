"""Checks before ckptd opens anything in a watched directory: is it a regular file (not a FIFO that blocks a
read forever, not ``/dev/zero`` that never ends), does it stay inside the watch root (a symlink to another team's
model must not be published as ours), and is a small JSON file (sidecar, ``trainer_state.json``) small?

Pure stat/realpath checks plus one bounded reader; used by discovery, the pipeline, ``--explain`` and the metric
sources, so every entry point refuses the same things with the same words.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ckptd.errors import CheckpointError
from ckptd.remote.mirror import lookup

JSON_LIMIT = 64 * 1024 * 1024  # trainer_state.json of a long run is a few MB; anything near this is not one


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def inside(path: str | Path, root: str | Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip("/") + "/")


def refusal(path: str | Path, root: str | Path, *, max_depth: int = 2) -> str:
    """Why ``path`` (a candidate file or checkpoint folder) must not be read, or ''. A folder is checked entry by
    entry (its weight files may be symlinks too), ``max_depth`` levels down."""
    p = Path(path)
    if not inside(p, root):
        return f"leads outside the watch root {root} (to {os.path.realpath(p)}); not read"
    try:
        st = os.stat(p)
    except OSError as exc:
        return f"cannot be examined: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        if max_depth <= 0:
            return ""
        try:
            entries = list(os.scandir(p))
        except OSError as exc:
            return f"cannot be listed: {exc.strerror or exc}"
        for entry in entries:
            reason = refusal(entry.path, root, max_depth=max_depth - 1)
            if reason:
                return f"holds {entry.name}, which {reason}"
        return ""
    if not stat.S_ISREG(st.st_mode):
        return f"is {_kind(st.st_mode)}; not read"
    return ""


def read_json(path: str | Path, limit: int = JSON_LIMIT) -> Any:
    """A small JSON file, read safely: regular files only (opened non-blocking, so a FIFO swapped in cannot hang
    the reader), at most ``limit`` bytes, nesting that cannot exhaust the stack. Raises OSError or ValueError
    with a reason."""
    # a mirror stub (a large object of an object-store watch) is read from the object
    raw = _read_object(path, limit) if lookup(path) is not None else _read_regular(path, limit)
    if len(raw) > limit:
        raise ValueError(f"grew past {limit} bytes while being read")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("is nested too deeply to be a JSON file ckptd reads") from None


def _read_object(path: str | Path, limit: int) -> bytes:
    from ckptd.input_files import open_binary

    if os.stat(path).st_size > limit:
        raise ValueError(f"is {os.stat(path).st_size} bytes, more than the {limit} a JSON file here may have")
    try:
        with open_binary(path) as fh:
            return fh.read(limit + 1)
    except CheckpointError as exc:  # the store failed or the object changed: a read error, like a local one
        raise OSError(exc.reason) from None


def _read_regular(path: str | Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"is {_kind(st.st_mode)}, not a JSON file")
        if st.st_size > limit:
            raise ValueError(f"is {st.st_size} bytes, more than the {limit} a JSON file here may have")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(limit + 1)
    finally:
        os.close(fd)
    return raw
