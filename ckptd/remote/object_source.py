"""Read an object in an object store the way :class:`~ckptd.file_source.FileSource` reads a file: ranged GETs of
only the bytes asked for, and an object overwritten meanwhile (new ETag or size) reported as
:class:`~ckptd.errors.CheckpointChangedError` ("retry later"), as a local in-place rewrite is.

Why the small cache: a ``torch.save`` zip is read as central directory, ``data.pkl``, one 30-byte local header
per storage record (its data offset), the tiny tensors (read eagerly for metrics), then the model's tensors. One
GET per header would be hundreds of round trips, so the first header read fetches, concurrently, every record's
header and every small record whole (the central directory says where they are) and nothing of the large records'
data. The model tensors are then fetched in large concurrent chunks, never cached. Everything else of the object
(optimizer state) is never fetched. Byte and request counts are kept per source and in :data:`STATS`.
"""

from __future__ import annotations

import io
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ckptd.errors import CheckpointChangedError, CheckpointError
from ckptd.file_source import EAGER_BYTES, FileSource, FileStamp
from ckptd.remote.mirror import ObjectRef, lookup, object_etag
from ckptd.remote.urls import scrub

READ_AHEAD = 4 << 10  # a small read (a header) fetches this much: the next small read is usually free
FILE_READ_AHEAD = 1 << 20  # the most a sequential run of file-object reads fetches ahead (doubling from 4 KiB)
TAIL = 16 << 10  # a read near the end fetches the whole tail: a zip's end records and its central directory
CHUNK = 16 << 20  # large reads are split into chunks fetched concurrently
MERGE_GAP = 256  # prefetched ranges closer than this are fetched as one
CACHE_LIMIT = 16 << 20  # cached bytes per object version
CACHED_OBJECTS = 4  # object versions whose cache is kept (a completeness check then the read share one)
_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = 30


class FetchStats:
    """Bytes and requests sent to object stores by this process (for benchmarks and tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = self.gets = self.heads = 0

    def add(self, nbytes: int = 0, gets: int = 0, heads: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.gets += gets
            self.heads += heads

    def reset(self) -> None:
        with self._lock:
            self.bytes = self.gets = self.heads = 0


STATS = FetchStats()


class ObjectReadError(CheckpointChangedError):
    """The store could not serve a read (network, throttling, permissions): not a verdict on the checkpoint, so
    the pipeline retries it like a changed file instead of recording it invalid."""

    def __init__(self, path: str | Path, detail: str) -> None:
        CheckpointError.__init__(self, path, f"cannot be read from the object store ({detail}); will be retried")


class _Segments:
    """Cached byte ranges of one object version, looked up by offset."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: list[int] = []
        self.blobs: list[bytes] = []
        self.total = 0
        self.planned = False

    def find(self, pos: int) -> tuple[int, bytes] | None:
        with self.lock:
            best: tuple[int, bytes] | None = None
            for start, blob in zip(self.starts, self.blobs):
                if start <= pos < start + len(blob) and (best is None or start + len(blob) > best[0] + len(best[1])):
                    best = (start, blob)
            return best

    def put(self, start: int, blob: bytes) -> None:
        with self.lock:
            if blob and self.total + len(blob) <= CACHE_LIMIT:
                self.starts.append(start)
                self.blobs.append(blob)
                self.total += len(blob)


_caches: OrderedDict[tuple[str, str], _Segments] = OrderedDict()
_caches_lock = threading.Lock()


def _cache_for(ref: ObjectRef) -> _Segments:
    key = (ref.url, ref.etag)
    with _caches_lock:
        seg = _caches.pop(key, None) or _Segments()
        _caches[key] = seg
        while len(_caches) > CACHED_OBJECTS:
            _caches.popitem(last=False)
        return seg


