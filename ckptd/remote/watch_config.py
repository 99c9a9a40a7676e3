"""The config of an object-store watch root (``root: s3://bucket/prefix``): checked offline, so ``ckptd check``
needs no network and no credentials; nothing is listed here.

Such a watch is seen through its mirror (``<state_dir>/mirror/<watch>``, :mod:`ckptd.remote.mirror`), which
becomes its ``root``; ``remote`` keeps the URL. Object stores have no inotify, so the watch polls (a listing
every ``poll_interval``); ``events: {sqs: QUEUE_URL}`` only makes a listing come sooner.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ckptd.daemon.config_checks import Problems, Section, check_str
from ckptd.remote.mirror import MIRROR_DIR
from ckptd.remote.urls import EXTRAS, has_userinfo, is_remote, overlap, redact, scheme, static_prefix

if TYPE_CHECKING:
    from ckptd.daemon.config import Watch

REMOTE_KEYS = ("events",)  # watch keys that only an object-store root may have


def remote_watch(watch: Watch, url: str, data: Mapping[str, Any], where: str, problems: Problems) -> Watch:
    """``watch`` (parsed with a URL ``root``) as an object-store watch: ``remote`` keeps the URL, the mode is
    poll; :func:`mirrored_root` then sets ``root`` to the mirror. Problems are added, never raised."""
    if not check_url(url, f"{where}.root", problems):
        return replace(watch, mode="poll", remote=redact(url).rstrip("/"))
    parts = urlsplit(url)
    if parts.query:
        problems.add(f"{where}.root", f"must not carry a query string ({redact(url)}); use storage_options")
    if not parts.netloc:
        problems.add(f"{where}.root", f"names no bucket: {redact(url)!r}")
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


def check_url(url: str, key: str, problems: Problems) -> bool:
    """An object-store URL (a root or an output) must not carry user info: it would reach logs, the status and the
    ledger. The value is never echoed (a secret with a '/' would not even be cut off by redaction). False when the
    URL is refused."""
    if has_userinfo(url):
        problems.add(key, "carries user info (credentials) in the URL; put credentials in the environment, a "
                     "profile or storage_options")
        return False
    return True


def check_outputs(watches: Sequence[Watch], problems: Problems) -> None:
    """Outputs the daemon would read back or that two watches would share (checked once every watch is parsed):

    - an object-store output whose static prefix overlaps an object-store root (the same bucket, one prefix a
      string prefix of the other: keys are strings) is ingested as checkpoints, unless the watch says
      ``allow_output_in_root: true`` (the daemon then skips runs under its outputs, :func:`output_prefixes`);
    - two watches whose output templates can resolve to the same place (``{watch}`` filled in, one static part a
      prefix of the other, as when neither has ``{watch}``): their publications would replace each other's
      manifest and delete each other's objects (local outputs: each other's generations and member copies)."""
    prefixes = [(i, w, _output_prefix(w)) for i, w in enumerate(watches)]
    for i, w, prefix in prefixes:
        if not w.remote_output or w.allow_output_in_root:
            continue
        for j, other in enumerate(watches):
            if other.remote and overlap(prefix, static_prefix(other.remote.rstrip("/") + "/")):
                whose = "its object-store root" if i == j else f"the object-store root of watches[{j}]"
                problems.add(f"watches[{i}].output", f"overlaps {whose} ({redact(other.remote)}): the daemon would "
                             "read its own outputs as checkpoints; set allow_output_in_root: true if meant (runs "
                             "under the output are then skipped)")
    for n, (i, w, prefix) in enumerate(prefixes):
        for j, other, theirs in prefixes[n + 1:]:
            if prefix and theirs and bool(w.remote_output) == bool(other.remote_output) and overlap(prefix, theirs):
                problems.add(f"watches[{j}].output", f"can resolve to the same outputs as watches[{i}] ({w.name}): "
                             "their publications would replace each other's; put {watch} in the template or use "
                             "another prefix")


def check_retain_grace(watch: Watch, data: Mapping[str, Any], where: str, problems: Problems) -> None:
    """``retain_grace`` is how long superseded objects stay for slow readers: only object-store outputs have it."""
    if "retain_grace" in data and not is_remote(watch.remote_output or watch.output):
        problems.add(f"{where}.retain_grace", "is only for an object-store output (output: s3://bucket/prefix)")
    if watch.retain_grace < 0:
        problems.add(f"{where}.retain_grace", "must not be negative")


def output_prefixes(watches: Sequence[Watch]) -> tuple[str, ...]:
    """The static prefixes of every object-store output: a run of an object-store watch whose URL is
    :func:`ckptd.remote.urls.under` one of them is the daemon's own output (``allow_output_in_root``), never a
    run."""
    return tuple(sorted({_output_prefix(w) for w in watches if w.remote_output}))


def output_mirror_dir(watch: Watch) -> Path | None:
    """Where an object-store output inside the watch's own object-store root appears in its mirror (for
    ``scan_run``'s ``skip``, as a local output root is): None when it is not inside the root, or when its static
    part ends inside a name (``out-{run}``: such runs are skipped whole by :func:`output_prefixes`)."""
    if not (watch.remote and watch.remote_output):
        return None
    root, prefix = static_prefix(watch.remote.rstrip("/") + "/"), _output_prefix(watch)
    rel = prefix[len(root):] if prefix.startswith(root) else ""
    whole = "{" not in watch.remote_output.replace("{watch}", "")  # a complete URL (runs: ".")
    if not rel.strip("/") or not (whole or rel.endswith("/")):
        return None
    return watch.root / rel.strip("/")


def _output_prefix(watch: Watch) -> str:
    """The static part of the watch's output template (the URL one for an object-store output)."""
    template = watch.remote_output or watch.output
    return static_prefix(template, watch.name) if template else ""


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


__all__ = ["REMOTE_KEYS", "check_local_only", "check_outputs", "check_retain_grace", "check_url", "is_remote",
           "mirrored_root", "output_mirror_dir", "output_prefixes", "remote_watch"]
