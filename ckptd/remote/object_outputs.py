"""Object-store outputs: a run's staged local outputs published under ``s3://…`` with the manifest as the commit.

Why this shape: an object store has no rename and no symlinks, so the local commit (a generation directory swapped
in by one rename, ``ckptd.daemon.publish``) does not exist there. Instead every file is uploaded under a
content-addressed name (``objects/<sha256>.<ext>``: an object, once there, never changes), a CoreML package under
an immutable versioned prefix (``coreml/<version>/…``), and ``manifest.json`` is written last: one PUT, atomic on
S3, is the commit point. A reader that reads the manifest and then the objects it names never sees a mix.

Objects are deleted only after a manifest that does not name them is in place. A superseded object (one the
manifest in place named and the new one does not) is kept at least one publication longer, as the local previous
generation is kept, *and* at least ``retain_grace`` seconds (a watch's ``retain_grace``, default 60 s) after the
manifest that dropped it was written: a reader that read a manifest and then fetches its objects slowly has that
long before any of them goes. The record needs no ledger: every manifest carries ``superseded_at`` (key -> the
unix time it stopped being named, as the writer's clock saw it) for what it still keeps, and ``retained`` (the
same keys, sorted); each publication carries the record forward and drops what it deletes. Deletions are
idempotent (an object already gone is not an error; a failed delete is retried by the next publication, which
finds the object unnamed). A failure anywhere before the manifest PUT leaves the previous manifest and every object
it names as they were; publishing again finishes the job (uploads that already landed are skipped).

Several daemons may publish one run (one takes it over from another that stalled). The lease is checked by the
publisher's ``fence`` right before the manifest PUT, after every object is uploaded (a daemon that lost the run
stops there, :class:`ckptd.errors.LeaseLost`). On S3 the PUT is also conditional on the manifest being the one the
publication planned against (``If-Match`` its ETag, ``If-None-Match: *`` when there was none), so a writer that
stalled between its lease check and its PUT cannot replace a newer manifest; a store that refuses the condition as
unsupported gets an unconditional PUT. What still slips through is repaired by the lease holder's next job
(``ckptd.daemon.remote_publish``: it re-reads the manifest and republishes when it is not its own).

A package exported by a queue worker (``ckptd.queue.remote``) is uploaded by that worker, under ``coreml/<version>``
named by its export id, before its ledger commit; the staged manifest then names the prefix's URL, and the
publisher names it (``coreml/<version>``) without uploading it again. Such a worker may upload a newer version
while a publication runs, so a ``coreml/`` version is deleted only when it is *older* (a lower export id) than
the one the new manifest names and neither manifest names it (:func:`plan_publication`).

The remote manifest is the staged one with every path replaced by its key relative to the base, plus: ``files``
(local name -> key: ``best.safetensors``, ``average.safetensors``, ``members/…``), ``objects`` (every key it names,
CoreML files included), ``retained`` and ``superseded_at`` (objects it no longer names but keeps for readers of
earlier manifests, see above), ``staged_manifest_sha256`` (the local manifest it was built from) and
``generation`` (the run's lease generation) when the publisher has one.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ckptd.daemon.publish import MANIFEST, current_dir
from ckptd.errors import CkptdError, LeaseLost
from ckptd.remote.urls import is_remote, scrub

OBJECTS = "objects"
COREML = "coreml"
PREFIXES = (OBJECTS, COREML)  # the only prefixes under the base where the publisher ever deletes
MANIFEST_SOURCE = "staged_manifest_sha256"  # the local manifest this remote one was built from (cheap catch-up)
SUPERSEDED = "superseded_at"  # key -> when the manifest that stopped naming it was written (unix seconds)
RETAIN_GRACE = 60.0  # seconds a superseded object stays at least (a watch's retain_grace)
_CHUNK = 1 << 20
_QUEUED_VERSION = re.compile(r"^best-v\d+-q(\d+)-")  # a queue worker's package: the export id orders them


class RemoteOutputError(CkptdError):
    """Publishing a run's outputs to the object store failed; the previous remote manifest stays valid."""


