"""Per-stream outputs: pinned member copies, ``average.safetensors``, ``best.safetensors``, ``manifest.json``.

Member copies are immutable, content-named files written atomically; best, average and manifest are published
together as one generation (``ckptd.daemon.publish``). The manifest is a pure function of the member set and
the export state, so it can always be regenerated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptd import __version__
from ckptd.averaging import average_checkpoints
from ckptd.daemon.config import Policy
from ckptd.daemon.ledger import CheckpointRow, MemberRow
from ckptd.daemon.publish import AVERAGE, BEST, BEST_PT, MANIFEST, Generation, current_dir
from ckptd.formats import CheckpointFormat
from ckptd.safetensors_io import open_safetensors
from ckptd.weights import Checkpoint, cast_floating, provenance_metadata, write_weights

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


def localize(member: MemberRow, output: Path) -> MemberRow:
    """The member with its copy's path in *this* daemon's output. The ledger may name a copy under another
    daemon's output (several daemons sharing a PostgreSQL ledger, each staging object-store outputs in its own
    state_dir; or a shared output mounted elsewhere): copies are named by source and content, so the same name
    under our output is the same copy (rebuilt from the source if it is not there yet)."""
    if Path(member.file).parent == output / MEMBERS_DIR:
        return member
    return MemberRow(member.record, str(member_path(output, member.record.path, member.record.sha256)))


def write_member(path: Path, weights: Mapping[str, torch.Tensor], *, source: str, sha256: str,
                 metric: float | None, step: int | None, layout: str, source_size: int = -1,
                 source_mtime_ns: int = -1, stream: str = "model") -> None:
    """A pinned copy in the checkpoint's own dtype: the average must not depend on the trainer keeping its file.
    Its metadata carries the source's identity (size, mtime) so a lost ledger is rebuilt exactly from it."""
    md = provenance_metadata(source, sha256=sha256, metric=metric, step=step,
                             extra={"layout": layout, "role": "member", "stream": stream,
                                    "source_size": source_size, "source_mtime_ns": source_mtime_ns})
    write_weights(path, weights, metadata=md)


def own_checkpoint(path: str | Path) -> Checkpoint:
    """A file ckptd wrote itself (immutable: written once, replaced only by rename), memory-mapped so averaging
    reads only what it needs and memory stays flat in k. Never used on a trainer's file."""
    mapped = open_safetensors(path)
    return Checkpoint(path=Path(path), format=CheckpointFormat.SAFETENSORS, obj=mapped.tensors,
                      weights=mapped.tensors, metadata=mapped.metadata)


def stage_best(gen: Generation, member: MemberRow, policy: Policy) -> None:
    """Put the best member's weights in the generation: a hard link of the pinned copy when no cast is asked
    (no second model-size write), else a cast copy."""
    r = member.record
    dtype = torch_dtype(policy.model_only.dtype)
    weights: Mapping[str, torch.Tensor] | None = None
    for fmt in policy.model_only.formats:
        if fmt == "safetensors" and dtype is None:
            gen.link(BEST, Path(member.file))
            continue
        if weights is None:
            weights = cast_floating(open_safetensors(member.file).tensors, dtype)
        md = provenance_metadata(r.path, sha256=r.sha256, metric=r.metric, step=r.step, extra={"role": "best"})
        write_weights(gen.path(BEST if fmt == "safetensors" else BEST_PT), weights, metadata=md, fmt=fmt)


def write_candidate_average(path: Path, members: Sequence[MemberRow], policy: Policy) -> None:
    """Fresh streamed mean of the member copies (best first, so integer buffers come from the best)."""
    md = provenance_metadata(extra={
        "role": "average", "k": len(members),
        "members": json.dumps([{"source": m.record.path, "sha256": m.record.sha256, "metric": m.record.metric,
                                "step": m.record.step} for m in members]),
    })
    average_checkpoints([own_checkpoint(m.file) for m in members], path, reference=0,
                        dtype=torch_dtype(policy.average.dtype), metadata=md)


def stage_average(gen: Generation, members: Sequence[MemberRow], policy: Policy,
                  evaluated: Path | None = None) -> None:
    """The average in the generation: ``evaluated`` (the very file an evaluation scored) when given, linked, so
    what is published is bitwise what won; else computed from the member copies."""
    if evaluated is not None:
        gen.link(AVERAGE, evaluated)
    else:
        write_candidate_average(gen.path(AVERAGE), members, policy)


