"""The payload of a ``ckptd.export`` job: what a worker needs, as JSON (procrastinate stores it as the job's args).

The export settings are the policy's *at request time* (a local export job captures them the same way), so a
worker needs no copy of the daemon's policies and a config reload never changes a job already queued.

A run with an object-store output (``watches[].output: s3://…``) is exported host-independently: the payload names
the input's key under the run's remote base (``remote_input``, uploaded by the daemon) and the worker derives the
base and its credentials from its own copy of the config (the watch, by name): a payload never carries credentials.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ckptd.atomic import TEMP_PREFIX
from ckptd.export.request import ExportRequest
from ckptd.export.runner import VERSIONS_DIR

REMOTE_INPUTS = "exports/inputs"  # under a run's remote base: inputs uploaded for workers, deleted when done


def staging_prefix(export_id: int) -> str:
    """The name prefix of every staging package of this export: the daemon's clean-up keeps them while the job
    lives; an attempt removes those of earlier attempts."""
    return f"{TEMP_PREFIX}staging-q{export_id}-"


def staging_for(output: Path, export_id: int, attempt: int) -> Path:
    """Where attempt ``attempt`` (procrastinate's count: 0, 1, …) builds the package. One per attempt: the export
    child of a worker killed with ``kill -9`` dies with it (``PR_SET_PDEATHSIG`` on Linux) but may still be
    writing for a moment, or run on where that is not available; the next attempt never shares that directory."""
    return output / VERSIONS_DIR / f"{staging_prefix(export_id)}a{attempt}.mlpackage"


def version_label(export_id: int, sha256: str) -> str:
    """The version directory's label (``best-vNNNN-<label>.mlpackage``): the export id makes it findable."""
    return f"q{export_id}-{sha256[:12]}"


def remote_version(export_id: int, sha256: str, *, attempt: int = 0, partial: bool = False) -> str:
    """The package's versioned prefix name under ``<base>/coreml/`` for an object-store output. Deterministic
    (no listing) and one per attempt: a worker taken for dead but still running (cut off from the database)
    can never write into the prefix its retry verified and committed. The export id orders versions (a newer
    request always has a larger id), which is what the publisher's deletion rule relies on."""
    return f"{version_prefix(export_id)}a{attempt}-{sha256[:12]}{'-partial' if partial else ''}.mlpackage"


def version_prefix(export_id: int) -> str:
    """What every attempt's prefix name of this export starts with."""
    return f"best-v{export_id:04d}-q{export_id}-"


def input_key(export_id: int, sha256: str, suffix: str = ".safetensors") -> str:
    """The key, relative to the run's remote base, of the export input the daemon uploads for a worker."""
    return f"{REMOTE_INPUTS}/q{export_id}-{sha256[:12]}{suffix}"


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
    # object-store output: the input's key relative to the run's remote base ("" for a shared local output), and
    # that base as the daemon saw it (redacted; the worker checks its own config agrees)
    remote_input: str = ""
    remote_base: str = ""

    def to_args(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Payload:
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(args)
        if missing:
            raise ValueError(f"export job payload lacks {sorted(missing)} (a job from another ckptd version?)")
        return cls(**{k: v for k, v in args.items() if k in names})

    def staging(self, attempt: int) -> Path:
        return staging_for(Path(self.output), self.export_id, attempt)

    def export_request(self, staging: Path, weights: Path | None = None) -> ExportRequest:
        """The request for one attempt: the package built at ``staging``, from ``weights`` (default: the shared
        input link; a downloaded copy for an object-store output)."""
        return ExportRequest(**{**self.request, "weights": str(weights) if weights is not None else self.input,
                                "output": str(staging)})
