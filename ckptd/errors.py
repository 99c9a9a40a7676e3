"""One exception hierarchy for ckptd.

Every message is written for the person reading a log line: it names the file (or config key) and what is
wrong, and where it helps, what to do about it. Library callers can catch :class:`CkptdError` for everything.
"""

from __future__ import annotations

import sys
from pathlib import Path


class CkptdError(Exception):
    """Base class of every error ckptd raises on purpose."""


class CheckpointError(CkptdError):
    """A checkpoint could not be read: missing, empty, truncated, corrupt, foreign, or unsafe."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = _shown(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _shown(path: str | Path) -> str:
    """The path an operator knows: a stub in an object-store watch's mirror is named by its ``s3://`` URL (the
    mirror path is this host's state_dir). Without a mirror loaded there is none to translate: no import here."""
    mirror = sys.modules.get("ckptd.remote.mirror")
    return str(path) if mirror is None else mirror.canonical(path)


class IncompleteCheckpointError(CheckpointError):
    """Empty or truncated: possibly still being written (the daemon waits for it to change)."""


class CheckpointChangedError(CheckpointError):
    """The file was truncated, rewritten, replaced or deleted while ckptd read it; what was read is discarded.

    Trainers rewrite some files in place (Lightning ``last.ckpt``, ml-cvnets ``*_last.pt``): reading again once
    the file has settled is the cure, so the daemon retries instead of recording a failure.
    """

    def __init__(self, path: str | Path, detail: str) -> None:
        super().__init__(path, f"changed while being read ({detail}); will be retried")


class UnsafeCheckpointError(CheckpointError):
    """Loading would need pickle globals outside the weights-only allowlist; nothing was executed."""

    def __init__(self, path: str | Path, globals_needed: list[str], detail: str = "") -> None:
        self.globals_needed = globals_needed
        names = ", ".join(globals_needed) if globals_needed else "(unknown)"
        reason = (
            f"refused to unpickle: it needs globals outside the weights-only allowlist: {names}. "
            "Nothing was executed. If you trust this file, allowlist them explicitly "
            "(library: allow_globals=[...]; config: policies.<name>.weights.allow_globals)"
        )
        if detail:
            reason += f" ({detail})"
        super().__init__(path, reason)


class WeightsNotFoundError(CheckpointError):
    """The checkpoint loaded, but no model weights were found in it (or not under the requested key)."""


class WeightsMismatchError(CkptdError):
    """Two sets of weights cannot be combined or loaded: keys, shapes or dtypes differ."""


class NonFiniteError(CkptdError):
    """A tensor holds NaN or Inf where ckptd refuses them (averaging)."""


class MetricError(CkptdError):
    """A metric or step source could not produce a number."""


class ConfigError(CkptdError):
    """A config file is invalid. ``problems`` lists every problem with its key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


class OutputPathError(CkptdError):
    """An output path would resolve outside its configured root."""


class ExportError(CkptdError):
    """A model export failed (factory, capture, conversion, verification or timeout)."""


class LeaseLost(CkptdError):
    """This daemon no longer holds the run's lease (it expired, or another daemon sharing the ledger took the run
    over): the publication it was committing is rolled back, the run is left to the current holder."""

    def __init__(self, watch: str, run: str, holder: str, current: str | None = None) -> None:
        self.watch, self.run, self.holder, self.current = watch, run, holder, current
        now = f"it is now held by {current}" if current and current != holder else "its lease expired"
        super().__init__(f"run {watch}/{run}: {holder} lost the run's lease ({now}); nothing was published, the "
                         "run is left to the daemon holding it (a daemon that stalls longer than lease_ttl loses "
                         "its runs)")
