"""Output path resolution that can never escape the configured output root. Pure except for realpath."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ckptd.errors import OutputPathError

_SAFE_NAME = re.compile(r"^[^\W_][\w.+=@-]*$")  # letters (any script), digits, ._+=@- ; no separators, no spaces


def safe_component(name: str) -> str:
    """A watch/run name usable as one path component (no separators, no '..', no leading dot)."""
    if not name or name in (".", "..") or not _SAFE_NAME.match(name):
        raise OutputPathError(f"run name {name!r} cannot be used in an output path (use letters, digits, ._+=@-)")
    return name


def resolve_output(template: str, watch: str, run: str) -> Path:
    """Fill ``{watch}``/``{run}`` and check the result stays inside the template's static root, after resolving
    symlinks (a symlinked run directory or output component cannot redirect writes)."""
    root = Path(template.split("{", 1)[0] or "/")
    out = Path(template.format(watch=safe_component(watch), run=safe_component(run)))
    real_root = Path(os.path.realpath(root))
    real_out = Path(os.path.realpath(out))
    if real_out != real_root and real_root not in real_out.parents:
        raise OutputPathError(f"output {out} resolves to {real_out}, outside the output root {real_root}")
    return out


def run_name(watch_root: Path, run_dir: Path) -> str:
    """The run's name: its path relative to the watch root ('.' runs are named after the root)."""
    rel = run_dir.relative_to(watch_root)
    return watch_root.name if str(rel) == "." else str(rel).replace(os.sep, "_")
