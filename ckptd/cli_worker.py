"""``ckptd worker -c CONFIG [--capability macos] [--concurrency N]``: run queued CoreML exports on this host.

The worker reads the config for its ``ledger`` (a PostgreSQL URL: the queue lives in that database) and ``log``;
everything an export needs travels in the job, but for a run with an object-store output: there the worker takes
the watch (by name) for its output URL and storage options, and its own ``state_dir`` for scratch space (the input
is downloaded, the package built there and uploaded; see :mod:`ckptd.queue.remote`). procrastinate's worker
fetches the jobs of one queue (``exports``, or ``exports-macos`` with ``--capability macos``), ``concurrency`` at
a time, each in its own export child (:mod:`ckptd.queue.task`).

Dead workers: every worker sends a heartbeat every ``--stalled-after``/3 seconds; a job still ``doing`` under a
worker whose heartbeat is older than ``--stalled-after`` (killed, host lost) is put back in the queue by any live
worker (checked at start and then as often as the heartbeat). SIGTERM/SIGINT: the running conversions are
killed, their jobs go back to the queue at once, the worker exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
from typing import TYPE_CHECKING, Any

from ckptd.units import parse_duration

if TYPE_CHECKING:
    from ckptd.daemon.config import Config


def add_worker_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("worker", help="run queued CoreML exports (policies with export.executor: queue)")
    p.add_argument("-c", "--config", required=True, help="the daemons' config: its `ledger` (PostgreSQL) and `log`")
    p.add_argument("--capability", choices=["macos"], default="",
                   help="take only jobs needing this capability (export.capability: macos); default: the others")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="exports at once (default 1)")
    p.add_argument("--stalled-after", default="30s", metavar="DURATION",
                   help="a worker silent this long is dead and its jobs are retried (default 30s)")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from ckptd.daemon.config import load_config
    from ckptd.daemon.ledger import ledger_target
    from ckptd.daemon.ledger_db import is_pg
    from ckptd.daemon.logs import configure_logging
    from ckptd.errors import ConfigError
    from ckptd.queue.app import quiet_library_logs

    config = load_config(args.config, check_paths=False)
    target = ledger_target(config)
    if not is_pg(target):
        raise ConfigError(args.config, ["ledger: `ckptd worker` needs a PostgreSQL ledger (`ledger: "
                                        "postgresql://user@host:port/db`): the export queue lives in that database"])
    if args.concurrency < 1:
        raise ConfigError("--concurrency", ["must be an integer >= 1"])
    try:
        stalled_after = parse_duration(args.stalled_after)
    except ValueError:
        raise ConfigError("--stalled-after", [f"expected a duration like 30s, not {args.stalled_after!r}"]) from None
    configure_logging(config.log.format, config.log.level)
    quiet_library_logs()
    return asyncio.run(Worker(str(target), args.capability, args.concurrency, max(stalled_after, 1.0),
                              config=config).run())


class Worker:
    def __init__(self, url: str, capability: str, concurrency: int, stalled_after: float,
                 config: Config | None = None) -> None:
        from ckptd.daemon.logs import get_logger
        from ckptd.queue.app import queue_name

        self.url, self.concurrency, self.stalled_after, self.config = url, concurrency, stalled_after, config
        self.queue = queue_name(capability)
        self.holder = f"worker@{socket.gethostname()}:{os.getpid()}"  # never a daemon's host:pid (see Ledger)
        self.log = get_logger(worker=self.holder)

    async def run(self) -> int:
        from ckptd.daemon.ledger import Ledger
        from ckptd.daemon.notify import Notifier
        from ckptd.queue.app import TASK, ensure_schema, make_app, retry_strategy
        from ckptd.queue.task import ExportTask

        if await asyncio.to_thread(ensure_schema, self.url):
            self.log.info("queue.schema_created", reason="first use of the export queue in this database")
        ledger = await asyncio.to_thread(Ledger, self.url, holder=self.holder)
        task = ExportTask(ledger, self.log, self.holder, self.config)
        app = make_app(self.url, max_size=self.concurrency + 4)

        def export(context: Any, **args: Any) -> str:
            return task.run(context.job, args)

        app.task(name=TASK, pass_context=True, retry=retry_strategy(), queue=self.queue)(export)
        notifier = Notifier()
        loop = asyncio.get_running_loop()
        try:
            async with app.open_async():
                worker = asyncio.create_task(app.run_worker_async(
                    queues=[self.queue], concurrency=self.concurrency, name=self.holder, wait=True,
                    # LISTEN/NOTIFY wakes it for new jobs; polling finds retried ones (a stalled job put back,
                    # a backoff elapsed), which procrastinate does not announce
                    install_signal_handlers=False, listen_notify=True,
                    fetch_job_polling_interval=min(5.0, self.stalled_after / 3),
                    update_heartbeat_interval=self.stalled_after / 3, stalled_worker_timeout=self.stalled_after,
                    delete_jobs="successful"))
                rescue = asyncio.create_task(self._rescue_stalled(app))

                def stop(signum: int) -> None:
                    if task.stopping:
                        return
                    self.log.info("worker.stopping", signal=signal.Signals(signum).name,
                                  reason="running exports are killed and go back to the queue")
                    notifier.stopping()
                    task.stopping = True  # before the kill: a killed export is then requeued, not failed
                    loop.run_in_executor(None, task.stop)
                    worker.cancel()

                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop, sig)
                self.log.info("worker.ready", queue=self.queue, concurrency=self.concurrency,
                              stalled_after=self.stalled_after)
                notifier.ready(f"exports from queue {self.queue}")
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
                rescue.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rescue
        finally:
            ledger.close()
            task.close()
        self.log.info("worker.stopped")
        return 0

    async def _rescue_stalled(self, app: Any) -> None:
        """Put back in the queue the jobs of workers whose heartbeat stopped (killed, host lost)."""
        from ckptd.queue.app import TASK

        while True:
            try:
                for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=self.stalled_after,
                                                                  task_name=TASK):
                    # a job killed before its claim may still hold the run's queueing lock, which a newer
                    # request may be waiting under too: free it, or putting the job back would be refused
                    await app.connector.execute_query_async(
                        "UPDATE procrastinate_jobs SET queueing_lock = NULL WHERE id = %(id)s", id=job.id)
                    try:
                        await app.job_manager.retry_job(job)
                    except Exception as exc:  # noqa: BLE001 (another worker put it back first)
                        self.log.debug("queue.stalled_retry_skipped", job=job.id, reason=str(exc))
                        continue
                    self.log.warning("export.stalled_job_retried", job=job.id,
                                     export_id=job.task_kwargs.get("export_id"), run=job.task_kwargs.get("run"),
                                     reason=f"its worker sent no heartbeat for {self.stalled_after:g}s (killed or "
                                            "lost); the job is retried now")
            except Exception as exc:  # noqa: BLE001 (the database hiccuped: try again next round)
                self.log.warning("queue.stalled_check_failed", reason=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(max(self.stalled_after / 3, 0.5))
