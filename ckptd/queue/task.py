"""The worker's side of one ``ckptd.export`` job: export like the daemon's local executor, publish exactly once.

Per attempt: claim the row (still the run's newest request, see :mod:`ckptd.queue.store`); run the export in a
child process (``ckptd.export.runner.run_export``: its own process group and timeout, so a crashing or killed
conversion never takes the worker down); publish a verified package with ``publish_package`` (the daemon's own
function) inside the ledger transaction that marks the row ``ok``.

After a kill: an attempt killed before publishing left a staging package (its path is the export id's; the next
attempt removes it and exports again). One killed after the package was moved to its version directory (named
by the export id, :func:`find_version`) but before the commit left a verified package: the next attempt commits
that one instead of exporting again, so a request never has two version directories nor two ``ok`` rows.

A worker that is presumed dead but still runs (its heartbeats lost) can race the retry of its own job; the
ledger's condition (``holder`` = the attempt's worker) still lets only one of them publish.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ckptd.daemon.export_inputs import release_input
from ckptd.daemon.export_seam import Log
from ckptd.export.runner import VERSIONS_DIR, ExportProcesses, publish_package, run_export
from ckptd.queue import store
from ckptd.queue.app import AttemptFailed, WorkerStopping, retry_delay
from ckptd.queue.payload import Payload, staging_prefix, version_label

LINK = "best.mlpackage"


def remove_staging(p: Payload, keep: Path | None) -> None:
    """Remove the staging packages of this export's attempts (but ``keep``)."""
    for path in (Path(p.output) / VERSIONS_DIR).glob(staging_prefix(p.export_id) + "*"):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def find_version(output: Path, export_id: int) -> Path | None:
    """The version directory an earlier attempt of this export moved its verified package to, if any."""
    found = sorted((output / VERSIONS_DIR).glob(f"best-v*-q{export_id}-*.mlpackage"))
    return found[-1] if found else None


