"""Filesystem events (watchdog/inotify) that make the next scan of a run come sooner.

Events are hints, never the source of truth: the scan decides. Watches on network filesystems (inotify does
not see writes from other hosts) run in polling mode; an inotify limit or error falls back to polling too.
"""

from __future__ import annotations

import inspect
import os
import sys
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


class _OverflowCallback:
    """A ``watchdog.observers.inotify_c.WatchCallback`` registered on the observer's own inotify instance.

    watchdog reads the kernel's ``IN_Q_OVERFLOW`` (wd -1) in ``InotifyFD.handle_event`` and calls
    ``on_queue_overflow()`` on every callback registered on that instance; it emits no event to handlers. So we
    register this callback next to the emitters' (on each watched root) instead of matching its log text, which a
    log level (``log.level: error``, or a quieted ``watchdog`` logger) silently disabled.
    """

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        self._on_overflow = on_overflow

    def on_event(self, event: Any) -> None:
        """Events on the root are the emitter's business."""

    def on_watch_deleted(self, wd: Any) -> None:
        """The emitter stops on its own when its root goes away."""

    def on_queue_overflow(self) -> None:
        self._on_overflow()


def _inotify_observer(on_overflow: Callable[[], None] | None) -> tuple[Any, Any]:
    """(observer, inotify instance); the instance is None where overflows cannot be observed (other platforms,
    watchdog < 7.1): there the slow safety re-scan is what recovers lost events."""
    if on_overflow is None or not sys.platform.startswith("linux"):
        return Observer(), None
    try:
        from watchdog.observers.api import BaseObserver
        from watchdog.observers.inotify import InotifyEmitter
        from watchdog.observers.inotify_c import InotifyFD
    except ImportError:
        return Observer(), None
    if not hasattr(InotifyFD, "add_callback") or "inotify_fd" not in inspect.signature(InotifyEmitter).parameters:
        return Observer(), None  # watchdog < 7.1 does not report overflows at all: the safety rescan covers them

    inotify = InotifyFD()  # an instance of our own (what InotifyObserver does), so we can add our callback to it

    class _Observer(BaseObserver):
        """``InotifyObserver`` with its inotify instance in our hands (public: ``inotify_fd`` emitter kwarg)."""

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            inotify.stop()
            inotify.join()

    inotify.start()
    return _Observer(InotifyEmitter, inotify_fd=inotify), inotify


class EventWatcher:
    """One watchdog observer for all event-mode watch roots; ``on_overflow`` runs on watchdog's inotify thread."""

    def __init__(self, notify: Callable[[Path, bool], None], on_overflow: Callable[[], None] | None = None) -> None:
        self._handler = _Handler(notify)
        self._started = False
        self._observer, self._inotify = _inotify_observer(on_overflow)
        self._overflow = _OverflowCallback(on_overflow) if on_overflow is not None else None

    def add(self, root: Path) -> None:
        """Watch ``root`` recursively; raises OSError when the kernel refuses (inotify limits)."""
        if not self._started:
            self._observer.start()
            self._started = True
        self._observer.schedule(self._handler, str(root), recursive=True)
        if self._inotify is not None and self._overflow is not None:
            from watchdog.observers.inotify_c import CallbackId, InotifyConstants, Mask

            # IN_MASK_ADD: never narrow the emitter's mask on the shared watch (the kernel wants one event bit)
            c = InotifyConstants
            mask = Mask(c.IN_MASK_ADD | c.IN_DELETE_SELF | c.IN_DONT_FOLLOW)
            self._inotify.add_callback(os.fsencode(root), mask, self._overflow, CallbackId(id(self._overflow)))

    def stop(self) -> None:
        if self._started:
            self._observer.stop()
            self._observer.join(timeout=5)
        elif self._inotify is not None:
            self._inotify.stop()
            self._inotify.join(timeout=5)


def watch_summary(watch: Any) -> dict[str, Any]:
    """What ``ckptd check`` prints about a watch: its filesystem and the mode ``auto`` resolves to. An
    object-store watch shows its URL (without credentials) and scheme, not this host's mirror; a remote output
    its URL, not the staging folder."""
    from ckptd.remote.display import shown_output_template, shown_root
    from ckptd.remote.urls import scheme

    remote = getattr(watch, "remote", "")
    fstype = (scheme(remote) or "") if remote else filesystem_type(watch.root)
    mode = watch.mode if watch.mode != "auto" else ("poll" if is_network_fs(fstype) else "events")
    return {"name": watch.name, "root": shown_root(watch), "fstype": fstype, "mode": mode, "policy": watch.policy,
            "output": shown_output_template(watch)}
