"""CoreML exports for the daemon: one export per run at a time, newest request wins, never blocking runs.

Each request is a job that owns an immutable input: a hard link taken in the run's worker when the export is
requested (``export_inputs``), so evicting members or replacing the average afterwards cannot pull it away.
If an export of the run is running, the request waits; a newer request supersedes the waiting one, which is
dropped (never run) and its link removed, so a burst of new bests exports only the newest. The export runs in a
child process with the policy's timeout; a verified package is published atomically, anything else keeps the
previous one. A failed export of the current best is retried on its own with backoff (``RETRY_DELAYS``); a newer
request cancels the retry. Every attempt is a ledger row, finished whatever happens (the manifest's ``coreml``
block is a view of those rows, see ``export_state``).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ckptd.atomic import TEMP_PREFIX
from ckptd.daemon.config import CoremlPolicy
from ckptd.daemon.export_inputs import leftover_inputs, release_input, take_input
from ckptd.daemon.export_seam import ExportRun, Log
from ckptd.daemon.export_state import average_signature, coreml_block
from ckptd.daemon.idle import wait_idle
from ckptd.daemon.ledger import Ledger, MemberRow
from ckptd.daemon.outputs import AVERAGE
from ckptd.daemon.telemetry import Metrics
from ckptd.export.request import ExportRequest, ExportResult
from ckptd.export.runner import VERSIONS_DIR, ExportProcesses, publish_package, run_export, staging_path
from ckptd.queue.client import live_files

if TYPE_CHECKING:
    from ckptd.queue.client import QueueExports

RETRY_DELAYS: tuple[float, ...] = (30.0, 120.0, 600.0)  # after the 1st, 2nd, 3rd+ failure (the last one repeats)
Key = tuple[str, str, str, str]  # (watch, run, stream, output): one export at a time per published package
Outcome = Literal["ok", "retry", "final", "stopped"]


@dataclass(frozen=True)
class ExportJob:
    """One export request. ``input`` is the job's own hard link; it is released when the job ends or is
    superseded (or kept across a retry's backoff)."""

    run: ExportRun
    kind: Literal["best", "average"]
    input: Path
    source: str  # the checkpoint path, or "average"
    sha256: str  # content identity: the checkpoint's sha256, or the average's signature
    metric: float | None
    step: int | None
    attempt: int = 1

    @property
    def key(self) -> Key:
        ctx = self.run.ctx
        return ctx.watch.name, ctx.run, ctx.stream, str(ctx.output)

    def same_work(self, other: ExportJob) -> bool:
        """Would exporting ``other`` produce the same package (same content, same export settings)?"""
        return (self.kind, self.sha256) == (other.kind, other.sha256) and \
            self.run.ctx.policy.coreml == other.run.ctx.policy.coreml


def build_request(policy: CoremlPolicy, job: ExportJob, staging: Path) -> ExportRequest:
    inputs = [{"name": i.name, "shape": [list(d) if isinstance(d, tuple) else d for d in i.shape], "kind": i.kind,
               "dtype": i.dtype, "scale": i.scale, "bias": list(i.bias), "color_layout": i.color_layout,
               "enumerated_shapes": [list(s) for s in i.enumerated_shapes]} for i in policy.inputs]
    return ExportRequest(
        weights=str(job.input), factory=policy.factory, output=str(staging), inputs=inputs,
        factory_kwargs=dict(policy.factory_kwargs), python_path=list(policy.python_path), outputs=list(policy.outputs),
        precision=policy.precision, minimum_deployment_target=policy.minimum_deployment_target,
        compression=policy.compression, author=policy.author, version=policy.version,
        description=policy.description,
        metadata={"source": job.source, "sha256": job.sha256, "metric": "" if job.metric is None else repr(job.metric),
                  "step": "" if job.step is None else str(job.step)},
    )


class ExportScheduler:
    """Implements ``export_seam.ExportRequester``. Thread-safe: requests come from run workers, retries from
    timers, exports run in a small thread pool (each waiting on its child process)."""

    def __init__(self, ledger: Ledger, log: Log, max_parallel: int = 1, metrics: Metrics | None = None,
                 retry_delays: Sequence[float] = RETRY_DELAYS) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.log = log
        self.retry_delays = tuple(retry_delays)
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="ckptd-export")
        self._lock = threading.Lock()
        self._running: dict[Key, ExportJob] = {}
        self._pending: dict[Key, ExportJob] = {}
        self._retry: dict[Key, tuple[ExportJob, threading.Timer]] = {}
        self._staging: dict[Key, Path] = {}
        self._processes = ExportProcesses()
        self._queue: QueueExports | None = None  # executor: queue (ckptd.queue.client), opened at first use
        self.stopping = False
        left = ledger.abandon_running_exports("the daemon stopped while this export ran (crash or kill); "
                                              "the export is redone if it is still current")
        if left:
            log.warning("export.abandoned", count=left, reason="export rows left 'running' by a previous daemon "
                        "process (crash or kill) marked abandoned")

    # --- requests (from the run's worker thread) -------------------------------------------------------------
    def request_best(self, run: ExportRun, member: MemberRow) -> None:
        r = member.record
        link = self._take(run, Path(member.file), r.sha256, r.path)
        if link is not None:
            self._request(ExportJob(run, "best", link, r.path, r.sha256, r.metric, r.step))

    def request_average(self, run: ExportRun, members: Sequence[MemberRow]) -> None:
        best = members[0].record
        signature = average_signature(members)
        link = self._take(run, run.ctx.output / AVERAGE, signature, "average")
        if link is not None:
            self._request(ExportJob(run, "average", link, "average", signature, best.metric, best.step))

    def _take(self, run: ExportRun, file: Path, sha256: str, source: str) -> Path | None:
        try:
            return take_input(run.ctx.output, file, sha256)
        except OSError as exc:
            run.log.error("export.not_requested", checkpoint=source, file=str(file),
                          reason=f"could not take the export's input (a link to ckptd's own file): {exc}")
            return None

    def _request(self, job: ExportJob) -> None:
        if job.run.ctx.policy.coreml.executor == "queue":
            self._enqueue(job)
            return
        key = job.key
        log = job.run.log
        with self._lock:
            if self.stopping:
                release_input(job.input)
                return
            running, waiting = self._running.get(key), self._pending.get(key)
            retry = self._retry.get(key)
            duplicate = (retry is not None and retry[0].same_work(job)) or (waiting is not None and waiting.same_work(
                job)) or (waiting is None and running is not None and running.same_work(job))
            if duplicate:
                release_input(job.input)
                log.info("export.already_requested", checkpoint=job.source, reason="the same export is already "
                         "running, waiting or scheduled for retry")
                return
            if retry is not None:
                retry[1].cancel()
                del self._retry[key]
                release_input(retry[0].input)
                log.info("export.retry_cancelled", checkpoint=retry[0].source,
                         reason=f"a newer export request ({job.source}) replaces the retry")
            if running is not None:
                self._pending[key] = job
                log.info("export.debounced", checkpoint=job.source, metric=job.metric,
                         reason="an export is running; only the newest waiting request will be exported"
                                + (f" (replaces {waiting.source})" if waiting else ""))
                if waiting is not None:
                    release_input(waiting.input)
                    log.info("export.superseded", checkpoint=waiting.source, metric=waiting.metric,
                             reason=f"a newer request ({job.source}) arrived before it ran; dropped, not exported")
                return
            self._start(key, job)

    def _enqueue(self, job: ExportJob) -> None:
        """``executor: queue``: a `ckptd worker` exports it (see ckptd.queue.client); nothing runs here."""
        from ckptd.queue.client import QueueExports

        with self._lock:
            if self.stopping or self.ledger.dialect != "postgresql":
                release_input(job.input)
                if not self.stopping:
                    job.run.log.error("export.not_requested", checkpoint=job.source, reason="executor: queue needs "
                                      "a PostgreSQL ledger (`ledger: postgresql://...`)")
                return
            if self._queue is None:
                self._queue = QueueExports(str(self.ledger.target), self.ledger, self.log, self.metrics)
            queue = self._queue
        queue.request(job)

    def _start(self, key: Key, job: ExportJob) -> None:
        """Run ``job`` now (lock held). Submitting under the lock makes it atomic with ``shutdown``."""
        try:
            self._pool.submit(self._run, key, job)
        except RuntimeError as exc:  # the pool is shut down (interpreter exit): nothing will run it
            release_input(job.input)
            job.run.log.info("export.abandoned", checkpoint=job.source, reason=f"not started: {exc}")
            return
        self._running[key] = job

    # --- running ----------------------------------------------------------------------------------------------
    def _run(self, key: Key, job: ExportJob | None) -> None:
        while job is not None:
            outcome = self._export(job)
            current = outcome == "retry" and self._still_current(job)  # reads the ledger: not under our lock
            with self._lock:
                following = None if self.stopping else self._pending.pop(key, None)
                if current and following is None and not self.stopping:
                    self._schedule_retry(key, job)  # the job keeps its input through the backoff
                else:
                    release_input(job.input)
                if following is None:
                    self._running.pop(key, None)
                else:
                    self._running[key] = following
            job = following

    def _export(self, job: ExportJob) -> Outcome:
        """One attempt. Never raises: whatever happens, the ledger row is finished and one line is logged."""
        ctx, policy, key = job.run.ctx, job.run.ctx.policy.coreml, job.key
        log = job.run.log.bind(checkpoint=job.source, metric=job.metric)
        staging = staging_path(ctx.output)
        with self._lock:
            self._staging[key] = staging  # before the child creates it: reconcile must not remove it
        export_id: int | None = None
        finished = ""  # the status the ledger row was finished with
        try:
            export_id = self.ledger.export_started(ctx.watch.name, ctx.run, job.source, job.sha256, job.metric,
                                                   job.step, stream=ctx.stream)
            log.info("export.started", action="export", attempt=job.attempt,
                     reason=f"new {policy.source}; {policy.precision}, {policy.minimum_deployment_target}")
            result = run_export(build_request(policy, job, staging), policy.timeout, self._processes)
            self._observe(result)
            if self.stopping:
                self.ledger.export_finished(export_id, "abandoned", reason="the daemon stopped; redone on restart")
                finished = "abandoned"
                log.info("export.abandoned", reason="the daemon is stopping; the export is redone on restart")
                return "stopped"
            if not job.run.lease_held():  # several daemons: only the run's holder publishes
                self.ledger.export_finished(export_id, "abandoned", reason="the run's lease was lost to another "
                                            "daemon; that daemon exports its own best")
                finished = "abandoned"
                log.warning("export.abandoned", reason="the run's lease was lost to another daemon: not published")
                return "stopped"
            if result.status == "ok" or (result.status == "partial" and policy.publish_partial):
                version = publish_package(staging, ctx.output, label=job.sha256[:12], keep=policy.keep)
                self.ledger.export_finished(export_id, result.status, path=str(version), capture=result.capture,
                                            verification=json.dumps(result.verification))
                finished = result.status
                self.ledger.clear_export_error(ctx.watch.name, ctx.run, stream=ctx.stream)
                log.info("export.published", action="publish", path=str(ctx.output / "best.mlpackage"),
                         version=version.name, capture=result.capture, seconds=round(result.seconds, 2),
                         attempt=job.attempt, verification={k: v for k, v in result.verification.items()
                                                            if k in ("graph_parity", "spec", "package_run",
                                                                     "predict")})
                job.run.note_export(self._block(job), ok=True)
                return "ok"
            reason = result.reason or f"verification {result.status}: {result.verification.get('package_run', '')}"
            self.ledger.export_finished(export_id, "failed", reason=reason, capture=result.capture,
                                        verification=json.dumps(result.verification))
            finished = "failed"
            log.error("export.failed", action="keep previous", attempt=job.attempt, reason=reason)
            job.run.note_export(self._block(job), ok=False)
            return "retry" if result.status == "failed" else "final"  # an unpublished partial will not change
        except Exception as exc:  # ckptd's own trouble (disk, ledger, manifest): never take the daemon down
            reason = f"ckptd failed while handling the export: {type(exc).__name__}: {exc}"
            log.error("export.failed", action="keep previous", attempt=job.attempt, reason=reason, exc_info=True)
            if export_id is not None and not finished:
                try:
                    self.ledger.export_finished(export_id, "failed", reason=reason)
                except (sqlite3.Error, OSError):
                    pass  # the ledger is what failed; the row is marked abandoned at the next start
            return "retry" if finished in ("", "failed") else "final"
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # published packages were renamed away already
            with self._lock:
                self._staging.pop(key, None)

    def _block(self, job: ExportJob) -> dict[str, Any]:
        ctx = job.run.ctx
        return coreml_block(self.ledger, ctx.watch.name, ctx.run, ctx.output, stream=ctx.stream) or {}

    def _observe(self, result: ExportResult) -> None:
        if self.metrics is None or self.stopping:
            return
        self.metrics.job_duration.labels(action="export").observe(result.seconds)
        self.metrics.exports.labels(result=result.status).inc()
        self.metrics.export_duration.labels(result=result.status).observe(result.seconds)
        if result.status == "ok":
            self.metrics.success("export")

    # --- retries --------------------------------------------------------------------------------------------
    def _still_current(self, job: ExportJob) -> bool:
        """Is this export still what the run should publish (its current best, or current average)?"""
        try:
            return job.run.export_target() == job.sha256
        except sqlite3.Error:
            return True  # cannot tell now; the retry itself is harmless

    def _schedule_retry(self, key: Key, job: ExportJob) -> None:
        if not self.retry_delays:
            release_input(job.input)
            return
        delay = self.retry_delays[min(job.attempt, len(self.retry_delays)) - 1]
        again = replace(job, attempt=job.attempt + 1)
        timer = threading.Timer(delay, self._retry_due, args=(key, again))
        timer.daemon = True
        self._retry[key] = (again, timer)
        timer.start()
        job.run.log.info("export.retry_scheduled", checkpoint=job.source, attempt=again.attempt,
                         retry_in=f"{delay:g}s", reason="the export of the current best failed; it is retried on "
                                                        "its own (a newer request cancels the retry)")

    def _retry_due(self, key: Key, job: ExportJob) -> None:
        current = self._still_current(job)  # reads the ledger: not under our lock
        with self._lock:
            entry = self._retry.get(key)
            if entry is None or entry[0] is not job:
                return  # cancelled meanwhile
            del self._retry[key]
            if self.stopping or key in self._running or not current:
                release_input(job.input)
                if not self.stopping:
                    job.run.log.info("export.retry_dropped", checkpoint=job.source,
                                     reason="no longer the current export target")
                return
            self._start(key, job)

    # --- recovery and lifecycle -----------------------------------------------------------------------------
    def reconcile_inputs(self, output: Path) -> list[Path]:
        """Remove inputs and staging packages under ``output`` that no waiting, running or retrying job holds."""
        removed: list[Path] = []
        queued, staged = live_files(self.ledger, output) if self.ledger.dialect == "postgresql" else (set(), ())
        with self._lock:  # held throughout: no job can register a file between the check and the removal
            jobs = [*self._running.values(), *self._pending.values(), *(j for j, _ in self._retry.values())]
            for path in leftover_inputs(output, {j.input for j in jobs} | queued):
                release_input(path)
                removed.append(path)
            versions = output / VERSIONS_DIR
            live = set(self._staging.values())
            if versions.is_dir():
                for path in versions.iterdir():
                    if path.name.startswith(TEMP_PREFIX) and path not in live and not path.name.startswith(staged):
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                        removed.append(path)
        return removed

    def busy(self) -> bool:
        """Is an export running or waiting? (Scheduled retries do not count: they may be minutes away.)"""
        with self._lock:
            return bool(self._running or self._pending)

    def wait(self, timeout: float | None = None) -> None:
        wait_idle(self.busy, timeout)

    def shutdown(self) -> None:
        with self._lock:
            self.stopping = True
            for job in self._pending.values():
                release_input(job.input)
            self._pending.clear()
            for job, timer in self._retry.values():
                timer.cancel()
                release_input(job.input)
            self._retry.clear()
        self._processes.kill_all()
        self._pool.shutdown(wait=True)
        if self._queue is not None:
            self._queue.shutdown()  # queued jobs stay queued: workers do not depend on this daemon
