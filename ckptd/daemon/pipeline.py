"""One run's processing: from a ready candidate to published outputs and a ledger entry.

Order of effects (crash safety): outputs are written atomically first, then the ledger commits, then
evicted member copies are removed, then the manifest is rewritten. A crash at any point leaves either the
old or the new complete files, and the checkpoint still "pending" in the ledger so it is redone on restart.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.atomic import cleanup_stale_temps
from ckptd.daemon.config import Policy, Watch
from ckptd.daemon.discovery import Observation, observe
from ckptd.daemon.ledger import FINAL_STATUSES, Ledger, MemberRow
from ckptd.daemon.telemetry import Metrics, rejection_reason
from ckptd.daemon.outputs import (
    AVERAGE,
    BEST,
    MANIFEST,
    MEMBERS_DIR,
    build_manifest,
    member_path,
    publish_average,
    publish_best,
    publish_best_from_member,
    write_manifest,
    write_member,
)
from ckptd.daemon.policy import Decision, Record, decide, ranked
from ckptd.daemon.retention import Known, select_prunable
from ckptd.errors import CheckpointError, CkptdError, IncompleteCheckpointError
from ckptd.export.runner import cleanup_staging
from ckptd.formats import check_complete
from ckptd.metric_sources import first_value
from ckptd.model_state import compare_state
from ckptd.safetensors_io import open_safetensors
from ckptd.weights import file_sha256, open_checkpoint


@dataclass(frozen=True)
class RunContext:
    watch: Watch
    policy: Policy
    run: str
    run_dir: Path
    output: Path


class RunProcessor:
    """Processes one run's candidates, one at a time (the daemon never runs two jobs of one run at once)."""

    def __init__(self, ctx: RunContext, ledger: Ledger, log: Any, *, exporter: Any = None, hooks: Any = None,
                 metrics: Metrics | None = None) -> None:
        self.ctx = ctx
        self.metrics = metrics or Metrics()
        self.ledger = ledger
        self.log = log.bind(watch=ctx.watch.name, run=ctx.run)
        self.exporter = exporter if ctx.policy.coreml.enabled else None
        self.hooks = hooks
        self.manifest_lock = threading.Lock()
        self.reconciled = False
        self._final: set[tuple[str, int, int]] = set()  # identities known final: no ledger query per scan

    # --- helpers ------------------------------------------------------------------------------------------
    def members(self) -> list[MemberRow]:
        """Current members, best first."""
        rows = self.ledger.members(self.ctx.watch.name, self.ctx.run)
        by_record = {r.record: r for r in rows}
        return [by_record[r] for r in ranked([r.record for r in rows], self.ctx.policy.metric.mode)]

    def _record(self, obs: Observation, **kw: Any) -> int:
        return self.ledger.record(self.ctx.watch.name, self.ctx.run, str(obs.path), obs.size, obs.mtime_ns, **kw)

    def write_manifest(self, members: list[MemberRow] | None = None, *, coreml: dict[str, Any] | None = None) -> None:
        """Rewrite manifest.json (serialized with exports, which update its coreml block)."""
        with self.manifest_lock:
            members = self.members() if members is None else members
            last = self.ledger.last_checkpoint(self.ctx.watch.name, self.ctx.run)
            if coreml is None:
                coreml = self.current_coreml()
            manifest = build_manifest(self.ctx.watch.name, self.ctx.run, self.ctx.output, self.ctx.policy, members,
                                      last, coreml)
            write_manifest(self.ctx.output, manifest)

    def current_coreml(self) -> dict[str, Any] | None:
        """The manifest's coreml block as last written (the manifest is its only store)."""
        path = self.ctx.output / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text()).get("coreml")
        except (OSError, ValueError):
            return None

    def note_export(self, block: dict[str, Any], *, ok: bool) -> None:
        """Called by the export scheduler when an export finished (published or failed)."""
        self.write_manifest(coreml=block)
        self.ledger.note_event(self.ctx.watch.name, self.ctx.run, "exported" if ok else "export_failed",
                               error=None if ok else f"coreml export: {block.get('reason')}")
        if self.hooks is not None:
            self.hooks.fire(self, "on_export", {"CKPTD_EXPORT_STATUS": block.get("status", ""),
                                                "CKPTD_EXPORT_PATH": str(self.ctx.output / "best.mlpackage"),
                                                "CKPTD_SOURCE": str(block.get("source", "")),
                                                "CKPTD_METRIC": str(block.get("metric", "")),
                                                "CKPTD_STEP": str(block.get("step", ""))})

    def _request_export(self, members: list[MemberRow], *, new_best: bool, average_changed: bool) -> None:
        if self.exporter is None or not members:
            return
        source = self.ctx.policy.coreml.source
        if source == "best" and new_best:
            self.exporter.request_for_member(self, members[0])
        elif source == "average" and average_changed and len(members) >= self.ctx.policy.average.min_members:
            self.exporter.request_average(self, members)

    def export_outdated(self, members: list[MemberRow]) -> bool:
        """Does the published export lag behind the current best/average (e.g. after a restart)?"""
        if self.exporter is None or not members:
            return False
        block = self.current_coreml() or {}
        if self.ctx.policy.coreml.source == "best":
            return block.get("sha256") != members[0].record.sha256
        if len(members) < self.ctx.policy.average.min_members:
            return False
        return block.get("sha256") != average_signature(members)

    # --- reconcile ----------------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Make the outputs match the ledger (and the ledger match the outputs if it was lost)."""
        out = self.ctx.output
        (out / MEMBERS_DIR).mkdir(parents=True, exist_ok=True)
        for directory in (out, out / MEMBERS_DIR):
            for tmp in cleanup_stale_temps(directory):
                self.log.info("output.temp_removed", file=str(tmp), reason="left by an interrupted write")
        for tmp in cleanup_staging(out):
            self.log.info("output.temp_removed", file=str(tmp), reason="left by an interrupted export")
        members = self.members()
        if not members:
            members = self._restore_members_from_disk()
        changed = False
        kept: list[MemberRow] = []
        for m in members:
            if Path(m.file).is_file():
                kept.append(m)
                continue
            src = Path(m.record.path)
            if src.exists() and file_sha256(src) == m.record.sha256:
                ckpt = self._open(src)
                write_member(Path(m.file), ckpt.weights, source=m.record.path, sha256=m.record.sha256,
                             metric=m.record.metric, step=m.record.step, layout=ckpt.layout)
                self.log.warning("member.rebuilt", checkpoint=m.record.path, file=m.file,
                                 reason="pinned copy was missing; re-extracted from the unchanged source")
                kept.append(m)
            else:
                self.log.error("member.lost", checkpoint=m.record.path, file=m.file,
                               reason="pinned copy missing and the source is gone or changed; dropped from top-k")
            changed = True
        if changed:
            with self.ledger.transaction() as db:
                self.ledger.set_members(db, self.ctx.watch.name, self.ctx.run, kept)
        referenced = {Path(m.file).name for m in kept}
        for f in (out / MEMBERS_DIR).glob("*.safetensors"):
            if f.name not in referenced:
                f.unlink(missing_ok=True)
                self.log.info("member.orphan_removed", file=str(f), reason="not a member in the ledger")
        kept = self.members()
        if kept:
            if changed or (not (out / BEST).exists() and "safetensors" in self.ctx.policy.model_only.formats):
                publish_best_from_member(out, kept[0], self.ctx.policy)
                self.log.info("best.rebuilt", checkpoint=kept[0].record.path, metric=kept[0].record.metric)
            if len(kept) >= self.ctx.policy.average.min_members and (changed or not (out / AVERAGE).exists()):
                publish_average(out, kept, self.ctx.policy)
                self.log.info("average.rebuilt", k=len(kept))
        self.write_manifest(kept)
        self.reconciled = True
        if self.export_outdated(kept):
            self.log.info("export.catch_up", reason="the published CoreML export does not match the current "
                          f"{self.ctx.policy.coreml.source}; exporting")
            self._request_export(kept, new_best=True, average_changed=True)

    def _restore_members_from_disk(self) -> list[MemberRow]:
        """Ledger lost: member copies carry source, sha256, metric and step in their metadata."""
        restored: list[MemberRow] = []
        for f in sorted((self.ctx.output / MEMBERS_DIR).glob("*.safetensors")):
            try:
                md = open_safetensors(f).metadata
                source, sha = md["source"], md["source_sha256"]
                metric = float(md["metric"]) if "metric" in md else None
                step = int(md["step"]) if "step" in md else None
            except (CkptdError, KeyError, ValueError) as exc:
                self.log.warning("member.unreadable", file=str(f), reason=str(exc))
                continue
            ckpt_id = self.ledger.record(self.ctx.watch.name, self.ctx.run, source, -1, -1, status="done",
                                         reason="restored from pinned member copy", sha256=sha, metric=metric,
                                         step=step)
            restored.append(MemberRow(Record(ckpt_id, source, sha, metric, step, f.stat().st_mtime), str(f)))
        if restored:
            top = ranked([m.record for m in restored], self.ctx.policy.metric.mode)[: self.ctx.policy.average.top_k]
            restored = [m for m in restored if m.record in top]
            with self.ledger.transaction() as db:
                self.ledger.set_members(db, self.ctx.watch.name, self.ctx.run, restored)
            self.log.warning("ledger.restored", members=len(restored), reason="ledger had no members for this run; "
                             "restored them from the pinned copies' metadata")
        return self.members()

    # --- processing ---------------------------------------------------------------------------------------
    def _open(self, path: Path) -> Any:
        w = self.ctx.policy.weights
        return open_checkpoint(path, key=w.key, prefer_ema=w.prefer_ema, strip_prefixes=w.strip_prefixes,
                               allow_globals=w.allow_globals)

    def known(self, obs: Observation) -> bool:
        """Already processed to a final status (this content, at this path)?"""
        identity = (str(obs.path), obs.size, obs.mtime_ns)
        if identity in self._final:
            return True
        row = self.ledger.find(self.ctx.watch.name, self.ctx.run, *identity)
        if row is not None and row.status in FINAL_STATUSES:
            self._final.add(identity)
            return True
        return False

    def process(self, obs: Observation) -> str:
        """Handle one ready candidate. Returns the outcome: a final status, 'incomplete' or 'retry'."""
        started = time.monotonic()
        outcome = self._process(obs)
        self.metrics.processed.labels(outcome=outcome).inc()
        self.metrics.job_duration.labels(action="process").observe(time.monotonic() - started)
        if outcome in ("done", "skipped", "duplicate", "unranked"):
            self.metrics.success("process")
        return outcome

    def _process(self, obs: Observation) -> str:
        if not self.reconciled:
            self.reconcile()
        watch, run = self.ctx.watch.name, self.ctx.run
        row = self.ledger.find(watch, run, str(obs.path), obs.size, obs.mtime_ns)
        if row is not None and row.status in FINAL_STATUSES:
            return row.status
        if row is None:
            self.metrics.detected.inc()
        path = obs.path
        try:
            check_complete(path)
        except IncompleteCheckpointError as exc:
            if not _unchanged(obs):
                return "retry"
            if row is None or row.reason != exc.reason:
                self.metrics.rejected.labels(reason=rejection_reason(exc.reason)).inc()
                self.log.warning("checkpoint.incomplete", checkpoint=str(path), action="wait",
                                 reason=f"{exc.reason} (will be retried when the file changes)")
            self._record(obs, status="incomplete", reason=exc.reason)
            self.ledger.note_event(watch, run, "incomplete", error=str(exc))
            return "incomplete"
        except CheckpointError:
            pass  # corrupt or foreign: the load below reports it, once, as invalid
        try:
            sha = file_sha256(path)
            ckpt = self._open(path)
        except (CheckpointError, OSError) as exc:
            if not _unchanged(obs):
                self.log.info("checkpoint.changed", checkpoint=str(path), action="retry",
                              reason="the file changed or vanished while being read")
                return "retry"
            reason = exc.reason if isinstance(exc, CheckpointError) else str(exc)
            self.metrics.rejected.labels(reason=rejection_reason(reason)).inc()
            self.log.error("checkpoint.invalid", checkpoint=str(path), action="ignore", reason=reason)
            self._record(obs, status="invalid", reason=reason)
            self.ledger.note_event(watch, run, "invalid", error=f"{path}: {reason}")
            return "invalid"
        metric, metric_src = first_value(self.ctx.policy.metric.sources, path, ckpt.obj, ckpt.metadata, "metric")
        step_value, _ = first_value(self.ctx.policy.step_sources, path, ckpt.obj, ckpt.metadata, "step")
        step = None if step_value is None else int(step_value)
        if not _unchanged(obs):
            self.log.info("checkpoint.changed", checkpoint=str(path), action="retry",
                          reason="the file changed while being read; discarded")
            return "retry"
        ckpt_id = self._record(obs, status="pending", sha256=sha, metric=metric,
                               metric_source=metric_src if metric is not None else None, step=step)
        members = self.members()
        record = Record(ckpt_id, str(path), sha, metric, step, obs.mtime_ns / 1e9)
        decision = decide([m.record for m in members], record, self.ctx.policy.average.top_k,
                          self.ctx.policy.metric.mode)
        if decision.action != "join":
            return self._finish_without_change(obs, decision, metric, metric_src, step, sha)
        mismatch = self._architecture_mismatch(members, ckpt.weights)
        if mismatch:
            reason = f"architecture differs from this run's members ({mismatch}); not averaged"
            self.metrics.rejected.labels(reason="architecture").inc()
            self.log.error("checkpoint.refused", checkpoint=str(path), metric=metric, action="refuse", reason=reason)
            self._record(obs, status="invalid", reason=reason, sha256=sha, metric=metric, step=step)
            self.ledger.note_event(watch, run, "refused", error=f"{path}: {reason}")
            return "invalid"
        return self._publish(obs, decision, record, ckpt, members, metric_src)

    def _finish_without_change(self, obs: Observation, decision: Decision, metric: float | None,
                               metric_src: str, step: int | None, sha: str) -> str:
        status = {"unranked": "unranked", "duplicate": "duplicate", "skip": "skipped"}[decision.action]
        reason = decision.reason if decision.action != "unranked" else f"{decision.reason} ({metric_src})"
        self._record(obs, status=status, reason=reason, sha256=sha, metric=metric, step=step)
        self.log.info("checkpoint." + status, checkpoint=str(obs.path), metric=metric, step=step,
                      action=decision.action, reason=reason)
        self.ledger.note_event(self.ctx.watch.name, self.ctx.run, status)
        self.write_manifest()
        return status

    def _architecture_mismatch(self, members: list[MemberRow], weights: Any) -> str:
        if not members:
            return ""
        try:
            reference = open_safetensors(members[0].file).tensors
        except CkptdError:
            return ""
        report = compare_state(reference, weights)
        return "" if report.ok else report.describe(limit=3, model="members")

    def _publish(self, obs: Observation, decision: Decision, record: Record, ckpt: Any,
                 old_members: list[MemberRow], metric_src: str) -> str:
        out, policy = self.ctx.output, self.ctx.policy
        files = {m.record.ckpt_id: m.file for m in old_members}
        new_file = member_path(out, record.path, record.sha256)
        timer = self.metrics.job_duration
        with timer.labels(action="member").time():
            write_member(new_file, ckpt.weights, source=record.path, sha256=record.sha256, metric=record.metric,
                         step=record.step, layout=ckpt.layout)
        files[record.ckpt_id] = str(new_file)
        members = [MemberRow(r, files[r.ckpt_id]) for r in decision.members]
        if decision.new_best:
            with timer.labels(action="best").time():
                publish_best(out, ckpt.weights, policy, source=record.path, sha256=record.sha256,
                             metric=record.metric, step=record.step)
            self.metrics.success("best")
        if len(members) >= policy.average.min_members:
            with timer.labels(action="average").time():
                publish_average(out, members, policy)
            self.metrics.success("average")
        with self.ledger.transaction() as db:
            self.ledger.set_members(db, self.ctx.watch.name, self.ctx.run, members)
        self._record(obs, status="done", reason=decision.reason, sha256=record.sha256, metric=record.metric,
                     metric_source=metric_src, step=record.step)
        for gone in decision.evicted:
            if gone.ckpt_id in files and files[gone.ckpt_id] != str(new_file):
                Path(files[gone.ckpt_id]).unlink(missing_ok=True)
        self.write_manifest(members)
        self.log.info("checkpoint.joined", checkpoint=record.path, metric=record.metric, step=record.step,
                      action="join", reason=decision.reason, k=len(members),
                      average=len(members) >= policy.average.min_members, new_best=decision.new_best)
        self.ledger.note_event(self.ctx.watch.name, self.ctx.run, "new_best" if decision.new_best else "joined")
        average_changed = len(members) >= policy.average.min_members
        self._request_export(members, new_best=decision.new_best, average_changed=average_changed)
        if self.hooks is not None:
            env = {"CKPTD_CHECKPOINT": record.path, "CKPTD_METRIC": str(record.metric), "CKPTD_STEP": str(record.step),
                   "CKPTD_SHA256": record.sha256}
            if decision.new_best:
                self.hooks.fire(self, "on_new_best", {**env, "CKPTD_BEST": str(out / "best.safetensors")})
            if average_changed:
                self.hooks.fire(self, "on_average", {**env, "CKPTD_AVERAGE": str(out / AVERAGE),
                                                     "CKPTD_K": str(len(members))})
        return "done"


