"""Scanning: which run directories a watch has, and which checkpoint candidates each run holds.

The scan is the source of truth (events only make it happen sooner). Checkpoint folders (Hugging Face Trainer
``checkpoint-N/`` and sharded ``*.index.json`` folders, DCP ``.metadata``) are candidates as a whole and not
descended into. With a trainer plan (``ckptd.trainers``) each name is judged by the trainer's preset: a
candidate feeding one or more weight streams, a resume state (recorded, never ranked), or ignored.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ckptd.atomic import TEMP_PREFIX
from ckptd.daemon.config import Watch
from ckptd.file_checks import refusal
from ckptd.formats import HF_ADAPTER_FILES, HF_MODEL_FILES
from ckptd.remote.mirror import is_mirrored
from ckptd.remote.watch_config import output_mirror_dir
from ckptd.trainers import RunPlan

HF_TRAINER_STATE = "trainer_state.json"
COMMIT_MARKER = "commit_success"  # Orbax-style: commit_success or commit_success.txt, written last


@dataclass(frozen=True)
class Observation:
    """What a scan saw of one candidate. For folders, size is the sum and mtime the newest of their files."""

    path: Path
    size: int
    mtime_ns: int
    is_dir: bool = False
    commit_ok: bool = True  # folder formats: is the commit marker (.metadata / index) at least as new as the data?
    streams: tuple[str, ...] = ("model",)  # the weight streams this candidate feeds (from the trainer plan)
    resume: str = ""  # a resume state (why): recorded, never loaded or ranked
    refused: str = ""  # why it must not be opened at all (a FIFO or device named like a checkpoint)

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
    if any(n.endswith(".index.json") for n in names) or HF_TRAINER_STATE in names \
            or any(n in names for n in (*HF_MODEL_FILES, *HF_ADAPTER_FILES)):
        return "hf"
    return None


def observe_folder(path: Path, kind: str) -> Observation | None:
    """A folder checkpoint as one candidate. DCP: ``.metadata`` must be newer than every shard (a reused folder
    keeps an old one while new shards are written). HF Trainer ``checkpoint-N``: ``trainer_state.json`` is written
    last, so the folder is complete only once it exists (then the settle window applies). An Orbax-style
    ``commit_success`` marker, where the writer leaves one, is the commit: complete once it is newer than the rest.
    In an object-store mirror, mtimes are whole seconds (plus an ETag hash), so "newer" compares seconds there."""
    size, newest, marker_mtime, data_newest, commit_mtime = 0, 0, 0, 0, 0
    has_state = False
    try:
        for entry in os.scandir(path):
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
            if entry.name.startswith(COMMIT_MARKER):
                commit_mtime = max(commit_mtime, st.st_mtime_ns)
                continue
            data_newest = max(data_newest, st.st_mtime_ns)
            if (kind == "dcp" and entry.name == ".metadata") or (kind == "hf" and entry.name.endswith(".index.json")):
                marker_mtime = max(marker_mtime, st.st_mtime_ns)
            has_state = has_state or entry.name == HF_TRAINER_STATE
    except OSError:
        return None
    if is_mirrored(path):  # whole seconds: a marker written in the same second as the data counts as newer
        marker_mtime, data_newest, commit_mtime = (t // 1_000_000_000 for t in (marker_mtime, data_newest,
                                                                                 commit_mtime))
    if commit_mtime:
        commit_ok = commit_mtime >= data_newest
    else:
        commit_ok = marker_mtime >= data_newest if kind == "dcp" \
            else has_state or not path.name.startswith("checkpoint-")
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


def scan_run(run_dir: Path, watch: Watch, plan: RunPlan | None = None) -> list[Observation]:
    """Candidates under one run directory, oldest first. With a ``plan``, names are judged by the trainer preset
    (candidates carry the streams they feed; resume states come back with ``resume`` set); without one, files
    matching ``include`` and checkpoint folders are candidates of the ``model`` stream.
    The watch's own output root is never descended into (outputs inside a root need allow_output_in_root)."""
    skip = (output_mirror_dir(watch) if watch.remote else None) or (Path(watch.output_root) if watch.output else None)
    found: list[Observation] = []
    if plan is None:
        for rel, is_dir in _walk(run_dir, watch.max_depth, skip, None, watch.exclude):
            path = run_dir / rel
            if is_dir or any(fnmatch.fnmatch(path.name, pat) for pat in watch.include):
                if not _excluded(path.name, watch.exclude):
                    _add(found, path, is_dir)
    else:
        for rel, is_dir in walk_run(plan, run_dir, watch.max_depth, skip):
            verdict = plan.classify(rel, is_dir)
            if verdict.kind == "candidate":
                _add(found, run_dir / rel, is_dir, streams=verdict.streams)
            elif verdict.kind == "resume":
                _add(found, run_dir / rel, is_dir, resume=verdict.reason)
    return sorted(found, key=lambda o: (o.mtime_ns, str(o.path)))


def _add(found: list[Observation], path: Path, is_dir: bool, **kw: object) -> None:
    try:
        if is_dir:
            kind = checkpoint_folder_kind(path)
            obs = observe_folder(path, kind) if kind else None
        else:
            st = os.stat(path)  # follows a symlinked file; discovery never writes through it
            obs = Observation(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block a read or never end it
                kw = {**kw, "refused": refusal(path, path.parent) or "is not a regular file; not read"}
    except OSError:
        return  # vanished mid-scan: the trainer deleted it
    if obs is not None:
        found.append(Observation(obs.path, obs.size, obs.mtime_ns, obs.is_dir, obs.commit_ok, **kw))  # type: ignore[arg-type]


def walk_run(plan: RunPlan, run_dir: Path, max_depth: int, skip: Path | None = None) -> list[tuple[str, bool]]:
    """(relative path, is_dir) of every entry a scan judges: checkpoint folders as a whole (not descended into),
    other folders descended up to ``max_depth``, names the preset excludes or ignores not descended into."""
    return _walk(run_dir, max_depth, skip, plan, ())


def _walk(run_dir: Path, max_depth: int, skip: Path | None, plan: RunPlan | None,
          exclude: tuple[str, ...]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    skip_real = os.path.realpath(skip) if skip is not None else None

    def walk(directory: Path, prefix: str, depth: int) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if not is_dir:
                out.append((rel, False))
                continue
            path = Path(entry.path)
            if skip_real is not None and os.path.realpath(path) == skip_real:
                continue
            if plan is None:
                if _excluded(entry.name, exclude):
                    continue
                if checkpoint_folder_kind(path):
                    out.append((rel, True))
                elif depth < max_depth:
                    walk(path, rel + "/", depth + 1)
                continue
            specific = any(s.feeds(entry.name) and s.files != ("*",) for s in plan.streams)
            if plan.by_name(entry.name) is not None or entry.name.startswith(TEMP_PREFIX):
                out.append((rel, True))  # a temp, derived or resume folder: judged by its name
            elif specific or checkpoint_folder_kind(path):
                out.append((rel, True))
            elif depth < max_depth:
                walk(path, rel + "/", depth + 1)

    walk(run_dir, "", 0)
    return out
