"""The daemon's side of queued exports: enqueue requests (newest wins), then watch their rows for the manifest.

Newest request wins, and how: procrastinate's ``queueing_lock`` refuses a *new* job while one waits
(``AlreadyEnqueued``), the opposite of what a run needs. So a request (1) inserts its ``exports`` row first (from
then on it is the run's newest row), (2) cancels every older job of the run that is still waiting (``todo``,
including a retry awaiting its backoff) and marks their rows ``superseded`` and releases their inputs, (3) defers
its own job, unless a newer row of the run appeared since (1): then it drops itself. A job that had already
started is not interrupted: when it claims its row, and again when it publishes, the ledger condition "no newer
row of the run" fails and it ends ``superseded`` without switching anything (:mod:`ckptd.queue.store`). The ledger
is the truth; the cancellation only keeps stale work out of the queue, and ``AlreadyEnqueued`` (a job slipped in
between) just repeats step 2.

A job's ``lock`` is the run, so a run's jobs never run at once, and they run oldest first: an older job always
finishes (published, or superseded) before a newer one starts.

The daemon does not wait for the workers: a watcher thread polls the rows of the jobs it enqueued (one query per
second while any is pending) and, when one is finished, rewrites the run's manifest and fires its hooks through
``ExportRun.note_export``, as the local executor does. After a daemon restart the run's catch-up requests the same
export again; a job still pending for the same content and output directory is adopted, not enqueued twice.

A run with an object-store output is exported host-independently (:mod:`ckptd.queue.remote`): between (1) and
(2) the input is uploaded to ``<remote base>/exports/inputs/q<id>-<sha12>.<ext>`` (outside the lock: it may be
large; a request that finds a newer row of its run when it defers drops itself) and the job names that key;
the worker publishes under ``coreml/<version>/`` and the ledger row's ``path`` is that prefix's URL, which the
manifest's ``coreml`` block and the next remote publication name. Uploaded inputs are deleted when their job is
over: by the worker, by this watcher once it sees the row final, by the cancellation of a waiting job, and by a
sweep of the run's ``exports/inputs/`` at each request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd.daemon.export_inputs import release_input
from ckptd.daemon.export_state import coreml_block
from ckptd.queue import store
from ckptd.queue.app import (
    TASK,
    ensure_schema,
    make_app,
    queue_name,
    queueing_lock,
    quiet_library_logs,
    run_key,
)
from ckptd.queue.payload import Payload, input_key, staging_for, staging_prefix
from ckptd.remote.urls import is_remote

if TYPE_CHECKING:
    from ckptd.daemon.export_seam import ExportRun, Log
    from ckptd.daemon.exports import ExportJob
    from ckptd.daemon.ledger import Ledger
    from ckptd.daemon.telemetry import Metrics
    from ckptd.queue.remote import RemoteRun

POLL_S = 1.0
DEFER_TRIES = 5


@dataclass
class _Tracked:
    run: ExportRun
    job_id: int
    seen: tuple[str, float | None] = ("queued", None)
    remote: RemoteRun | None = None  # object-store output: where the job's uploaded input is
    remote_input: str = ""


class _Outdated(Exception):
    """A newer request of the run was inserted between this one's row and its job (while it uploaded its
    input): this one is dropped."""


class QueueExports:
    """Thread-safe (one lock around enqueueing; the watcher thread takes a snapshot under it)."""

    def __init__(self, url: str, ledger: Ledger, log: Log, metrics: Metrics | None = None,
                 poll_s: float = POLL_S) -> None:
        self.url, self.ledger, self.log, self.metrics, self.poll_s = url, ledger, log, metrics, poll_s
        self._app: Any = None
        self._lock = threading.Lock()
        self._tracked: dict[int, _Tracked] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> Any:
        if self._app is None:
            if ensure_schema(self.url):
                self.log.info("queue.schema_created", reason="first use of the export queue in this database")
            quiet_library_logs()
            app = make_app(self.url, max_size=2)
            app.open()
            self._app = app
            self._thread = threading.Thread(target=self._watch, name="ckptd-export-queue", daemon=True)
            self._thread.start()
        return self._app

    # --- requests ---------------------------------------------------------------------------------------------
    def request(self, job: ExportJob) -> None:
        """Enqueue ``job`` (its input link is taken); never raises: trouble is logged and the input released
        (the run's catch-up requests it again once the queue answers)."""
        ctx = job.run.ctx
        key = run_key(ctx.watch.name, ctx.run, ctx.stream)
        log = job.run.log.bind(checkpoint=job.source, metric=job.metric)
        export_id: int | None = None
        remote: RemoteRun | None = None
        uploaded = ""
        try:
            with self._lock:
                app = self._open()
                if self._adopt(job, key, log):
                    return
                export_id = store.insert_queued(self.ledger, ctx.watch.name, ctx.run, ctx.stream, job.source,
                                                job.sha256, job.metric, job.step)
            if getattr(ctx.watch, "remote_output", ""):
                remote = self._remote(job)
                uploaded = input_key(export_id, job.sha256, job.input.suffix or ".safetensors")
                remote.put(job.input, uploaded)  # outside the lock: a model-sized upload
                release_input(job.input)  # the worker reads the uploaded copy
                self._sweep(remote, key, log)
            with self._lock:
                newest = store.newest(self.ledger, ctx.watch.name, ctx.run, ctx.stream)
                if newest is not None and newest.id != export_id:
                    raise _Outdated()
                payload = self._payload(job, export_id, remote, uploaded)
                job_id = self._defer(app, key, payload, ctx.policy.coreml.capability, log, remote)
                self._tracked[export_id] = _Tracked(job.run, job_id, remote=remote, remote_input=uploaded)
        except Exception as exc:  # noqa: BLE001 (queue, ledger or store trouble: never take the run's worker down)
            release_input(job.input)
            if remote is not None and uploaded:
                self._delete_input(remote, uploaded, log)
            if export_id is not None:
                reason = ("a newer export request of the run arrived while its input was uploaded; dropped"
                          if isinstance(exc, _Outdated) else f"could not be queued: {exc}")
                try:
                    store.supersede(self.ledger, export_id, reason)
                except Exception:  # noqa: BLE001 (the ledger is what failed; the row stays queued, inert)
                    pass
            if isinstance(exc, _Outdated):
                log.info("export.superseded", export_id=export_id, reason="a newer request arrived while its input "
                                                                          "was uploaded; dropped, not exported")
                return
            log.error("export.not_requested", reason=f"could not queue the export: {type(exc).__name__}: {exc}; "
                                                     "requested again at the run's next new best or the daemon's "
                                                     "next start")
            return
        log.info("export.queued", export_id=export_id, job=job_id, queue=queue_name(ctx.policy.coreml.capability),
                 reason="executor: queue; a `ckptd worker` exports and publishes it"
                        + (f" (input uploaded to {remote.url}/{uploaded})" if remote is not None else ""))

    def _adopt(self, job: ExportJob, key: str, log: Log) -> bool:
        """The same export is already queued or running (a restarted daemon's catch-up): track it, do not
        enqueue it twice. Lock held."""
        ctx = job.run.ctx
        live = store.live_jobs(self.ledger, TASK, lock=key)
        last = store.newest(self.ledger, ctx.watch.name, ctx.run, ctx.stream)
        pending = {j.export_id: j for j in live}
        if last is None or last.sha256 != job.sha256 or last.status not in store.CLAIMABLE \
                or last.id not in pending or pending[last.id].args.get("output") != str(ctx.output):
            return False
        release_input(job.input)
        args = pending[last.id].args
        remote = self._remote(job) if args.get("remote_input") else None
        self._tracked.setdefault(last.id, _Tracked(job.run, pending[last.id].id, (last.status, last.finished_at),
                                                   remote=remote, remote_input=str(args.get("remote_input") or "")))
        log.info("export.already_requested", export_id=last.id,
                 reason="the same export is already queued or running on a worker")
        return True

    def _remote(self, job: ExportJob) -> RemoteRun:
        from ckptd.queue.remote import RemoteRun

        ctx = job.run.ctx
        return RemoteRun.for_watch(ctx.watch, ctx.run, ctx.stream)

    def _sweep(self, remote: RemoteRun, key: str, log: Log) -> None:
        """Delete the run's uploaded inputs whose export is over (a worker or daemon died before deleting it)."""
        from ckptd.queue.remote import sweep_inputs

        try:
            live = [j.export_id for j in store.live_jobs(self.ledger, TASK, lock=key) if j.export_id is not None]
            removed = sweep_inputs(remote, self.ledger, live)
        except Exception as exc:  # noqa: BLE001 (the next request sweeps again)
            log.warning("export.inputs_sweep_failed", reason=f"{type(exc).__name__}: {exc}")
            return
        if removed:
            log.info("export.inputs_removed", count=len(removed), reason="uploaded inputs of exports that are over")

    def _delete_input(self, remote: RemoteRun, key: str, log: Log) -> None:
        try:
            remote.delete(key)
        except Exception as exc:  # noqa: BLE001 (the next request's sweep deletes it)
            log.warning("export.input_not_deleted", key=key, reason=f"{type(exc).__name__}: {exc}")

    def _payload(self, job: ExportJob, export_id: int, remote: RemoteRun | None = None,
                 uploaded: str = "") -> Payload:
        from dataclasses import asdict

        from ckptd.daemon.exports import build_request

        ctx, policy = job.run.ctx, job.run.ctx.policy.coreml
        staging = staging_for(ctx.output, export_id, 0)  # each attempt uses its own (Payload.staging)
        return Payload(export_id=export_id, watch=ctx.watch.name, run=ctx.run, stream=ctx.stream,
                       policy=ctx.policy.name, output=str(ctx.output), input="" if remote else str(job.input),
                       source=job.source, sha256=job.sha256, metric=job.metric, step=job.step,
                       request=asdict(build_request(policy, job, staging)), timeout=policy.timeout, keep=policy.keep,
                       publish_partial=policy.publish_partial, remote_input=uploaded,
                       remote_base=remote.url if remote is not None else "")

    def _defer(self, app: Any, key: str, payload: Payload, capability: str, log: Log,
               remote: RemoteRun | None = None) -> int:
        from procrastinate.exceptions import AlreadyEnqueued

        deferrer = app.configure_task(TASK, lock=key, queueing_lock=queueing_lock(key),
                                      queue=queue_name(capability))
        for _ in range(DEFER_TRIES):
            self._cancel_waiting(app, key, payload.export_id, log, remote)
            try:
                return int(deferrer.defer(**payload.to_args()))
            except AlreadyEnqueued:
                continue  # a job of the run slipped in between (another daemon's late request): cancel it too
        raise RuntimeError(f"the run's queue slot stayed taken after {DEFER_TRIES} tries")

    def _cancel_waiting(self, app: Any, key: str, newer: int, log: Log, remote: RemoteRun | None = None) -> None:
        for live in store.live_jobs(self.ledger, TASK, lock=key):
            if live.status != "todo" or (live.export_id is not None and live.export_id >= newer):
                continue  # only older requests: a newer one (inserted while this one uploaded) wins
            if not app.job_manager.cancel_job_by_id(live.id):
                continue  # it started meanwhile: it ends superseded on its own
            if live.export_id is not None:
                store.supersede(self.ledger, live.export_id, f"a newer export request (#{newer}) replaced it "
                                                              "before it ran; dropped, not exported")
                self._tracked.pop(live.export_id, None)
            if live.args.get("input"):
                release_input(Path(live.args["input"]))
            if live.args.get("remote_input") and remote is not None:
                self._delete_input(remote, str(live.args["remote_input"]), log)
            log.info("export.superseded", export_id=live.export_id, job=live.id, checkpoint=live.args.get("source"),
                     metric=live.args.get("metric"),
                     reason=f"a newer request (#{newer}) arrived before it ran; dropped, not exported")

    # --- results ----------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 (a ledger hiccup: the next poll tries again)
                self.log.warning("queue.poll_failed", reason=f"{type(exc).__name__}: {exc}")

    def poll(self) -> None:
        """Note every tracked export that finished since the last poll; forget the ones that will not change."""
        with self._lock:
            tracked = dict(self._tracked)
        if not tracked:
            return
        rows = store.states(self.ledger, tracked)
        jobs = store.job_statuses(self.ledger, (t.job_id for t in tracked.values()))
        for export_id, t in tracked.items():
            row = rows.get(export_id)
            if row is not None and (row.status, row.finished_at) != t.seen:
                t.seen = (row.status, row.finished_at)
                if row.status in (*store.PUBLISHED, "failed"):
                    try:
                        self._note(t.run, row)
                    except Exception as exc:  # noqa: BLE001 (e.g. the run's lease moved: its new daemon writes it)
                        t.run.log.warning("export.note_failed", export_id=export_id,
                                          reason=f"could not rewrite the manifest: {type(exc).__name__}: {exc}")
            waiting = jobs.get(t.job_id) in ("todo", "doing")
            if row is None or row.status not in store.CLAIMABLE or not waiting:
                with self._lock:
                    if self._tracked.get(export_id) is t:
                        del self._tracked[export_id]
                if t.remote is not None and t.remote_input:  # the job is over: its uploaded input too
                    self._delete_input(t.remote, t.remote_input, t.run.log)

    def _note(self, run: ExportRun, row: store.RowState) -> None:
        ctx = run.ctx
        ok = row.status in store.PUBLISHED
        block = coreml_block(self.ledger, ctx.watch.name, ctx.run, ctx.output, stream=ctx.stream) or {}
        if ok:
            self.ledger.clear_export_error(ctx.watch.name, ctx.run, stream=ctx.stream)
            path = block.get("path")
            run.log.info("export.published", action="publish", executor="queue", export_id=row.id,
                         worker=row.holder, path=path if is_remote(path) else str(ctx.output / "best.mlpackage"),
                         version=block.get("version"),
                         checkpoint=block.get("source"))
        else:
            run.log.error("export.failed", action="keep previous", executor="queue", export_id=row.id,
                          worker=row.holder, checkpoint=block.get("source"), reason=block.get("reason"))
        if self.metrics is not None:
            self.metrics.exports.labels(result=row.status).inc()
            if ok:
                self.metrics.success("export")
        run.note_export(block, ok=ok)

    # --- lifecycle -------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop watching; queued jobs stay queued (workers do not depend on the daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._app is not None:
                try:
                    self._app.close()
                finally:
                    self._app = None


def live_files(ledger: Ledger, output: Path) -> tuple[set[Path], tuple[str, ...]]:
    """The inputs, and the name prefixes of the staging packages, under ``output`` that a waiting or running job
    owns: the daemon's clean-up of leftovers (``ExportScheduler.reconcile_inputs``) keeps them. Empty without a
    queue in the ledger database."""
    if not store.has_queue(ledger):
        return set(), ()
    inputs: set[Path] = set()
    prefixes: list[str] = []
    for live in store.live_jobs(ledger, TASK):
        if live.args.get("output") == str(output):
            if live.args.get("input"):
                inputs.add(Path(live.args["input"]))
            if live.export_id is not None:
                prefixes.append(staging_prefix(live.export_id))
    return inputs, tuple(prefixes)
