"""Filesystem events (watchdog/inotify) that make the next scan of a run come sooner.

Events are hints, never the source of truth: the scan decides. Watches on network filesystems (inotify does
not see writes from other hosts) run in polling mode; an inotify limit or error falls back to polling too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "9p", "afs",
              "beegfs", "panfs", "wekafs", "virtiofs", "davfs", "sshfs", "s3fs", "cvmfs"}


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def filesystem_type(path: Path, mounts_file: str = "/proc/mounts") -> str:
    """The fstype of the mount holding ``path`` (longest matching mount point); '' if unknown."""
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return ""
    real = os.path.realpath(path)
    best, best_len = "", -1
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = _unescape(parts[1])
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > best_len:
            best, best_len = parts[2], len(mount)
    return best


def is_network_fs(fstype: str) -> bool:
    return fstype in NETWORK_FS or fstype.startswith("fuse") or fstype.startswith("nfs")


class _Handler(FileSystemEventHandler):
    def __init__(self, notify: Callable[[Path, bool], None]) -> None:
        self._notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        src = os.fsdecode(event.src_path)
        self._notify(Path(src), False)
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        if dest:
            self._notify(Path(dest), True)  # a rename into place: the writer's commit signal


class _OverflowDetector(logging.Handler):
    """watchdog reports an inotify queue overflow only as a log record: turn it into a callback."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()


class EventWatcher:
    """One watchdog observer for all event-mode watch roots."""

    def __init__(self, notify: Callable[[Path, bool], None], on_overflow: Callable[[], None] | None = None) -> None:
        self._observer: Any = Observer()
        self._handler = _Handler(notify)
        self._started = False
        self._detector: _OverflowDetector | None = None
        if on_overflow is not None:
            self._detector = _OverflowDetector(on_overflow)
            for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
                logging.getLogger(name).addHandler(self._detector)

    def add(self, root: Path) -> None:
        """Watch ``root`` recursively; raises OSError when the kernel refuses (inotify limits)."""
        if not self._started:
            self._observer.start()
            self._started = True
        self._observer.schedule(self._handler, str(root), recursive=True)

    def stop(self) -> None:
        if self._detector is not None:
            for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
                logging.getLogger(name).removeHandler(self._detector)
        if self._started:
            self._observer.stop()
            self._observer.join(timeout=5)
