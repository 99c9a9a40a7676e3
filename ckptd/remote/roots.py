"""The daemon's object-store watches: one mirror per watch, refreshed by a listing thread of its own, and one SQS
listener per queue whose hints make that thread list at once.

Why a thread per watch: one listing of a large prefix takes seconds (10,000 objects: 3-6 s) and the loop thread
never waits on I/O (see ``ckptd.daemon.service``). Each :class:`WatchLister` lists every ``poll_interval`` (at
once at startup and when a hint arrives), keeps the mirror's stub writes to itself, and hands each completed
:class:`MirrorChange` to the loop (merged while the loop has not taken it) and wakes it; discovery then only
takes what is pending (:meth:`RemoteRoots.take`: cheap). ``ckptd once`` has no threads: there ``take`` lists on
the calling thread, as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ckptd.remote.mirror import MirrorChange, ObjectMirror
from ckptd.remote.urls import redact, scrub

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar", ".pkl", ".safetensors")  # formats.TORCH_SUFFIXES + st
CLOSE_WAIT = 0.2  # seconds close() waits for a listing in flight (it finishes on its own and hands over nothing)


def merge(old: MirrorChange | None, new: MirrorChange) -> MirrorChange:
    """Two refreshes the loop has not taken yet as one: a stub changed then removed is removed, removed then
    recreated is changed; the counts are the newer listing's."""
    if old is None:
        return new
    gone, made = set(new.removed), set(new.changed)
    changed = dict.fromkeys([p for p in old.changed if p not in gone] + list(new.changed))
    removed = dict.fromkeys([p for p in old.removed if p not in made] + list(new.removed))
    return MirrorChange(tuple(changed), tuple(removed), new.objects, new.seconds, new.skipped, new.ignored)


class WatchLister:
    """One remote watch's mirror and its listings: on a thread of its own (:meth:`start`) or, without one, on the
    caller's (:meth:`refresh`). ``on_done(lister, change_or_None, news)`` runs after each listing."""

    def __init__(self, watch: Any, log: Any, on_done: Callable[[WatchLister, MirrorChange | None, bool], None]) -> None:
        self.watch, self.log = watch, log
        self.signature = signature(watch)
        self._on_done = on_done
        self._mirror: ObjectMirror | None = None
        self._lock = threading.Lock()
        self._pending: MirrorChange | None = None
        self.listed = False  # a listing worked once
        self.failing = ""  # why the last listing failed ('' when it worked)
        self._stop = threading.Event()
        self._trigger = threading.Event()
        self._forget = False  # closed for good (not a shutdown): the mirror's stubs are forgotten
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        """A listing worked and the last one did not fail."""
        return self.listed and not self.failing

    @property
    def background(self) -> bool:
        return self._thread is not None

    def start(self, after: WatchLister | None = None) -> None:
        """List on a thread of its own; ``after``: a closed lister of the same mirror whose listing in flight must
        end first (two refreshes never write one mirror together)."""
        self._thread = threading.Thread(target=self._run, args=(after,), name=f"ckptd-list-{self.watch.name}",
                                        daemon=True)
        self._thread.start()

    def trigger(self) -> None:
        """List now (a hint): a listing in flight is followed by another, any number of hints by one."""
        self._trigger.set()

    def _run(self, after: WatchLister | None) -> None:
        if after is not None and after._thread is not None:
            while after._thread.is_alive() and not self._stop.is_set():
                after._thread.join(0.1)
        while not self._stop.is_set():
            self._trigger.clear()
            self.refresh()
            self._trigger.wait(self.watch.poll_interval)
        self._forget_if_closed()

    def refresh(self) -> MirrorChange | None:
        """List once and update the mirror; the change is added to what is pending. None (and one log line
        naming the watch and the reason, once until it recovers) when the listing failed: the stubs stay."""
        watch, log = self.watch, self.log
        try:
            if self._mirror is None:
                self._mirror = ObjectMirror(watch, log)
            self._mirror.watch, self._mirror.log = watch, log  # a reload's runs/exclude/max_depth: what is mirrored
            change = self._mirror.refresh()
        except Exception as exc:  # noqa: BLE001 (any store failure: keep what we have, retry next poll_interval)
            reason = scrub(f"{type(exc).__name__}: {exc}")
            if self._stop.is_set():
                return None
            if self.failing != reason:
                log.warning("watch.listing_failed", watch=watch.name, root=redact(watch.remote), reason=reason,
                            action=f"keeping its runs and mirror; listing again every {watch.poll_interval:g}s")
            with self._lock:
                self.failing = reason
            self._on_done(self, None, False)
            return None
        if self._stop.is_set():
            return None  # closed meanwhile: nobody takes it (the next lister's first listing sees it all again)
        if self.failing:
            log.info("watch.listing_recovered", watch=watch.name, root=redact(watch.remote))
        with self._lock:
            news = bool(change) or not self.available  # the first listing, or a recovery: discovery runs
            self._pending = merge(self._pending, change)
            self.listed, self.failing = True, ""
        log.debug("watch.listed", watch=watch.name, objects=change.objects, seconds=round(change.seconds, 3),
                  changed=len(change.changed), removed=len(change.removed), skipped=change.skipped,
                  ignored=change.ignored)
        self._on_done(self, change, news)
        return change

    def take(self) -> MirrorChange | None:
        """What the listings since the last call changed (an empty change when nothing did); None while the watch
        is not available (what is pending stays pending)."""
        with self._lock:
            if not self.available:
                return None
            change, self._pending = self._pending or MirrorChange(), None
        return change

    def close(self, *, forget: bool = True, timeout: float = CLOSE_WAIT) -> None:
        """Stop listing, within ``timeout``: a listing in flight ends on its own and hands over nothing.
        ``forget``: the mirror's stubs are forgotten (a watch gone); at shutdown they stay, for jobs finishing."""
        self._forget = forget
        self._stop.set()
        self._trigger.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # the thread forgets the stubs itself when its listing ends
        self._forget_if_closed()

    def _forget_if_closed(self) -> None:
        if self._stop.is_set() and self._forget and self._mirror is not None:
            self._mirror.close()


