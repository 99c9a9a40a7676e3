"""Recovery for one stream's outputs: make them match the ledger (and the ledger match them when it was lost).

Runs before a processor's first job (daemon start, reload, a run re-created after a listing error):
1. remove what interrupted writes left (temp files, unfinished generations, orphaned export inputs) — never
   anything this process is still writing;
2. restore the members from the pinned copies' metadata when the ledger has none (ledger deleted or corrupt);
3. re-extract a missing member copy from its unchanged source, or drop it;
4. republish (one generation) when what is published does not match the ledger's members.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd.atomic import cleanup_stale_temps
from ckptd.daemon import gate
from ckptd.daemon.ledger import MemberRow
from ckptd.daemon.outputs import AVERAGE, BEST, MANIFEST, MEMBERS_DIR, published_manifest
from ckptd.daemon.policy import Record, ranked
from ckptd.daemon.publish import cleanup_stale_generations, kept_generations
from ckptd.errors import CheckpointError, CkptdError
from ckptd.formats import safetensors_header

if TYPE_CHECKING:
    from ckptd.daemon.pipeline import RunProcessor


def reconcile(proc: RunProcessor) -> None:
    """Bring ``proc``'s outputs and ledger into agreement (see the module docstring)."""
    out, log = proc.ctx.output, proc.log
    (out / MEMBERS_DIR).mkdir(parents=True, exist_ok=True)
    for directory in (out, out / MEMBERS_DIR):
        for tmp in cleanup_stale_temps(directory):
            log.info("output.temp_removed", file=str(tmp), reason="left by an interrupted write")
    for tmp in cleanup_stale_generations(out):
        log.info("output.temp_removed", file=str(tmp), reason="left by an interrupted publication")
    if proc.exporter is not None:
        for tmp in proc.exporter.reconcile_inputs(out):
            log.info("output.temp_removed", file=str(tmp), reason="left by an interrupted export")
    if proc.evaluator is not None:
        for tmp in proc.evaluator.reconcile_candidates(out):
            log.info("output.temp_removed", file=str(tmp), reason="candidate left by an interrupted evaluation")
    members = proc.members()
    if not members:
        members = restore_members(proc)
    kept, changed = _check_member_files(proc, members)
    if changed:
        with proc.ledger.transaction() as db:
            proc.ledger.set_members(db, proc.ctx.watch.name, proc.ctx.run, kept, stream=proc.ctx.stream)
        kept = proc.members()
    for f in prune_members(out, {m.file for m in kept}):
        log.info("member.orphan_removed", file=str(f), reason="not a member in the ledger nor named by a kept "
                 "generation")
    if gate.adopt_published(proc):
        log.info("average.adopted", reason="the policy now evaluates its average: the published one stays until "
                 "an evaluation of the current top-k decides")
    if changed or not published_matches(proc, kept):
        proc.republish(kept, reason="the published outputs did not match the ledger")
    proc.reconciled = True
    if proc.evaluation_outdated(kept):
        log.info("evaluation.catch_up", reason="the current top-k was not evaluated yet (the daemon stopped "
                 "before its evaluation finished); evaluating")
        proc.request_evaluation()  # its decision requests an evaluated average's or winner's export
    elif proc.export_outdated(kept):
        log.info("export.catch_up", reason="the published CoreML export does not match the current "
                 f"{proc.ctx.policy.coreml.source}; exporting")
        proc.catch_up_export(kept)


def _check_member_files(proc: RunProcessor, members: list[MemberRow]) -> tuple[list[MemberRow], bool]:
    """Members whose pinned copy is readable; a missing/unreadable one is re-extracted from its unchanged source
    (same model content) or dropped. Returns (kept, whether anything changed)."""
    kept: list[MemberRow] = []
    changed = False
    for m in members:
        try:
            safetensors_header(m.file)
            kept.append(m)
            continue
        except CheckpointError:
            pass
        changed = True
        try:
            rebuilt = proc.rebuild_member(m)
        except (CkptdError, OSError) as exc:
            rebuilt, why = False, str(exc)
        else:
            why = "the source is gone or its model weights changed"
        if rebuilt:
            proc.log.warning("member.rebuilt", checkpoint=m.record.path, file=m.file,
                             reason="pinned copy was missing or unreadable; re-extracted from the unchanged source")
            kept.append(m)
        else:
            proc.log.error("member.lost", checkpoint=m.record.path, file=m.file,
                           reason=f"pinned copy missing or unreadable and {why}; dropped from the top-k")
    return kept, changed