class ObjectSource(FileSource):
    """A registered mirror stub's object, read with ranged GETs (``FileSource``'s interface)."""

    def __init__(self, path: str | Path, ref: ObjectRef) -> None:
        self.path = Path(path)
        self.ref = ref
        self.fs = ref.fs
        self.stamp = FileStamp(ref.size, ref.mtime_ns, 0, 0)
        self.fd = -1
        self.bytes_fetched = 0
        self.gets = 0
        self._cache = _cache_for(ref)
        self.fh = ObjectFile(self)

    # --- identity ----------------------------------------------------------------------------------------
    def changed(self) -> str | None:
        """Why the object is no longer the version we read (None when it is). A deleted object is not "changed"
        (as a deleted local file is not): a read that still needed it fails on its own."""
        now = lookup(self.path)
        if now is not None and now.etag != self.ref.etag:
            return "the object was overwritten (a newer listing shows another ETag)"
        try:
            self.fs.invalidate_cache(self.ref.path)
            info = self.fs.info(self.ref.path)
        except FileNotFoundError:
            return None
        except Exception as exc:  # network, credentials: cannot vouch for what was read  # noqa: BLE001
            return scrub(f"cannot check the object: {type(exc).__name__}: {exc}")
        finally:
            STATS.add(heads=1)
        size = int(info.get("size") or 0)
        if size != self.ref.size:
            return f"size {self.ref.size} -> {size} bytes (the object was overwritten)"
        etag = object_etag(info)
        if etag and etag != self.ref.etag:
            return "the object was overwritten (ETag changed)"
        return None

    def close(self) -> None:
        self.fh.close()

    # --- reads ---------------------------------------------------------------------------------------------
    def read(self, offset: int, nbytes: int, what: str = "data") -> bytes:
        self.check_range(offset, nbytes, what)
        if not self._cache.planned:
            self._plan()
        return self._get(offset, nbytes, READ_AHEAD)

    def read_into(self, buf: torch.Tensor, offset: int, what: str = "data") -> None:
        """Fill ``buf`` from ``offset``: cached bytes first, the rest in concurrent chunks (not cached)."""
        nbytes = buf.numel()
        self.check_range(offset, nbytes, what)
        if nbytes == 0:
            return
        view = memoryview(buf.numpy())
        pos, end = offset, offset + nbytes
        pos = self._copy_cached(view, offset, pos, end)
        if pos >= end:
            return
        ranges = [(s, min(s + CHUNK, end)) for s in range(pos, end, CHUNK)]
        for (start, stop), data in zip(ranges, self._fetch(ranges)):
            view[start - offset: stop - offset] = data

    def _copy_cached(self, view: memoryview, offset: int, pos: int, end: int) -> int:
        while pos < end:
            seg = self._cache.find(pos)
            if seg is None:
                break
            start, blob = seg
            take = blob[pos - start: end - start]
            view[pos - offset: pos - offset + len(take)] = take
            pos += len(take)
        return pos

    def _get(self, offset: int, nbytes: int, ahead: int) -> bytes:
        """``nbytes`` from ``offset``: cached bytes, then one GET for the rest (plus ``ahead``, cached)."""
        if nbytes == 0:
            return b""
        out = bytearray(nbytes)
        view = memoryview(out)
        end = offset + nbytes
        pos = self._copy_cached(view, offset, offset, end)
        if pos < end:
            size = self.stamp.size
            start = max(0, size - TAIL) if size - pos <= TAIL and not self._cache.find(max(0, size - TAIL)) else pos
            start = min(start, pos)
            stop = min(size, max(end, pos + ahead))
            (data,) = self._fetch([(start, stop)])
            self._cache.put(start, data)
            view[pos - offset:] = data[pos - start: end - start]
        return bytes(out)

    def _fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """One ranged GET per range (concurrent on async filesystems); a short answer means the object changed."""
        if not ranges:
            return []
        path = self.ref.path
        try:
            if len(ranges) == 1:
                results: list[Any] = [self.fs.cat_file(path, start=ranges[0][0], end=ranges[0][1])]
            else:
                results = self.fs.cat_ranges([path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges],
                                             on_error="return")
        except Exception as exc:  # noqa: BLE001
            results = [exc]
        got = sum(len(r) for r in results if isinstance(r, bytes | bytearray))
        self.bytes_fetched += got
        self.gets += len(ranges)
        STATS.add(nbytes=got, gets=len(ranges))
        out: list[bytes] = []
        for (start, stop), data in zip(ranges, results):
            if isinstance(data, FileNotFoundError):
                raise CheckpointChangedError(self.path, "the object was deleted while being read")
            if isinstance(data, BaseException):
                raise ObjectReadError(self.path, f"{type(data).__name__}: {data}")
            if len(data) != stop - start:
                raise CheckpointChangedError(self.path, f"short read at byte {start + len(data)} of {self.ref.url}: "
                                             f"{self.changed() or 'the object shrank'}")
            out.append(bytes(data))
        return out

    def _plan(self) -> None:
        """First source-level read of a ``torch.save`` zip: fetch every record's header and every small record
        (``data.pkl``, ``byteorder``, tiny tensors) at once; large records' data is left for the tensor reads."""
        self._cache.planned = True
        head = self._get(0, min(4, self.stamp.size), READ_AHEAD)
        if head != _ZIP_MAGIC:
            return
        try:
            zf = zipfile.ZipFile(ObjectFile(self))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return  # the reader reports it, through its own path
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
        ends = [i.header_offset for i in infos[1:]] + [getattr(zf, "start_dir", self.stamp.size)]
        wanted: list[tuple[int, int]] = []
        for info, end in zip(infos, ends):
            start = info.header_offset
            end = min(max(end, start), self.stamp.size)
            large = info.file_size > EAGER_BYTES and "/data/" in info.filename
            wanted.append((start, min(end, start + _LOCAL_HEADER) if large else end))
        ranges: list[tuple[int, int]] = []
        for start, stop in wanted:
            if ranges and start - ranges[-1][1] <= MERGE_GAP:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], stop))
            elif stop > start:
                ranges.append((start, stop))
        missing = [r for r in (self._uncovered(s, e) for s, e in ranges) if r[1] > r[0]]
        for (start, _), data in zip(missing, self._fetch(missing)):
            self._cache.put(start, data)

    def _uncovered(self, start: int, stop: int) -> tuple[int, int]:
        """The part of [start, stop) after what the cache already holds from ``start``."""
        while start < stop:
            seg = self._cache.find(start)
            if seg is None:
                break
            start = seg[0] + len(seg[1])
        return start, stop


class ObjectFile(io.RawIOBase):
    """A seekable, read-only file object over an :class:`ObjectSource` (for ``zipfile`` and ``torch.load``)."""

    def __init__(self, source: ObjectSource) -> None:
        super().__init__()
        self._source = source
        self._pos = 0
        self._ahead = READ_AHEAD  # doubles while reads are sequential (torch's loader), back to 4 KiB on a seek
        self._last_end = -1

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.stamp.size}[whence]
        if base + offset < 0:
            raise OSError(22, "negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._source.stamp.size - self._pos)
        if n <= 0:
            return 0
        self._ahead = min(self._ahead * 2, FILE_READ_AHEAD) if self._pos == self._last_end else READ_AHEAD
        data = self._source._get(self._pos, n, self._ahead)
        memoryview(b).cast("B")[:n] = data
        self._pos += n
        self._last_end = self._pos
        return n