def signature(watch: Any) -> tuple[Any, ...]:
    """What the mirror depends on: another URL, mirror root or store options is another mirror."""
    return watch.remote, str(watch.root), repr(sorted(dict(watch.storage_options).items()))


class RemoteRoots:
    """The listers of the remote watches and the SQS listeners. ``wake(url)`` is called from a lister's thread
    when a listing brought news (the loop discovers at once); ``on_listed(watch_name, change)`` after each
    completed listing (metrics)."""

    def __init__(self, wake: Callable[[str], None],
                 on_listed: Callable[[str, MirrorChange], None] | None = None) -> None:
        self._wake = wake
        self._on_listed = on_listed
        self._listers: dict[str, WatchLister] = {}
        self._hints: dict[tuple[str, str], Any] = {}
        self._groups: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}  # queue -> (watch name, prefix)
        self._lock = threading.Lock()  # the listers dict: the loop replaces it, SQS threads read it

    def setup(self, watches: Iterable[Any], log: Any, *, hints: bool = True) -> None:
        """Start a listing thread per remote watch (its first listing at once) and the SQS listeners the config
        asks for; stop those no longer wanted. A watch whose mirror is unchanged keeps its thread and mirror."""
        watches = [w for w in watches if getattr(w, "remote", "")]
        names = {w.name for w in watches}
        with self._lock:
            for name in [n for n in self._listers if n not in names]:
                self._listers.pop(name).close()
            for watch in watches:
                old = self._listers.get(watch.name)
                if old is not None and old.background and old.signature == signature(watch):
                    old.watch, old.log = watch, log  # poll_interval, settle …: read at the next wait
                    continue
                if old is not None:
                    old.close()
                lister = self._listers[watch.name] = WatchLister(watch, log, self._done)
                lister.start(after=old)
        from ckptd.remote.sqs_hints import hints_by_queue

        groups = hints_by_queue(watches) if hints else {}
        for key in [k for k in self._hints if k not in groups]:
            self._hints.pop(key).close()
            self._groups.pop(key, None)
        for key, group in groups.items():
            self._groups[key] = tuple((w.name, redact(w.remote).rstrip("/") + "/") for w in group)
            if key not in self._hints:
                from ckptd.remote.sqs_hints import SqsHints

                self._hints[key] = SqsHints(key[0], group[0].storage_options,
                                            lambda url, key=key: self._hint(key, url), log)
                log.info("watch.sqs_hints", watches=[w.name for w in group], queue=redact(key[0]))

    def _hint(self, key: tuple[str, str], url: str) -> None:
        """An SQS thread: list the watches whose prefix holds ``url`` now (a hint about another prefix, such as
        our outputs, is no hint)."""
        for name, prefix in self._groups.get(key, ()):
            if url.startswith(prefix):
                lister = self._listers.get(name)
                if lister is not None:
                    lister.trigger()

    def _done(self, lister: WatchLister, change: MirrorChange | None, news: bool) -> None:
        if change is not None and self._on_listed is not None:
            self._on_listed(lister.watch.name, change)
        if news and lister.background:
            self._wake(redact(lister.watch.remote))

    def take(self, watch: Any, log: Any) -> MirrorChange | None:
        """What ``watch``'s listings changed since the last call (the loop: cheap, the listing thread did the
        work); without a listing thread (``ckptd once``), one listing now. None when the watch is not available
        (no listing worked yet, or the last failed): its runs stay as they were."""
        with self._lock:
            lister = self._listers.get(watch.name)
            if lister is None or (not lister.background and lister.signature != signature(watch)):
                if lister is not None:
                    lister.close()
                lister = self._listers[watch.name] = WatchLister(watch, log, self._done)
        if not lister.background:
            lister.watch, lister.log = watch, log
            lister.refresh()
        return lister.take()

    def refresh(self, watch: Any, log: Any) -> MirrorChange | None:
        """One listing now, on the calling thread (``ckptd once``; tests). Same answer as :meth:`take`."""
        return self.take(watch, log)

    def available(self, watch: Any) -> bool:
        """Did a listing of the watch work, and did the last one not fail?"""
        lister = self._listers.get(watch.name)
        return lister is not None and lister.available

    def failing(self) -> dict[str, str]:
        """Watch name -> why its last listing failed, for each watch whose last listing failed (``ckptd once``
        exits 1 then: its runs were not looked at, which is not "nothing to do")."""
        with self._lock:
            listers = list(self._listers.values())
        return {lister.watch.name: lister.failing for lister in listers if lister.failing}

    def stop(self) -> None:
        """Shutdown: the listing and SQS threads stop (promptly: a call in flight ends on its own). The stubs stay
        registered: a job still finishing reads through them."""
        for hint in self._hints.values():
            hint.close()
        self._hints.clear()
        self._groups.clear()
        with self._lock:
            listers = list(self._listers.values())
            self._listers.clear()
        for lister in listers:  # all asked first: the waits overlap, however many watches
            lister.close(forget=False, timeout=0)
        deadline = time.monotonic() + CLOSE_WAIT
        for lister in listers:
            lister.close(forget=False, timeout=max(0.0, deadline - time.monotonic()))


def committed_objects(change: MirrorChange, paths: Iterable[Path],
                      folder_kind: Callable[[Path], str | None]) -> list[Path]:
    """The changed stubs among ``paths`` that are whole checkpoints on their own (a weights file not inside a
    checkpoint folder): complete once listed. Folder files wait for their folder's commit signal."""
    changed = set(change.changed)
    kinds: dict[Path, str | None] = {}
    out = []
    for path in paths:
        if path not in changed or path.suffix not in CHECKPOINT_SUFFIXES:
            continue
        if path.parent not in kinds:
            kinds[path.parent] = folder_kind(path.parent)
        if kinds[path.parent] is None:
            out.append(path)
    return out


def affected_runs(change: MirrorChange, run_dirs: Iterable[Path]) -> dict[Path, list[Path]]:
    """Which of ``run_dirs`` hold a changed or removed stub, with those stubs."""
    dirs = set(run_dirs)
    out: dict[Path, list[Path]] = {}
    for path in (*change.changed, *change.removed):
        for parent in (path, *path.parents):
            if parent in dirs:
                out.setdefault(parent, []).append(path)
                break
    return out