def restore_members(proc: RunProcessor) -> list[MemberRow]:
    """Ledger lost: the member copies carry source, content sha256, metric, step and the source's identity
    (size, mtime) in their metadata. Each gets its own checkpoint row, so two members from one rewritten file
    (``last.ckpt``) never collide."""
    ctx, ledger = proc.ctx, proc.ledger
    restored: list[MemberRow] = []
    for f in sorted((ctx.output / MEMBERS_DIR).glob("*.safetensors")):
        try:
            md = safetensors_header(f).get("__metadata__") or {}
            source, sha = md["source"], md["source_sha256"]
            metric = float(md["metric"]) if "metric" in md else None
            step = int(md["step"]) if "step" in md else None
            size = int(md.get("source_size", -1))
            mtime_ns = int(md.get("source_mtime_ns", -1))
        except (CkptdError, KeyError, ValueError, TypeError) as exc:
            proc.log.warning("member.unreadable", file=str(f), reason=str(exc))
            continue
        if size < 0 or mtime_ns < 0:
            # written by ckptd 0.1 (no source identity): a negative identity unique per content
            size, mtime_ns = -1, -int(sha[:12], 16)
        ckpt_id = ledger.record(ctx.watch.name, ctx.run, source, size, mtime_ns, status="done",
                                reason="restored from pinned member copy", sha256=sha, metric=metric, step=step,
                                stream=ctx.stream)
        mtime = mtime_ns / 1e9 if mtime_ns > 0 else f.stat().st_mtime
        restored.append(MemberRow(Record(ckpt_id, source, sha, metric, step, mtime), str(f)))
    if restored:
        top = ranked([m.record for m in restored], ctx.policy.metric.mode)[: ctx.policy.average.top_k]
        restored = [m for m in restored if m.record in top]
        with ledger.transaction() as db:
            ledger.set_members(db, ctx.watch.name, ctx.run, restored, stream=ctx.stream)
        proc.log.warning("ledger.restored", members=len(restored), reason="ledger had no members for this run; "
                         "restored them from the pinned copies' metadata")
    return proc.members()


def published_matches(proc: RunProcessor, members: list[MemberRow]) -> bool:
    """Do the committed manifest and files describe exactly these members?"""
    out, policy = proc.ctx.output, proc.ctx.policy
    manifest = published_manifest(out)
    if manifest is None or not (out / MANIFEST).is_file():
        return False
    best = manifest.get("best") or {}
    average = manifest.get("average") or {}
    want = [m.record.sha256 for m in members]
    listed = manifest.get("top_k_members", average.get("members")) or []  # ckptd <= 0.2: only average.members
    if [e.get("sha256") for e in listed] != want:
        return False
    if (best.get("sha256") if members else None) != (want[0] if want else None):
        return False
    if members and "safetensors" in policy.model_only.formats and not (out / BEST).is_file():
        return False
    averaged = gate.average_members(proc, members)
    if averaged and "top_k_members" in manifest and \
            [e.get("sha256") for e in average.get("members") or []] != [m.record.sha256 for m in averaged]:
        return False
    return bool(averaged) == (out / AVERAGE).is_file()


def prune_members(output: Path, keep: set[str]) -> list[Path]:
    """Remove member copies that neither the ledger's members (``keep``) nor any kept generation's manifest name:
    an evicted member stays while the previous generation (kept for readers in the middle of it) names it."""
    names = {Path(f).name for f in keep}
    for gen in kept_generations(output):
        try:
            manifest = json.loads((gen / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        for entry in [manifest.get("best") or {}, *((manifest.get("average") or {}).get("members") or [])]:
            for key in ("path", "member_path"):
                value = entry.get(key)
                if isinstance(value, str) and value.startswith(MEMBERS_DIR + "/"):
                    names.add(Path(value).name)
    removed = []
    for f in (output / MEMBERS_DIR).glob("*.safetensors"):
        if f.name not in names:
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f)
    return removed
