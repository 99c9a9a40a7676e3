"""How ``ckptd check`` and ``ckptd status`` name what an object-store watch reads and writes: its URL (without
credentials), never this daemon's mirror or staging folder, which only mean something on this host.

Light on purpose (no fsspec, no torch): the views that use it must answer fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ckptd.remote.urls import join, redact


def shown_root(watch: Any) -> str:
    """The watch's root: ``s3://bucket/prefix`` for an object-store root, else the directory."""
    remote = getattr(watch, "remote", "")
    return redact(remote) if remote else str(watch.root)


def shown_path(watch: Any, path: str | Path) -> str:
    """``path`` (a run directory or file under the watch's root) as the operator knows it: the object URL for a
    path in an object-store watch's mirror, anything else unchanged."""
    remote = getattr(watch, "remote", "")
    text = str(path)
    root = str(watch.root)
    if not remote:
        return text
    if text == root:
        return redact(remote)
    if text.startswith(root + os.sep):
        return join(redact(remote), os.path.relpath(text, root).replace(os.sep, "/"))
    return text


def shown_output(watch: Any, run: str, staged: str | Path) -> str:
    """The run's output: the object-store URL for a remote output (``staged`` is then this host's staging
    folder), else ``staged``."""
    remote = getattr(watch, "remote_output", "")
    return redact(remote.format(watch=watch.name, run=run)) if remote else str(staged)


def shown_output_template(watch: Any) -> str:
    """The watch's output template as configured (a remote one without credentials)."""
    remote = getattr(watch, "remote_output", "")
    return redact(remote) if remote else str(watch.output)