class ManifestChanged(RemoteOutputError):
    """The conditional manifest PUT found another manifest than the one the publication was planned against."""


@dataclass(frozen=True)
class StagedFile:
    """A published local file (best, average, a member copy), named in the manifest by ``name``."""

    name: str  # relative to the local output: "best.safetensors", "members/a-0123456789ab.safetensors"
    path: Path
    size: int
    sha256: str

    @property
    def key(self) -> str:
        return f"{OBJECTS}/{self.sha256}{Path(self.name).suffix}"


@dataclass(frozen=True)
class StagedPackage:
    """A published CoreML package (a directory): its version name and its files (relative path, path, size)."""

    version: str
    files: tuple[tuple[str, Path, int], ...]

    @property
    def prefix(self) -> str:
        return f"{COREML}/{self.version}"


@dataclass(frozen=True)
class Staged:
    """What the local committed generation publishes, read once (see :func:`collect`)."""

    manifest: dict[str, Any]
    manifest_sha256: str
    files: tuple[StagedFile, ...]
    package_version: str | None  # the version the manifest's coreml block names (None: no package)
    package: StagedPackage | None  # its files, when it is still staged locally
    remote_package: str | None = None  # its URL, when a queue worker uploaded it (nothing staged locally)


@dataclass(frozen=True)
class Plan:
    """What one publication does: upload, then (when ``write_manifest``) PUT ``manifest``, then delete."""

    manifest: dict[str, Any]
    uploads: tuple[tuple[str, Path], ...]  # (key relative to the base, local file)
    write_manifest: bool
    deletes: tuple[str, ...]  # keys relative to the base, only under PREFIXES
    fresh: tuple[str, ...] = ()  # keys this manifest stops naming: their superseded_at is stamped at its PUT


# --- the pure part ------------------------------------------------------------------------------------------------
def named_keys(manifest: Mapping[str, Any] | None) -> set[str]:
    """Every object key a remote manifest names (its ``objects``)."""
    if not manifest:
        return set()
    return {str(k) for k in manifest.get("objects") or ()}


def superseded(manifest: Mapping[str, Any] | None, default: float) -> dict[str, float]:
    """A manifest's record of the objects it keeps without naming them: key -> when they were superseded
    (``default`` for a ``retained`` key without a time, as written before the record had times)."""
    out: dict[str, float] = {}
    if not manifest:
        return out
    record = manifest.get(SUPERSEDED)
    if isinstance(record, Mapping):
        for key, at in record.items():
            if isinstance(at, (int, float)) and not isinstance(at, bool) and at == at:
                out[str(key)] = float(at)
    for key in manifest.get("retained") or ():
        out.setdefault(str(key), default)
    return out


