"""Which listed objects an object-store watch mirrors at all, and which of those are metadata (fetched whole).

Why: a watched prefix may hold far more than checkpoints (tokenized shards, logs, images, event files), and each
mirrored object costs a stub, each fetched one its bytes. Discovery only looks at run directories matched by
``runs`` (not hidden, not excluded), never descends into names ``exclude`` matches (temp names), and stops
``max_depth`` folders below a run; trainer detection looks one level deeper (``checkpoint-N/trainer_state.json``)
and a checkpoint folder is read as a whole, however deep its files (:mod:`ckptd.daemon.discovery`,
:func:`ckptd.trainers.detect.list_names`). Objects outside that are not mirrored. Of the rest only small metadata
(sidecars, ``trainer_state.json``, ``config.json``, DCP ``.metadata``, ``*.index.json``, commit markers) is
downloaded; every other object, however small, is a sparse stub read with ranged GETs.

The names below repeat constants of :mod:`ckptd.formats` and :mod:`ckptd.daemon.discovery`, which import the
mirror (a test keeps them in step).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from ckptd.atomic import TEMP_PREFIX

COMMIT_MARKER = "commit_success"  # discovery.COMMIT_MARKER: commit_success or commit_success.txt
DCP_METADATA = ".metadata"  # hidden (``.*`` is a default exclude) but DCP's commit record: always kept
FOLDER_FILES = ("trainer_state.json", "model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
                "adapter_model.bin")  # discovery.checkpoint_folder_kind: HF_TRAINER_STATE, HF_MODEL/ADAPTER_FILES
METADATA_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".toml")  # read whole, as text, by metric sources etc.


def is_metadata(name: str) -> bool:
    """A file the daemon reads whole (never a checkpoint): worth a local copy when small."""
    return name == DCP_METADATA or name.startswith(COMMIT_MARKER) or name.endswith(METADATA_SUFFIXES)


def marks_folder(name: str) -> bool:
    """Does a file of this name make its folder a checkpoint folder (read as a whole)?"""
    return name == DCP_METADATA or name.endswith(".index.json") or name in FOLDER_FILES


class WatchScope:
    """The part of a watch's prefix the daemon may read, from the watch's ``runs``, ``exclude`` and ``max_depth``
    (a watch without ``runs``, such as a test's bare namespace, is judged by names alone)."""

    def __init__(self, watch: Any) -> None:
        runs = getattr(watch, "runs", None)
        self.exclude: tuple[str, ...] = tuple(getattr(watch, "exclude", ()) or ())
        depth = getattr(watch, "max_depth", None)
        self.max_depth: int | None = depth if isinstance(depth, int) else None
        parts = None if runs is None else [p for p in str(runs).split("/") if p not in ("", ".")]
        # '**' matches any number of folders: where a run starts is then not known from the key alone
        self.run_parts: list[str] | None = None if parts is None or any("**" in p for p in parts) else parts

    def excluded(self, name: str) -> bool:
        return name.startswith(TEMP_PREFIX) or any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    def select(self, keys: Iterable[str]) -> set[str]:
        """The keys (relative to the watched prefix) the watch may read."""
        keys = list(keys)
        folders = {key.rsplit("/", 1)[0] for key in keys if "/" in key and marks_folder(key.rsplit("/", 1)[1])}
        return {key for key in keys if self._wanted(key, folders)}

    def _wanted(self, key: str, folders: set[str]) -> bool:
        parts = key.split("/")
        if self.run_parts is None:
            return self._names_ok(parts[:-1], parts[-1])
        n = len(self.run_parts)
        if len(parts) <= n:
            return False  # beside the run directories, not in one: discovery never reads it
        if not all(fnmatch.fnmatchcase(part, pat) for part, pat in zip(parts, self.run_parts)):
            return False
        if n and (parts[n - 1].startswith(".") or self.excluded(parts[n - 1])):
            return False  # not a run (discovery.list_runs)
        dirs, name = parts[n:-1], parts[-1]
        if not self._names_ok(dirs, name):
            return False
        if self.max_depth is None or len(dirs) <= self.max_depth + 1:
            return True
        # deeper: only inside a checkpoint folder that discovery reaches (read as a whole, sub-folders included)
        return any("/".join(parts[:n + i + 1]) in folders for i in range(self.max_depth + 1))

    def _names_ok(self, dirs: list[str], name: str) -> bool:
        if any(self.excluded(d) for d in dirs):
            return False  # discovery never descends into an excluded folder
        return name == DCP_METADATA or not self.excluded(name)
