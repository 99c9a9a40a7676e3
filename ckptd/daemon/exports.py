"""CoreML exports for the daemon: one export at a time, newest request wins (debounce), never blocking runs.

A new best (or a new average, per policy) asks for an export; if one is running for that run, the request
replaces any waiting one, so a burst of new bests exports only the newest. The export runs in a child process
with the policy's timeout; a verified package is published atomically, anything else keeps the previous one.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.daemon.config import CoremlPolicy
from ckptd.daemon.ledger import MemberRow
from ckptd.export.request import ExportRequest
from ckptd.export.runner import cleanup_staging, publish_package, run_export, staging_path


@dataclass(frozen=True)
class ExportJob:
    processor: Any  # RunProcessor (avoids an import cycle)
    weights: str
    source: str
    sha256: str
    metric: float | None
    step: int | None


def build_request(policy: CoremlPolicy, job: ExportJob, output: Path) -> ExportRequest:
    inputs = [{"name": i.name, "shape": [list(d) if isinstance(d, tuple) else d for d in i.shape], "kind": i.kind,
               "dtype": i.dtype, "scale": i.scale, "bias": list(i.bias), "color_layout": i.color_layout,
               "enumerated_shapes": [list(s) for s in i.enumerated_shapes]} for i in policy.inputs]
    return ExportRequest(
        weights=job.weights, factory=policy.factory, output=str(staging_path(output)), inputs=inputs,
        factory_kwargs=dict(policy.factory_kwargs), python_path=list(policy.python_path), outputs=list(policy.outputs),
        precision=policy.precision, minimum_deployment_target=policy.minimum_deployment_target,
        compression=policy.compression, author=policy.author, version=policy.version,
        description=policy.description,
        metadata={"source": job.source, "sha256": job.sha256, "metric": "" if job.metric is None else repr(job.metric),
                  "step": "" if job.step is None else str(job.step)},
    )


class ExportScheduler:
    def __init__(self, ledger: Any, log: Any, max_parallel: int = 1, metrics: Any = None) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.log = log
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="ckptd-export")
        self._lock = threading.Lock()
        self._running: set[tuple[str, str]] = set()
        self._pending: dict[tuple[str, str], ExportJob] = {}
        self.stopping = False

    def request_for_member(self, processor: Any, member: MemberRow) -> None:
        r = member.record
        self.request(ExportJob(processor, member.file, r.path, r.sha256, r.metric, r.step))

    def request_average(self, processor: Any, members: list[MemberRow]) -> None:
        from ckptd.daemon.pipeline import average_signature

        best = members[0].record
        # weights/sha256 are fixed when the export starts (the newest average then), see _snapshot_average
        self.request(ExportJob(processor, "", "average", average_signature(members), best.metric, best.step))

    def request(self, job: ExportJob) -> None:
        ctx = job.processor.ctx
        key = (ctx.watch.name, ctx.run)
        with self._lock:
            if self.stopping:
                return
            if key in self._running:
                replaced = self._pending.get(key)
                self._pending[key] = job
                self.log.info("export.debounced", watch=key[0], run=key[1], checkpoint=job.source, metric=job.metric,
                              reason="an export is running; only the newest waiting request will be exported"
                                     + (f" (replaces {replaced.source})" if replaced else ""))
                return
            self._running.add(key)
        self._pool.submit(self._run, key, job)

    def _run(self, key: tuple[str, str], job: ExportJob | None) -> None:
        while job is not None:
            try:
                self._export(job)
            except Exception as exc:  # an export problem must never take the daemon down  # noqa: BLE001
                self.log.error("export.failed", watch=key[0], run=key[1], checkpoint=job.source,
                               reason=f"{type(exc).__name__}: {exc}")
            with self._lock:
                job = None if self.stopping else self._pending.pop(key, None)
                if job is None:
                    self._running.discard(key)

    def _export(self, job: ExportJob) -> None:
        ctx = job.processor.ctx
        log = self.log.bind(watch=ctx.watch.name, run=ctx.run, checkpoint=job.source, metric=job.metric)
        cleanup_staging(ctx.output)
        snapshot = None
        if job.source == "average":
            job, snapshot = _snapshot_average(job)
        try:
            self._export_weights(job, log)
        finally:
            if snapshot is not None:
                snapshot.unlink(missing_ok=True)

    def _export_weights(self, job: ExportJob, log: Any) -> None:
        proc = job.processor
        ctx, policy = proc.ctx, proc.ctx.policy.coreml
        request = build_request(policy, job, ctx.output)
        export_id = self.ledger.export_started(ctx.watch.name, ctx.run, job.source, job.sha256, job.metric, job.step)
        log.info("export.started", action="export", reason=f"new {policy.source}; {policy.precision}, "
                                                           f"{policy.minimum_deployment_target}")
        result = run_export(request, policy.timeout)
        if self.metrics is not None and not self.stopping:
            self.metrics.job_duration.labels(action="export").observe(result.seconds)
            self.metrics.exports.labels(result=result.status).inc()
            if result.status == "ok":
                self.metrics.success("export")
        if self.stopping:
            cleanup_staging(ctx.output)
            self.ledger.export_finished(export_id, "abandoned", reason="the daemon stopped; redone on restart")
            log.info("export.abandoned", reason="the daemon is stopping; the export is redone on restart")
            return
        previous = (proc.current_coreml() or {})
        block: dict[str, Any] = {
            "source": job.source, "sha256": job.sha256, "metric": job.metric, "step": job.step,
            "capture": result.capture, "verification": result.verification, "seconds": round(result.seconds, 2),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if result.status == "ok" or (result.status == "partial" and policy.publish_partial):
            version = publish_package(Path(request.output), ctx.output, label=f"{job.sha256[:12]}", keep=policy.keep)
            block.update({"status": result.status, "path": "best.mlpackage",
                          "version": str(version.relative_to(ctx.output))})
            self.ledger.export_finished(export_id, result.status, path=str(version), capture=result.capture,
                                        verification=_json(result.verification))
            log.info("export.published", action="publish", path=str(ctx.output / "best.mlpackage"),
                     version=version.name, capture=result.capture, seconds=round(result.seconds, 2),
                     verification={k: v for k, v in result.verification.items() if k in
                                   ("graph_parity", "spec", "package_run", "predict")})
            proc.note_export(block, ok=True)
            return
        cleanup_staging(ctx.output)
        reason = result.reason or f"verification {result.status}: {result.verification.get('package_run', '')}"
        last_ok = _last_ok(previous)
        block.update({"status": "failed", "reason": reason, "last_ok": last_ok,
                      "path": "best.mlpackage" if last_ok else None})
        self.ledger.export_finished(export_id, "failed", reason=reason, capture=result.capture,
                                    verification=_json(result.verification))
        log.error("export.failed", action="keep previous", reason=reason)
        proc.note_export(block, ok=False)

    def wait(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                busy = bool(self._running)
            if not busy or (deadline is not None and time.monotonic() > deadline):
                return
            time.sleep(0.05)

    def shutdown(self) -> None:
        from ckptd.export.runner import kill_running_exports

        with self._lock:
            self.stopping = True
            self._pending.clear()
        kill_running_exports()
        self._pool.shutdown(wait=True)


def _last_ok(previous: dict[str, Any]) -> dict[str, Any] | None:
    """What best.mlpackage still holds after a failure: the previous published export, if any."""
    if previous.get("status") in ("ok", "partial"):
        return {k: previous.get(k) for k in ("source", "sha256", "metric", "step", "version")}
    return previous.get("last_ok")


def _snapshot_average(job: ExportJob) -> tuple[ExportJob, Path]:
    """A hard link to the current average.safetensors: published files are only ever replaced by rename, so
    the link keeps exactly the content whose members we record, even if a newer average lands meanwhile."""
    import os

    from ckptd.atomic import TEMP_PREFIX
    from ckptd.daemon.pipeline import average_signature

    proc = job.processor
    members = proc.members()
    snapshot = proc.ctx.output / "coreml" / f"{TEMP_PREFIX}average-{time.monotonic_ns()}.safetensors"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    os.link(proc.ctx.output / "average.safetensors", snapshot)
    best = members[0].record
    return ExportJob(proc, str(snapshot), "average", average_signature(members), best.metric, best.step), snapshot


def _json(value: Any) -> str:
    import json

    return json.dumps(value)
