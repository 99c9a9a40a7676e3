"""The config of an object-store watch root (``root: s3://bucket/prefix``): checked offline, so ``ckptd check``
needs no network and no credentials; nothing is listed here.

Such a watch is seen through its mirror (``<state_dir>/mirror/<watch>``, :mod:`ckptd.remote.mirror`), which
becomes its ``root``; ``remote`` keeps the URL. Object stores have no inotify, so the watch polls (a listing
every ``poll_interval``); ``events: {sqs: QUEUE_URL}`` only makes a listing come sooner.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ckptd.daemon.config_checks import Problems, Section, check_str
from ckptd.remote.mirror import MIRROR_DIR
from ckptd.remote.urls import EXTRAS, is_remote, redact, scheme

if TYPE_CHECKING:
    from ckptd.daemon.config import Watch

REMOTE_KEYS = ("events",)  # watch keys that only an object-store root may have


def remote_watch(watch: Watch, url: str, data: Mapping[str, Any], where: str, problems: Problems) -> Watch:
    """``watch`` (parsed with a URL ``root``) as an object-store watch: ``remote`` keeps the URL, the mode is
    poll; :func:`mirrored_root` then sets ``root`` to the mirror. Problems are added, never raised."""
    parts = urlsplit(url)
    shown = redact(url)
    if parts.username or parts.password or parts.query:
        problems.add(f"{where}.root", f"must not carry credentials or a query string ({shown}); use "
                     "storage_options, the environment or a profile")
    if not parts.netloc:
        problems.add(f"{where}.root", f"names no bucket: {url!r}")
    if scheme(url) not in EXTRAS and not _fsspec_protocol(scheme(url) or ""):
        problems.add(f"{where}.root", f"{scheme(url)}:// is not an object store ckptd can list (s3://, gs://, or "
                     "another fsspec protocol)")
    if data.get("mode") == "events":
        problems.add(f"{where}.mode", "an object-store root has no filesystem events: it is listed every "
                     "poll_interval (mode: poll); for earlier listings add events: {sqs: QUEUE_URL}")
    ev = Section(data.get("events"), f"{where}.events", problems, ("sqs",))
    queue = ev.get("sqs", "", check_str, "an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)")
    if queue:
        if scheme(url) not in ("s3", "s3a"):
            problems.add(f"{where}.events.sqs", "SQS notifications are for s3:// roots")
        if scheme(queue) not in ("http", "https"):
            problems.add(f"{where}.events.sqs", f"expected the queue's https:// URL, not {redact(queue)!r}")
    return replace(watch, mode="poll", remote=url.rstrip("/"), sqs_queue=queue or "")


def _fsspec_protocol(name: str) -> bool:
    """Does fsspec know the protocol (looked up in its registry; no filesystem is created, nothing is listed)?"""
    if importlib.util.find_spec("fsspec") is None:
        return False
    from fsspec.registry import known_implementations, registry

    return name in known_implementations or name in registry


def mirrored_root(watch: Watch, state_dir: Path) -> Watch:
    """An object-store watch's ``root`` is its mirror, ``<state_dir>/mirror/<watch>`` (others unchanged)."""
    if not watch.remote:
        return watch
    return replace(watch, root=state_dir / MIRROR_DIR / watch.name)


def check_local_only(data: Mapping[str, Any], where: str, problems: Problems) -> None:
    """A local root cannot have the object-store keys (a typo'd URL would otherwise be silently local)."""
    for key in REMOTE_KEYS:
        if key in data:
            problems.add(f"{where}.{key}", "is only for an object-store root (root: s3://bucket/prefix)")


__all__ = ["REMOTE_KEYS", "check_local_only", "is_remote", "mirrored_root", "remote_watch"]
