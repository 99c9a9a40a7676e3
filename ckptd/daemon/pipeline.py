"""One stream of one run: from a ready candidate to published outputs and a ledger entry.

Order of effects (crash safety, one commit point): load and validate the candidate before anything is touched
(unsafe, unreadable, non-finite or foreign-architecture checkpoints are recorded as invalid and never block the
run); write the member copy (an immutable, content-named file); build the next generation (best, average,
manifest) beside the published one; commit the ledger (members + "done" in one transaction); swap the generation
in with one rename; remove evicted member copies. A crash at any point leaves the previous generation published,
and recovery (``ckptd.daemon.recovery``) republishes from the ledger if it got ahead of the outputs.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptd.daemon import gate, recovery, remote_publish
from ckptd.daemon.config import Policy, Watch
from ckptd.daemon.discovery import Observation, observe
from ckptd.daemon.export_seam import ExportRequester
from ckptd.daemon.export_state import coreml_block, export_target, published_sha256
from ckptd.daemon.ledger import FINAL_STATUSES, CheckpointRow, Ledger, MemberRow
from ckptd.daemon.outputs import (
    AVERAGE,
    build_manifest,
    localize,
    manifest_unchanged,
    member_path,
    publish,
    write_member,
)
from ckptd.daemon.policy import Decision, Record, decide, ranked
from ckptd.daemon.telemetry import Metrics, rejection_reason
from ckptd.daemon.validation import NoReadableMember, publish_problem
from ckptd.errors import (
    CheckpointChangedError,
    CheckpointError,
    CkptdError,
    IncompleteCheckpointError,
    LeaseLost,
    WeightsNotFoundError,
)
from ckptd.file_checks import refusal
from ckptd.formats import check_complete
from ckptd.metric_sources import ValueSource, first_value
from ckptd.reader import read_checkpoint
from ckptd.remote.mirror import canonical, local
from ckptd.remote.urls import is_remote
from ckptd.trainers import StreamPlan, pick_weights

MAX_ATTEMPTS = 3  # a checkpoint that makes processing fail this often is recorded invalid: it never blocks its run
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class RunContext:
    watch: Watch
    policy: Policy
    run: str
    run_dir: Path
    output: Path
    stream: str = "model"
    plan: StreamPlan | None = None  # the trainer preset's view of this stream (None: the policy alone decides)
    allow_globals: tuple[str, ...] = ()  # data-only types the trainer's files need (from the preset)

    @property
    def metric_sources(self) -> tuple[ValueSource, ...]:
        return self.plan.metric_sources if self.plan is not None else self.policy.metric.sources

    @property
    def step_sources(self) -> tuple[ValueSource, ...]:
        return self.plan.step_sources if self.plan is not None else self.policy.step_sources


class NotInStream(CkptdError):
    """The file has no weights for this (optional) stream: e.g. a timm checkpoint saved without EMA."""


class OutputUnavailable(CkptdError):
    """Writing this run's outputs failed (disk full, read-only, I/O error): nothing was published and the
    candidate stays pending; the run's job backs off and retries on its own."""


@dataclass
class Loaded:
    """A candidate read once: its model weights (in memory, ckptd's own copy), the whole object for metric
    lookup, and the identity of its model content."""

    weights: dict[str, torch.Tensor]
    obj: Any
    metadata: Mapping[str, str]
    layout: str
    sha256: str


