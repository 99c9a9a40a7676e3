"""CoreML exports as jobs of a procrastinate queue in the PostgreSQL ledger database (``export.executor: queue``).

Why a maintained queue: exports are the heavy part of the work (a minute of CPU per package, some needing a Mac
for CoreML predict parity); running them on other hosts needs durable jobs, per-run locks, retries and the
detection of a dead worker, which procrastinate already does on the database ckptd already shares (no broker).

Who does what:

- the daemon (:mod:`ckptd.queue.client`) takes the job's input (a hard link in the run's output, as for a local
  export), writes the ``exports`` row (``queued``) and defers one ``ckptd.export`` job whose payload names the
  row, the input, the output and the export settings at request time; it then watches the row and rewrites the
  run's manifest (and fires ``on_export`` hooks) when a worker finished it;
- ``ckptd worker`` (:mod:`ckptd.queue.task`) runs the export in a child process exactly as the daemon does and
  publishes the package with the same function, conditioned in the ledger (:mod:`ckptd.queue.store`).

Requirements: for a local ``output``, the run's output directory must be the same shared storage, at the same
path, on the daemon and on every worker (the payload carries absolute paths; the input is a hard link there). An
object-store ``output`` (``s3://…``) needs nothing shared but the store and the config: the daemon uploads the
input under the run's remote base, the worker (any host, its own ``state_dir``) downloads it, exports, uploads the
package under ``coreml/<version>/`` and commits; the daemon's next publication names that prefix in the remote
manifest (:mod:`ckptd.queue.remote`). procrastinate's tables (``procrastinate_*``) live in the ledger's database
beside ckptd's, created at the first start (:func:`ckptd.queue.app.ensure_schema`).

Differences from the local executor: a request's attempts share one ledger row (the local executor writes one
per attempt); after the third retry (30 s, 2 min, 10 min) a failure is final until the run's next new best or the
daemon's next start (the local executor keeps retrying every 10 min while the export is still current); ``ckptd
once`` queues exports and exits without waiting for the workers.
"""