def plan_publication(staged: Staged, listing: Mapping[str, int], remote: Mapping[str, Any] | None,
                     generation: int | None = None, *, now: float | None = None, grace: float = 0.0,
                     previous: Mapping[str, Any] | None = None) -> Plan:
    """The uploads, the manifest and the deletions that make the remote outputs equal the staged ones.

    ``listing``: the keys under the base's ``objects/`` and ``coreml/`` with their sizes; ``remote``: the manifest
    in place now (None: none or unreadable). Content-addressed objects already there with the same size are not
    uploaded again; a package prefix the current manifest names is complete and immutable, so it is skipped too,
    and so is one a queue worker uploaded (``staged.remote_package``: its files are the listing's under it).
    Deleted: what neither the new manifest nor the one it replaces names (a reader of either finds its objects),
    nor any manifest dropped less than ``grace`` seconds before ``now`` (the ``superseded_at`` record), except a
    ``coreml/`` version newer than the named one (a worker's upload that no manifest names *yet*). ``previous``:
    the manifest this publisher wrote last, when another one replaced it since (a late writer's): what it named
    or kept is kept as if it were in place."""
    uploads: dict[str, Path] = {}
    for f in staged.files:
        if listing.get(f.key) != f.size:
            uploads.setdefault(f.key, f.path)
    remote_prefix = _coreml_path(remote)
    prefix: str | None = None
    package_keys: list[str] = []
    if staged.package is not None:
        prefix = staged.package.prefix
        package_keys = [f"{prefix}/{rel}" for rel, _, _ in staged.package.files]
        if prefix != remote_prefix:  # not yet committed: (re)upload every file, whatever a failed try left
            uploads.update((f"{prefix}/{rel}", path) for rel, path, _ in staged.package.files)
    elif staged.package_version is not None and staged.remote_package is not None:
        prefix = f"{COREML}/{staged.package_version}"  # a worker uploaded it before its commit: name it as it is
        package_keys = sorted(k for k in listing if k.startswith(prefix + "/"))
        if not package_keys:
            raise RemoteOutputError(f"the CoreML package {staged.remote_package} that the ledger says a worker "
                                    "published is not in the object store; nothing was published (the run's "
                                    "next export replaces it)")
    elif staged.package_version is not None and remote_prefix == f"{COREML}/{staged.package_version}":
        prefix = remote_prefix  # no longer staged here (a daemon that took the run over), but committed remotely
        package_keys = sorted(k for k in named_keys(remote) if k.startswith(prefix + "/"))
    manifest = remote_manifest(staged, prefix, package_keys, generation)
    unchanged = remote is not None and _comparable(remote) == _comparable(manifest)
    now = time.time() if now is None else now
    others = [m for m in (remote, previous) if m]
    fresh: set[str] = set()
    if unchanged:
        assert remote is not None
        manifest = dict(remote)
        keep = set().union(*(named_keys(m) | set(superseded(m, now)) for m in others))
    else:
        names = set(manifest["objects"])
        fresh = {k for m in others for k in named_keys(m)} - names
        record: dict[str, float] = {}
        for m in others:
            for key, at in superseded(m, now).items():
                if key not in names and grace > 0 and now - at < grace:
                    record[key] = max(at, record.get(key, at))
        record.update((k, now) for k in fresh)
        record = {k: at for k, at in record.items() if k in listing}  # gone already: nothing left to keep
        fresh &= set(record)
        manifest["retained"] = sorted(record)
        manifest[SUPERSEDED] = {k: _millis(at) for k, at in sorted(record.items())}
        keep = names | set(record)
    named = _queued_id(staged.package_version) if prefix is not None else 0
    deletes = sorted(k for k in listing if k.split("/", 1)[0] in PREFIXES and k not in keep
                     and not _newer_package(k, named))
    order = sorted(uploads.items(), key=lambda item: (not item[0].startswith(OBJECTS + "/"), item[0]))
    return Plan(manifest=manifest, uploads=tuple(order), write_manifest=not unchanged,
                deletes=tuple(deletes), fresh=tuple(sorted(fresh)))


def remote_manifest(staged: Staged, package_prefix: str | None, package_keys: list[str],
                    generation: int | None) -> dict[str, Any]:
    """The staged manifest with every file path replaced by its object key (relative to the base)."""
    m = copy.deepcopy(staged.manifest)
    keys = {f.name: f.key for f in staged.files}

    def rewrite(entry: Any, field: str) -> None:
        if isinstance(entry, dict) and entry.get(field) in keys:
            entry[field] = keys[entry[field]]

    best, average = m.get("best"), m.get("average")
    rewrite(best, "path")
    rewrite(best, "member_path")
    rewrite(average, "path")
    for entry in [*(m.get("top_k_members") or ()), *((average or {}).get("members") or ())]:
        rewrite(entry, "path")
    coreml = m.get("coreml")
    if isinstance(coreml, dict):
        coreml["path"] = package_prefix
        if coreml.get("version"):
            coreml["version"] = Path(str(coreml["version"])).name
        last_ok = coreml.get("last_ok")
        if isinstance(last_ok, dict) and last_ok.get("version"):
            last_ok["version"] = Path(str(last_ok["version"])).name
    m["files"] = dict(sorted(keys.items()))
    m["objects"] = sorted(set(keys.values()) | set(package_keys))
    m[MANIFEST_SOURCE] = staged.manifest_sha256
    if generation is not None:
        m["generation"] = generation
    return m


