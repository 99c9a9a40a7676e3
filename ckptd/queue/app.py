"""The procrastinate app on the ledger's PostgreSQL database, its one task's names, locks and retry strategy.

One task, ``ckptd.export``; one queue per worker capability (``exports``, ``exports-macos``). Every job of a run
carries ``lock = "<watch>/<run>/<stream>"`` (procrastinate never runs two jobs with one lock at once, so two
exports of a run never race) and, while it waits, ``queueing_lock = "export:<watch>/<run>/<stream>"`` (at most
one waiting request per run; see :mod:`ckptd.queue.client` for how the newest request wins).

procrastinate's schema is created in the ledger database (tables ``procrastinate_*`` beside ckptd's) by the first
daemon or worker that starts, under an advisory lock so that several starting together do not race. Upgrading
procrastinate across schema changes needs its migrations applied (``procrastinate schema --migrate`` lists them):
ckptd only creates the schema when it is missing.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from ckptd.errors import CkptdError

TASK = "ckptd.export"
QUEUES = {"": "exports", "macos": "exports-macos"}  # capability -> queue
SCHEMA_LOCK = 0x636B70747175  # pg_advisory_xact_lock key ("ckptqu"): one process creates the schema
RETRY_DELAYS: tuple[float, ...] = (30.0, 120.0, 600.0)  # as a local export: after the 1st, 2nd, 3rd failure


class QueueError(CkptdError):
    """The export queue cannot be used (no procrastinate, database unreachable); the message says why."""


class AttemptFailed(Exception):
    """An export attempt failed (its ledger row says why); ``retry``: the strategy schedules the next one."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.retry = retry


class WorkerStopping(Exception):
    """The worker is stopping (SIGTERM): the export was killed, the job goes back to the queue at once."""


def queue_name(capability: str) -> str:
    try:
        return QUEUES[capability]
    except KeyError:
        raise QueueError(f"unknown worker capability {capability!r} (known: macos, or none)") from None


def run_key(watch: str, run: str, stream: str) -> str:
    """The per-run ``lock`` of the run's export jobs."""
    return f"{watch}/{run}/{stream}"


def queueing_lock(key: str) -> str:
    return f"export:{key}"


def retry_delay(attempts: int, delays: tuple[float, ...] = RETRY_DELAYS) -> float | None:
    """Seconds before the next attempt after ``attempts`` earlier ones failed (procrastinate's count, 0 for the
    first run); None once they are used up."""
    return delays[attempts] if attempts < len(delays) else None


def import_procrastinate() -> Any:
    try:
        import procrastinate
    except ImportError:
        raise QueueError("export.executor: queue needs procrastinate: pip install 'ckptd[queue]'") from None
    return procrastinate


def retry_strategy(delays: tuple[float, ...] = RETRY_DELAYS) -> Any:
    """procrastinate's retry decision for ``ckptd.export``: the ledger's 30 s / 2 min / 10 min after a failed
    attempt, at once after a worker stopped (another worker takes it), never for anything else a task raises
    on purpose (:class:`AttemptFailed` with ``retry=False``)."""
    procrastinate = import_procrastinate()

    class ExportRetry(procrastinate.BaseRetryStrategy):  # type: ignore[misc,name-defined]
        def get_retry_decision(self, *, exception: BaseException, job: Any) -> Any:
            if isinstance(exception, WorkerStopping):
                return procrastinate.RetryDecision(retry_in={"seconds": 0})
            if isinstance(exception, AttemptFailed) and not exception.retry:
                return None
            delay = retry_delay(job.attempts, delays)  # also ckptd's own trouble (ledger down): same backoff
            return None if delay is None else procrastinate.RetryDecision(retry_in={"seconds": delay})

    return ExportRetry()


def quiet_library_logs() -> None:
    """procrastinate logs every job at INFO; ckptd logs its own line per decision. Keep its warnings and errors
    (unless the root logger is at DEBUG: then everything)."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("procrastinate").setLevel(logging.WARNING)


def make_app(url: str, *, max_size: int = 4) -> Any:
    """The App on ``url`` (the ledger's). Open it with ``app.open()`` (daemon, sync) or ``open_async`` (worker)."""
    procrastinate = import_procrastinate()
    connector = procrastinate.PsycopgConnector(conninfo=url, min_size=1, max_size=max_size,
                                               kwargs={"application_name": "ckptd-queue"})
    return procrastinate.App(connector=connector)


def ensure_schema(url: str) -> bool:
    """Create procrastinate's schema in the ledger database unless it exists; True if it was created now.
    Idempotent and safe when several processes start together (one transaction under an advisory lock)."""
    import_procrastinate()
    import psycopg
    from procrastinate.schema import SchemaManager

    from ckptd.daemon.ledger_db import describe

    try:
        with psycopg.connect(url, connect_timeout=10, application_name="ckptd-queue") as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            row = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
            if row is not None and row[0] is not None:
                return False
            conn.execute(SchemaManager.get_schema())  # one script, no placeholders
            return True
    except psycopg.Error as exc:
        message = " ".join(str(exc).split())
        password = urlsplit(url).password
        raise QueueError(f"cannot prepare the export queue in {describe(url)}: "
                         f"{message.replace(password, '***') if password else message}") from None
