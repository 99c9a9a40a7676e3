"""The payload of a ``ckptd.export`` job: what a worker needs, as JSON (procrastinate stores it as the job's args).

The export settings are the policy's *at request time* (a local export job captures them the same way), so a
worker needs no copy of the daemon's policies and a config reload never changes a job already queued.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ckptd.atomic import TEMP_PREFIX
from ckptd.export.request import ExportRequest
from ckptd.export.runner import VERSIONS_DIR


def staging_prefix(export_id: int) -> str:
    """The name prefix of every staging package of this export: the daemon's clean-up keeps them while the job
    lives; an attempt removes those of earlier attempts."""
    return f"{TEMP_PREFIX}staging-q{export_id}-"


def staging_for(output: Path, export_id: int, attempt: int) -> Path:
    """Where attempt ``attempt`` (procrastinate's count: 0, 1, …) builds the package. One per attempt: the export
    child of a worker killed with ``kill -9`` is not killed with it (its own process group) and may still write
    into its own staging; the next attempt never shares that directory."""
    return output / VERSIONS_DIR / f"{staging_prefix(export_id)}a{attempt}.mlpackage"


def version_label(export_id: int, sha256: str) -> str:
    """The version directory's label (``best-vNNNN-<label>.mlpackage``): the export id makes it findable."""
    return f"q{export_id}-{sha256[:12]}"


@dataclass(frozen=True)
class Payload:
    export_id: int
    watch: str
    run: str
    stream: str
    policy: str
    output: str  # the run's output directory (shared storage, same path on every host)
    input: str  # the job's own hard link, in <output>/.exports/inputs/
    source: str
    sha256: str
    metric: float | None
    step: int | None
    request: dict[str, Any]  # ExportRequest fields (weights = input, output = the staging path)
    timeout: float
    keep: int
    publish_partial: bool

    def to_args(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Payload:
        names = {f.name for f in fields(cls)}
        missing = names - set(args)
        if missing:
            raise ValueError(f"export job payload lacks {sorted(missing)} (a job from another ckptd version?)")
        return cls(**{k: v for k, v in args.items() if k in names})

    def staging(self, attempt: int) -> Path:
        return staging_for(Path(self.output), self.export_id, attempt)

    def export_request(self, staging: Path) -> ExportRequest:
        return ExportRequest(**{**self.request, "weights": self.input, "output": str(staging)})
