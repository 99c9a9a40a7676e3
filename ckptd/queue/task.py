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

Object-store output (the payload names ``remote_input``, see :mod:`ckptd.queue.remote`): the input is downloaded
into this worker's scratch folder, the package is built there and uploaded under ``coreml/<version>/`` (the
version named by the export id) before the same conditioned commit, whose ``path`` is the prefix's URL. Nothing is
switched: the daemon's next publication names the prefix in the remote manifest. A retry re-uploads to the same
prefix and commits once; an attempt refused because a newer request exists deletes the prefix.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd.daemon.export_inputs import release_input
from ckptd.daemon.export_seam import Log
from ckptd.export.runner import VERSIONS_DIR, ExportProcesses, publish_package, run_export
from ckptd.queue import store
from ckptd.queue.app import AttemptFailed, WorkerStopping, retry_delay
from ckptd.queue.payload import Payload, remote_version, staging_prefix, version_label

if TYPE_CHECKING:
    from ckptd.daemon.config import Config
    from ckptd.export.request import ExportResult

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

    def __init__(self, ledger: Any, log: Log, holder: str, config: Config | None = None) -> None:
        """``config``: the worker's config, needed for jobs of object-store outputs (the watch's storage options
        and output template, the ``state_dir`` for scratch); without it such jobs fail with the reason."""
        self.ledger, self.log, self.holder, self.config = ledger, log, holder, config
        self.processes = ExportProcesses()
        self.stopping = False
        self._scratch: Path | None = None

    def stop(self) -> None:
        """SIGTERM: kill the running conversions (their jobs go back to the queue at once). Blocks while reaping."""
        self.stopping = True
        self.processes.kill_all()

    def close(self) -> None:
        """The worker exits: its scratch folder goes (a killed worker's is removed by the next one's start)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

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
            if p.remote_input:
                return self._export_remote(p, job, log)
            existing = find_version(Path(p.output), p.export_id)
            if existing is not None:
                return self._commit_existing(p, existing, p.staging(job.attempts), log)
            return self._export(p, job, log)
        except (AttemptFailed, WorkerStopping):
            raise
        except Exception as exc:  # ckptd's own trouble (ledger, disk, store): the row says so, the job is retried
            reason = f"the worker failed while handling the export: {type(exc).__name__}: {exc}"
            retry = retry_delay(job.attempts) is not None
            log.error("export.failed", action="keep previous", reason=reason, exc_info=True)
            try:
                store.fail(self.ledger, p.export_id, self.holder, reason)
            except Exception:  # noqa: BLE001 (the ledger is what failed; the retry claims the row again)
                pass
            if not retry:
                self._release(p)
            raise AttemptFailed(reason, retry=retry) from exc

    def _export(self, p: Payload, job: Any, log: Log) -> str:
        """A shared local output: build in the output's staging, move into a version directory, switch the link."""
        staging, output = p.staging(job.attempts), Path(p.output)
        remove_staging(p, keep=None)  # earlier attempts', killed before publishing
        try:
            result = self._convert(p, staging, None, log)

            def publish(status: str) -> tuple[store.PathOrUrl | None, str]:
                label = version_label(p.export_id, p.sha256) + ("-partial" if status == "partial" else "")
                version = store.publish(self.ledger, p.export_id, self.holder, status,
                                        lambda: publish_package(staging, output, label=label, keep=p.keep))
                return version, str(output / LINK)

            return self._finish(p, job, result, publish, log)
        finally:  # a published package was renamed away already; a killed attempt's may have been left
            remove_staging(p, keep=None)

    def _export_remote(self, p: Payload, job: Any, log: Log) -> str:
        """An object-store output: download the input, build here, upload under ``coreml/<version>/``, commit."""
        from ckptd.queue.remote import attempt_dir, for_payload, scratch_root

        if self.config is None:
            raise RuntimeError("this worker has no config to reach the job's object store")
        target = for_payload(self.config, p)
        if self._scratch is None:
            self._scratch = scratch_root(self.config.state_dir)
        scratch = attempt_dir(self._scratch, p.export_id, job.attempts)
        try:
            weights = scratch / ("input" + (Path(p.remote_input).suffix or ".safetensors"))
            target.get(p.remote_input, weights)
            staging = scratch / "package.mlpackage"
            result = self._convert(p, staging, weights, log)

            def publish(status: str) -> tuple[store.PathOrUrl | None, str]:
                version = remote_version(p.export_id, p.sha256, attempt=job.attempts, partial=status == "partial")
                url = target.upload_package(version, staging)  # before the commit: a reader never misses it
                committed = store.publish(self.ledger, p.export_id, self.holder, status, lambda: url)
                if committed is not None:
                    target.delete_packages_of(p.export_id, keep=version)  # killed attempts' leftovers
                else:  # superseded, or another attempt of it committed its own prefix: nothing will name ours
                    target.delete_package(version)
                return committed, url

            return self._finish(p, job, result, publish, log)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _convert(self, p: Payload, staging: Path, weights: Path | None, log: Log) -> ExportResult:
        log.info("export.started", action="export", worker=self.holder,
                 reason=f"queued export; {p.request.get('precision')}, "
                        f"{p.request.get('minimum_deployment_target')}")
        result = run_export(p.export_request(staging, weights), p.timeout, self.processes)
        if self.stopping:
            store.requeue(self.ledger, p.export_id, self.holder, "the worker stopped (SIGTERM); the export is "
                          "queued again")
            log.info("export.requeued", reason="the worker is stopping: the export was killed and goes back to "
                                               "the queue")
            raise WorkerStopping()
        return result

    def _finish(self, p: Payload, job: Any, result: ExportResult,
                publish: Callable[[str], tuple[store.PathOrUrl | None, str]], log: Log) -> str:
        """Publish a verified package exactly once (``publish``: the conditioned commit; returns the committed
        version, None when refused, and what readers use), or record the failure and decide the retry."""
        if result.status == "ok" or (result.status == "partial" and p.publish_partial):
            store.record_result(self.ledger, p.export_id, self.holder, capture=result.capture,
                                verification=json.dumps(result.verification))
            version, where = publish(result.status)
            if version is None:
                return self._not_published(p, log)
            self._release(p)
            log.info("export.published", action="publish", path=where, version=Path(str(version)).name,
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
            self._release(p)
        raise AttemptFailed(reason, retry=delay is not None)

    def _release(self, p: Payload) -> None:
        """The job is over (published, superseded, failed for good): drop its input."""
        if not p.remote_input:
            release_input(Path(p.input))
            return
        try:
            from ckptd.queue.remote import for_payload

            if self.config is not None:
                for_payload(self.config, p).delete(p.remote_input)
        except Exception as exc:  # noqa: BLE001 (the daemon's sweep deletes it later)
            self.log.warning("export.input_not_deleted", export_id=p.export_id, key=p.remote_input,
                             reason=f"{type(exc).__name__}: {exc}; the daemon's next sweep deletes it")

    def _drop_remote_package(self, p: Payload) -> None:
        """A dropped request (superseded, gone) of an object-store output: whatever package prefix a killed
        attempt of it uploaded is garbage (no manifest ever names it)."""
        if not p.remote_input or self.config is None:
            return
        try:
            from ckptd.queue.remote import for_payload

            target = for_payload(self.config, p)
            target.delete_packages_of(p.export_id)
        except Exception as exc:  # noqa: BLE001 (left for the publisher's clean-up of older versions)
            self.log.warning("export.package_not_deleted", export_id=p.export_id,
                             reason=f"{type(exc).__name__}: {exc}; removed by a later publication of the run")

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
        self._release(p)
        log.info("export.published", action="publish", path=str(output / LINK), version=Path(version).name,
                 reason="an earlier attempt of this export was killed after moving its verified package into "
                        "place: committed that package, not exported again")
        return "published"

    def _not_claimed(self, p: Payload, claim: str, log: Log) -> str:
        if claim == "published":
            self._release(p)  # the committing attempt died before releasing it
            log.info("export.already_published", reason="an earlier attempt of this export published it; its "
                                                        "worker died before the job was acknowledged")
            return claim
        self._release(p)
        if p.remote_input:
            self._drop_remote_package(p)
        else:
            remove_staging(p, keep=None)
        log.info("export.superseded", reason="a newer export request of the run exists (or this one was "
                                             f"dropped: {claim}); not exported")
        return claim

    def _not_published(self, p: Payload, log: Log) -> str:
        if store.mark_superseded(self.ledger, p.export_id, self.holder, "a newer export request of the run "
                                 "arrived while it ran; not published"):
            self._release(p)
            log.info("export.superseded", action="keep previous", reason="a newer export request of the run "
                                                                         "arrived while it ran; not published")
            return "superseded"
        log.warning("export.not_published", reason="the export row is no longer this worker's (another attempt "
                                                   "took the job over); not published")
        return "lost"