class ExportTask:
    """Runs jobs for one worker process (``holder``); thread-safe (procrastinate runs sync tasks in threads)."""

    def __init__(self, ledger: Any, log: Log, holder: str) -> None:
        self.ledger, self.log, self.holder = ledger, log, holder
        self.processes = ExportProcesses()
        self.stopping = False

    def stop(self) -> None:
        """SIGTERM: kill the running conversions (their jobs go back to the queue at once). Blocks while reaping."""
        self.stopping = True
        self.processes.kill_all()

    def run(self, job: Any, args: dict[str, Any]) -> str:
        try:
            p = Payload.from_args(args)
        except (TypeError, ValueError) as exc:
            self.log.error("export.failed", job=job.id, reason=f"unreadable job payload: {exc}")
            raise AttemptFailed(str(exc), retry=False) from None
        log = self.log.bind(watch=p.watch, run=p.run, **({"stream": p.stream} if p.stream != "model" else {}),
                            checkpoint=p.source, metric=p.metric, export_id=p.export_id, job=job.id,
                            attempt=job.attempts + 1)
        if self.stopping:
            raise WorkerStopping()
        claim = store.claim(self.ledger, p.export_id, self.holder, job.id)
        if claim != "claimed":
            return self._not_claimed(p, claim, log)
        try:
            existing = find_version(Path(p.output), p.export_id)
            if existing is not None:
                return self._commit_existing(p, existing, p.staging(job.attempts), log)
            return self._export(p, job, log)
        except (AttemptFailed, WorkerStopping):
            raise
        except Exception as exc:  # ckptd's own trouble (ledger, disk): the row says so, the job is retried
            reason = f"the worker failed while handling the export: {type(exc).__name__}: {exc}"
            retry = retry_delay(job.attempts) is not None
            log.error("export.failed", action="keep previous", reason=reason, exc_info=True)
            try:
                store.fail(self.ledger, p.export_id, self.holder, reason)
            except Exception:  # noqa: BLE001 (the ledger is what failed; the retry claims the row again)
                pass
            if not retry:
                release_input(Path(p.input))
            raise AttemptFailed(reason, retry=retry) from exc

    def _export(self, p: Payload, job: Any, log: Log) -> str:
        staging, output = p.staging(job.attempts), Path(p.output)
        remove_staging(p, keep=None)  # earlier attempts', killed before publishing
        try:
            log.info("export.started", action="export", worker=self.holder,
                     reason=f"queued export; {p.request.get('precision')}, "
                            f"{p.request.get('minimum_deployment_target')}")
            result = run_export(p.export_request(staging), p.timeout, self.processes)
            if self.stopping:
                store.requeue(self.ledger, p.export_id, self.holder, "the worker stopped (SIGTERM); the export is "
                              "queued again")
                log.info("export.requeued", reason="the worker is stopping: the export was killed and goes back to "
                                                   "the queue")
                raise WorkerStopping()
            if result.status == "ok" or (result.status == "partial" and p.publish_partial):
                verification = json.dumps(result.verification)
                store.record_result(self.ledger, p.export_id, self.holder, capture=result.capture,
                                    verification=verification)
                label = version_label(p.export_id, p.sha256) + ("-partial" if result.status == "partial" else "")
                version = store.publish(self.ledger, p.export_id, self.holder, result.status,
                                        lambda: publish_package(staging, output, label=label, keep=p.keep))
                if version is None:
                    return self._not_published(p, log)
                release_input(Path(p.input))
                log.info("export.published", action="publish", path=str(output / LINK), version=version.name,
                         capture=result.capture, seconds=round(result.seconds, 2),
                         verification={k: v for k, v in result.verification.items()
                                       if k in ("graph_parity", "spec", "package_run", "predict")})
                return "published"
            reason = result.reason or f"verification {result.status}: {result.verification.get('package_run', '')}"
            delay = retry_delay(job.attempts) if result.status == "failed" else None  # a partial will not change
            store.fail(self.ledger, p.export_id, self.holder, reason, capture=result.capture,
                       verification=json.dumps(result.verification))
            log.error("export.failed", action="keep previous", reason=reason,
                      **({"retry_in": f"{delay:g}s"} if delay is not None else {}))
            if delay is None:
                release_input(Path(p.input))
            raise AttemptFailed(reason, retry=delay is not None)
        finally:  # a published package was renamed away already; a killed attempt's may have been left
            remove_staging(p, keep=None)

    def _commit_existing(self, p: Payload, existing: Path, staging: Path, log: Log) -> str:
        """An earlier attempt moved this export's verified package into place, then died before its commit."""
        output = Path(p.output)

        def switch() -> Path:
            if os.path.realpath(output / LINK) == os.path.realpath(existing):
                return existing  # the link was switched too: only the commit is missing
            os.rename(existing, staging)  # not visible to readers yet: publish it the ordinary way
            return publish_package(staging, output, label=label, keep=p.keep)

        status = "partial" if existing.name.endswith("-partial.mlpackage") else "ok"
        label = version_label(p.export_id, p.sha256) + ("-partial" if status == "partial" else "")
        version = store.publish(self.ledger, p.export_id, self.holder, status, switch)
        if version is None:
            return self._not_published(p, log)
        release_input(Path(p.input))
        log.info("export.published", action="publish", path=str(output / LINK), version=version.name,
                 reason="an earlier attempt of this export was killed after moving its verified package into "
                        "place: committed that package, not exported again")
        return "published"

    def _not_claimed(self, p: Payload, claim: str, log: Log) -> str:
        if claim == "published":
            release_input(Path(p.input))  # the committing attempt died before releasing it
            log.info("export.already_published", reason="an earlier attempt of this export published it; its "
                                                        "worker died before the job was acknowledged")
            return claim
        release_input(Path(p.input))
        remove_staging(p, keep=None)
        log.info("export.superseded", reason="a newer export request of the run exists (or this one was "
                                             f"dropped: {claim}); not exported")
        return claim

    def _not_published(self, p: Payload, log: Log) -> str:
        if store.mark_superseded(self.ledger, p.export_id, self.holder, "a newer export request of the run "
                                 "arrived while it ran; not published"):
            release_input(Path(p.input))
            log.info("export.superseded", action="keep previous", reason="a newer export request of the run "
                                                                         "arrived while it ran; not published")
            return "superseded"
        log.warning("export.not_published", reason="the export row is no longer this worker's (another attempt "
                                                   "took the job over); not published")
        return "lost"
