"""Queued exports of runs with an object-store output: the input and the package travel through the store.

Why: a worker on another host cannot see the daemon's local staging (``<state_dir>/staging/...``). So the daemon
uploads the export's input under the run's remote base (``exports/inputs/q<id>-<sha12>.safetensors``) before it
defers the job; the worker downloads it into a private scratch directory of its own ``state_dir``, exports, and
uploads the package under its versioned prefix (``coreml/<version>/``, named by the export id) before the
conditioned ledger commit whose ``path`` is that prefix's URL. No symlink anywhere: the daemon's next publication
names the prefix in the remote manifest (:mod:`ckptd.remote.object_outputs`).

Exactly once: the prefix is a function of the export id and the attempt (so a worker taken for dead but still
running never writes into the prefix its retry committed); only the attempt that commits makes its prefix the
run's, and it deletes the prefixes other attempts of the export left; an attempt whose commit is refused because
a newer request exists deletes its own. Inputs are deleted once their job is final: by the
worker after its commit (or when it drops a superseded job), by the daemon when it sees the row final, and by the
daemon's sweep of ``exports/inputs/`` at each request (:func:`sweep_inputs`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd.daemon.leases import pid_alive
from ckptd.daemon.remote_publish import remote_base
from ckptd.queue import store
from ckptd.queue.app import QueueError
from ckptd.queue.payload import REMOTE_INPUTS, Payload
from ckptd.remote.object_outputs import COREML, RemoteOutputError
from ckptd.remote.urls import filesystem, join, redact

if TYPE_CHECKING:
    from ckptd.daemon.config import Config, Watch
    from ckptd.daemon.ledger import Ledger

_INPUT_ID = re.compile(r"^q(\d+)-")
SCRATCH = "worker-scratch"  # under the worker's state_dir: one folder per worker process


@dataclass(frozen=True)
class RemoteRun:
    """One run stream's remote base: the fsspec filesystem, the base path in it, the base URL."""

    fs: Any
    base: str  # bucket/prefix (no scheme): what fsspec calls take
    url: str  # s3://bucket/prefix: what the ledger and the logs name (redacted)

    @classmethod
    def for_watch(cls, watch: Watch, run: str, stream: str) -> RemoteRun:
        url = remote_base(watch.remote_output, watch.name, run, stream)
        fs, path = filesystem(url, watch.storage_options)
        return cls(fs, path, redact(url))

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}"

    # --- inputs ---------------------------------------------------------------------------------------------
    def put(self, local: Path, key: str) -> None:
        self.fs.put_file(os.fspath(local), self._path(key))

    def get(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._path(key), os.fspath(local))

    def delete(self, key: str) -> bool:
        """Remove one object; missing is fine (someone else finished the clean-up). True if it was there."""
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            return False
        return True

    def keys(self, prefix: str) -> dict[str, int]:
        """Keys (relative to the base) and sizes under ``prefix``: a fresh listing (fsspec caches them)."""
        root = self._path(prefix)
        self.fs.invalidate_cache(root)
        try:
            found = self.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(self.base) + 1:]: int(i.get("size") or 0) for p, i in found.items()
                if i.get("type", "file") == "file"}

    # --- packages -------------------------------------------------------------------------------------------
    def package_url(self, version: str) -> str:
        return join(self.url, COREML, version)

    def upload_package(self, version: str, package: Path) -> str:
        """Upload the package directory under ``coreml/<version>/`` and return the prefix's URL. The prefix is
        emptied first (a killed attempt of the same export may have left part of it) and listed afterwards: it
        holds exactly this package's files, or this raises."""
        prefix = f"{COREML}/{version}"
        self.delete_package(version)
        want: dict[str, int] = {}
        for path in sorted(p for p in package.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(package).as_posix()}"
            self.fs.put_file(os.fspath(path), self._path(key))
            want[key] = path.stat().st_size
        found = self.keys(prefix)
        if found != want:
            raise RemoteOutputError(f"the package uploaded to {self.package_url(version)} is not what was sent "
                                    f"({len(found)} objects found, {len(want)} sent): another writer under the "
                                    "same prefix?")
        return self.package_url(version)

    def delete_packages_of(self, export_id: int, keep: str | None = None) -> None:
        """Delete every attempt's prefix of this export (but ``keep``): none of them will ever be named."""
        from ckptd.queue.payload import version_prefix

        start = f"{COREML}/{version_prefix(export_id)}"
        versions = {k[len(COREML) + 1:].split("/", 1)[0] for k in self.keys(COREML) if k.startswith(start)}
        for version in sorted(versions - {keep}):
            self.delete_package(version)

    def delete_package(self, version: str) -> None:
        keys = self.keys(f"{COREML}/{version}")
        if keys:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm([self._path(k) for k in sorted(keys)])


def for_payload(config: Config, p: Payload) -> RemoteRun:
    """The worker's view of the job's remote base: its own config's watch of that name (storage options,
    credentials and the output template never travel in a job). Raises QueueError when its config disagrees."""
    watch = next((w for w in config.watches if w.name == p.watch), None)
    if watch is None or not watch.remote_output:
        raise QueueError(f"the job is for watch {p.watch!r} with an object-store output, but this worker's config "
                         "has no such watch: run `ckptd worker` with the daemons' config")
    target = RemoteRun.for_watch(watch, p.run, p.stream)
    if p.remote_base and target.url != p.remote_base:
        raise QueueError(f"the job's remote output is {p.remote_base} but this worker's config says {target.url}: "
                         "run `ckptd worker` with the daemons' config")
    return target


# --- the worker's scratch -------------------------------------------------------------------------------------------
def scratch_root(state_dir: Path) -> Path:
    """This worker process's scratch folder; those of dead worker processes on this host are removed."""
    root = state_dir / SCRATCH
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and not pid_alive(int(entry.name)):
            shutil.rmtree(entry, ignore_errors=True)
    mine = root / str(os.getpid())
    mine.mkdir(exist_ok=True)
    return mine


def attempt_dir(root: Path, export_id: int, attempt: int) -> Path:
    """A fresh folder for one attempt (input download, package build); earlier attempts' are removed."""
    for old in root.glob(f"q{export_id}-a*"):
        shutil.rmtree(old, ignore_errors=True)
    path = root / f"q{export_id}-a{attempt}"
    path.mkdir(parents=True)
    return path




# --- the daemon's sweep --------------------------------------------------------------------------------------------
def sweep_inputs(target: RemoteRun, ledger: Ledger, live: Iterable[int]) -> list[str]:
    """Delete the uploaded inputs under ``exports/inputs/`` whose export is over: its row is gone or final
    (published, superseded, failed for good) and no job of it waits or runs (``live``: those export ids).
    A row still ``queued`` is kept (its job may be being deferred right now)."""
    keys = target.keys(REMOTE_INPUTS)
    by_id: dict[int, list[str]] = {}
    for key in keys:
        m = _INPUT_ID.match(key.rsplit("/", 1)[-1])
        if m:
            by_id.setdefault(int(m.group(1)), []).append(key)
    if not by_id:
        return []
    rows = store.states(ledger, by_id)
    keep = set(live)
    removed: list[str] = []
    for export_id, found in sorted(by_id.items()):
        row = rows.get(export_id)
        if export_id in keep or (row is not None and row.status in ("queued", "running")):
            continue
        for key in found:
            if target.delete(key):
                removed.append(key)
    return removed
