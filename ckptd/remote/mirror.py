"""The local mirror of an object-store watch root: one sparse stub file per object under
``<state_dir>/mirror/<watch>/``, so discovery, readiness, trainer detection and the pipeline work on paths unchanged.

Why stubs: the daemon already decides everything from (path, size, mtime_ns). A stub is created with
``truncate(size)`` (no disk used) and stamped with the object's LastModified. S3's LastModified has 1 s
resolution, so the nanoseconds are taken from a hash of the ETag: an overwrite with new content inside the same
second (and the same size) still changes the identity that readiness and the ledger use. Small metadata objects
(sidecars, ``trainer_state.json``, ``.metadata``, index files, markers) are downloaded whole, so those small reads
stay local: streamed to a temp file in bounded batches, never more than :data:`BATCH_BYTES` in memory at once. Every
other object, however small, stays a stub, registered here so that :func:`ckptd.input_files.open_input` serves its
bytes with ranged GETs. Objects the watch would never look at (outside its runs, deeper than ``max_depth``,
excluded names: :mod:`ckptd.remote.scope`) are not mirrored at all.

The listing is the truth: each :meth:`ObjectMirror.refresh` lists the prefix once, creates/updates what changed,
removes stubs of deleted objects and leaves unchanged ones untouched. Nothing is ever written outside the mirror
root: keys that are not valid relative paths (``..``, empty or over-long components, a path over ``PATH_MAX``) are
skipped, with one log line each; a stub that cannot be written is logged once, not at every listing.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from ckptd.atomic import TEMP_PREFIX
from ckptd.remote.scope import WatchScope, is_metadata
from ckptd.remote.urls import filesystem, redact, scrub

MIRROR_DIR = "mirror"  # <state_dir>/mirror/<watch name>
WHOLE_LIMIT = 1 << 20  # metadata objects up to this size are downloaded whole (sidecars, markers, .metadata)
JSON_WHOLE_LIMIT = 64 << 20  # JSON files are read whole anyway (ckptd.file_checks.JSON_LIMIT)
NAME_MAX = 255  # bytes per path component (Linux); longer keys cannot be mirrored
PATH_MAX = 4096  # bytes per path (Linux), when the mirror's filesystem does not say
TEMP_ROOM = 64  # bytes a temp file's name next to a stub may need beyond the stub's own path
BATCH_BYTES = 64 << 20  # whole downloads are fetched in batches of at most this many bytes (held in memory)
BATCH_COUNT = 32  # and at most this many objects (concurrent GETs)
STREAM_LIMIT = 8 << 20  # larger ones are streamed straight to their temp file, one at a time
STREAM_CHUNK = 1 << 20
_NS = 1_000_000_000


@dataclass(frozen=True)
class ObjectRef:
    """One object as the last listing saw it; ``fs``/``path`` are the fsspec filesystem and the path inside it."""

    fs: Any = field(compare=False, repr=False)
    path: str  # bucket/key
    url: str  # s3://bucket/key (what the ledger records)
    etag: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class MirrorChange:
    """What one refresh did: stubs created or updated, stubs removed, and what the listing cost."""

    changed: tuple[Path, ...] = ()
    removed: tuple[Path, ...] = ()
    objects: int = 0
    seconds: float = 0.0
    skipped: int = 0  # keys that cannot be mirror paths (logged once each)
    ignored: int = 0  # objects the watch never looks at (not mirrored; see ckptd.remote.scope)

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed)


# process-wide: stub path -> object, mirror root -> URL (readers and canonical() look them up from any thread)
_STUBS: dict[str, ObjectRef] = {}
_ROOTS: dict[str, str] = {}
_REAL_ROOTS: dict[str, str] = {}  # realpath of a mirror root -> the root (a resolved path still finds its stub)
_lock = threading.Lock()


def lookup(path: str | Path) -> ObjectRef | None:
    """The object a registered stub stands for (None for any other path: an ordinary local file)."""
    if not _STUBS:
        return None
    ref = _STUBS.get(os.path.abspath(path))
    if ref is None:
        real = os.path.realpath(path)
        for real_root, root in list(_REAL_ROOTS.items()):
            if real.startswith(real_root + "/"):
                return _STUBS.get(root + real[len(real_root):])
    return ref


def is_mirrored(path: str | Path) -> bool:
    """Is ``path`` inside a mirror root (its mtimes have 1 s resolution plus an ETag hash)?"""
    return bool(_ROOTS) and _root_of(os.path.abspath(path)) is not None


def _root_of(abspath: str) -> str | None:
    for root in _ROOTS:
        if abspath == root or abspath.startswith(root + "/"):
            return root
    return None


def canonical(path: str | Path) -> str:
    """What the ledger records for ``path``: ``s3://bucket/key`` for a mirror path (every daemon has its own
    state_dir, the object URL is the same for all), anything else unchanged."""
    text = str(path)
    if not _ROOTS:
        return text
    absolute = os.path.abspath(text)
    root = _root_of(absolute)
    return text if root is None else _ROOTS[root] + absolute[len(root):]


def local(url: str) -> str:
    """The inverse of :func:`canonical`: the mirror path of an object URL (anything else unchanged)."""
    for root, base in list(_ROOTS.items()):
        if url == base or url.startswith(base + "/"):
            return root + url[len(base):]
    return url


def identity_mtime_ns(last_modified: Any, etag: str) -> int:
    """LastModified (1 s resolution) plus a nanosecond part from the ETag, so a same-second overwrite with new
    content changes the identity. Deterministic: every daemon computes the same value for the same object."""
    if isinstance(last_modified, datetime):
        seconds = int(last_modified.timestamp())
    elif isinstance(last_modified, str) and last_modified:
        seconds = int(datetime.fromisoformat(last_modified.replace("Z", "+00:00")).timestamp())
    elif isinstance(last_modified, int | float):
        seconds = int(last_modified)
    else:
        seconds = 0
    frac = int.from_bytes(hashlib.sha256(etag.encode()).digest()[:8], "big") % _NS
    return seconds * _NS + frac


def object_etag(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    return ""


def _last_modified(info: Mapping[str, Any]) -> Any:
    for key in ("LastModified", "last_modified", "updated", "mtime", "timeCreated", "created"):
        if info.get(key):
            return info[key]
    return None


def bad_name(rel: str) -> str:
    """Why the key ``rel`` (relative to the watched prefix) cannot be a path in the mirror, or ''."""
    if not rel:
        return "empty name"
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            return f"has a {part or 'empty'!r} path component"
        if "\0" in part:
            return "contains a NUL byte"
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            return f"has a path component longer than {NAME_MAX} bytes"
        if part.startswith(TEMP_PREFIX):
            return "uses ckptd's temp-file prefix"
    return ""


def _whole(rel: str, size: int) -> bool:
    """Download whole (small metadata reads stay local) rather than stub (ranged GETs)? Never a checkpoint, however
    small: a prefix full of small shards must not be copied to this disk."""
    if not is_metadata(rel.rsplit("/", 1)[-1]):
        return False
    return size <= WHOLE_LIMIT or (rel.endswith(".json") and size <= JSON_WHOLE_LIMIT)


class _Gone(Exception):
    """The object is not what the listing said any more (deleted, overwritten, unreadable): the next listing
    decides; nothing is written."""


class ObjectMirror:
    """The mirror of one watch's object-store root (``watch.remote``) in ``watch.root``."""

    def __init__(self, watch: Any, log: Any) -> None:
        root = Path(watch.root)
        if not root.is_absolute() or root.parent.name != MIRROR_DIR:
            raise ValueError(f"a mirror root must be <state_dir>/{MIRROR_DIR}/<watch>, not {root}")
        self.watch, self.log = watch, log
        self.root = root
        self.url = redact(watch.remote).rstrip("/")
        self._fs: Any = None
        self._base = ""
        self._reported: set[str] = set()  # skipped keys already logged
        self._write_failures: dict[str, str] = {}  # mirror path -> reason, logged (the last listing's)
        self._failing_now: dict[str, str] = {}  # the same, this listing
        try:
            self._path_max = int(os.pathconf(root.parent if root.parent.exists() else "/", "PC_PATH_MAX"))
        except (OSError, ValueError):
            self._path_max = PATH_MAX
        with _lock:
            _ROOTS[str(root)] = self.url
            _REAL_ROOTS[os.path.realpath(root)] = str(root)

    def filesystem(self) -> tuple[Any, str]:
        if self._fs is None:
            self._fs, self._base = filesystem(self.watch.remote, self.watch.storage_options)
        return self._fs, self._base

    def list(self) -> tuple[dict[str, ObjectRef], float]:
        """Every object under the prefix (key relative to it -> ref), from one listing, and its duration."""
        fs, base = self.filesystem()
        started = time.monotonic()
        _forget_listing(fs, base)  # the listing is the truth: never a cached one
        found = fs.find(base, detail=True, withdirs=False)
        _forget_listing(fs, base)  # and do not keep a copy of every entry in the filesystem's cache
        seconds = time.monotonic() - started
        out: dict[str, ObjectRef] = {}
        for name, info in found.items():
            if info.get("type") == "directory" or name.endswith("/") or not name.startswith(base + "/"):
                continue  # folder placeholders; the prefix itself as an object
            rel = name[len(base) + 1:]
            etag = object_etag(info) or f"{info.get('size')}:{_last_modified(info)}"
            size = int(info.get("size") or 0)
            url = f"{self.url}/{rel}"
            out[rel] = ObjectRef(fs, name, url, etag, size, identity_mtime_ns(_last_modified(info), etag))
        return out, seconds

    def refresh(self) -> MirrorChange:
        """List once and bring the mirror in line with the listing; returns what changed."""
        listing, seconds = self.list()
        usable, skipped = self._usable(listing)
        keep = WatchScope(self.watch).select(usable)
        wanted = {rel: ref for rel, ref in usable.items() if rel in keep}
        self.root.mkdir(parents=True, exist_ok=True)
        removed = self._remove_unlisted(wanted)
        self._failing_now = {}
        changed = self._apply(wanted)
        self._write_failures = self._failing_now
        return MirrorChange(tuple(changed), tuple(removed), len(listing), seconds, skipped, len(usable) - len(wanted))

    def _usable(self, listing: dict[str, ObjectRef]) -> tuple[dict[str, ObjectRef], int]:
        """The listed keys that can be mirror paths; each unusable one is logged once."""
        bad: dict[str, str] = {}
        room = self._path_max - TEMP_ROOM - len(os.fsencode(str(self.root))) - 1
        for rel in listing:
            reason = bad_name(rel)
            if not reason and len(rel.encode("utf-8", "surrogatepass")) > room:
                reason = f"makes a mirror path longer than the system's {self._path_max}-byte limit"
            if reason:
                bad[rel] = reason
        dirs = {rel[:i] for rel in listing if rel not in bad for i in range(len(rel)) if rel[i] == "/"}
        for rel in listing:
            if rel not in bad and rel in dirs:
                bad[rel] = "is both an object and a prefix of other objects"
        for rel, reason in bad.items():
            if rel not in self._reported:
                shown = rel if len(rel) <= 120 else rel[:120] + "…"
                self.log.warning("mirror.skipped", watch=self.watch.name, key=shown, action="skip",
                                 reason=f"object name {reason}; it cannot be mirrored as a path")
        self._reported = set(bad)
        return {rel: ref for rel, ref in listing.items() if rel not in bad}, len(bad)

    def _remove_unlisted(self, wanted: dict[str, ObjectRef]) -> list[Path]:
        """Remove stubs (and stray temp files) of objects no longer listed, then empty folders."""
        removed: list[Path] = []
        root = str(self.root)
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                ref = wanted.get(rel)
                if ref is not None and not os.path.islink(path):
                    continue
                with _lock:
                    _STUBS.pop(path, None)
                try:
                    os.unlink(path)
                except OSError:
                    continue
                if not name.startswith(TEMP_PREFIX):
                    removed.append(Path(path))
            if dirpath != root:
                try:
                    os.rmdir(dirpath)  # only when empty
                except OSError:
                    pass
        return removed

    def _apply(self, wanted: dict[str, ObjectRef]) -> list[Path]:
        changed: list[Path] = []
        downloads: list[tuple[Path, ObjectRef]] = []
        real_root = os.path.realpath(self.root)
        for rel, ref in sorted(wanted.items()):
            stub = self.root / rel
            whole = _whole(rel, ref.size)
            try:
                st = os.lstat(stub)
                current = (st.st_size, st.st_mtime_ns) == (ref.size, ref.mtime_ns) and os.path.isfile(stub) \
                    and not os.path.islink(stub)
            except OSError:
                current = False
            if current:
                self._register(stub, None if whole else ref)
                continue
            if not self._inside(stub.parent, real_root):
                continue
            if whole:
                downloads.append((stub, ref))
            elif self._write(stub, ref, None):
                changed.append(stub)
        changed.extend(self._download(downloads))
        return changed

    def _inside(self, directory: Path, real_root: str) -> bool:
        """Create ``directory`` and make sure it really is inside the mirror root (no symlink leads out)."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._write_failed(directory, exc)
            return False
        real = os.path.realpath(directory)
        return real == real_root or real.startswith(real_root + "/")

    def _download(self, items: list[tuple[Path, ObjectRef]]) -> list[Path]:
        """Metadata objects, written whole: in batches of concurrent GETs holding at most :data:`BATCH_BYTES`
        (:data:`BATCH_COUNT` objects), the few larger than :data:`STREAM_LIMIT` streamed to their temp file."""
        changed: list[Path] = []
        batch: list[tuple[Path, ObjectRef]] = []
        held = 0
        for stub, ref in items:
            if ref.size > STREAM_LIMIT:
                if self._write(stub, ref, lambda fh, ref=ref: _stream(ref, fh)):
                    changed.append(stub)
                continue
            if batch and (held + ref.size > BATCH_BYTES or len(batch) >= BATCH_COUNT):
                changed.extend(self._fetch_batch(batch))
                batch, held = [], 0
            batch.append((stub, ref))
            held += ref.size
        if batch:
            changed.extend(self._fetch_batch(batch))
        return changed

    def _fetch_batch(self, items: list[tuple[Path, ObjectRef]]) -> list[Path]:
        """One batch: ranged GETs (no HEAD first) one byte past the listed size, so a grown object is noticed."""
        fetch = [ref for _, ref in items if ref.size]
        results: list[Any] = []
        if fetch:
            try:
                results = list(fetch[0].fs.cat_ranges([r.path for r in fetch], [0] * len(fetch),
                                                      [r.size + 1 for r in fetch], on_error="return"))
            except Exception as exc:  # noqa: BLE001 (the store failed: the next listing tries again)
                results = [exc] * len(fetch)
        got = dict(zip([r.path for r in fetch], results))
        del results  # each result is dropped once written
        changed: list[Path] = []
        for stub, ref in items:
            data = got.get(ref.path, b"") if ref.size else b""
            if self._write(stub, ref, lambda fh, ref=ref, data=data: _check_whole(ref, data, fh)):
                changed.append(stub)
            got.pop(ref.path, None)  # written: no longer held
        return changed

    def _write(self, stub: Path, ref: ObjectRef, fill: Callable[[IO[bytes]], None] | None) -> bool:
        """Replace ``stub`` atomically by a sparse stub (``fill`` None) or what ``fill`` writes (the object's
        bytes), stamped with the object's identity."""
        tmp = stub.parent / f"{TEMP_PREFIX}mirror.{os.getpid()}.{secrets.token_hex(6)}"
        try:
            if os.path.isdir(stub) and not os.path.islink(stub):
                _remove_tree(stub)
            with open(tmp, "xb") as fh:
                if fill is None:
                    fh.truncate(ref.size)
                else:
                    fill(fh)
            os.utime(tmp, ns=(ref.mtime_ns, ref.mtime_ns))
            os.replace(tmp, stub)
        except (_Gone, OSError) as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            if isinstance(exc, _Gone):  # deleted or overwritten since the listing: the next listing sees it
                self.log.info("mirror.fetch_skipped", watch=self.watch.name, key=ref.url, reason=scrub(str(exc)))
            else:
                self._write_failed(stub, exc)
            return False
        self._register(stub, None if fill is not None else ref)
        return True

    def _write_failed(self, path: Path, exc: OSError) -> None:
        """One log line per path and reason, not one per listing (a disk full, a name this disk refuses)."""
        reason = scrub(exc.strerror or str(exc))
        key = str(path)
        if self._write_failures.get(key) != reason and self._failing_now.get(key) != reason:
            rel = os.path.relpath(path, self.root)
            shown = rel if len(rel) <= 120 else rel[:120] + "…"
            self.log.warning("mirror.write_failed", watch=self.watch.name, key=f"{self.url}/{shown}", reason=reason,
                             action="skip; tried again at each listing, logged again only if the reason changes")
        self._failing_now[key] = reason

    @staticmethod
    def _register(stub: Path, ref: ObjectRef | None) -> None:
        with _lock:
            if ref is None:
                _STUBS.pop(str(stub), None)
            else:
                _STUBS[str(stub)] = ref

    def close(self) -> None:
        """Forget this mirror's stubs (the files stay: the next daemon's first listing reuses them). The root's
        URL stays known, so a job still finishing records canonical paths."""
        prefix = str(self.root) + "/"
        with _lock:
            for key in [k for k in _STUBS if k.startswith(prefix)]:
                del _STUBS[key]


