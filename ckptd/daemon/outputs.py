"""Per-run outputs: pinned member copies, ``average.safetensors``, ``best.safetensors``, ``manifest.json``.

Every file is published atomically (temp in the same directory, fsync, rename, fsync the directory). The
manifest is a pure function of the member set, so it can always be regenerated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptd import __version__
from ckptd.atomic import atomic_write_text
from ckptd.averaging import average_checkpoints
from ckptd.daemon.config import Policy
from ckptd.daemon.ledger import CheckpointRow, MemberRow
from ckptd.safetensors_io import open_safetensors
from ckptd.weights import cast_floating, provenance_metadata, write_weights

MANIFEST = "manifest.json"
AVERAGE = "average.safetensors"
BEST = "best.safetensors"
MEMBERS_DIR = "members"


def torch_dtype(name: str) -> torch.dtype | None:
    return None if name == "keep" else getattr(torch, name)


def member_path(output: Path, source: str, sha256: str) -> Path:
    stem = Path(source).name
    for suffix in (".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return output / MEMBERS_DIR / f"{stem}-{sha256[:12]}.safetensors"


def write_member(path: Path, weights: Mapping[str, torch.Tensor], *, source: str, sha256: str,
                 metric: float | None, step: int | None, layout: str) -> None:
    """A pinned copy in the checkpoint's own dtype: the average must not depend on the trainer keeping its file."""
    md = provenance_metadata(source, sha256=sha256, metric=metric, step=step,
                             extra={"layout": layout, "role": "member"})
    write_weights(path, weights, metadata=md)


def publish_best(output: Path, weights: Mapping[str, torch.Tensor], policy: Policy, *, source: str, sha256: str,
                 metric: float | None, step: int | None) -> None:
    md = provenance_metadata(source, sha256=sha256, metric=metric, step=step, extra={"role": "best"})
    cast = cast_floating(weights, torch_dtype(policy.model_only.dtype))
    for fmt in policy.model_only.formats:
        write_weights(output / ("best.safetensors" if fmt == "safetensors" else "best.pt"), cast, metadata=md, fmt=fmt)


def publish_best_from_member(output: Path, member: MemberRow, policy: Policy) -> None:
    r = member.record
    publish_best(output, open_safetensors(member.file).tensors, policy, source=r.path, sha256=r.sha256,
                 metric=r.metric, step=r.step)


def publish_average(output: Path, members: Sequence[MemberRow], policy: Policy) -> Path:
    """Fresh streamed mean of the member copies (best first, so integer buffers come from the best)."""
    md = provenance_metadata(extra={
        "role": "average", "k": len(members),
        "members": json.dumps([{"source": m.record.path, "sha256": m.record.sha256, "metric": m.record.metric,
                                "step": m.record.step} for m in members]),
    })
    return average_checkpoints([m.file for m in members], output / AVERAGE, reference=0,
                               dtype=torch_dtype(policy.average.dtype), metadata=md).output


def build_manifest(watch: str, run: str, output: Path, policy: Policy, members: Sequence[MemberRow],
                   last: CheckpointRow | None, coreml: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest (DESIGN.md §3) for the given ranked member set; paths relative to ``output``."""
    def entry(m: MemberRow) -> dict[str, Any]:
        return {"source": m.record.path, "sha256": m.record.sha256, "metric": m.record.metric,
                "step": m.record.step, "path": str(Path(m.file).relative_to(output))}

    manifest: dict[str, Any] = {
        "watch": watch, "run": run, "updated_at": "", "ckptd_version": __version__,
        "metric": {"mode": policy.metric.mode, "sources": [s.describe() for s in policy.metric.sources]},
        "best": None,
        "average": None,
    }
    if members:
        best = entry(members[0])
        best["member_path"] = best.pop("path")
        best["path"] = BEST if "safetensors" in policy.model_only.formats else "best.pt"
        manifest["best"] = best
        if len(members) >= policy.average.min_members:
            manifest["average"] = {"k": len(members), "top_k": policy.average.top_k, "path": AVERAGE,
                                   "members": [entry(m) for m in members]}
        else:
            manifest["average"] = {"k": len(members), "top_k": policy.average.top_k, "path": None,
                                   "waiting_for": policy.average.min_members,
                                   "members": [entry(m) for m in members]}
    if last is not None:
        manifest["last"] = {"source": last.path, "step": last.step, "metric": last.metric, "status": last.status}
    if coreml is not None:
        manifest["coreml"] = dict(coreml)
    return manifest


def write_manifest(output: Path, manifest: dict[str, Any], *, force: bool = False) -> bool:
    """Write when the content (ignoring ``updated_at``) changed; returns whether it wrote."""
    path = output / MANIFEST
    if not force and path.exists():
        try:
            old = json.loads(path.read_text())
            old["updated_at"] = manifest["updated_at"]
            if old == json.loads(json.dumps(manifest)):
                return False
        except (OSError, ValueError):
            pass
    manifest = dict(manifest)
    manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return True