def apply_retention(processor: RunProcessor, now: float) -> int:
    """Opt-in pruning of training checkpoints (see ckptd.daemon.retention); returns how many were deleted."""
    policy = processor.ctx.policy.retention
    if not policy.enabled:
        return 0
    ctx, ledger = processor.ctx, processor.ledger
    rows = ledger.known_files(ctx.watch.name, ctx.run)
    known = [Known(r.path, r.size, r.mtime_ns, r.step, r.status, Path(r.path).is_dir()) for r in rows]
    sources = {m.record.path for m in processor.members()}
    deleted = 0
    by_path = {(r.path, r.size, r.mtime_ns): r for r in rows}
    for item, reason in select_prunable(known, sources, policy.keep_last, policy.min_age, now):
        path = Path(item.path)
        now_seen = observe(path, is_dir=False)
        if now_seen is None or now_seen.signature != (item.size, item.mtime_ns) or not path.is_file():
            continue  # changed or gone since it was processed: not the file the ledger knows
        if policy.dry_run:
            processor.log.info("retention.would_delete", checkpoint=str(path), action="dry-run", reason=reason)
            continue
        try:
            path.unlink()
        except OSError as exc:
            processor.log.warning("retention.failed", checkpoint=str(path), reason=str(exc))
            continue
        ledger.set_status(by_path[(item.path, item.size, item.mtime_ns)].id, "pruned", reason)
        processor.log.info("retention.deleted", checkpoint=str(path), action="delete", reason=reason)
        deleted += 1
    return deleted


def average_signature(members: list[MemberRow]) -> str:
    """Identity of an average: the sha256 over its members' content hashes."""
    return hashlib.sha256("".join(sorted(m.record.sha256 for m in members)).encode()).hexdigest()


def _unchanged(obs: Observation) -> bool:
    """Is the candidate still exactly what the scan saw (not rewritten, not deleted)?"""
    now = observe(obs.path, obs.is_dir)
    return now is not None and now.signature == obs.signature
