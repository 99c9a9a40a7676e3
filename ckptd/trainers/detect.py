"""``trainer: auto``: which trainer wrote a run, told from the names of the files present (and why).

:func:`detect` is pure (relative paths in, a trainer and a reason out); :func:`list_names` is the only I/O: a bounded
walk of the run directory. Detection is per run and may change while a run is young (an HF run has no
``checkpoint-N/`` before its first save): callers re-plan on each scan until a trainer is found.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path

from ckptd.trainers.presets import PRESETS, Preset

MAX_ENTRIES = 20000  # a run directory with more entries is judged on the first ones seen


def _matches(rel_paths: list[str], pattern: str) -> str | None:
    for rel in rel_paths:
        if fnmatch.fnmatchcase(rel, pattern) or ("/" not in pattern and fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1],
                                                                                           pattern)):
            return rel
    return None


def evidence_for(preset: Preset, rel_paths: list[str]) -> list[str] | None:
    """The paths that prove ``preset`` (one per glob of the first matching evidence group), or None."""
    for group in preset.evidence:
        hits = [_matches(rel_paths, pattern) for pattern in group]
        if all(hits):
            return [h for h in hits if h]
    return None


def detect(rel_paths: Iterable[str]) -> tuple[str, str]:
    """(trainer, why) for a run whose files have these relative POSIX paths."""
    paths = sorted(rel_paths)
    found: list[tuple[str, list[str]]] = []
    for name, preset in PRESETS.items():
        hits = evidence_for(preset, paths)
        if hits:
            found.append((name, hits))
    if not found:
        return "plain", "no trainer-specific files found → plain (every included file is a candidate)"
    name, hits = found[0]
    why = f"found {' and '.join(hits)} → {name}"
    if len(found) > 1:
        why += " (also looks like " + ", ".join(n for n, _ in found[1:]) + ")"
    return name, why


def list_names(run_dir: Path, max_depth: int) -> list[str]:
    """Relative POSIX paths under ``run_dir`` (files and folders), at most ``max_depth + 1`` levels deep, so that
    a checkpoint folder's own files (``checkpoint-N/trainer_state.json``) are seen."""
    out: list[str] = []

    def walk(directory: Path, prefix: str, depth: int) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if len(out) >= MAX_ENTRIES:
                return
            rel = prefix + entry.name
            out.append(rel)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir and depth < max_depth + 1:
                walk(Path(entry.path), rel + "/", depth + 1)

    walk(run_dir, "", 0)
    return out
