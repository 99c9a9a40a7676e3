"""The daemon's main loop: discover runs, schedule per-run jobs on a worker pool, react to events and signals.

The loop thread never does heavy work: loading, hashing, averaging and publishing run in worker threads, one
job per run at a time, at most ``max_parallel_runs`` at once. Signal handlers only set flags (uvicorn style).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.daemon.config import Config, Watch, load_config
from ckptd.daemon.discovery import list_runs, scan_run
from ckptd.daemon.exports import ExportScheduler
from ckptd.daemon.hooks import HookRunner
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.logs import configure_logging, get_logger
from ckptd.daemon.telemetry import Metrics
from ckptd.daemon.notify import Notifier
from ckptd.daemon.paths import resolve_output, run_name
from ckptd.daemon.pipeline import RunContext, RunProcessor, apply_retention
from ckptd.daemon.readiness import ReadinessTracker
from ckptd.daemon.watcher import EventWatcher, filesystem_type, is_network_fs
from ckptd.errors import CkptdError, ConfigError

LEDGER_NAME = "ledger.sqlite3"
MIN_JOB_INTERVAL = 0.2  # seconds between two scans of one run when events keep arriving
ERROR_BACKOFF = 30.0


@dataclass
class RunState:
    ctx: RunContext
    processor: RunProcessor
    tracker: ReadinessTracker = field(default_factory=ReadinessTracker)
    dirty: bool = True
    running: bool = False
    next_check: float | None = None
    last_scan: float = 0.0
    pending: int = 0


class Daemon:
    def __init__(self, config: Config, config_path: str | Path | None = None, *, once: bool = False) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.once = once
        self.log = get_logger()
        self.ledger = Ledger(config.state_dir / LEDGER_NAME)
        self.notifier = Notifier()
        self.runs: dict[tuple[str, Path], RunState] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reload = False
        self._rediscover = True
        # threads are created on demand; _schedule() enforces max_parallel_runs (which a reload may change)
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="ckptd-run")
        self._watcher: EventWatcher | None = None
        self._poll_watches: set[str] = set()
        self._last_action = "starting"
        self.failures = 0
        self.metrics = Metrics(config.metrics.listen if not once else "", config.metrics.textfile)
        self.exports = ExportScheduler(self.ledger, self.log, metrics=self.metrics)
        self.hooks = HookRunner(self.log)

    # --- watches -------------------------------------------------------------------------------------------
    def _setup_watchers(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._watcher = None
        self._poll_watches = set()
        if self.once:
            return
        for watch in self.config.watches:
            fstype = filesystem_type(watch.root)
            mode = watch.mode
            if mode == "auto":
                mode = "poll" if is_network_fs(fstype) else "events"
                if mode == "poll":
                    self.log.info("watch.polling", watch=watch.name, root=str(watch.root), fstype=fstype,
                                  reason="network filesystem: inotify cannot see writes from other hosts")
            if mode == "events":
                try:
                    if self._watcher is None:
                        self._watcher = EventWatcher(self._on_event, self._on_overflow)
                    self._watcher.add(watch.root)
                    self.log.info("watch.events", watch=watch.name, root=str(watch.root), fstype=fstype)
                except OSError as exc:
                    mode = "poll"
                    self.log.warning("watch.events_unavailable", watch=watch.name, root=str(watch.root),
                                     reason=f"{exc}; falling back to polling every {watch.poll_interval:g}s "
                                            "(raise fs.inotify.max_user_watches to use events)")
            if mode == "poll":
                self._poll_watches.add(watch.name)

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
                self._wake.set()
                return
        for watch in self.config.watches:
            if watch.root in path.parents or path == watch.root:
                self._rediscover = True
                self._wake.set()
                return

    def _on_overflow(self) -> None:
        """Events were lost: rescan everything now (the scan is the source of truth anyway)."""
        self.log.warning("watch.overflow", reason="inotify queue overflowed; events were lost; rescanning all runs "
                         "(consider raising fs.inotify.max_queued_events)")
        for state in list(self.runs.values()):
            state.dirty = True
        self._rediscover = True
        self._wake.set()

    # --- discovery ----------------------------------------------------------------------------------------
    def _discover(self) -> None:
        seen: set[tuple[str, Path]] = set()
        for watch in self.config.watches:
            policy = self.config.policy_for(watch)
            out_root = Path(os.path.realpath(watch.output_root))
            for run_dir in list_runs(watch):
                real = Path(os.path.realpath(run_dir))
                if real == out_root or out_root in real.parents:
                    continue  # our own outputs (allow_output_in_root) are never a run
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
                    self.log.error("run.skipped", watch=watch.name, run_dir=str(run_dir), reason=str(exc))
                    continue
                ctx = RunContext(watch=watch, policy=policy, run=name, run_dir=run_dir, output=output)
                self.ledger.touch_run(watch.name, name, str(run_dir), str(output))
                processor = RunProcessor(ctx, self.ledger, self.log, exporter=self.exports,
                                         hooks=self.hooks, metrics=self.metrics)
                self.runs[key] = RunState(ctx=ctx, processor=processor,
                                          tracker=state.tracker if state else ReadinessTracker())
                if state is None:
                    self.log.info("run.discovered", watch=watch.name, run=name, run_dir=str(run_dir),
                                  output=str(output))
        for key in [k for k in self.runs if k not in seen and not self.runs[k].running]:
            del self.runs[key]

    # --- jobs ---------------------------------------------------------------------------------------------
    def _due(self, state: RunState, now: float) -> bool:
        if state.running or now - state.last_scan < MIN_JOB_INTERVAL:
            return False
        if state.dirty or (state.next_check is not None and now >= state.next_check):
            return True
        return now - state.last_scan >= self._scan_interval(state)

    def _scan_interval(self, state: RunState) -> float:
        """Polled watches scan every poll_interval; event watches only need the safety re-scan."""
        if state.ctx.watch.name in self._poll_watches:
            return state.ctx.watch.poll_interval
        return self.config.rescan_interval

    def _submit(self, state: RunState) -> None:
        state.running, state.dirty, state.next_check = True, False, None
        state.last_scan = time.monotonic()
        self._pool.submit(self._job, state).add_done_callback(lambda _future: self._wake.set())

    def _job(self, state: RunState) -> None:
        ctx, processor, tracker = state.ctx, state.processor, state.tracker
        settle = 0.0 if self.once else ctx.watch.settle
        try:
            with self.metrics.scan_duration.time():
                candidates = scan_run(ctx.run_dir, ctx.watch)
            tracker.forget_missing({o.path for o in candidates})
            next_check: float | None = None
            pending = 0
            for obs in candidates:
                if self._stop.is_set():
                    break
                if processor.known(obs):
                    continue
                now = time.monotonic()
                tracker.observe(obs, now)
                if tracker.is_ready(obs, now, settle):
                    outcome = processor.process(obs)
                    self._last_action = f"{ctx.run}: {obs.path.name} {outcome}"
                    if outcome == "retry":
                        pending += 1
                        next_check = min(next_check or now + max(settle, 1.0), now + max(settle, 1.0))
                else:
                    pending += 1
                    deadline = tracker.deadline(obs, settle)
                    when = deadline if deadline is not None else now + max(settle, 1.0)
                    next_check = when if next_check is None else min(next_check, when)
            if not processor.reconciled:
                processor.reconcile()
            if not self._stop.is_set():
                apply_retention(processor, time.time())
            state.pending = pending
            state.next_check = next_check
        except Exception as exc:  # one run's failure must never take the daemon down
            self.failures += 1
            reason = f"{type(exc).__name__}: {exc}"
            self.log.error("run.failed", watch=ctx.watch.name, run=ctx.run, reason=reason,
                           retry_in=f"{ERROR_BACKOFF:g}s", exc_info=not isinstance(exc, (CkptdError, OSError)))
            try:
                self.ledger.note_event(ctx.watch.name, ctx.run, "failed", error=reason)
            except Exception:  # the ledger itself may be what failed; already logged  # noqa: BLE001
                pass
            state.next_check = time.monotonic() + ERROR_BACKOFF
        finally:
            state.running = False

    # --- signals and reload ---------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            self._stop.set()
            self._wake.set()

        def hup(_signum: int, _frame: Any) -> None:
            self._reload = True
            self._wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, hup)

    def _do_reload(self) -> None:
        self._reload = False
        if self.config_path is None:
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.log.error("config.reload_rejected", config=str(self.config_path), problems=exc.problems,
                           reason="the new config is invalid; keeping the running config")
            self.notifier.ready(self._status_text())
            return
        if new.state_dir != self.config.state_dir:
            self.log.warning("config.state_dir_unchanged", reason="state_dir changes need a restart")
            new = type(new)(**{**new.__dict__, "state_dir": self.config.state_dir})
        self.config = new
        configure_logging(new.log.format, new.log.level)
        self.log = get_logger()
        self._setup_watchers()
        self._rediscover = True
        self.log.info("config.reloaded", config=str(self.config_path), watches=len(new.watches))
        self.notifier.ready(self._status_text())

    # --- main loop ------------------------------------------------------------------------------------------
    def _status_text(self) -> str:
        pending = sum(s.pending for s in self.runs.values())
        busy = sum(1 for s in self.runs.values() if s.running)
        return f"{len(self.runs)} runs, {busy} busy, {pending} pending; last: {self._last_action}"

    def run(self) -> int:
        """Foreground daemon until SIGTERM/SIGINT. Returns the exit code."""
        self._install_signals()
        self.log.info("daemon.starting", config=str(self.config_path), watches=len(self.config.watches),
                      state_dir=str(self.config.state_dir), pid=os.getpid())
        self._setup_watchers()
        next_discovery = 0.0
        ready_sent = False
        while not self._stop.is_set():
            if self._reload:
                self._do_reload()
            now = time.monotonic()
            if self._rediscover or now >= next_discovery:
                self._rediscover = False
                self._discover()
                intervals = [self.config.rescan_interval] + [w.poll_interval for w in self.config.watches
                                                             if w.name in self._poll_watches]
                next_discovery = now + min(intervals)
            self._schedule(now)
            if not ready_sent:
                self.notifier.ready(self._status_text())
                self.log.info("daemon.ready", runs=len(self.runs), poll_watches=sorted(self._poll_watches))
                ready_sent = True
            self.notifier.watchdog(now)
            self.notifier.status(self._status_text())
            self.metrics.runs.set(len(self.runs))
            self.metrics.queue_depth.set(sum(s.pending for s in self.runs.values()))
            self.metrics.flush()
            self._wake.wait(self._sleep_for(now, next_discovery))
            self._wake.clear()
        return self._shutdown()

    def _schedule(self, now: float) -> None:
        busy = sum(1 for s in self.runs.values() if s.running)
        for state in sorted(self.runs.values(), key=lambda s: s.last_scan):
            if busy >= self.config.max_parallel_runs:
                break
            if self._due(state, now):
                self._submit(state)
                busy += 1

    def _sleep_for(self, now: float, next_discovery: float) -> float:
        deadlines = [next_discovery]
        for s in self.runs.values():
            if s.running:
                continue
            if s.next_check is not None:
                deadlines.append(s.next_check)
            if s.dirty:
                deadlines.append(s.last_scan + MIN_JOB_INTERVAL)
            deadlines.append(s.last_scan + self._scan_interval(s))
        if self.notifier.watchdog_interval:
            deadlines.append(now + self.notifier.watchdog_interval)
        return min(max(min(deadlines) - now, 0.02), 60.0)

    def _shutdown(self) -> int:
        self.notifier.stopping()
        deadline = time.monotonic() + self.config.shutdown_deadline
        running = [s.ctx.run for s in self.runs.values() if s.running]
        self.log.info("daemon.stopping", running_jobs=running, deadline_s=self.config.shutdown_deadline)
        if self._watcher is not None:
            self._watcher.stop()
        self.exports.shutdown()  # an export in flight is killed; it is redone on restart
        while any(s.running for s in self.runs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if any(s.running for s in self.runs.values()):
            self.log.warning("daemon.abandoned", reason="shutdown deadline passed; in-flight work abandoned "
                             "(outputs are atomic: nothing partial is published; it is redone on restart)")
            os._exit(0)
        self._pool.shutdown(wait=True)
        self.hooks.shutdown(wait=False)
        self.metrics.close()
        self.ledger.close()
        self.log.info("daemon.stopped")
        return 0

    def run_once(self) -> int:
        """Process everything present now, then exit (0, or 1 if a run failed)."""
        self._discover()
        for state in self.runs.values():
            self._submit(state)
        self._pool.shutdown(wait=True)
        self.exports.wait()
        self.hooks.shutdown(wait=True)
        self.metrics.close()
        for state in self.runs.values():
            self.log.info("run.summary", watch=state.ctx.watch.name, run=state.ctx.run,
                          counts=self.ledger.counts(state.ctx.watch.name, state.ctx.run),
                          output=str(state.ctx.output))
        self.ledger.close()
        return 1 if self.failures else 0


def watch_summary(watch: Watch) -> dict[str, Any]:
    fstype = filesystem_type(watch.root)
    mode = watch.mode if watch.mode != "auto" else ("poll" if is_network_fs(fstype) else "events")
    return {"name": watch.name, "root": str(watch.root), "fstype": fstype, "mode": mode, "policy": watch.policy}