def _forget_listing(fs: Any, base: str) -> None:
    """Drop the filesystem's cached listings of ``base`` and everything under it. ``invalidate_cache(base)``
    alone keeps the sub-folders a recursive ``find`` cached, and s3fs answers ``info``/``size`` from those: a
    small object new since the previous listing was then "not found" when fetched, at every refresh."""
    fs.invalidate_cache(base)
    cache = getattr(fs, "dircache", None)
    if cache is None:
        return
    prefix = base + "/"
    for _ in range(3):  # another thread may fill the cache meanwhile (the outputs' publisher shares it)
        try:
            stale = [key for key in list(cache) if key.startswith(prefix)]
        except RuntimeError:
            continue
        for key in stale:
            cache.pop(key, None)
        return
    fs.invalidate_cache()


def _check_whole(ref: ObjectRef, data: Any, fh: IO[bytes]) -> None:
    """Write one batch result, or :class:`_Gone` when it is not the listed object (an error, another size)."""
    if isinstance(data, BaseException):
        raise _Gone(f"{type(data).__name__}: {data}"[:300])
    if not isinstance(data, bytes | bytearray) or len(data) != ref.size:
        raise _Gone("size changed since the listing")
    fh.write(data)


def _stream(ref: ObjectRef, fh: IO[bytes]) -> None:
    """Copy a larger metadata object into ``fh`` in :data:`STREAM_CHUNK` pieces (never whole in memory); store
    errors and a changed object are :class:`_Gone`, a local write error stays an ``OSError``."""
    try:
        src = ref.fs.open(ref.path, "rb", block_size=STREAM_CHUNK * 4)
    except Exception as exc:  # noqa: BLE001 (deleted, network, permissions: the next listing tries again)
        raise _Gone(scrub(f"{type(exc).__name__}: {exc}")[:300]) from None
    with src:
        etag = object_etag(getattr(src, "details", None) or {})
        if etag and etag != ref.etag:
            raise _Gone("overwritten since the listing (another ETag)")
        while True:
            try:
                chunk = src.read(STREAM_CHUNK)
            except Exception as exc:  # noqa: BLE001
                raise _Gone(scrub(f"{type(exc).__name__}: {exc}")[:300]) from None
            if not chunk:
                break
            fh.write(chunk)
            if fh.tell() > ref.size:
                raise _Gone("size changed since the listing")
    if fh.tell() != ref.size:
        raise _Gone("size changed since the listing")


def _remove_tree(path: Path) -> None:
    """A directory where an object now is (its objects were deleted): only ours, inside the mirror."""
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)
