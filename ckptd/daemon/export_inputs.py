"""Immutable inputs owned by export jobs: a hard link in ``<output>/.exports/inputs/`` taken at request time.

Why: an export may wait (another export of the run is running, or a retry backs off) while the pipeline keeps
evicting members and replacing ``average.safetensors``. ckptd only ever replaces its outputs by rename and
deletes them by unlink, so a hard link taken when the export is requested keeps exactly the bytes the request
describes, for as long as the job holds it, at no copy cost. Where the filesystem has no hard links, a copy
(atomic, same folder) does the same job.

The folder lives in the run's output directory (same filesystem, so links work; a dot-folder, so no scanner
and no reader of the outputs ever treats it as a product).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
from pathlib import Path

from ckptd.atomic import atomic_path

INPUTS_DIR = Path(".exports") / "inputs"
_counter = itertools.count(1)
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class InputUnavailableError(OSError):
    """The file to export is not there when the export is requested (a ckptd bug or outside interference)."""


def inputs_dir(output: Path) -> Path:
    return output / INPUTS_DIR


def take_input(output: Path, file: Path, sha256: str) -> Path:
    """Hard-link ``file`` (one of ckptd's own outputs) into the run's export inputs; returns the link.

    Called in the run's worker thread, where nothing can evict ``file`` concurrently."""
    folder = inputs_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{sha256[:16]}-{os.getpid()}-{next(_counter)}{file.suffix}"
    try:
        # published names may be links into a generation: link the real file (CPython's os.link on Linux
        # ignores follow_symlinks=True and links the symlink itself, whose relative target then dangles)
        os.link(os.path.realpath(file), dest)
    except FileNotFoundError:
        raise InputUnavailableError(errno.ENOENT, "ckptd's own output to export is missing", str(file)) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        with atomic_path(dest) as tmp:  # no hard links here: an atomic copy is the owned input instead
            shutil.copyfile(file, tmp)
    return dest


def release_input(path: Path) -> None:
    """Drop a job's input (the job ended or was superseded). Missing is fine: reconcile may have run."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def leftover_inputs(output: Path, live: set[Path]) -> list[Path]:
    """Inputs in ``output`` that no live job holds (left by a crash): for reconcile to remove."""
    folder = inputs_dir(output)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p not in live)
