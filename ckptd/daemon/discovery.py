"""Scanning: which run directories a watch has, and which checkpoint candidates each run holds.

The scan is the source of truth (events only make it happen sooner). Checkpoint folders (Hugging Face sharded
``*.index.json``, DCP ``.metadata``) are candidates as a whole and not descended into.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from ckptd.atomic import TEMP_PREFIX
from ckptd.daemon.config import Watch


@dataclass(frozen=True)
class Observation:
    """What a scan saw of one candidate. For folders, size is the sum and mtime the newest of their files."""

    path: Path
    size: int
    mtime_ns: int
    is_dir: bool = False
    commit_ok: bool = True  # folder formats: is the commit marker (.metadata / index) at least as new as the data?

    @property
    def signature(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


def list_runs(watch: Watch) -> list[Path]:
    """Run directories of a watch (``runs: "."`` = the root itself)."""
    if watch.runs in (".", ""):
        return [watch.root] if watch.root.is_dir() else []
    try:
        return sorted(p for p in watch.root.glob(watch.runs)
                      if p.is_dir() and not p.name.startswith(".") and not _excluded(p.name, watch.exclude))
    except OSError:
        return []


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return name.startswith(TEMP_PREFIX) or any(fnmatch.fnmatch(name, pat) for pat in patterns)


def checkpoint_folder_kind(path: Path) -> str | None:
    try:
        names = os.listdir(path)
    except OSError:
        return None
    if ".metadata" in names:
        return "dcp"
    if any(n.endswith(".index.json") for n in names):
        return "hf"
    return None


def observe_folder(path: Path, kind: str) -> Observation | None:
    size, newest, marker_mtime = 0, 0, 0
    try:
        for entry in os.scandir(path):
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
            if (kind == "dcp" and entry.name == ".metadata") or (kind == "hf" and entry.name.endswith(".index.json")):
                marker_mtime = max(marker_mtime, st.st_mtime_ns)
    except OSError:
        return None
    # DCP writes .metadata last; a reused folder keeps an old .metadata while new shards are written
    commit_ok = kind != "dcp" or marker_mtime >= newest
    return Observation(path=path, size=size, mtime_ns=newest, is_dir=True, commit_ok=commit_ok)


def observe(path: Path, is_dir: bool) -> Observation | None:
    """Observe one known candidate again (None when it vanished): the same view a scan gives."""
    try:
        if is_dir:
            kind = checkpoint_folder_kind(path)
            return observe_folder(path, kind) if kind else None
        st = os.stat(path)
        return Observation(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)
    except OSError:
        return None


def scan_run(run_dir: Path, watch: Watch) -> list[Observation]:
    """Candidates under one run directory (files matching include, checkpoint folders), up to max_depth.
    The watch's own output root is never descended into (outputs inside a root need allow_output_in_root)."""
    found: list[Observation] = []
    out_root = os.path.realpath(watch.output_root) if watch.output else None

    def walk(directory: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            if _excluded(entry.name, watch.exclude):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if out_root is not None and os.path.realpath(path) == out_root:
                        continue
                    kind = checkpoint_folder_kind(path)
                    if kind is not None:
                        obs = observe_folder(path, kind)
                        if obs is not None:
                            found.append(obs)
                    elif depth < watch.max_depth:
                        walk(path, depth + 1)
                elif entry.is_file(follow_symlinks=True) and any(fnmatch.fnmatch(entry.name, pat)
                                                                 for pat in watch.include):
                    st = entry.stat()
                    found.append(Observation(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns))
            except OSError:
                continue  # vanished mid-scan: the trainer deleted it

    walk(run_dir, 0)
    return sorted(found, key=lambda o: (o.mtime_ns, str(o.path)))
