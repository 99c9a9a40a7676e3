"""The daemon's side of object-store outputs: after a local commit, publish the stream's outputs remotely.

A watch whose ``output`` is a URL (``s3://bucket/out/{run}``) stages its outputs locally under
``<state_dir>/staging/<watch>/<run>`` (config.py), so everything up to the local commit is unchanged; this module
then mirrors the committed generation to the object store (``ckptd.remote.object_outputs``). The local commit is
the daemon's truth; the remote copy may lag behind after a failure, never the other way round:

- after each local commit (:meth:`RemoteOutputs.after_commit`): publish; a failure is one log line naming the run
  and the reason and the run's status error; never raised (the local state is committed, the caller goes on);
- at the end of each of the run's jobs (:meth:`RemoteOutputs.catch_up`): one GET of the remote manifest; when it
  is not built from the committed local one, or carries an older lease generation than ours (a daemon that lost
  the run wrote it late), publish again; a failure there fails the job, so the service backs off and retries it.

Several daemons share a run's outputs over time (leases): ``fence`` (raises :class:`ckptd.errors.LeaseLost` when
this daemon no longer holds the run) runs right before the manifest PUT, and the PUT is conditional where the store
supports it (``ckptd.remote.object_outputs``). A lost lease is not a failure: one log line, no status error; the
next ``catch_up`` raises it, so that the service lets the run go as it does for a local publication.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ckptd.errors import LeaseLost
from ckptd.remote.object_outputs import (
    MANIFEST_SOURCE,
    RETAIN_GRACE,
    ObjectPublisher,
    RemoteOutputError,
    local_manifest_sha256,
)
from ckptd.remote.urls import filesystem, join, redact, scrub

if TYPE_CHECKING:
    from ckptd.daemon.pipeline import RunContext


ERROR_PREFIX = "remote outputs:"  # the run's status error set by a failed publication (cleared by a good one)


class RemoteOutputUnavailable(RemoteOutputError):
    """The remote outputs are behind the committed local ones and publishing them failed again."""


def remote_base(template: str, watch: str, run: str, stream: str) -> str:
    """The stream's remote base URL: the template filled for the model stream, ``<base>/<stream>`` for others
    (as the local outputs)."""
    base = template.format(watch=watch, run=run)
    return base if stream == "model" else join(base, stream)


class RemoteOutputs:
    """One stream's remote publication state (owned by its ``RunProcessor``)."""

    def __init__(self, ctx: RunContext, ledger: Any, log: Any, lock: threading.RLock,
                 generation: Callable[[], int | None] | None = None,
                 fence: Callable[[], object] | None = None) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.url = remote_base(ctx.watch.remote_output, ctx.watch.name, ctx.run, ctx.stream)
        self.log = log.bind(remote=redact(self.url))
        self.generation = generation or (lambda: None)
        self.fence = fence  # raises LeaseLost when the run is no longer ours; run right before the manifest PUT
        self._lost: LeaseLost | None = None  # the lease was lost during a publication: catch_up raises it
        self._written: int | None = None  # the generation of the remote manifest this process wrote (or found) last
        self._publisher: ObjectPublisher | None = None
        self._lock = lock  # the processor's manifest lock: member copies are pruned under it, never mid-upload
        self._synced: str | None = None  # sha256 of the local manifest the remote one was last built from
        self._failed: str | None = None  # the reason of the last failure, until a publication succeeds
        self._cleared = False  # a stale remote-publication error of an earlier process cleared from the status

    def _get_publisher(self) -> ObjectPublisher:
        if self._publisher is None:
            fs, path = filesystem(self.url, getattr(self.ctx.watch, "storage_options", None))
            grace = getattr(self.ctx.watch, "retain_grace", RETAIN_GRACE)
            self._publisher = ObjectPublisher(fs, path, self.log, retain_grace=grace)
        return self._publisher

    def after_commit(self) -> None:
        """A local generation was committed: publish it. Never raises."""
        if self._lost is not None:
            return  # the run is another daemon's: catch_up tells the service
        try:
            self._publish()
        except LeaseLost as exc:  # another daemon holds the run now: it publishes; ours stops here, quietly
            self._lost = exc
            self.log.info("outputs.remote_skipped", reason=f"the run's lease was lost ({exc}); its holder "
                          "publishes the outputs")
        except Exception as exc:  # noqa: BLE001 - any failure: the remote stays at its previous manifest
            self._note_failure(exc)

    def catch_up(self) -> None:
        """At the end of a job: publish when the remote manifest is not ours (one GET). Raises
        :class:`RemoteOutputUnavailable`, or :class:`LeaseLost` when the run is no longer ours."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            try:
                local = local_manifest_sha256(self.ctx.output)
                if local is None:
                    return
                if self._failed is None:
                    try:
                        remote = self._get_publisher().remote()
                    except Exception as exc:
                        if local == self._synced:  # nothing known to publish: the next job checks again
                            self.log.debug("outputs.remote_unknown", reason=_reason(exc))
                            return
                        raise
                    if self._in_place(remote, local):
                        self._synced = local  # (the first job of a process: the remote was built from this one)
                        return
                    if remote is not None and self._synced == local:
                        self.log.warning("outputs.remote_replaced", action="publishing again",
                                         reason=f"the remote manifest (generation {remote.get('generation')}) is "
                                                "not the one this daemon published last: written late by a daemon "
                                                "that lost the run?")
                self._publish()
            except LeaseLost as exc:
                self._lost = exc
                raise
            except Exception as exc:
                reason = _reason(exc)
                self._failed = reason
                raise RemoteOutputUnavailable(f"publishing the outputs to {redact(self.url)} failed: {reason}; "
                                              "the local outputs are committed, the remote ones stay as last "
                                              "published; retrying after a back-off") from exc

    def _in_place(self, remote: dict[str, Any] | None, local: str) -> bool:
        """Is the remote manifest built from the committed local one, and not older than the one we wrote last (or,
        before we wrote any, than our lease generation)?"""
        if remote is None or remote.get(MANIFEST_SOURCE) != local:
            return False
        ours, theirs = self._written if self._written is not None else self.generation(), remote.get("generation")
        return ours is None or (isinstance(theirs, int) and theirs >= ours)

    def _publish(self) -> None:
        with self._lock:
            before = local_manifest_sha256(self.ctx.output)
            result = self._get_publisher().publish(self.ctx.output, self.generation(), fence=self.fence)
            self._synced = before
            written = (result["manifest"] or {}).get("generation")
            self._written = written if isinstance(written, int) else self._written
            if result["committed"] or result["uploaded"]:
                self.log.info("outputs.remote_published", uploaded=len(result["uploaded"]),
                              deleted=len(result["deleted"]))
            if self._failed is not None or not self._cleared:
                if self._failed is not None:
                    self.log.info("outputs.remote_recovered", reason="the remote outputs caught up")
                self._failed = None
                self._cleared = self._clear_error()

    def _note_failure(self, exc: BaseException) -> None:
        reason = _reason(exc)
        self._failed = reason
        self.log.error("outputs.remote_failed", action="retry when the run's job ends", reason=reason)
        try:
            self.ledger.note_event(self.ctx.watch.name, self.ctx.run, "remote_failed", stream=self.ctx.stream,
                                   error=f"{ERROR_PREFIX} publishing to {redact(self.url)} failed: {reason}")
        except Exception as exc2:  # noqa: BLE001 - the ledger's own failure is reported by the run's job
            self.log.debug("outputs.remote_note_failed", reason=_reason(exc2))

    def _clear_error(self) -> bool:
        """The run's status error, when it is a remote-publication one (from this process or an earlier one):
        resolved now. Any other error stays."""
        try:
            with self.ledger.transaction() as db:
                db.execute("UPDATE runs SET last_error=NULL, last_error_at=NULL WHERE watch=? AND run=? AND "
                           "stream=? AND (last_error LIKE ? OR last_error LIKE ?)",
                           (self.ctx.watch.name, self.ctx.run, self.ctx.stream, ERROR_PREFIX + "%",
                            RemoteOutputUnavailable.__name__ + ":%"))
        except Exception as exc:  # noqa: BLE001 - cleared at the next publication instead
            self.log.debug("outputs.remote_note_failed", reason=_reason(exc))
            return False
        return True


def for_run(ctx: RunContext, ledger: Any, log: Any, lock: threading.RLock,
            generation: Callable[[], int | None] | None = None,
            fence: Callable[[], object] | None = None) -> RemoteOutputs | None:
    """The stream's remote publisher, or None when its watch writes local outputs only. ``generation``: the
    run's lease generation of the publication being mirrored (written into the remote manifest); ``fence``:
    raises :class:`LeaseLost` when this daemon no longer holds the run (checked right before the manifest PUT)."""
    if not getattr(ctx.watch, "remote_output", ""):
        return None
    return RemoteOutputs(ctx, ledger, log, lock, generation=generation, fence=fence)


def _reason(exc: BaseException) -> str:
    """A failure for a log line or the status: never with a URL's user info (botocore quotes endpoint URLs)."""
    if isinstance(exc, RemoteOutputError):
        return scrub(str(exc))
    return scrub(f"{type(exc).__name__}: {exc}")
