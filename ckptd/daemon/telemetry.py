"""Prometheus metrics (optional): an HTTP endpoint and/or a node_exporter textfile, both off by default.

Uses prometheus_client (well kept, the reference implementation) with a private registry. Label values are
small fixed sets (actions, outcomes, reason categories): never paths, steps or metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, write_to_textfile

from ckptd import __version__
from ckptd.daemon.http_listener import serve


def rejection_reason(reason: str) -> str:
    """Map a free-text reason to a bounded label value."""
    text = reason.lower()
    for needle, label in (("weights-only", "unsafe"), ("truncated", "truncated"), ("empty", "empty"),
                          ("architecture", "architecture"), ("not a checkpoint", "foreign"),
                          ("no model weights", "no_weights"), ("corrupt", "corrupt")):
        if needle in text:
            return label
    return "other"


class Metrics:
    def __init__(self, listen: str = "", textfile: str = "", status_config: Callable[[], Any] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.detected = Counter("ckptd_checkpoints_detected", "Checkpoint candidates seen for the first time",
                                registry=r)
        self.rejected = Counter("ckptd_checkpoints_rejected", "Checkpoints rejected, by reason", ["reason"], registry=r)
        self.processed = Counter("ckptd_checkpoints_processed", "Checkpoints processed, by outcome", ["outcome"],
                                 registry=r)
        self.job_duration = Histogram("ckptd_job_duration_seconds", "Duration of pipeline steps", ["action"],
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
                                      registry=r)
        self.queue_depth = Gauge("ckptd_queue_depth", "Candidates waiting (settling or retrying) over all runs",
                                 registry=r)
        self.runs = Gauge("ckptd_runs", "Runs being watched", registry=r)
        self.scan_duration = Histogram("ckptd_scan_duration_seconds", "Duration of one run directory scan",
                                       buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30), registry=r)
        self.exports = Counter("ckptd_exports", "CoreML exports, by result", ["result"], registry=r)
        self.last_success = Gauge("ckptd_last_success_timestamp_seconds", "Unix time of the last success, by action",
                                  ["action"], registry=r)
        self.loop_errors = Counter("ckptd_loop_errors", "Main-loop stage failures (logged, backed off, retried), "
                                   "by stage", ["stage"], registry=r)
        self.job_failures = Counter("ckptd_job_failures", "Run jobs that failed and were rescheduled with backoff",
                                    registry=r)
        self.inotify_overflows = Counter("ckptd_inotify_overflows", "inotify queue overflows (events lost; all runs "
                                         "rescanned)", registry=r)
        self.decision_latency = Histogram("ckptd_decision_latency_seconds", "From a candidate's last write (mtime) "
                                          "to its decision being recorded (joined, skipped, invalid, ...)",
                                          buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400),
                                          registry=r)
        self.export_duration = Histogram("ckptd_export_duration_seconds", "Duration of CoreML exports, by result",
                                         ["result"], buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
                                         registry=r)
        self.backlog = Gauge("ckptd_backlog", "Candidates waiting (settling or retrying), by watch", ["watch"],
                             registry=r)
        self._backlog_watches: set[str] = set()
        # object-store watches (root: s3://…): each listing of the prefix, made by the watch's listing thread
        self.listing_seconds = Histogram("ckptd_listing_seconds", "Duration of one listing of an object-store "
                                         "watch root, by watch", ["watch"],
                                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.listing_objects = Gauge("ckptd_listing_objects", "Objects the last listing of an object-store watch "
                                     "root found, by watch", ["watch"], registry=r)
        self._listed_watches: set[str] = set()
        self.evaluations = Counter("ckptd_evaluations", "Candidate evaluations (issue 12 evaluation gate), by result",
                                   ["result"], registry=r)
        for result in ("ok", "partial", "failed"):  # bounded label sets start at 0, so rate() sees the first one
            self.export_duration.labels(result=result)
        for result in ("ok", "failed", "rejected"):
            self.evaluations.labels(result=result)
        Info("ckptd_build", "ckptd build information", registry=r).info({"version": __version__})
        self.textfile = textfile
        self._last_textfile = 0.0
        self.server: Any = None
        if listen:  # /metrics, plus the status page (/, /run) when status_config gives the current config
            self.server = serve(listen, r, status_config)

    def success(self, action: str) -> None:
        self.last_success.labels(action=action).set(time.time())

    def decided(self, mtime_ns: int) -> None:
        """A candidate's decision was recorded: observe the time since its file was last written."""
        self.decision_latency.observe(max(0.0, time.time() - mtime_ns / 1e9))

    def listed(self, watch: str, seconds: float, objects: int) -> None:
        """A listing of an object-store watch completed (called from its listing thread)."""
        self.listing_seconds.labels(watch=watch).observe(seconds)
        self.listing_objects.labels(watch=watch).set(objects)
        self._listed_watches.add(watch)

    def set_backlog(self, by_watch: dict[str, int]) -> None:
        """One series per configured watch (names from the config: bounded); watches removed by a reload go
        (their listing series too)."""
        for name in self._backlog_watches - set(by_watch):
            self.backlog.remove(name)
        for name in self._listed_watches - set(by_watch):
            self._listed_watches.discard(name)
            self.listing_seconds.remove(name)
            self.listing_objects.remove(name)
        for name, waiting in by_watch.items():
            self.backlog.labels(watch=name).set(waiting)
        self._backlog_watches = set(by_watch)

    def flush(self, force: bool = False) -> None:
        """Write the textfile atomically (temp in the same directory + rename), at most every 5 s."""
        if not self.textfile or (not force and time.monotonic() - self._last_textfile < 5):
            return
        self._last_textfile = time.monotonic()
        write_to_textfile(self.textfile, self.registry)  # writes a temp file beside it, then os.replace

    def close(self) -> None:
        self.flush(force=True)
        if self.server is not None:
            self.server.close()
            self.server = None
