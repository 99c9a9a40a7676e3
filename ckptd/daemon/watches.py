"""The daemon's view of its watches: which use inotify events and which poll, roots that cannot be listed right
now, and inotify overflows waiting to be reported.

Kept apart from the loop (``service.py``) so the loop reads as a schedule, and from ``watcher.py`` (the watchdog
adapter) so that adapter stays about watchdog alone.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from ckptd.daemon.config import Watch
from ckptd.daemon.logs import get_logger
from ckptd.daemon.watcher import EventWatcher, filesystem_type, is_network_fs


class WatchSet:
    """Set up per config (and again on reload); ``on_path`` and ``wake`` are called from watchdog's threads."""

    def __init__(self, on_path: Callable[[Path, bool], None], wake: Callable[[], None]) -> None:
        self._on_path = on_path
        self._wake = wake
        self._watcher: EventWatcher | None = None
        self.polled: set[str] = set()  # watch names scanned every poll_interval
        self.unavailable: set[str] = set()  # watch names whose root cannot be listed right now
        self._overflows = 0  # incremented on the inotify thread only
        self._overflows_seen = 0
        self._key: tuple[tuple[str, str, str], ...] | None = None  # what the current observer was set up for

    def setup(self, watches: Iterable[Watch], *, events: bool = True) -> None:
        """Events for local roots, polling for network filesystems (and wherever inotify refuses).

        A reload that leaves the watches' roots and modes as they were keeps the running observer: no churn of
        inotify instances and threads, however many SIGHUPs arrive.
        """
        watches = list(watches)
        key = tuple((w.name, str(w.root), w.mode) for w in watches) if events else None
        if key is not None and key == self._key:
            return
        log = get_logger()
        self.stop()
        self.polled = set()
        self._key = key
        if not events:
            return
        for watch in watches:
            fstype = filesystem_type(watch.root)
            mode = watch.mode
            if mode == "auto":
                mode = "poll" if is_network_fs(fstype) else "events"
                if mode == "poll":
                    log.info("watch.polling", watch=watch.name, root=str(watch.root), fstype=fstype,
                             reason="network filesystem: inotify cannot see writes from other hosts")
            if mode == "events":
                try:
                    if self._watcher is None:
                        self._watcher = EventWatcher(self._on_path, self._on_overflow)
                    self._watcher.add(watch.root)
                    log.info("watch.events", watch=watch.name, root=str(watch.root), fstype=fstype)
                except OSError as exc:
                    mode = "poll"
                    log.warning("watch.events_unavailable", watch=watch.name, root=str(watch.root),
                                reason=f"{exc}; falling back to polling every {watch.poll_interval:g}s "
                                       "(raise fs.inotify.max_user_watches to use events)")
            if mode == "poll":
                self.polled.add(watch.name)

    def _on_overflow(self) -> None:
        self._overflows += 1
        self._wake()

    def take_overflows(self) -> int:
        """Overflows since the last call (the loop logs them as one line and rescans everything)."""
        lost = self._overflows - self._overflows_seen
        self._overflows_seen += lost
        return lost

    def root_available(self, watch: Watch) -> bool:
        """Can the root be listed? A root that cannot (unmounted, NFS down) must keep its runs, since an empty
        listing would drop them. The transition is logged once each way."""
        try:
            ok, reason = stat.S_ISDIR(os.stat(watch.root).st_mode), "not a directory"
        except OSError as exc:
            ok, reason = False, exc.strerror or str(exc)
        log = get_logger()
        if not ok and watch.name not in self.unavailable:
            self.unavailable.add(watch.name)
            log.warning("watch.unavailable", watch=watch.name, root=str(watch.root), reason=reason,
                        action="keeping its runs; retrying at each discovery")
        elif ok and watch.name in self.unavailable:
            self.unavailable.discard(watch.name)
            log.info("watch.available", watch=watch.name, root=str(watch.root))
        return ok

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._watcher = None
        self._key = None