def _queued_id(version: str | None) -> int:
    """The export id of a queue worker's package version (0 for any other: those are uploaded by the publisher
    itself, never concurrently with it)."""
    m = _QUEUED_VERSION.match(version or "")
    return int(m.group(1)) if m else 0


def _newer_package(key: str, named: int) -> bool:
    """Is ``key`` in a queue worker's package newer than the version the new manifest names (export id
    ``named``)? Such a worker uploads before its commit; the daemon names it at its next publication."""
    parts = key.split("/")
    return len(parts) > 2 and parts[0] == COREML and _queued_id(parts[1]) > named


def _millis(at: float) -> float:
    """A time for the record, never later than ``at`` (rounded up, an age could come out below 0)."""
    return math.floor(at * 1000) / 1000


def _comparable(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in ("retained", SUPERSEDED)}


def _coreml_path(manifest: Mapping[str, Any] | None) -> str | None:
    coreml = (manifest or {}).get("coreml")
    return coreml.get("path") if isinstance(coreml, dict) else None


def _package_version(manifest: Mapping[str, Any]) -> str | None:
    """The package version the local manifest's coreml block stands for (the newest good one)."""
    coreml = manifest.get("coreml")
    if not isinstance(coreml, dict) or not coreml.get("path"):
        return None
    source = coreml if coreml.get("status") in ("ok", "partial") else coreml.get("last_ok") or {}
    version = source.get("version")
    return Path(str(version)).name if version else None


# --- the local side ------------------------------------------------------------------------------------------------
class Hashes:
    """sha256 of ckptd's own published files, cached by identity: they are immutable (written once, replaced by
    rename), so a file is hashed once per process, not once per publication."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._cache: dict[tuple[int, int, int, int], str] = {}

    def sha256(self, path: Path) -> tuple[str, int]:
        st = path.stat()
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        found = self._cache.get(ident)
        if found is None:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
            found = digest.hexdigest()
            if len(self._cache) >= self.limit:
                self._cache.pop(next(iter(self._cache)))
            self._cache[ident] = found
        return found, st.st_size


def manifest_file(local_output: Path) -> Path | None:
    """The committed local manifest (inside ``current``), or None when nothing was published."""
    current = current_dir(local_output)
    return None if current is None else current / MANIFEST


def local_manifest_sha256(local_output: Path) -> str | None:
    """Identity of the committed local manifest: what a remote manifest records it was built from."""
    path = manifest_file(local_output)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None
    except OSError:
        return None


def collect(local_output: Path, hashes: Hashes | None = None) -> Staged | None:
    """The committed local generation: its manifest and every file it names (resolved once through ``current``,
    so a concurrent local commit cannot mix two generations). None when nothing was published yet."""
    hashes = hashes or Hashes()
    current = current_dir(local_output)
    if current is None:
        return None
    raw = (current / MANIFEST).read_bytes()
    manifest = json.loads(raw)
    names: dict[str, Path] = {}
    for name in ("best.safetensors", "best.pt", "average.safetensors"):
        if (current / name).is_file():
            names[name] = current / name
    best, average = manifest.get("best") or {}, manifest.get("average") or {}
    members = [best.get("member_path"), *(e.get("path") for e in manifest.get("top_k_members") or ()),
               *(e.get("path") for e in average.get("members") or ())]
    for rel in members:
        if rel and rel not in names:
            path = local_output / rel
            if not path.is_file():
                raise RemoteOutputError(f"{path}: the member copy named by the staged manifest is missing; "
                                        "the run is recovered first, then published")
            names[rel] = path
    files = []
    for name, path in sorted(names.items()):
        sha, size = hashes.sha256(path)
        files.append(StagedFile(name, path, size, sha))
    version = _package_version(manifest)
    package = None
    remote_package = _remote_package(manifest) if version is not None else None
    if version is not None and remote_package is None:
        pkg = local_output / COREML / version
        if pkg.is_dir():
            package = StagedPackage(version, tuple(
                (p.relative_to(pkg).as_posix(), p, p.stat().st_size) for p in sorted(pkg.rglob("*")) if p.is_file()))
    return Staged(manifest, hashlib.sha256(raw).hexdigest(), tuple(files), version, package, remote_package)


def _remote_package(manifest: Mapping[str, Any]) -> str | None:
    """The URL of the package when the staged manifest's coreml block names one in the object store."""
    coreml = manifest.get("coreml")
    path = coreml.get("path") if isinstance(coreml, dict) else None
    return path if isinstance(path, str) and is_remote(path) else None


