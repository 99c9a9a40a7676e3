"""The daemon's main loop: discover runs, schedule per-run jobs on a worker pool, react to events and signals.

The loop thread never does heavy work and never waits on the ledger: loading, hashing, averaging, publishing and
ledger writes run in worker threads, one job per run at a time, at most ``max_parallel_runs`` at once. So a
locked ledger or a slow file only delays that run, while the loop keeps answering signals and pinging systemd.

Signal handlers only set flags; the loop sleeps on a self-pipe (``loop.Wakeup``). Every stage of an iteration is
guarded (``loop.StageGuard``): a failure is one log line, a counter, and a growing, capped backoff, never the end
of the daemon. The systemd WATCHDOG ping is sent only while the essential stages (discovery, scheduling) succeed,
so a loop that keeps failing is restarted by systemd instead of pretending to be healthy.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.daemon.config import Config, Watch, load_config
from ckptd.daemon.discovery import checkpoint_folder_kind, list_runs
from ckptd.daemon.evaluations import EvaluationScheduler
from ckptd.daemon.exports import ExportScheduler
from ckptd.daemon.hooks import HookRunner
from ckptd.daemon.ledger import LEDGER_NAME, Ledger, LedgerConnectError, ledger_target
from ckptd.daemon.ledger_db import describe as describe_ledger
from ckptd.daemon.logs import configure_logging, get_logger
from ckptd.daemon.loop import StageGuard, Wakeup, describe, expected
from ckptd.daemon.notify import Notifier
from ckptd.daemon.paths import resolve_output, run_name
from ckptd.daemon.pipeline import RunContext, RunProcessor
from ckptd.daemon.readiness import ReadinessTracker
from ckptd.daemon.run_leases import RunLeases
from ckptd.daemon.run_streams import RunStreams
from ckptd.daemon.telemetry import Metrics
from ckptd.daemon.watcher import watch_summary
from ckptd.daemon.watches import WatchSet
from ckptd.errors import CkptdError, ConfigError, LeaseLost
from ckptd.remote.mirror import MirrorChange, canonical
from ckptd.remote.roots import RemoteRoots, affected_runs, committed_objects
from ckptd.remote.urls import under
from ckptd.remote.watch_config import output_prefixes

__all__ = ["LEDGER_NAME", "Daemon", "watch_summary"]

MIN_JOB_INTERVAL = 0.2  # seconds between two scans of one run when events keep arriving
JOB_BACKOFF_FIRST = 2.0  # a failed run job is retried after 2 s, 4 s, 8 s … at most JOB_BACKOFF_MAX
JOB_BACKOFF_MAX = 60.0
ESSENTIAL = ("discover", "schedule", "loop")  # while any of these fails, no WATCHDOG=1


class LedgerOpenError(CkptdError):
    """The ledger cannot be opened at startup (exit 1 with the file and the reason, no traceback)."""


@dataclass
class RunState:
    ctx: RunContext
    streams: RunStreams  # the run's trainer plan and one processor per weight stream
    tracker: ReadinessTracker = field(default_factory=ReadinessTracker)
    dirty: bool = True
    running: bool = False
    next_check: float | None = None
    last_scan: float = 0.0
    pending: int = 0
    failures: int = 0  # consecutive failed jobs: the backoff grows with them
    lease_retry_at: float = 0.0  # held by another daemon: when to try to claim the run again


class Daemon:
    def __init__(self, config: Config, config_path: str | Path | None = None, *, once: bool = False) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.once = once
        self.log = get_logger()
        target = ledger_target(config)  # config.ledger: a postgresql:// URL, or a SQLite file (in state_dir)
        try:
            self.ledger, rebuilt = Ledger.open(target)  # a corrupt SQLite ledger is moved aside and rebuilt
        except LedgerConnectError as exc:  # its message names the URL without password
            raise LedgerOpenError(str(exc)) from None
        except (sqlite3.Error, OSError) as exc:
            raise LedgerOpenError(f"cannot open the ledger {describe_ledger(target)}: {describe(exc)}") from exc
        if rebuilt:
            self.log.warning("ledger.rebuilt", ledger=describe_ledger(target), reason=rebuilt)
        self.notifier = Notifier()
        self.runs: dict[tuple[str, Path], RunState] = {}
        self._refused_runs: set[tuple[str, Path]] = set()  # run dirs whose name cannot be an output (logged once)
        self._wakeup = Wakeup()  # signal flags + the self-pipe the loop sleeps on
        self._rediscover = True
        self.watches = WatchSet(self._on_event, self._wakeup.wake)
        # object-store watches: a listing thread per watch (its mirror), SQS hints
        self.remote = RemoteRoots(self._remote_hint, on_listed=lambda name, change: self.metrics.listed(
            name, change.seconds, change.objects))
        # threads are created on demand; _schedule() enforces max_parallel_runs (which a reload may change)
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="ckptd-run")
        self._sched_lock = threading.Lock()  # scheduling vs. the heartbeat giving runs back
        self._unavailable_since: dict[str, float] = {}  # watch -> since when its root cannot be reached
        self._last_action = "starting"
        self.failures = 0
        self.metrics = Metrics(config.metrics.listen if not once else "", config.metrics.textfile,
                               status_config=lambda: self.config)  # the status page reads the current config
        self.exports = ExportScheduler(self.ledger, self.log, metrics=self.metrics)
        self.evaluations = EvaluationScheduler(self.ledger, self.log, max_parallel=config.max_parallel_runs,
                                               metrics=self.metrics)
        self.hooks = HookRunner(self.log)
        self.leases = self._make_leases()
        self._guards = {name: StageGuard(name, self.metrics.loop_errors)
                        for name in ("discover", "schedule", "metrics", "loop")}
        self._guards["reload"] = StageGuard("reload", self.metrics.loop_errors, first=0.0)  # each SIGHUP is tried

    @property
    def stopping(self) -> bool:
        return self._wakeup.stop_requested

    # --- watches -------------------------------------------------------------------------------------------
    def _on_event(self, path: Path, moved_in: bool) -> None:
        """Called from the watchdog thread: mark the run dirty and wake the loop. Nothing else."""
        name = path.name
        if name.startswith(".ckptd-tmp-"):
            return
        for (_, run_dir), state in list(self.runs.items()):
            if path == run_dir or run_dir in path.parents:
                if state.ctx.output == path or state.ctx.output in path.parents:
                    return
                if moved_in:
                    state.tracker.note_moved_in(path)
                state.dirty = True
                self._wakeup.wake()
                return
        for watch in self.config.watches:
            if watch.root in path.parents or path == watch.root:
                self._rediscover = True
                self._wakeup.wake()
                return

    def _handle_overflow(self, lost: int) -> None:
        self.metrics.inotify_overflows.inc(lost)
        self.log.warning("watch.overflow", overflows=lost, reason="inotify queue overflowed; events were lost; "
                         "rescanning all runs (consider raising fs.inotify.max_queued_events)")
        for state in list(self.runs.values()):
            state.dirty = True
        self._rediscover = True

    # --- discovery ----------------------------------------------------------------------------------------
    def _discover(self) -> None:
        """Which runs exist (filesystem only: the ledger row is written by the run's first job)."""
        seen: set[tuple[str, Path]] = set()
        for watch in self.config.watches:
            change = self.remote.take(watch, self.log) if watch.remote else None  # the listing thread's news
            if (watch.remote and change is None) or not self.watches.root_available(watch):
                seen.update(k for k in self.runs if k[0] == watch.name)
                if not watch.remote or not self.remote.available(watch):
                    self._unavailable_since.setdefault(watch.name, time.monotonic())
                continue
            self._unavailable_since.pop(watch.name, None)
            policy = self.config.policy_for(watch)
            out_root = Path(os.path.realpath(watch.output_root))
            own = output_prefixes(self.config.watches) if watch.remote else ()
            for run_dir in list_runs(watch):
                real = Path(os.path.realpath(run_dir))
                if real == out_root or out_root in real.parents:
                    continue  # our own outputs (allow_output_in_root) are never a run
                if own and any(under(canonical(run_dir), prefix) for prefix in own):
                    continue  # our own object-store outputs under a watched prefix (allow_output_in_root)
                key = (watch.name, run_dir)
                seen.add(key)
                state = self.runs.get(key)
                if state is not None and state.ctx.watch == watch and state.ctx.policy == policy:
                    continue
                if state is not None and state.running:
                    continue  # replaced after its current job
                try:
                    name = run_name(watch.root, run_dir)
                    output = resolve_output(watch.output, watch.name, name)
                except CkptdError as exc:
                    if key not in self._refused_runs:  # once per directory, not on every discovery pass
                        self._refused_runs.add(key)
                        self.log.error("run.skipped", watch=watch.name, run_dir=canonical(run_dir), reason=str(exc))
                    continue
                ctx = RunContext(watch=watch, policy=policy, run=name, run_dir=run_dir, output=output)
                if state is not None:
                    state.streams.retire()
                self.runs[key] = RunState(ctx=ctx, streams=RunStreams(ctx, self.ledger, self.log, self._processor),
                                          tracker=state.tracker if state else ReadinessTracker())
                if state is None:
                    self.log.info("run.discovered", watch=watch.name, run=name, run_dir=canonical(run_dir),
                                  output=str(output))
            if change:
                self._note_remote_change(watch, change)
        self._refused_runs &= seen
        self.leases.total = len({(w, s.ctx.run) for (w, _), s in self.runs.items()})
        gone = [self.runs.pop(key) for key in [k for k in self.runs if k not in seen and not self.runs[k].running]]
        for state in gone:
            state.streams.retire()
        if gone:
            self.leases.release({(s.ctx.watch.name, s.ctx.run) for s in gone})

    def _note_remote_change(self, watch: Watch, change: MirrorChange) -> None:
        """Runs whose objects a listing found changed are scanned now. A single object is complete once listed
        (PUT and multipart-complete are atomic): it is committed like a file renamed into place. A folder
        checkpoint's files still wait for its completion signal and the settle time."""
        states = {run_dir: s for (name, run_dir), s in self.runs.items() if name == watch.name}
        for run_dir, paths in affected_runs(change, states).items():
            for path in committed_objects(change, paths, checkpoint_folder_kind):
                states[run_dir].tracker.note_moved_in(path)
            states[run_dir].dirty = True

    def _remote_hint(self, url: str) -> None:
        """A listing thread: a listing changed the mirror (or was the first to work); discover at once."""
        self._rediscover = True
        self._wakeup.wake()

    def _processor(self, ctx: RunContext) -> RunProcessor:
        proc = RunProcessor(ctx, self.ledger, self.log, exporter=self.exports, hooks=self.hooks, metrics=self.metrics,
                            evaluator=self.evaluations)
        store, key = self.leases.store, (ctx.watch.name, ctx.run)
        proc.fence = lambda db: store.fence(db, *key)
        proc.lease_held = lambda: self.leases.holds(key)
        return proc

    # --- leases (several daemons sharing one ledger) ------------------------------------------------------
    def _make_leases(self) -> RunLeases:
        from ckptd.daemon.leases import LeaseStore, default_holder

        return RunLeases(LeaseStore(self.ledger, default_holder(), self.config.lease_ttl), self.log,
                         on_lost=self._lease_lost, surplus=self._surplus, renewable=self._reachable)

    def _reachable(self, key: tuple[str, str]) -> bool:
        """Heartbeat thread: may this daemon keep the run's lease? Not when its watch root has been unavailable
        (unmounted, or its object store unlistable) for longer than lease_ttl: another daemon may see it."""
        since = self._unavailable_since.get(key[0])
        return since is None or time.monotonic() - since < self.config.lease_ttl

    def _surplus(self, n: int) -> list[tuple[str, str]]:
        """Heartbeat thread: up to ``n`` idle runs this daemon holds, to give back. Under the schedule lock, so a
        run picked here is never started by the loop at the same moment."""
        picked: list[tuple[str, str]] = []
        with self._sched_lock:
            states = list(self.runs.values())  # a snapshot: discovery may change the dict meanwhile
            for state in sorted(states, key=lambda s: s.last_scan, reverse=True):
                key = (state.ctx.watch.name, state.ctx.run)
                if len(picked) >= n:
                    break
                if state.running or not self.leases.holds(key) or key in picked or key in self.leases.sticky:
                    continue  # (sticky: claimed because no other daemon took it: giving it back would starve it)
                picked.append(key)
            retry = time.monotonic() + self.leases.ttl
            for state in states:
                if (state.ctx.watch.name, state.ctx.run) in picked:
                    state.lease_retry_at = retry  # the other daemon claims it meanwhile
        return picked

    def _lease_lost(self, key: tuple[str, str]) -> None:
        """Heartbeat thread: the run now belongs to another daemon. Its processors are retired at once (a late
        export or evaluation of theirs publishes nothing); the next job claims again and starts fresh."""
        for state in list(self.runs.values()):
            if (state.ctx.watch.name, state.ctx.run) == key:
                state.streams.retire()
                self._wakeup.wake()

    def _holds_lease(self, state: RunState) -> bool:
        """Claim the run if needed (in the job's thread: a ledger round trip). A run claimed now starts from the
        ledger (fresh processors reconcile the outputs with it): another daemon may have moved it on."""
        ctx = state.ctx
        key = (ctx.watch.name, ctx.run)
        if self.leases.holds(key) and not state.streams.retired:
            return True
        if not self.leases.ensure(key):
            if self.once:  # `ckptd once` leaves it to the daemon holding it: say so
                self.log.info("run.held_elsewhere", watch=ctx.watch.name, run=ctx.run,
                              reason="another ckptd process sharing the ledger holds this run; it processes it")
            state.pending = 0
            state.lease_retry_at = time.monotonic() + min(self._scan_interval(state), max(self.leases.ttl / 3, 0.5))
            return False
        state.streams.retire()
        state.streams = RunStreams(ctx, self.ledger, self.log, self._processor)
        return True

    def _discovery_interval(self) -> float:
        return min([self.config.rescan_interval] + [w.poll_interval for w in self.config.watches
                                                    if w.name in self.watches.polled])

    # --- jobs ---------------------------------------------------------------------------------------------
    def _due(self, state: RunState, now: float) -> bool:
        if state.running or now - state.last_scan < MIN_JOB_INTERVAL:
            return False
        if now < state.lease_retry_at:
            return False  # another daemon holds the run: events do not make us ask again sooner
        if state.next_check is not None and state.failures and now < state.next_check:
            return False  # backing off after a failure: events do not cut the backoff short
        if state.dirty or (state.next_check is not None and now >= state.next_check):
            return True
        return now - state.last_scan >= self._scan_interval(state)

    def _scan_interval(self, state: RunState) -> float:
        """Polled watches scan every poll_interval; event watches only need the safety re-scan."""
        if state.ctx.watch.name in self.watches.polled:
            return state.ctx.watch.poll_interval
        return self.config.rescan_interval

    def _submit(self, state: RunState) -> None:
        state.running, state.dirty, state.next_check = True, False, None
        state.last_scan = time.monotonic()
        self._pool.submit(self._job, state).add_done_callback(lambda _future: self._wakeup.wake())

    def _job(self, state: RunState) -> None:
        """Runs in a worker thread: plan, scan and process one run (the ledger is only touched here)."""
        ctx = state.ctx
        settle = 0.0 if self.once else ctx.watch.settle
        try:
            if not self._holds_lease(state):
                return
            state.pending, state.next_check = state.streams.job(state.tracker, settle, lambda: self.stopping,
                                                                self._note_action, self.metrics.scan_duration)
            if state.failures:
                self.log.info("run.recovered", watch=ctx.watch.name, run=ctx.run, after_failures=state.failures)
                self.ledger.note_event(ctx.watch.name, ctx.run, "recovered", clear_error=True)  # status: no stale error
            state.failures = 0
        except LeaseLost as exc:  # another daemon took the run over while we were publishing: not a failure
            self.leases.forget((ctx.watch.name, ctx.run))
            state.streams.retire()
            self.log.warning("run.lease_lost", watch=ctx.watch.name, run=ctx.run, reason=str(exc))
            state.lease_retry_at = time.monotonic() + self.leases.ttl
        except Exception as exc:  # one run's failure must never take the daemon down
            self.failures += 1
            state.failures += 1
            self.metrics.job_failures.inc()
            delay = min(JOB_BACKOFF_FIRST * 2 ** (state.failures - 1), JOB_BACKOFF_MAX)
            reason = describe(exc)
            self.log.error("run.failed", watch=ctx.watch.name, run=ctx.run, reason=reason, failures=state.failures,
                           retry_in=f"{delay:g}s", exc_info=not expected(exc))
            try:
                self.ledger.note_event(ctx.watch.name, ctx.run, "failed", error=reason)
            except Exception:  # the ledger itself may be what failed; already logged  # noqa: BLE001
                pass
            state.next_check = time.monotonic() + delay
        finally:
            state.running = False

    def _note_action(self, text: str) -> None:
        self._last_action = text

    # --- reload -----------------------------------------------------------------------------------------------
    def _do_reload(self) -> None:
        """SIGHUP: load the config again; an invalid one is rejected and the running one kept."""
        if self.config_path is None:
            return
        self.notifier.reloading()
        try:
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                self.log.error("config.reload_rejected", config=str(self.config_path), problems=exc.problems,
                               reason="the new config is invalid; keeping the running config")
                return
            if new.state_dir != self.config.state_dir:
                self.log.warning("config.state_dir_unchanged", reason="state_dir changes need a restart")
                new = type(new)(**{**new.__dict__, "state_dir": self.config.state_dir})
            self.config = new
            configure_logging(new.log.format, new.log.level)
            self.log = get_logger()
            self.watches.setup(self.config.watches, events=not self.once)
            self.remote.setup(self.config.watches, self.log, hints=not self.once)
            self._rediscover = True
            self.log.info("config.reloaded", config=str(self.config_path), watches=len(new.watches))
        finally:
            self.notifier.ready(self._status_text())  # systemd leaves "reloading" whatever happened

    # --- main loop ------------------------------------------------------------------------------------------
    def _status_text(self) -> str:
        pending = sum(s.pending for s in self.runs.values())
        busy = sum(1 for s in self.runs.values() if s.running)
        failing = [g.name for g in self._guards.values() if not g.healthy]
        return (f"{len(self.runs)} runs, {busy} busy, {pending} pending; last: {self._last_action}"
                + (f"; failing: {', '.join(failing)}" if failing else ""))

    @property
    def progressing(self) -> bool:
        """True while the essential stages succeed: only then is systemd's watchdog pinged."""
        return all(self._guards[name].healthy for name in ESSENTIAL)

    def run(self) -> int:
        """Foreground daemon until SIGTERM/SIGINT. Returns the exit code."""
        self._wakeup.install_signals()
        self.log.info("daemon.starting", config=str(self.config_path), watches=len(self.config.watches),
                      state_dir=str(self.config.state_dir), pid=os.getpid())
        self.watches.setup(self.config.watches, events=not self.once)
        self.remote.setup(self.config.watches, self.log, hints=not self.once)
        self.leases.start()
        next_discovery = 0.0
        ready_sent = False
        while not self.stopping:
            now = time.monotonic()
            try:
                next_discovery = self._iterate(now, next_discovery)
                self._guards["loop"].succeeded()
            except Exception as exc:  # a failure outside any stage: same treatment  # noqa: BLE001
                self._guards["loop"].failed(now, exc)
            if not ready_sent:
                self.notifier.ready(self._status_text())
                self.log.info("daemon.ready", runs=len(self.runs), poll_watches=sorted(self.watches.polled))
                ready_sent = True
            if self.progressing:
                self.notifier.watchdog(now)
            self._wakeup.wait(self._sleep_for(now, next_discovery))
        return self._shutdown()

    def _iterate(self, now: float, next_discovery: float) -> float:
        """One pass of the loop; returns when discovery is next due."""
        guards = self._guards
        if self._wakeup.reload_requested:
            self._wakeup.reload_requested = False  # signals arriving during the reload ask for one more
            guards["reload"].run(now, self._do_reload)
        lost = self.watches.take_overflows()
        if lost:
            self._handle_overflow(lost)
        if (self._rediscover or now >= next_discovery) and guards["discover"].due(now):
            self._rediscover = False
            if guards["discover"].run(now, self._discover):
                next_discovery = now + self._discovery_interval()
        guards["schedule"].run(now, lambda: self._schedule(now))
        self.notifier.status(self._status_text())
        guards["metrics"].run(now, self._update_metrics)
        return next_discovery

    def _update_metrics(self) -> None:
        self.metrics.runs.set(len(self.runs))
        self.metrics.queue_depth.set(sum(s.pending for s in self.runs.values()))
        self.metrics.set_backlog({w.name: sum(s.pending for s in self.runs.values() if s.ctx.watch.name == w.name)
                                  for w in self.config.watches})
        self.metrics.flush()  # the textfile: an OSError here is the metrics stage's failure, nothing more

    def _schedule(self, now: float) -> None:
        busy = sum(1 for s in self.runs.values() if s.running)
        with self._sched_lock:
            for state in sorted(self.runs.values(), key=lambda s: s.last_scan):
                if busy >= self.config.max_parallel_runs:
                    break
                if self._due(state, now):
                    self._submit(state)
                    busy += 1

    def _sleep_for(self, now: float, next_discovery: float) -> float:
        discover, schedule = self._guards["discover"], self._guards["schedule"]
        deadlines = [max(next_discovery, discover.until) if discover.failures else next_discovery]
        if not schedule.healthy:
            deadlines.append(schedule.until)
        else:
            for s in self.runs.values():
                if s.running:
                    continue
                if s.lease_retry_at > now:
                    deadlines.append(s.lease_retry_at)  # held by another daemon: nothing sooner
                    continue
                if s.next_check is not None:
                    deadlines.append(s.next_check)
                if s.dirty and not s.failures:
                    deadlines.append(s.last_scan + MIN_JOB_INTERVAL)
                deadlines.append(s.last_scan + self._scan_interval(s))
        if self._guards["loop"].failures:
            deadlines = [max(d, self._guards["loop"].until) for d in deadlines]
        if self.notifier.watchdog_interval:
            deadlines.append(now + self.notifier.watchdog_interval)
        return min(max(min(deadlines) - now, 0.02), 60.0)

    def _shutdown(self) -> int:
        self.notifier.stopping()
        deadline = time.monotonic() + self.config.shutdown_deadline
        running = [s.ctx.run for s in self.runs.values() if s.running]
        self.log.info("daemon.stopping", running_jobs=running, deadline_s=self.config.shutdown_deadline,
                      signals=self._wakeup.signals)
        self.watches.stop()
        self.remote.stop()
        self.evaluations.shutdown()  # an evaluation in flight is killed (its group); it is redone on restart
        self.exports.shutdown()  # an export in flight is killed; it is redone on restart
        while any(s.running for s in self.runs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if any(s.running for s in self.runs.values()):
            self.log.warning("daemon.abandoned", reason="shutdown deadline passed; in-flight work abandoned "
                             "(outputs are atomic: nothing partial is published; it is redone on restart)")
            os._exit(0)
        self._pool.shutdown(wait=True)
        self.hooks.shutdown(wait=False)
        self.leases.stop()  # given back: another daemon takes the runs over at once, not after lease_ttl
        self._close_quietly()
        self.log.info("daemon.stopped")
        return 0

    def _close_quietly(self) -> None:
        """Last metrics flush and closes: a failure here is logged, it does not turn a clean stop into a crash."""
        for name, close in (("metrics", self.metrics.close), ("ledger", self.ledger.close),
                            ("wakeup", self._wakeup.close)):
            try:
                close()
            except Exception as exc:  # noqa: BLE001
                self.log.error("daemon.close_failed", part=name, reason=describe(exc))

    def run_once(self) -> int:
        """Process everything present now, then exit (0, or 1 if a run failed)."""
        self.leases.start()
        self._discover()
        for state in self.runs.values():
            self._submit(state)
        self._pool.shutdown(wait=True)
        while self.evaluations.busy() or self.exports.busy():  # an evaluation's decision may request an export
            self.evaluations.wait()
            self.exports.wait()
        self.evaluations.shutdown()
        self.hooks.shutdown(wait=True)
        self.leases.stop()
        for state in self.runs.values():
            self.log.info("run.summary", watch=state.ctx.watch.name, run=state.ctx.run,
                          counts=self.ledger.counts(state.ctx.watch.name, state.ctx.run),
                          output=str(state.ctx.output))
        self._close_quietly()
        return 1 if self.failures or self.remote.failing() else 0  # an unlistable object store fails too
