"""Atomic publication of files: temp name in the same directory, fsync, rename, fsync the directory.

A reader either sees the previous file or the complete new one under the final name, never a partial one,
even if the writer is killed at any instant (the temp file is left behind under a dotted temp name that every
ckptd scanner ignores, and :func:`cleanup_stale_temps` removes it later).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TEMP_PREFIX = ".ckptd-tmp-"

# Temp files this process is writing right now: cleanup never removes them (a processor re-created after a reload
# reconciles while the old one may still be writing).
_in_flight: set[Path] = set()
_in_flight_lock = threading.Lock()


def fsync_dir(directory: str | Path) -> None:
    """Make a rename/creation in ``directory`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(final: str | Path) -> Path:
    """A unique temp name next to ``final`` (same directory, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{os.getpid()}.{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path; on clean exit fsync it, rename it onto ``final`` and fsync the directory.

    On any exception the temp file is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    with _in_flight_lock:
        _in_flight.add(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_open(final: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file for writing; it becomes ``final`` atomically when the block exits cleanly."""
    if "w" not in mode:
        raise ValueError("atomic_open is for writing")
    with atomic_path(final) as tmp, open(tmp, mode) as fh:
        yield fh
        fh.flush()


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_open(final, "wb") as fh:
        fh.write(data)


def atomic_write_text(final: str | Path, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_torch_save(obj: Any, final: str | Path, save: Callable[[Any, Any], None] | None = None) -> None:
    """``torch.save`` that publishes atomically."""
    if save is None:
        import torch

        save = torch.save
    with atomic_open(final, "wb") as fh:
        save(obj, fh)


def cleanup_stale_temps(directory: str | Path, older_than_s: float = 0.0) -> list[Path]:
    """Remove temp files a killed writer left in ``directory`` (only ckptd's own temp names, never one this
    process is still writing)."""
    import time

    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    now = time.time()
    with _in_flight_lock:
        busy = set(_in_flight)
    for entry in directory.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file() and entry not in busy:
            try:
                if now - entry.stat().st_mtime >= older_than_s:
                    entry.unlink()
                    removed.append(entry)
            except OSError:
                continue
    return removed
