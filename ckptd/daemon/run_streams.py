"""One run's streams: its trainer plan, one processor per weight stream, and the job that feeds them.

A run is scanned once per job; each ready candidate goes to the processor of every stream it feeds (ml-cvnets'
``checkpoint_score_*`` to ``model``, ``checkpoint_ema_score_*`` to ``ema``; a timm file to both). Streams never
mix: each has its own ledger rows, members, best, average, manifest and export, under ``{output}`` for ``model``
and ``{output}/<stream>`` for the others. With ``trainer: auto`` the plan is recomputed on every job (a young run
may not show its trainer yet) and a change is logged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ckptd.daemon.config import run_plan
from ckptd.daemon.discovery import Observation, scan_run
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.pipeline import RunContext, RunProcessor
from ckptd.daemon.pruning import apply_retention
from ckptd.daemon.readiness import ReadinessTracker
from ckptd.daemon.remote_publish import remote_base
from ckptd.remote.mirror import canonical
from ckptd.remote.urls import redact
from ckptd.trainers import RunPlan


def _recordable(path: Path) -> bool:
    """Can the ledger (UTF-8 text) hold this path? A name of undecodable bytes (latin-1 on a UTF-8 host)
    cannot, and must not stall the run."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _recorded_output(ctx: RunContext) -> str:
    """What the ledger records as the stream's output: the object-store URL (without credentials) for a remote
    output, not this daemon's staging folder; several daemons sharing a ledger agree, and status shows the URL."""
    remote = getattr(ctx.watch, "remote_output", "")
    if remote:
        return redact(remote_base(remote, ctx.watch.name, ctx.run, ctx.stream))
    return str(ctx.output)


class RunStreams:
    """The processors of one run, keyed by stream name (``model`` first when present)."""

    def __init__(self, ctx: RunContext, ledger: Ledger, log: Any,
                 make_processor: Callable[[RunContext], RunProcessor]) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.log = log.bind(watch=ctx.watch.name, run=ctx.run)
        self._make = make_processor
        self.plan: RunPlan | None = None
        self.processors: dict[str, RunProcessor] = {}
        self.retired = False
        self._unnamed: set[Path] = set()  # files whose names cannot be recorded (logged once each)

    def retire(self) -> None:
        """This run's view was replaced (a reload, the run gone, its lease lost): late decisions of its processors
        are void."""
        self.retired = True
        for proc in self.processors.values():
            proc.retired = True

    @property
    def primary(self) -> RunProcessor | None:
        return next(iter(self.processors.values()), None)

    def refresh_plan(self) -> None:
        """(Re)compute the trainer plan; create processors for new streams, keep those whose view is unchanged."""
        plan = run_plan(self.ctx.watch, self.ctx.policy, self.ctx.run_dir)
        if plan == self.plan:
            return
        previous = self.plan
        if previous is None or previous.trainer != plan.trainer:
            self.log.info("run.trainer", trainer=plan.trainer, reason=plan.detected_because,
                          streams=[s.name for s in plan.streams], **({"was": previous.trainer} if previous else {}))
        for problem in plan.problems:
            if previous is None or problem not in previous.problems:
                self.log.warning("run.plan_problem", reason=problem)
        for name, why in plan.disabled:
            if name in self.processors:
                self.log.warning("stream.disabled", stream=name, reason=f"{why}; its outputs stay as last published")
                self.ledger.note_event(self.ctx.watch.name, self.ctx.run, "stream_off", stream=name,
                                       error=f"stream switched off ({why}); outputs as last published")
        processors: dict[str, RunProcessor] = {}
        for stream in plan.streams:
            output = self.ctx.output if stream.name == "model" else self.ctx.output / stream.name
            ctx = replace(self.ctx, output=output, stream=stream.name, plan=stream, allow_globals=plan.allow_globals)
            old = self.processors.get(stream.name)
            if old is not None and old.ctx == ctx:
                processors[stream.name] = old
                continue
            self.ledger.touch_run(ctx.watch.name, ctx.run, canonical(str(ctx.run_dir)), _recorded_output(ctx),
                                  stream=stream.name)
            processors[stream.name] = self._make(ctx)
            processors[stream.name].defer_manifest = True
        for name, old in self.processors.items():
            if processors.get(name) is not old:
                old.retired = True
        self.processors, self.plan = processors, plan  # only once every stream is set up (a full ledger retries)

    def job(self, tracker: ReadinessTracker, settle: float, stopping: Callable[[], bool],
            note: Callable[[str], None], scan_timer: Any = None) -> tuple[int, float | None]:
        """Scan the run and process what is ready; returns (candidates still pending, when to look again).
        ``scan_timer``: a Prometheus histogram timing the scan alone."""
        self.refresh_plan()
        with scan_timer.time() if scan_timer is not None else contextlib.nullcontext():
            candidates = scan_run(self.ctx.run_dir, self.ctx.watch, self.plan)
        present = {o.path for o in candidates}
        self._unnamed &= present
        tracker.forget_missing(present)
        for proc in self.processors.values():
            proc.forget_missing(present)
        next_check: float | None = None
        pending = 0
        for obs in candidates:
            if stopping():
                break
            if not _recordable(obs.path):
                if obs.path not in self._unnamed:
                    self._unnamed.add(obs.path)
                    self.log.error("checkpoint.invalid", checkpoint=repr(canonical(str(obs.path))), action="ignore",
                                   reason="its file name is not valid UTF-8, so it cannot be recorded; rename it")
                continue
            todo = self._todo(obs)
            if not todo:
                continue
            now = time.monotonic()
            tracker.observe(obs, now)
            if not tracker.is_ready(obs, now, settle):
                pending += 1
                deadline = tracker.deadline(obs, settle)
                when = deadline if deadline is not None else now + max(settle, 1.0)
                next_check = when if next_check is None else min(next_check, when)
                continue
            for proc in todo:
                outcome = proc.process(obs)
                note(f"{self.ctx.run}{'' if proc.ctx.stream == 'model' else '/' + proc.ctx.stream}: "
                     f"{obs.path.name} {outcome}")
                if outcome == "retry":
                    pending += 1
                    again = now + max(settle, 1.0)
                    next_check = again if next_check is None else min(next_check, again)
        for proc in self.processors.values():
            proc.flush_manifest()
            if not proc.reconciled:
                proc.reconcile()
        if not stopping() and self.processors:
            apply_retention(list(self.processors.values()), time.time())
        return pending, next_check

    def _todo(self, obs: Observation) -> list[RunProcessor]:
        """The processors that still have to see ``obs`` (resume states are recorded by the primary, unread)."""
        if obs.resume or obs.refused:
            primary = self.primary
            if primary is not None:
                (primary.record_refused if obs.refused else primary.record_resume)(obs)
            return []
        procs = [self.processors[s] for s in obs.streams if s in self.processors]
        return [p for p in procs if not p.known(obs)]