# --- the remote side -----------------------------------------------------------------------------------------------
def read_manifest(fs: Any, base: str) -> dict[str, Any] | None:
    """The remote manifest under ``base`` (``bucket/prefix``), or None when there is none or it is unreadable.
    A reader reads this, then the objects it names (keys relative to ``base``)."""
    try:
        data = fs.cat_file(f"{base}/{MANIFEST}")
    except FileNotFoundError:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def list_objects(fs: Any, base: str) -> dict[str, int]:
    """Keys (relative to ``base``) and sizes under ``objects/`` and ``coreml/``: one fresh listing each."""
    out: dict[str, int] = {}
    for prefix in PREFIXES:
        root = f"{base}/{prefix}"
        fs.invalidate_cache(root)  # fsspec caches listings; the publisher must see the store as it is now
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            continue
        for path, info in found.items():
            if info.get("type", "file") == "file":
                out[path[len(base) + 1:]] = int(info.get("size") or 0)
    return out


class ObjectPublisher:
    """Publishes one stream's staged outputs under ``base_path`` (``bucket/out/w/run``) of the filesystem ``fs``."""

    def __init__(self, fs: Any, base_path: str, log: Any, retain_grace: float = RETAIN_GRACE,
                 clock: Callable[[], float] = time.time) -> None:
        self.fs = fs
        self.base = base_path.rstrip("/")
        self.log = log
        self.hashes = Hashes()
        self.retain_grace = retain_grace
        self.clock = clock
        self.conditional = _is_s3(fs)  # conditional PUTs, until the store refuses them as unsupported
        self.last: dict[str, Any] | None = None  # the manifest this publisher wrote last (see plan_publication)

    def publish(self, local_output: Path, generation: int | None = None,
                fence: Callable[[], object] | None = None) -> dict[str, Any]:
        """Upload what is missing, ``fence()`` (raises :class:`LeaseLost` when the run is no longer ours; an int it
        returns is the manifest's generation), PUT the manifest (the commit), delete what no manifest still needs.
        Returns ``{"manifest", "uploaded", "deleted", "committed"}``. Raises :class:`RemoteOutputError` (the
        previous remote manifest stays valid) or ``LeaseLost`` (nothing was written after the uploads)."""
        try:
            staged = collect(local_output, self.hashes)
        except (OSError, ValueError) as exc:
            raise RemoteOutputError(f"cannot read the staged outputs in {local_output}: {exc}") from exc
        if staged is None:
            return {"manifest": None, "uploaded": [], "deleted": [], "committed": False}
        self._check_package(staged)
        try:
            return self._publish(staged, generation, fence)
        except ManifestChanged as exc:  # another writer's PUT landed between our read and ours: plan again once
            self.log.info("outputs.remote_manifest_changed", action="planning the publication again",
                          reason=str(exc))
        try:
            return self._publish(staged, generation, fence)
        except ManifestChanged as exc:
            raise RemoteOutputError(f"{exc} (twice); retrying when the run's job ends") from exc

    def _publish(self, staged: Staged, generation: int | None,
                 fence: Callable[[], object] | None) -> dict[str, Any]:
        try:
            remote, etag, present = read_manifest_tagged(self.fs, self.base)
            self._check_generation(remote, generation, fence)
            previous = self.last if self.last is not None and self.last != remote else None
            plan = plan_publication(staged, list_objects(self.fs, self.base), remote, generation,
                                    now=self.clock(), grace=self.retain_grace, previous=previous)
            uploaded = []
            for key, path in plan.uploads:
                self.fs.put_file(os.fspath(path), f"{self.base}/{key}")
                uploaded.append(key)
            if plan.write_manifest:
                fenced = fence() if fence is not None else None  # the last moment: the objects are in place
                if isinstance(fenced, int) and not isinstance(fenced, bool):
                    plan.manifest["generation"] = fenced  # the generation the fence just bumped the run to
                at = _millis(self.clock())  # the manifest takes effect now: what it drops is superseded now
                plan.manifest[SUPERSEDED].update((k, at) for k in plan.fresh)
                body = (json.dumps(plan.manifest, indent=2) + "\n").encode()
                self._put_manifest(body, etag, present)
                self.last = plan.manifest
            elif self.last is None:
                self.last = plan.manifest
        except (RemoteOutputError, LeaseLost):
            raise
        except Exception as exc:  # s3fs/botocore raise their own types: every one leaves the old manifest valid
            raise RemoteOutputError(_describe(exc)) from exc
        deleted = self._delete(plan.deletes)
        return {"manifest": plan.manifest, "uploaded": uploaded, "deleted": deleted,
                "committed": plan.write_manifest}

    def remote(self) -> dict[str, Any] | None:
        """The remote manifest as it is now: one GET of a small object (None: none, or unreadable)."""
        self.fs.invalidate_cache(f"{self.base}/{MANIFEST}")
        return read_manifest(self.fs, self.base)

    def up_to_date(self, local_output: Path) -> bool:
        """Is the remote manifest built from the committed local one? One small GET, no hashing."""
        local = local_manifest_sha256(local_output)
        if local is None:
            return True
        try:
            remote = self.remote()
        except Exception as exc:  # noqa: BLE001 - an unreachable store: not up to date, publish() reports why
            self.log.debug("outputs.remote_unknown", reason=_describe(exc))
            return False
        return remote is not None and remote.get(MANIFEST_SOURCE) == local

    def _put_manifest(self, body: bytes, etag: str | None, present: bool) -> None:
        """The commit: conditional on the manifest being the one planned against, where the store can do that."""
        path = f"{self.base}/{MANIFEST}"
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"} if not present else {}
        if not self.conditional or not condition:
            self.fs.pipe_file(path, body)
            return
        try:
            self.fs.pipe_file(path, body, **condition)
        except Exception as exc:
            if _precondition_failed(exc, condition):
                raise ManifestChanged(f"the remote manifest {path} changed since this publication read it (another "
                                      "daemon published the run)") from exc
            if not _unsupported(exc):
                raise
            self.conditional = False
            self.log.debug("outputs.remote_unconditional", reason=f"the store refused a conditional PUT "
                           f"({_describe(exc)}); the manifest is written unconditionally from now on")
            self.fs.pipe_file(path, body)

    def _check_package(self, staged: Staged) -> None:
        """A package a worker uploaded must be under this base: the remote manifest names it relative to it."""
        if staged.remote_package is None:
            return
        parts = urlsplit(staged.remote_package)
        if f"{parts.netloc}{parts.path}".rstrip("/") != f"{self.base}/{COREML}/{staged.package_version}":
            raise RemoteOutputError(f"the CoreML package {staged.remote_package} is not under this run's output "
                                    f"({self.base}): was the output template changed? The run's next export "
                                    "publishes one under the new output")

    def _check_generation(self, remote: Mapping[str, Any] | None, generation: int | None,
                          fence: Callable[[], object] | None) -> None:
        """A late writer (a daemon that lost the run's lease) must not replace a newer state: when the remote
        manifest is newer, the fence says whether the run is still ours (LeaseLost: quietly not)."""
        theirs = (remote or {}).get("generation")
        if generation is not None and isinstance(theirs, int) and theirs > generation:
            if fence is not None:
                fence()
            raise RemoteOutputError(f"the remote manifest is at generation {theirs}, newer than this publication's "
                                    f"{generation}; another daemon owns the run now, nothing was written")

    def _delete(self, keys: tuple[str, ...]) -> list[str]:
        """After the commit: a failure only leaves garbage that the next publication removes. Idempotent: an
        object another publisher deleted already is not a failure."""
        if not keys:
            return []
        paths = [f"{self.base}/{k}" for k in keys]
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            self.log.warning("outputs.remote_cleanup_failed", objects=len(keys), action="retry next publication",
                             reason=_describe(exc))
            return []
        return list(keys)


