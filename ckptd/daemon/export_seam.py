"""The typed seam between a run's pipeline and the export scheduler.

Why a seam: the scheduler used to hold the run processor as ``Any`` and read a pinned member file whenever the
export happened to start; nothing said which side owned that file, so the pipeline evicted it under a queued
export. Now the contract is explicit and checkable:

- the pipeline calls :class:`ExportRequester` from the run's own worker thread (or, for an evaluated average
  or winner, from the run's evaluation job, holding the run's manifest lock); ``request_best`` and
  ``request_average`` take a hard link of the input *before they return*, so the job owns an immutable input and
  nothing the pipeline does afterwards (evicting members, replacing the average) can pull it away;
- the scheduler calls back only through :class:`ExportRun`: the run's context (watch, run, output, policy), its
  logger, its current members (is a failed export still the current one, worth a retry?) and ``note_export``
  (publish the manifest view and fire hooks once the ledger row is final).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ckptd.daemon.ledger import MemberRow
    from ckptd.daemon.pipeline import RunContext


class Log(Protocol):
    """The slice of a structlog bound logger the export code uses."""

    def bind(self, **values: Any) -> Log: ...

    def info(self, event: str, **values: Any) -> Any: ...

    def warning(self, event: str, **values: Any) -> Any: ...

    def error(self, event: str, **values: Any) -> Any: ...


class ExportRun(Protocol):
    """What the scheduler needs from a run (the pipeline's ``RunProcessor`` satisfies it)."""

    ctx: RunContext
    log: Log

    def members(self) -> list[MemberRow]:
        """The run's current top-k members, best first (from the ledger)."""
        ...

    def export_target(self) -> str | None:
        """The content identity the run's export should have now (its best, its published average, or the
        evaluated winner); a failed export is retried only while it is still the target."""
        ...

    def note_export(self, block: dict[str, Any], *, ok: bool) -> None:
        """An export finished and its ledger row is final: rewrite the manifest (``block`` is the ledger's
        view, the same as ``export_state.coreml_block``), record the event, fire the ``on_export`` hooks."""
        ...

    def lease_held(self) -> bool:
        """Does this daemon still hold the run (several daemons sharing a ledger)? Checked before a package is
        published; always true for a single daemon."""
        ...


class ExportRequester(Protocol):
    """What the pipeline calls on the scheduler: from the run's worker thread, or from its evaluation job."""

    def request_best(self, run: ExportRun, member: MemberRow) -> None:
        """Export ``member`` (the new best). Links its pinned copy now; the link is the job's input."""
        ...

    def request_average(self, run: ExportRun, members: Sequence[MemberRow]) -> None:
        """Export the average of ``members``, which must be what ``<output>/average.safetensors`` holds now
        (call it right after publishing the average). Links that file now."""
        ...

    def reconcile_inputs(self, output: Path) -> list[Path]:
        """Remove export inputs and staging packages under ``output`` left by jobs that no longer exist
        (a crash, a kill); never those of a job still waiting, running or scheduled for retry. Returns what
        was removed, for the caller to log."""
        ...
