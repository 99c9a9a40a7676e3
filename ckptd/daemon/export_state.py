"""Export state: the ledger's ``exports`` table is the store; the manifest's ``coreml`` block is a view of it.

Why: the block used to be read back from ``manifest.json`` to build the next one, which made a published file
the only store of the export history (a lost or hand-edited manifest changed what the daemon believed). Now every
export attempt is a ledger row, and :func:`coreml_block` derives the block from the newest result plus the newest
published row, so the run's worker and the export thread can both rewrite the manifest at any time and agree.

A package a queue worker published to an object-store output (``ckptd.queue.remote``) has no local link: its row's
``path`` is the URL of its versioned prefix (``s3://…/coreml/<version>``), and the block names that URL as its
``path`` (``coreml/<version>`` as its ``version``); the remote publication turns it into the key relative to the
run's base (``ckptd.remote.object_outputs``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptd.daemon.config import Policy
from ckptd.daemon.evaluation_store import GateState
from ckptd.daemon.ledger import ExportRow, Ledger, MemberRow
from ckptd.export.runner import VERSIONS_DIR
from ckptd.remote.urls import is_remote

PACKAGE_LINK = "best.mlpackage"


def average_signature(members: Sequence[MemberRow]) -> str:
    """Identity of an average: the sha256 over its members' content hashes."""
    return hashlib.sha256("".join(sorted(m.record.sha256 for m in members)).encode()).hexdigest()


def export_target(policy: Policy, members: Sequence[MemberRow], gate: GateState | None = None) -> str | None:
    """The identity (sha256) the published export should have now, or None when there is nothing to export.
    ``gate``: the evaluation gate's state, which decides an evaluated average and the 'winner' source."""
    if not members:
        return None
    if policy.coreml.source == "best":
        return members[0].record.sha256
    if policy.coreml.source == "winner":
        from ckptd.daemon.gate import winner_target

        return winner_target(gate, members) if gate is not None else None
    if len(members) < policy.average.min_members:
        return None
    if policy.average.evaluated:
        return average_signature(gate.members) if gate is not None and gate.members else None
    return average_signature(members)


def published_sha256(ledger: Ledger, watch: str, run: str, *, stream: str = "model") -> str | None:
    """What ``best.mlpackage`` holds according to the ledger (None: nothing published yet)."""
    row = ledger.last_ok_export(watch, run, stream=stream)
    return row.sha256 if row else None


def coreml_block(ledger: Ledger, watch: str, run: str, output: Path, *, stream: str = "model"
                 ) -> dict[str, Any] | None:
    """The manifest's ``coreml`` block (DESIGN.md §3), from the ledger; None when this run never exported."""
    latest = ledger.latest_export(watch, run, stream=stream)
    if latest is None:
        return None
    block = _describe(latest, output)
    if latest.status in ("ok", "partial"):
        block["path"] = package_path(latest)
        return block
    ok = ledger.last_ok_export(watch, run, stream=stream)
    last_ok = None if ok is None else {k: v for k, v in _describe(ok, output).items()
                                       if k in ("source", "sha256", "metric", "step", "version", "exported_at")}
    block.update({"status": "failed", "reason": latest.reason, "last_ok": last_ok,
                  "path": package_path(ok) if ok is not None else None})
    return block


def package_path(row: ExportRow) -> str:
    """Where readers find a published row's package: ``best.mlpackage`` (the link in the output), or the URL of
    its prefix in the object store (no links there)."""
    return row.path if row.path and is_remote(row.path) else PACKAGE_LINK


def _describe(row: ExportRow, output: Path) -> dict[str, Any]:
    finished = row.finished_at if row.finished_at is not None else row.started_at
    block: dict[str, Any] = {
        "status": row.status, "source": row.source, "sha256": row.sha256, "metric": row.metric, "step": row.step,
        "capture": row.capture or "", "verification": _verification(row.verification),
        "seconds": round(max(0.0, finished - row.started_at), 2),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
    }
    if row.path and is_remote(row.path):
        block["version"] = f"{VERSIONS_DIR}/{row.path.rstrip('/').rsplit('/', 1)[-1]}"
    elif row.path:
        block["version"] = os.path.relpath(row.path, output)
    return block


def _verification(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