def publish(output: Path, policy: Policy, members: Sequence[MemberRow], manifest: dict[str, Any], *,
            best_changed: bool, average_changed: bool, average_members: Sequence[MemberRow],
            evaluated: Path | None = None, before_commit: Callable[[], None] | None = None) -> Path:
    """Build and commit one generation: best, average and manifest change together or not at all.
    ``average_members`` are the published average's members (the top-k, or what an evaluation chose; empty: no
    average); ``evaluated`` the candidate file that won its evaluation. ``before_commit`` runs once everything is
    written, right before the swap (the ledger's commit)."""
    with Generation(output) as gen:
        if members:
            names = [BEST if f == "safetensors" else BEST_PT for f in policy.model_only.formats]
            if best_changed or not all(gen.carry(n) for n in names):
                stage_best(gen, members[0], policy)
        if average_members and (average_changed or not gen.carry(AVERAGE)):
            stage_average(gen, average_members, policy, evaluated)
        stamped = dict(manifest)
        stamped["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        gen.write_text(MANIFEST, json.dumps(stamped, indent=2) + "\n")
        if before_commit is not None:
            before_commit()
        return gen.commit()


def published_manifest(output: Path) -> dict[str, Any] | None:
    """The committed manifest, or None (nothing published, or unreadable)."""
    current = current_dir(output)
    path = (current / MANIFEST) if current is not None else output / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_manifest(watch: str, run: str, output: Path, policy: Policy, members: Sequence[MemberRow],
                   last: CheckpointRow | None, coreml: Mapping[str, Any] | None = None, *,
                   stream: str = "model", average_members: Sequence[MemberRow] | None = None,
                   evaluations: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest (DESIGN.md §3) for the given ranked member set; paths relative to ``output``.
    ``sha256`` identifies a checkpoint's model weights (names, dtypes, shapes, bytes), not its whole file.
    ``average_members``: what the published average holds when an evaluation decides it (default: the top-k);
    ``evaluations``: the ``best`` and ``average`` evaluation objects, when the policy evaluates."""
    def entry(m: MemberRow) -> dict[str, Any]:
        return {"source": m.record.path, "sha256": m.record.sha256, "metric": m.record.metric,
                "step": m.record.step, "path": str(Path(m.file).relative_to(output))}

    manifest: dict[str, Any] = {
        "watch": watch, "run": run, "stream": stream, "updated_at": "", "ckptd_version": __version__,
        "metric": {"mode": policy.metric.mode, "sources": [s.describe() for s in policy.metric.sources]},
        "best": None,
        "average": None,
    }
    if members:
        best = entry(members[0])
        best["member_path"] = best.pop("path")
        best["path"] = BEST if "safetensors" in policy.model_only.formats else BEST_PT
        manifest["best"] = best
        manifest["top_k_members"] = [entry(m) for m in members]
        averaged = members if average_members is None else average_members
        if average_members is None and len(members) < policy.average.min_members:
            averaged = ()
        manifest["average"] = {"k": len(averaged), "top_k": policy.average.top_k,
                               "path": AVERAGE if averaged else None,
                               "members": [entry(m) for m in averaged]}
        if not averaged:
            manifest["average"]["waiting_for"] = (
                policy.average.min_members if len(members) < policy.average.min_members
                else "an average that evaluates at least as well as the best member")
            if average_members is None:  # ckptd <= 0.2 listed the waiting top-k here; kept for readers of it
                manifest["average"]["members"] = [entry(m) for m in members]
        if policy.average.evaluated:
            manifest["average"]["strategy"] = policy.average.strategy
            manifest["average"]["gate"] = policy.average.gate or policy.average.strategy == "greedy"
        if evaluations:
            best["evaluation"] = evaluations.get("best")
            manifest["average"]["evaluation"] = evaluations.get("average")
    if last is not None:
        manifest["last"] = {"source": last.path, "step": last.step, "metric": last.metric, "status": last.status}
    if coreml is not None:
        manifest["coreml"] = dict(coreml)
    return manifest


def manifest_unchanged(output: Path, manifest: dict[str, Any]) -> bool:
    """Is the published manifest the same as ``manifest`` (ignoring ``updated_at``)? Then nothing is republished."""
    old = published_manifest(output)
    if old is None:
        return False
    old["updated_at"] = manifest.get("updated_at", "")
    return bool(old == json.loads(json.dumps(manifest)))