def read_manifest_tagged(fs: Any, base: str, tries: int = 3) -> tuple[dict[str, Any] | None, str | None, bool]:
    """The remote manifest (None: none or unreadable), its ETag (None where the store has none) and whether one
    is there: what the conditional PUT of the next manifest is conditional on. The body and the ETag are of the
    same version (s3fs reads with If-Match the ETag it found; a change in between is read again)."""
    path = f"{base}/{MANIFEST}"
    for attempt in range(tries):
        fs.invalidate_cache(path)
        try:
            with fs.open(path, "rb") as fh:
                data = fh.read()
                details = getattr(fh, "details", None)
        except FileNotFoundError:
            return None, None, False
        except OSError as exc:
            if attempt + 1 < tries and _precondition_failed(exc, {"IfMatch": "?"}):
                continue  # replaced between the HEAD and the GET: read the new one
            raise
        etag = details.get("ETag") if isinstance(details, dict) else None
        try:
            value = json.loads(data)
        except ValueError:
            return None, etag, True
        return (value if isinstance(value, dict) else None), etag, True
    raise AssertionError("unreachable")


def _is_s3(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    return bool({"s3", "s3a"} & set((protocol,) if isinstance(protocol, str) else protocol))


def _errors(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (s3fs translates botocore's ClientError, keeping it as the cause)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return "", 0
    error = response.get("Error") or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
    return str(error.get("Code") or ""), int(status) if str(status).isdigit() else 0


def _precondition_failed(exc: BaseException, condition: Mapping[str, str]) -> bool:
    """Did the store refuse the PUT because the manifest is not the one planned against?"""
    for e in _errors(exc):
        code, status = _code(e)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            return True
    if "IfNoneMatch" in condition and isinstance(exc, FileExistsError):
        return True
    return "IfMatch" in condition and isinstance(exc, FileNotFoundError)  # deleted since: not ours to replace


def _unsupported(exc: BaseException) -> bool:
    """Did the store (or the client library) refuse the conditional header itself, as unsupported?"""
    for e in _errors(exc):
        if type(e).__name__ == "ParamValidationError" or isinstance(e, TypeError):
            return True  # a botocore too old for If-Match on PUT, or a filesystem without the keyword
        if isinstance(e, OSError) and e.errno == errno.ENOSYS:
            return True
        code, status = _code(e)
        if code == "NotImplemented" or status == 501:
            return True
        if code in ("InvalidArgument", "InvalidRequest") and re.search(r"(?i)match|condition", str(e)):
            return True
    return False


def _describe(exc: BaseException) -> str:
    """An exception for a log line or the status: its type and message, any user info in a URL removed."""
    return scrub(f"{type(exc).__name__}: {exc}")