class RunProcessor:
    """Processes one stream of one run, one candidate at a time (never two jobs of one run at once)."""

    def __init__(self, ctx: RunContext, ledger: Ledger, log: Any, *, exporter: ExportRequester | None = None,
                 hooks: Any = None, metrics: Metrics | None = None, evaluator: Any = None) -> None:
        self.ctx = ctx
        self.metrics = metrics or Metrics()
        self.ledger = ledger
        self.log = log.bind(watch=ctx.watch.name, run=ctx.run, **({"stream": ctx.stream}
                                                                    if ctx.stream != "model" else {}))
        self.exporter = exporter if ctx.policy.coreml.enabled else None
        self.evaluator = evaluator if ctx.policy.evaluate.enabled else None  # an EvaluationScheduler
        self.hooks = hooks
        self.manifest_lock = threading.RLock()
        self.reconciled = False
        self.retired = False  # set when a reload replaces this processor: late evaluation decisions are dropped
        self.defer_manifest = False  # a job over many files publishes manifest-only changes once, at its end
        self._manifest_stale = False
        # the latest final identity per path: no ledger query per file per scan; bounded by the files present
        self._final: dict[str, tuple[int, int]] = {}
        self.generation: int | None = None  # the run's generation from the last fenced publication (leases)
        self.remote = remote_publish.for_run(ctx, ledger, self.log, self.manifest_lock,  # object-store outputs
                                             generation=lambda: self.generation, fence=self._remote_fence)
        # set by the daemon: checks, inside a ledger transaction, that this daemon still holds the run's lease
        # (raises LeaseLost); every publication runs it before its swap (``ckptd.daemon.run_leases``)
        self.fence: Callable[[Any], Any] | None = None
        self.lease_held: Callable[[], bool] = lambda: True  # cheap, in memory: checked before an export publishes

    # --- ledger views -------------------------------------------------------------------------------------
    def members(self) -> list[MemberRow]:
        """Current members, best first."""
        rows = [localize(r, self.ctx.output)
                for r in self.ledger.members(self.ctx.watch.name, self.ctx.run, stream=self.ctx.stream)]
        by_record = {r.record: r for r in rows}
        return [by_record[r] for r in ranked([r.record for r in rows], self.ctx.policy.metric.mode)]

    def _record(self, obs: Observation, **kw: Any) -> int:
        return self.ledger.record(self.ctx.watch.name, self.ctx.run, canonical(obs.path), obs.size, obs.mtime_ns,
                                  stream=self.ctx.stream, **kw)

    def _event(self, event: str, **kw: Any) -> None:
        self.ledger.note_event(self.ctx.watch.name, self.ctx.run, event, stream=self.ctx.stream, **kw)

    # --- publication --------------------------------------------------------------------------------------
    def _manifest(self, members: list[MemberRow], last: CheckpointRow | None = None,
                  coreml: Mapping[str, Any] | None = None, state: gate.GateState | None = None) -> dict[str, Any]:
        stored = self.ledger.last_checkpoint(self.ctx.watch.name, self.ctx.run, stream=self.ctx.stream)
        if last is None or (stored is not None and (stored.step or -1, stored.mtime_ns) > (last.step or -1,
                                                                                              last.mtime_ns)):
            last = stored
        state = self._gate(state)
        averaged = gate.average_members(self, members, state)
        return build_manifest(self.ctx.watch.name, self.ctx.run, self.ctx.output, self.ctx.policy, members, last,
                              self.current_coreml() if coreml is None else coreml, stream=self.ctx.stream,
                              average_members=averaged,
                              evaluations=gate.evaluation_blocks(self, members, averaged, state))

    def _publish(self, members: list[MemberRow], manifest: dict[str, Any], *, best_changed: bool,
                 average_changed: bool, before_commit: Callable[[], None] | None = None,
                 state: gate.GateState | None = None, evaluated: Path | None = None, fenced: bool = False) -> None:
        """One generation; ``before_commit`` (the ledger transaction) runs after everything is written and
        before the swap. ``fenced``: ``before_commit`` checks the lease itself, in its own transaction; otherwise
        the lease is checked first, in a transaction of its own. Output write failures become
        :class:`OutputUnavailable`."""
        if self.fence is not None and not fenced:
            before_commit = self._fenced(before_commit)
        try:
            with self.manifest_lock:
                state = self._gate(state)
                publish(self.ctx.output, self.ctx.policy, members, manifest, best_changed=best_changed,
                        average_changed=average_changed, average_members=gate.average_members(self, members, state),
                        evaluated=evaluated, before_commit=before_commit)
                if self.remote is not None:
                    self.remote.after_commit()  # never raises: a failed upload is retried at the job's end
        except OSError as exc:
            if exc.errno in OUTPUT_ERRNOS:
                self.reconciled = False  # the ledger may be ahead of the outputs: recovery republishes
                raise OutputUnavailable(f"cannot write the outputs in {self.ctx.output}: "
                                        f"{exc.strerror or exc}; nothing was published, the previous outputs stay; "
                                        "retrying after a back-off") from exc
            raise

    def _remote_fence(self) -> int | None:
        """Right before a remote manifest PUT: is the run still ours (raises LeaseLost)? Returns the generation
        the manifest carries."""
        if self.fence is None:
            return None
        self._check_lease()
        return self.generation

    def _check_lease(self) -> None:
        """Raise :class:`LeaseLost` unless this daemon still holds the run (with the fence's margin): checked in
        the ledger before a candidate's decision is recorded, as every publication is."""
        if self.fence is None:
            return
        with self.ledger.transaction() as db:
            self.generation = self.fence(db)

    def _fenced(self, inner: Callable[[], None] | None) -> Callable[[], None]:
        """``inner`` preceded by a lease check in a transaction of its own (LeaseLost aborts the publication)."""
        def commit() -> None:
            self._check_lease()
            if inner is not None:
                inner()

        return commit

    def republish(self, members: list[MemberRow], *, reason: str) -> None:
        """Publish the complete set for ``members`` (recovery, or after outputs were deleted)."""
        with self.manifest_lock:  # the manifest is built and published under one lock (an evaluation publishes too)
            self._publish(members, self._manifest(members), best_changed=True, average_changed=True)
        if members:
            self.log.info("outputs.republished", members=len(members), reason=reason)

    def write_manifest(self, members: list[MemberRow] | None = None, *,
                       coreml: Mapping[str, Any] | None = None) -> None:
        """Publish a new manifest with the same weights (a new generation only if the content changed)."""
        with self.manifest_lock:
            members = self.members() if members is None else members
            manifest = self._manifest(members, coreml=coreml)
            if not manifest_unchanged(self.ctx.output, manifest):
                self._publish(members, manifest, best_changed=False, average_changed=False)

    def _gate(self, state: gate.GateState | None) -> gate.GateState | None:
        """The gate's state, read once per manifest or publication (only a policy that evaluates has one)."""
        return gate.load(self) if state is None and self.ctx.policy.evaluate.enabled else state

    def publish_evaluated_average(self, members: list[MemberRow], state: gate.GateState, evaluated: Path | None,
                                  before_commit: Callable[[], None]) -> None:
        """A new average that won its evaluation (``evaluated``: the very file that was scored)."""
        with self.manifest_lock:
            self._publish(members, self._manifest(members, state=state), best_changed=False, average_changed=True,
                          before_commit=before_commit, state=state, evaluated=evaluated)
        # no pruning here: a join may have written a member copy it has not committed yet (only the run's worker
        # prunes, after its own commit)
        self.metrics.success("average")

    def note_evaluated_average(self, kept: list[MemberRow]) -> None:
        """An evaluated average was published: the event, and the on_average hooks."""
        self._event("average_published")
        if self.hooks is not None and kept:
            best = kept[0].record
            self.hooks.fire(self, "on_average", {"CKPTD_CHECKPOINT": best.path, "CKPTD_METRIC": str(best.metric),
                                                 "CKPTD_STEP": str(best.step), "CKPTD_SHA256": best.sha256,
                                                 "CKPTD_STREAM": self.ctx.stream,
                                                 "CKPTD_AVERAGE": str(self.ctx.output / AVERAGE),
                                                 "CKPTD_K": str(len(kept))})

    def note_event(self, event: str) -> None:
        self._event(event)

    def apply_evaluation(self, decision: Any, topk_key: str | None, files: dict[str, Path],
                         best_value: float | None) -> None:
        """The evaluation scheduler's callback (``evaluations.EvaluationRun``)."""
        gate.apply(self, decision, topk_key, files, best_value)

    def decision_key(self, members: list[MemberRow]) -> str:
        return gate.decision_key(self, members)

    def request_evaluation(self) -> None:
        if self.evaluator is not None:
            self.evaluator.request(self)

    def evaluation_outdated(self, members: list[MemberRow]) -> bool:
        """Was the current top-k never evaluated (e.g. the daemon stopped before the evaluation finished)?"""
        if self.evaluator is None or not members:
            return False
        return gate.load(self).topk_key != gate.decision_key(self, members)

    def current_coreml(self) -> dict[str, Any] | None:
        """The manifest's coreml block: a view of the ledger's exports rows (the ledger is the store)."""
        return coreml_block(self.ledger, self.ctx.watch.name, self.ctx.run, self.ctx.output, stream=self.ctx.stream)

    def note_export(self, block: dict[str, Any], *, ok: bool) -> None:
        """Called by the export scheduler when an export finished (published or failed)."""
        self.write_manifest(coreml=block)
        self._event("exported" if ok else "export_failed",
                    error=None if ok else f"coreml export: {block.get('reason')}")
        if self.hooks is not None:
            self.hooks.fire(self, "on_export", {"CKPTD_EXPORT_STATUS": block.get("status", ""),
                                                "CKPTD_EXPORT_PATH": str(block["path"]) if is_remote(
                                                    block.get("path")) else str(self.ctx.output / "best.mlpackage"),
                                                "CKPTD_SOURCE": str(block.get("source", "")),
                                                "CKPTD_METRIC": str(block.get("metric", "")),
                                                "CKPTD_STEP": str(block.get("step", ""))})

    def request_export(self, members: list[MemberRow], *, new_best: bool, average_changed: bool) -> None:
        if self.exporter is None or not members:
            return
        source = self.ctx.policy.coreml.source
        if source == "best" and new_best:
            self.exporter.request_best(self, members[0])
        elif source == "average" and average_changed and len(members) >= self.ctx.policy.average.min_members \
                and not self.ctx.policy.average.evaluated:  # an evaluated average is exported once it wins
            self.exporter.request_average(self, members)

    def export_target(self) -> str | None:
        return export_target(self.ctx.policy, self.members(), gate.load(self))

    def export_outdated(self, members: list[MemberRow]) -> bool:
        """Does the published export lag behind the current best/average (e.g. after a restart)?"""
        if self.exporter is None or not members:
            return False
        target = export_target(self.ctx.policy, members, gate.load(self))
        published = published_sha256(self.ledger, self.ctx.watch.name, self.ctx.run, stream=self.ctx.stream)
        return target is not None and target != published

    def catch_up_export(self, members: list[MemberRow]) -> None:
        """Export what the run should have exported (after a restart, the published package lags behind)."""
        if self.exporter is None or not members:
            return
        source = self.ctx.policy.coreml.source
        if source == "winner" or (source == "average" and self.ctx.policy.average.evaluated):
            gate.export_decided(self)
        else:
            self.request_export(members, new_best=True, average_changed=True)

    # --- recovery -----------------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Make the outputs match the ledger (and the ledger match the outputs if it was lost)."""
        recovery.reconcile(self)

    def rebuild_member(self, member: MemberRow) -> bool:
        """Re-extract a lost member copy from its source if the source still holds the same model weights."""
        src = Path(local(member.record.path))  # an object URL: its stub in this daemon's mirror
        if not src.exists():
            return False
        loaded = self._load(src)
        if loaded.sha256 != member.record.sha256:
            return False
        st = src.stat()
        write_member(Path(member.file), loaded.weights, source=member.record.path, sha256=member.record.sha256,
                     metric=member.record.metric, step=member.record.step, layout=loaded.layout,
                     source_size=st.st_size, source_mtime_ns=st.st_mtime_ns, stream=self.ctx.stream)
        return True

    # --- processing ---------------------------------------------------------------------------------------
    def _load(self, path: Path) -> Loaded:
        """Read the candidate once, with ordinary reads (never a memory map of a trainer's file), only this
        stream's model bytes; raises CheckpointChangedError when the file changes meanwhile."""
        w, plan = self.ctx.policy.weights, self.ctx.plan
        allow = (*w.allow_globals, *self.ctx.allow_globals)
        with read_checkpoint(path, allow_globals=allow) as reader:
            key, prefer_ema = w.key, w.prefer_ema
            if plan is not None:
                pick = pick_weights(plan, reader.obj)
                if pick is None:
                    if plan.optional:
                        raise NotInStream(f"no {plan.name} weights in this file")
                    raise WeightsNotFoundError(path, f"has no weights for the {plan.name} stream "
                                                     f"({plan.about or 'see the trainer preset'})")
                key, prefer_ema = pick.key, pick.prefer_ema
            found = reader.weights(key=key, prefer_ema=prefer_ema, strip_prefixes=w.strip_prefixes)
            return Loaded(found.state, reader.obj, reader.metadata, found.layout, found.content_sha256)

    def known(self, obs: Observation) -> bool:
        """Already processed to a final status (this content, at this path)?"""
        key = str(obs.path)
        if self._final.get(key) == obs.signature:
            return True
        row = self.ledger.find(self.ctx.watch.name, self.ctx.run, canonical(key), obs.size, obs.mtime_ns,
                               stream=self.ctx.stream)
        if row is not None and row.status in FINAL_STATUSES:
            self._final[key] = obs.signature
            return True
        return False

    def forget_missing(self, present: set[Path]) -> None:
        """Drop cached identities of files no longer present (keeps the cache bounded by the directory)."""
        for key in [k for k in self._final if Path(k) not in present]:
            del self._final[key]

    def process(self, obs: Observation) -> str:
        """Handle one ready candidate. Returns the outcome: a final status, 'incomplete' or 'retry'.
        Raises :class:`OutputUnavailable` when outputs cannot be written (the run's job backs off)."""
        started = time.monotonic()
        try:
            outcome = self._process(obs)
        except OutputUnavailable:
            self.metrics.processed.labels(outcome="output_error").inc()
            raise
        except (LeaseLost, sqlite3.Error):
            # the run is another daemon's now, or the ledger itself failed (a PostgreSQL restart, a dropped idle
            # connection noticed at the next statement): not this checkpoint's failure, no attempt counted; the
            # run's job backs off and retries
            raise
        except Exception as exc:  # a bug or an unforeseen input: never let one checkpoint block its run  # noqa: BLE001
            outcome = self._failed(obs, exc)
        self.metrics.processed.labels(outcome=outcome).inc()
        if outcome in ("done", "skipped", "duplicate", "unranked", "invalid"):  # final decisions, once per file
            self.metrics.decided(obs.mtime_ns)
        self.metrics.job_duration.labels(action="process").observe(time.monotonic() - started)
        if outcome in ("done", "skipped", "duplicate", "unranked"):
            self.metrics.success("process")
        return outcome

    def record_resume(self, obs: Observation) -> None:
        """A trainer's resume state (e.g. ml-cvnets' training_checkpoint_*.pt: its best_metric is the best so
        far, not its own): recorded so status and --explain show it, never loaded or ranked."""
        if self.known(obs):
            return
        self._record(obs, status="resume", reason=f"resume state: {obs.resume}; not ranked")
        self._final[str(obs.path)] = obs.signature
        self.log.info("checkpoint.resume_state", checkpoint=canonical(obs.path), action="record", reason=obs.resume)

    def record_refused(self, obs: Observation) -> None:
        """Something discovery will not hand to a reader (a FIFO, a device named like a checkpoint): one log line
        and an invalid record, once per file version."""
        if self.known(obs):
            return
        self.log.error("checkpoint.invalid", checkpoint=canonical(obs.path), action="ignore", reason=obs.refused)
        self._invalid(obs, obs.refused)

    def _failed(self, obs: Observation, exc: Exception) -> str:
        reason = f"{type(exc).__name__}: {exc}"
        self._check_lease()  # a daemon that lost the run records nothing for it, failures included
        self._record(obs, status="failed", reason=reason, attempt=True)
        row = self.ledger.find(self.ctx.watch.name, self.ctx.run, canonical(obs.path), obs.size, obs.mtime_ns,
                               stream=self.ctx.stream)
        attempts = row.attempts if row else MAX_ATTEMPTS
        if attempts >= MAX_ATTEMPTS:
            reason = f"processing failed {attempts} times, giving up on this checkpoint: {reason}"
            self.log.error("checkpoint.invalid", checkpoint=canonical(obs.path), action="ignore", reason=reason,
                           exc_info=exc)
            return self._invalid(obs, reason, counted=False)
        self.log.error("checkpoint.failed", checkpoint=canonical(obs.path), action="retry", attempt=attempts,
                       reason=reason, exc_info=exc)
        return "retry"

    def _invalid(self, obs: Observation, reason: str, *, counted: bool = True, **kw: Any) -> str:
        if counted:
            self.metrics.rejected.labels(reason=rejection_reason(reason)).inc()
        self._record(obs, status="invalid", reason=reason, **kw)
        self._event("invalid", error=f"{canonical(obs.path)}: {reason}")
        self._final[str(obs.path)] = obs.signature
        return "invalid"

    def _process(self, obs: Observation) -> str:
        if not self.reconciled:
            self.reconcile()
        path = obs.path
        row = self.ledger.find(self.ctx.watch.name, self.ctx.run, canonical(path), obs.size, obs.mtime_ns,
                               stream=self.ctx.stream)
        if row is not None and row.status in FINAL_STATUSES:
            return row.status
        if row is None:
            self.metrics.detected.inc()
        try:
            check_complete(path)
        except IncompleteCheckpointError as exc:
            if not _unchanged(obs):
                return "retry"
            if row is None or row.reason != exc.reason:
                self.metrics.rejected.labels(reason=rejection_reason(exc.reason)).inc()
                self.log.warning("checkpoint.incomplete", checkpoint=canonical(path), action="wait",
                                 reason=f"{exc.reason} (will be retried when the file changes)")
            self._record(obs, status="incomplete", reason=exc.reason)
            self._event("incomplete", error=str(exc))
            return "incomplete"
        except CheckpointError:
            pass  # corrupt or foreign: the load below reports it, once, as invalid
        outside = refusal(path, self.ctx.watch.root)  # a symlink out of the root (also inside a folder), a FIFO
        if outside:
            self.log.error("checkpoint.invalid", checkpoint=canonical(path), action="ignore", reason=outside)
            return self._invalid(obs, outside)
        try:
            loaded = self._load(path)
        except NotInStream as exc:
            self._record(obs, status="skipped", reason=str(exc))
            self._final[str(path)] = obs.signature
            self.log.debug("checkpoint.skipped", checkpoint=canonical(path), action="skip", reason=str(exc))
            return "skipped"
        except (CheckpointError, OSError) as exc:
            if not _unchanged(obs) or isinstance(exc, CheckpointChangedError):
                self.log.info("checkpoint.changed", checkpoint=canonical(path), action="retry",
                              reason="the file changed or vanished while being read")
                return "retry"
            reason = exc.reason if isinstance(exc, CheckpointError) else str(exc)
            self.log.error("checkpoint.invalid", checkpoint=canonical(path), action="ignore", reason=reason)
            return self._invalid(obs, reason)
        metric, metric_src = first_value(self.ctx.metric_sources, path, loaded.obj, loaded.metadata, "metric")
        step_value, _ = first_value(self.ctx.step_sources, path, loaded.obj, loaded.metadata, "step")
        step = None if step_value is None else int(step_value)
        if not _unchanged(obs):
            self.log.info("checkpoint.changed", checkpoint=canonical(path), action="retry",
                          reason="the file changed while being read; discarded")
            return "retry"
        sha = loaded.sha256
        self._check_lease()  # the read may have taken long: a daemon that lost the run meanwhile records nothing
        ckpt_id = self._record(obs, status="pending", sha256=sha, metric=metric,
                               metric_source=metric_src if metric is not None else None, step=step)
        members = self.members()
        record = Record(ckpt_id, canonical(path), sha, metric, step, obs.mtime_ns / 1e9)
        decision = decide([m.record for m in members], record, self.ctx.policy.average.top_k,
                          self.ctx.policy.metric.mode)
        if decision.action != "join":
            return self._finish_without_change(obs, decision, metric, metric_src, step, sha)
        problem = self._validate(members, loaded.weights)
        if problem:
            self.log.error("checkpoint.refused", checkpoint=canonical(path), metric=metric, action="refuse",
                           reason=problem)
            return self._invalid(obs, problem, sha256=sha, metric=metric, step=step)
        return self._join(obs, decision, record, loaded, members, metric_src)

    def _validate(self, members: list[MemberRow], weights: Mapping[str, torch.Tensor]) -> str:
        """Why ``weights`` must not be published ('' if fine), checked before any output is touched."""
        try:
            return publish_problem(weights, [m.file for m in members])
        except NoReadableMember:
            self.reconciled = False  # recovery rebuilds the member copies before the next candidate
            raise OutputUnavailable(f"no member copy of {self.ctx.run} is readable to check the architecture "
                                    "against; recovering the members first") from None

    def _finish_without_change(self, obs: Observation, decision: Decision, metric: float | None,
                               metric_src: str, step: int | None, sha: str) -> str:
        status = {"unranked": "unranked", "duplicate": "duplicate", "skip": "skipped"}[decision.action]
        reason = decision.reason if decision.action != "unranked" else f"{decision.reason} ({metric_src})"
        self._record(obs, status=status, reason=reason, sha256=sha, metric=metric, step=step)
        self._final[str(obs.path)] = obs.signature
        self.log.info("checkpoint." + status, checkpoint=canonical(obs.path), metric=metric, step=step,
                      action=decision.action, reason=reason)
        self._event(status)
        if self.defer_manifest:
            self._manifest_stale = True  # only "last" changed: published once by flush_manifest()
        else:
            self.write_manifest()
        return status

    def flush_manifest(self) -> None:
        """Publish the manifest-only changes deferred during a job (10,000 skipped files: one generation, not
        10,000)."""
        if self._manifest_stale:
            self._manifest_stale = False
            self.write_manifest()
        if self.remote is not None:
            self.remote.catch_up()  # the object store behind the committed outputs: publish; raises if it fails

    def _join(self, obs: Observation, decision: Decision, record: Record, loaded: Loaded,
              old_members: list[MemberRow], metric_src: str) -> str:
        out, policy = self.ctx.output, self.ctx.policy
        files = {m.record.ckpt_id: m.file for m in old_members}
        new_file = member_path(out, record.path, record.sha256)
        timer = self.metrics.job_duration
        try:
            with timer.labels(action="member").time():
                write_member(new_file, loaded.weights, source=record.path, sha256=record.sha256,
                             metric=record.metric, step=record.step, layout=loaded.layout, source_size=obs.size,
                             source_mtime_ns=obs.mtime_ns, stream=self.ctx.stream)
        except OSError as exc:
            if exc.errno in OUTPUT_ERRNOS:
                raise OutputUnavailable(f"cannot write member copy {new_file}: {exc.strerror or exc}; nothing was "
                                        "published, the previous outputs stay; retrying after a back-off") from exc
            raise
        files[record.ckpt_id] = str(new_file)
        members = [MemberRow(r, files[r.ckpt_id]) for r in decision.members]
        # an evaluated average is not replaced here: the evaluation job decides (gate.apply)
        average_changed = len(members) >= policy.average.min_members and not policy.average.evaluated
        done = CheckpointRow(record.ckpt_id, record.path, obs.size, obs.mtime_ns, record.sha256, "done",
                             decision.reason, record.metric, record.step)

        def commit_ledger() -> None:
            with self.ledger.transaction() as db:
                if self.fence is not None:
                    # members and "done" only while this daemon holds the run (same transaction)
                    self.generation = self.fence(db)
                self.ledger.set_members(db, self.ctx.watch.name, self.ctx.run, members, stream=self.ctx.stream)
                self.ledger.record(self.ctx.watch.name, self.ctx.run, canonical(obs.path), obs.size, obs.mtime_ns,
                                   status="done", reason=decision.reason, sha256=record.sha256,
                                   metric=record.metric, metric_source=metric_src, step=record.step,
                                   stream=self.ctx.stream, db=db)

        with timer.labels(action="publish").time(), self.manifest_lock:  # manifest built and published under it
            self._publish(members, self._manifest(members, done), best_changed=decision.new_best,
                          average_changed=average_changed, before_commit=commit_ledger, fenced=True)
        self._manifest_stale = False  # that manifest carries every deferred change too
        self._final[str(obs.path)] = obs.signature
        with self.manifest_lock:  # never between an evaluation's check of its members' copies and its publish
            recovery.prune_members(out, {m.file for m in members})  # evicted copies no kept generation names
        if decision.new_best:
            self.metrics.success("best")
        if average_changed:
            self.metrics.success("average")
        self.log.info("checkpoint.joined", checkpoint=record.path, metric=record.metric, step=record.step,
                      action="join", reason=decision.reason, k=len(members), average=average_changed,
                      new_best=decision.new_best)
        self._event("new_best" if decision.new_best else "joined")
        self.request_export(members, new_best=decision.new_best, average_changed=average_changed)
        self.request_evaluation()
        if self.hooks is not None:
            env = {"CKPTD_CHECKPOINT": record.path, "CKPTD_METRIC": str(record.metric), "CKPTD_STEP": str(record.step),
                   "CKPTD_SHA256": record.sha256, "CKPTD_STREAM": self.ctx.stream}
            if decision.new_best:
                self.hooks.fire(self, "on_new_best", {**env, "CKPTD_BEST": str(out / "best.safetensors")})
            if average_changed:
                self.hooks.fire(self, "on_average", {**env, "CKPTD_AVERAGE": str(out / AVERAGE),
                                                     "CKPTD_K": str(len(members))})
        return "done"


def _unchanged(obs: Observation) -> bool:
    """Is the candidate still exactly what the scan saw (not rewritten, not deleted)?"""
    now = observe(obs.path, obs.is_dir)
    return now is not None and now.signature == obs.signature
