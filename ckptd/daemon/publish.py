"""One commit point per stream's outputs: a generation directory swapped in by a single rename.

``best.safetensors``, ``average.safetensors`` and ``manifest.json`` must change together: a reader must never see
a new best next to an old manifest, or a half-published update when the average fails after the best was
written. So every update builds a complete *generation* (``.generations/<n>/``: unchanged files are hard links
of the previous generation's, new ones are written there), and one ``rename`` of the ``current`` symlink makes
it visible. The published names are fixed symlinks into it::

    <output>/current -> .generations/0000000042        (swapped atomically: the commit)
    <output>/best.safetensors -> current/best.safetensors
    <output>/average.safetensors -> current/average.safetensors
    <output>/manifest.json -> current/manifest.json

A reader that wants a consistent set of several files resolves ``current`` once and reads inside it. The
previous generation is kept (a reader in the middle of it is not pulled away); older ones are removed.
A failure (disk full, a killed process) while a generation is built leaves only a temp directory that
:func:`cleanup_stale_generations` removes; what is published stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from pathlib import Path

from ckptd.atomic import TEMP_PREFIX, atomic_write_text, fsync_dir

CURRENT = "current"
GENERATIONS = ".generations"
MANIFEST = "manifest.json"
AVERAGE = "average.safetensors"
BEST = "best.safetensors"
BEST_PT = "best.pt"
PUBLISHED = (MANIFEST, BEST, BEST_PT, AVERAGE)
KEEP_GENERATIONS = 2

_building: set[Path] = set()  # generation dirs being built in this process (never cleaned as stale)
_building_lock = threading.Lock()


def current_dir(output: Path) -> Path | None:
    """The directory of the committed generation, or None if nothing was ever committed here."""
    link = output / CURRENT
    try:
        target = os.readlink(link)
    except OSError:
        return None
    path = (output / target) if not os.path.isabs(target) else Path(target)
    return path if path.is_dir() else None


class Generation:
    """A generation being built. Use :meth:`carry`/:meth:`link`/:meth:`path` to fill it, then :meth:`commit`
    (or :meth:`abort`; a context manager aborts on error)."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.root = output / GENERATIONS
        self.root.mkdir(parents=True, exist_ok=True)
        self.dir = self.root / f"{TEMP_PREFIX}gen-{os.getpid()}-{secrets.token_hex(4)}"
        self.dir.mkdir()
        with _building_lock:
            _building.add(self.dir)
        self.previous = current_dir(output)
        self.committed: Path | None = None

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.committed is None:
            self.abort()

    def path(self, name: str) -> Path:
        return self.dir / name

    def link(self, name: str, source: Path) -> None:
        """Publish ``source`` (an immutable file ckptd wrote, e.g. a member copy) under ``name`` without copying."""
        target = self.dir / name
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)  # filesystems without hard links: a copy is still correct

    def carry(self, name: str) -> bool:
        """Keep the previous generation's ``name`` unchanged in this one; False if it had none."""
        if self.previous is None or not (self.previous / name).is_file():
            return False
        self.link(name, self.previous / name)
        return True

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.dir / name, text)

    def commit(self) -> Path:
        """Make this generation the published one (one rename); returns its directory."""
        for entry in self.dir.iterdir():
            with open(entry, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(self.dir)
        final = self.root / f"{_next_number(self.root):010d}"
        os.rename(self.dir, final)
        fsync_dir(self.root)
        # the fixed names first: one that is new dangles into the old generation (reads as absent, as the old
        # manifest says) until the swap, so a reader never finds the new manifest naming a file not there yet
        _link_names(self.output, final)
        link_tmp = self.output / f"{TEMP_PREFIX}{CURRENT}.{secrets.token_hex(4)}"
        os.symlink(os.path.join(GENERATIONS, final.name), link_tmp)
        os.replace(link_tmp, self.output / CURRENT)
        self.committed = final
        with _building_lock:
            _building.discard(self.dir)
        _unlink_absent(self.output, final)
        fsync_dir(self.output)
        _remove_old(self.root, keep={final.name} | ({self.previous.name} if self.previous else set()))
        return final

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with _building_lock:
            _building.discard(self.dir)


def _next_number(root: Path) -> int:
    numbers = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    return max(numbers, default=0) + 1


def _link_names(output: Path, generation: Path) -> None:
    """Each published name is a fixed symlink into ``current``, created before the swap for every name the new
    generation has; a regular file from an older ckptd is replaced by its link atomically."""
    for name in PUBLISHED:
        fixed = output / name
        want = os.path.join(CURRENT, name)
        if not (generation / name).is_file() or (os.path.islink(fixed) and os.readlink(fixed) == want):
            continue
        tmp = output / f"{TEMP_PREFIX}{name}.link.{secrets.token_hex(4)}"
        os.symlink(want, tmp)
        os.replace(tmp, fixed)


def _unlink_absent(output: Path, generation: Path) -> None:
    """After the swap: a name the published generation lacks is removed (it reads as absent either way)."""
    for name in PUBLISHED:
        fixed = output / name
        if not (generation / name).is_file() and os.path.islink(fixed):
            with contextlib.suppress(FileNotFoundError):
                fixed.unlink()


def kept_generations(output: Path) -> list[Path]:
    """The committed generations still on disk (the published one and the one before it)."""
    root = output / GENERATIONS
    try:
        return sorted(p for p in root.iterdir() if p.name.isdigit())
    except OSError:
        return []


def _remove_old(root: Path, keep: set[str]) -> None:
    for entry in root.iterdir():
        if entry.name.isdigit() and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


def cleanup_stale_generations(output: Path) -> list[Path]:
    """Generation dirs a killed or failed build left behind (never one this process is still building)."""
    root = output / GENERATIONS
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    with _building_lock:
        building = set(_building)
    for entry in root.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry not in building:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    for entry in output.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry.is_symlink():  # a link swap interrupted before its rename
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed
