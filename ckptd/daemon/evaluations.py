"""Evaluations for the daemon: at most one evaluation job per run at a time, newest request wins, never blocking
the runs' own workers.

A job reads the run's *current* top-k when it starts (so a request that waited behind a running job evaluates the
newest state; requests arriving meanwhile collapse into one), evaluates what the policy's strategy needs through
a content cache in the ledger (``evaluation_store``), and hands the decision to the run (``gate.apply``), which
publishes a new average or records why the candidate lost. Each evaluation process counts against the policy's
``evaluate.max_per_hour``; when the budget is spent the job stops and is requeued for when it frees up.
Candidate averages are written under ``<output>/.candidates/`` (ckptd's own files, inside the output root) and
removed when the job ends; one that wins is linked into the published generation first. The evaluator never gets
one of them: each evaluation runs on its own scratch copy (``eval-<set>-<row>.safetensors``), deleted afterwards,
so nothing it (or a process it leaves behind) does can reach a published file. A job that found a failed
evaluation is retried after ``RETRY_DELAYS``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from ckptd.daemon import evaluation_store as store
from ckptd.daemon.evaluation_runner import EvaluationProcesses, input_checked, run_evaluation
from ckptd.daemon.export_seam import Log
from ckptd.daemon.idle import wait_idle
from ckptd.daemon.ledger import Ledger, MemberRow
from ckptd.daemon.soup import Outcome, SoupDecision, gated_uniform, greedy
from ckptd.daemon.telemetry import Metrics

CANDIDATES = ".candidates"
HOUR = 3600.0
RETRY_DELAYS: tuple[float, ...] = (30.0, 120.0, 600.0)  # after failed evaluations (the last one repeats)
Key = tuple[str, str, str, str]


class EvaluationRun(Protocol):
    """What the scheduler needs from a run (the pipeline's ``RunProcessor`` satisfies it)."""

    ctx: Any
    log: Log
    ledger: Ledger

    def members(self) -> list[MemberRow]: ...

    def decision_key(self, members: list[MemberRow]) -> str: ...

    def apply_evaluation(self, decision: SoupDecision | None, topk_key: str | None, files: dict[str, Path],
                         best_value: float | None) -> None: ...


class BudgetSpent(Exception):
    """The policy's evaluations-per-hour budget is spent; ``wait`` seconds until one frees up."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"evaluation budget spent; next slot in {wait:.0f}s")
        self.wait = wait


class Superseded(Exception):
    """A member of the set being evaluated left the top-k meanwhile (its pinned copy may be gone): the job stops
    without a decision; the join that evicted it requested the evaluation of the newer top-k."""


class Budget:
    """Evaluations started per policy in the last hour. Two counts, the larger one wins: those this process
    started (in memory, every watch of the policy) and, when ``take`` is given the ledger and the run's watch, the
    ledger's rows of that watch started in the last hour by any process (``ckptd once`` from cron or a daemon in
    a crash loop is a fresh process each time; the ledger remembers). Across processes, a policy shared by
    several watches is counted per watch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

    def take(self, policy: str, limit: int, now: float | None = None, *, ledger: Ledger | None = None,
             watch: str | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            times = self._started[policy]
            while times and now - times[0] >= HOUR:
                times.popleft()
            waits = [HOUR - (now - times[-limit]) + 1.0] if len(times) >= limit else []
            if ledger is not None and watch is not None:
                recent = store.started_since(ledger, watch, now - HOUR, limit)  # newest first
                if len(recent) >= limit:
                    waits.append(HOUR - (now - recent[-1]) + 1.0)
            if waits:
                raise BudgetSpent(max(waits))
            times.append(now)


class Evaluator:
    """Evaluates subsets of one run's members for one job: cache first, then a real evaluation process."""

    def __init__(self, scheduler: EvaluationScheduler, run: EvaluationRun) -> None:
        self.scheduler, self.run = scheduler, run
        ctx = run.ctx
        self.ev = ctx.policy.evaluate
        self.where = (ctx.watch.name, ctx.run, ctx.stream)
        self.dir = Path(ctx.output) / CANDIDATES
        self.files: dict[str, Path] = {}  # set key -> ckptd's own weights for it (a win publishes exactly this)
        self.scratch: set[Path] = set()  # every file this job writes under .candidates, registered before writing
        self.ran = 0
        self.cache_hits = 0

    def weights_for(self, subset: Sequence[MemberRow]) -> Path:
        """ckptd's own weights for a set, the file a win publishes: one member's pinned copy itself (immutable),
        several members' uniform average, written once per set. Never given to the evaluator (``_scratch_copy``)."""
        skey = store.set_key([m.record.sha256 for m in subset])
        if skey in self.files:
            return self.files[skey]
        if len(subset) == 1:
            path = Path(subset[0].file)
        else:
            from ckptd.daemon.outputs import write_candidate_average  # torch: only when a soup is evaluated

            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"{skey[:24]}.safetensors"
            self.scratch.add(path)  # written atomically (a temp file, removed if the write fails)
            write_candidate_average(path, subset, self.run.ctx.policy)
        self.files[skey] = path
        return path

    def _scratch_copy(self, weights: Path, skey: str, row_id: int) -> Path:
        """The evaluator's own copy of ``weights``, bitwise ``weights`` when made: whatever the evaluator (or a
        process it left behind) later does to it never reaches a published file. Removed after the evaluation."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"eval-{skey[:24]}-{row_id}.safetensors"
        self.scratch.add(path)
        try:
            shutil.copyfile(weights, path)
        except BaseException:  # a partial copy (ENOSPC) never stays behind
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            raise
        return path

    def _drop(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
            self.scratch.discard(path)

    def __call__(self, subset: Sequence[MemberRow]) -> Outcome:
        shas = [m.record.sha256 for m in subset]
        key = store.evaluation_key(self.ev.signature(), shas)
        hit = store.cached(self.run.ledger, *self.where, key)
        if hit is not None:
            self.cache_hits += 1
            return Outcome(hit.value)
        self.scheduler.budget.take(self.run.ctx.policy.name, self.ev.max_per_hour, ledger=self.run.ledger,
                                   watch=self.where[0])
        sources = [m.record.path for m in subset]
        kind = "member" if len(subset) == 1 else "soup"
        row_id = store.started(self.run.ledger, *self.where, kind, key, sources)
        log = self.run.log.bind(members=len(subset), candidate=kind)
        copy: Path | None = None
        try:
            copy = self._scratch_copy(self.weights_for(subset), store.set_key(shas), row_id)
            before = copy.stat()
            env = {"CKPTD_WATCH": self.where[0], "CKPTD_RUN": self.where[1], "CKPTD_STREAM": self.where[2],
                   "CKPTD_CANDIDATE": kind, "CKPTD_MEMBERS": json.dumps(sources), "CKPTD_OUTPUT": str(
                       self.run.ctx.output), "CKPTD_METRIC_NAME": self.ev.metric,
                   store.EVALUATION_ID: str(row_id)}
            log.info("evaluation.started", action="evaluate", members_sources=sources)
            verdict = input_checked(run_evaluation(
                self.ev, copy, env, self.scheduler.processes,
                on_start=lambda pid: store.set_pid(self.run.ledger, row_id, pid)), copy, before)
        except Exception as exc:  # ckptd's own trouble (disk, averaging): the evaluation failed, the run goes on
            current = {m.record.sha256 for m in self.run.members()}
            if any(sha not in current for sha in shas):  # evicted while we ran: not a failure, just too late
                store.finished(self.run.ledger, row_id, "abandoned", reason="a member left the top-k during the "
                               f"evaluation: {exc}")
                raise Superseded(str(exc)) from exc
            store.finished(self.run.ledger, row_id, "failed", reason=f"{type(exc).__name__}: {exc}")
            self.scheduler.count("failed")
            log.error("evaluation.failed", reason=f"ckptd could not prepare or run the evaluation: {exc}",
                      exc_info=True)
            return Outcome(None, str(exc))
        finally:
            if copy is not None:
                self._drop(copy)
        self.ran += 1
        if verdict.value is None:
            store.finished(self.run.ledger, row_id, "failed", reason=verdict.reason)
            self.scheduler.count("failed")
            log.error("evaluation.failed", action="keep previous", reason=verdict.reason,
                      seconds=round(verdict.seconds, 2), output=verdict.output or None)
            return Outcome(None, verdict.reason)
        store.finished(self.run.ledger, row_id, "ok", value=verdict.value)
        self.scheduler.count("ok")
        log.info("evaluation.finished", metric_name=self.ev.metric, value=verdict.value,
                 seconds=round(verdict.seconds, 2), output=verdict.output or None)
        return Outcome(verdict.value)

    def cleanup(self, keep: frozenset[Path] = frozenset()) -> None:
        for path in list(self.scratch):
            if path.parent == self.dir and path not in keep:
                self._drop(path)
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only when empty (another job of this output may be using it)


def decide(members: Sequence[MemberRow], policy: Any, evaluate: Evaluator) -> tuple[SoupDecision | None,
                                                                                    float | None]:
    """The policy's decision for the current top-k (None: no average is due, only the best is evaluated)."""
    avg, ev = policy.average, policy.evaluate
    if len(members) < avg.min_members:
        return None, evaluate(members[:1]).value
    if avg.strategy == "greedy":
        d = greedy(members, evaluate, ev, avg.margin)
    elif avg.gate:
        d = gated_uniform(members, evaluate, ev, avg.margin)
    else:  # evaluated for the record only: the uniform average is published as soon as the top-k changes
        best, everything = evaluate(members[:1]), evaluate(members)
        tried = [{"members": [m.record.path for m in members[:1]], "value": best.value},
                 {"members": [m.record.path for m in members], "value": everything.value}]
        d = SoupDecision(True, list(members), everything.value, best.value, tried)
    return d, d.best_value


class EvaluationScheduler:
    """Thread-safe: requests come from run workers, jobs run in a small pool of their own."""

    def __init__(self, ledger: Ledger, log: Log, max_parallel: int = 2, metrics: Metrics | None = None) -> None:
        self.ledger, self.log, self.metrics = ledger, log, metrics
        self.budget = Budget()
        self.processes = EvaluationProcesses()
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="ckptd-eval")
        self._lock = threading.Lock()
        self._running: set[Key] = set()
        self._pending: dict[Key, EvaluationRun] = {}
        self._timers: dict[Key, threading.Timer] = {}
        self._failed_jobs: dict[Key, int] = {}  # consecutive jobs with a failed evaluation, per run
        self.retry_delays = RETRY_DELAYS
        self.stopping = False
        left, killed = store.abandon_running(ledger, "the daemon stopped while this evaluation ran (crash or "
                                                     "kill); it is redone if still needed")
        if left:
            log.warning("evaluation.abandoned", count=left, killed_process_groups=killed or None,
                        reason="evaluation rows left 'running' by a previous daemon process marked abandoned"
                        + (f"; {len(killed)} evaluator(s) it left running killed" if killed else ""))

    def count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.evaluations.labels(result=result).inc()

    @staticmethod
    def _key(run: EvaluationRun) -> Key:
        ctx = run.ctx
        return ctx.watch.name, ctx.run, ctx.stream, str(ctx.output)

    def request(self, run: EvaluationRun) -> None:
        """Evaluate the run's current state soon (debounced: one job per run, the newest request wins)."""
        key = self._key(run)
        with self._lock:
            if self.stopping:
                return
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            if key in self._running:
                self._pending[key] = run
                return
            self._start(key, run)

    def _start(self, key: Key, run: EvaluationRun) -> None:
        try:
            self._pool.submit(self._loop, key, run)
        except RuntimeError:
            return  # shutting down
        self._running.add(key)

    def _loop(self, key: Key, run: EvaluationRun | None) -> None:
        while run is not None:
            self._job(key, run)
            with self._lock:
                run = None if self.stopping else self._pending.pop(key, None)
                if run is None:
                    self._running.discard(key)

    def _job(self, key: Key, run: EvaluationRun) -> None:
        evaluator = Evaluator(self, run)
        try:
            members = run.members()
            if not members:
                return
            topk = run.decision_key(members)
            decision, best_value = decide(members, run.ctx.policy, evaluator)
            if self.stopping:
                return
            run.apply_evaluation(decision, topk, evaluator.files, best_value)
            if decision is not None and decision.rejected is not None:
                self.count("rejected")  # the newest candidate lost (a gated average kept, a member left out)
            failed = (decision.failures if decision is not None else best_value is None)
            self._after(key, run, failed)
        except Superseded as exc:
            run.log.info("evaluation.superseded", action="evaluate the newer top-k", reason="a member left the "
                         f"top-k while its set was evaluated ({exc}); no decision for the older top-k")
        except BudgetSpent as exc:
            run.log.warning("evaluation.deferred", action="wait", retry_in=f"{exc.wait:.0f}s",
                            reason=f"the policy's evaluate.max_per_hour "
                                   f"({run.ctx.policy.evaluate.max_per_hour}) is spent; the previous outputs stay")
            self._requeue(key, run, exc.wait)
        except Exception as exc:  # never take the daemon down; the next top-k change retries
            run.log.error("evaluation.failed", action="keep previous", reason=f"{type(exc).__name__}: {exc}",
                          exc_info=True)
        finally:
            evaluator.cleanup()

    def _after(self, key: Key, run: EvaluationRun, failed: bool) -> None:
        """A job with a failed evaluation is not final: it is retried on its own after a back-off (a newer
        request replaces the retry; successes are cached, so only the failed evaluations run again)."""
        with self._lock:
            if not failed:
                self._failed_jobs.pop(key, None)
                return
            n = self._failed_jobs[key] = self._failed_jobs.get(key, 0) + 1
        delay = self.retry_delays[min(n, len(self.retry_delays)) - 1]
        run.log.warning("evaluation.retry_scheduled", retry_in=f"{delay:g}s", attempt=n + 1,
                        reason="an evaluation failed; the previous outputs stay and the decision is retried")
        self._requeue(key, run, delay)

    def _requeue(self, key: Key, run: EvaluationRun, delay: float) -> None:
        with self._lock:
            if self.stopping:
                return
            timer = threading.Timer(delay, self.request, args=(run,))
            timer.daemon = True
            self._timers[key] = timer
            timer.start()

    def reconcile_candidates(self, output: Path) -> list[Path]:
        """Remove candidate files a killed job left under ``output`` (none while a job of that output runs)."""
        with self._lock:
            if any(k[3] == str(output) for k in self._running):
                return []
            directory = output / CANDIDATES
            removed = sorted(directory.iterdir()) if directory.is_dir() else []
            shutil.rmtree(directory, ignore_errors=True)
        return removed

    def busy(self) -> bool:
        """Is an evaluation job running or waiting? (Retries and budget waits on timers do not count.)"""
        with self._lock:
            return bool(self._running or self._pending)

    def wait(self, timeout: float | None = None) -> None:
        wait_idle(self.busy, timeout)

    def shutdown(self) -> None:
        with self._lock:
            self.stopping = True
            self._pending.clear()
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
        self.processes.kill_all()
        self._pool.shutdown(wait=True)
