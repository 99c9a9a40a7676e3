"""Is a checkpoint fit to publish? Checked on its weights before any output is touched.

A NaN/Inf anywhere, or names, shapes or tensor kinds that differ from the run's members, make it invalid: such
weights would poison the average or fail it half-way. The members' architecture is read from the header of any
readable member copy (ckptd's own files), never from a trainer's file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ckptd.errors import CheckpointError, CkptdError, NonFiniteError
from ckptd.formats import safetensors_header
from ckptd.model_state import compare_state


class NoReadableMember(CkptdError):
    """None of the member copies can be read: the architecture cannot be checked until they are recovered."""


def publish_problem(weights: Mapping[str, torch.Tensor], member_files: Sequence[str]) -> str:
    """Why ``weights`` must not be published, or ''. Raises NoReadableMember when there are members but none
    of their copies is readable."""
    for key, t in weights.items():
        # one cheap pass (a sum) per tensor; the exact element check only when the sum is not finite
        # (NaN/Inf inside, or a sum that overflowed)
        if t.is_floating_point() and t.numel() and not math.isfinite(float(t.sum())) \
                and not bool(torch.isfinite(t).all()):
            return str(NonFiniteError(f"tensor {key!r} holds NaN or Inf; not published, not averaged"))
    if not member_files:
        return ""
    for file in member_files:
        try:
            header = safetensors_header(file)
        except CheckpointError:
            continue  # unreadable reference: try the next member
        reference = {k: torch.empty(v["shape"], dtype=_kind(v["dtype"]), device="meta")
                     for k, v in header.items() if k != "__metadata__"}
        report = compare_state(reference, weights)
        if not report.ok:
            return (f"architecture differs from this run's members ({report.describe(limit=3, model='members')});"
                    " not averaged")
        kinds = {k for k, t in weights.items() if k in reference
                 and t.is_floating_point() != reference[k].is_floating_point()}
        if kinds:
            return f"tensor kinds differ from this run's members ({sorted(kinds)[:3]}); not averaged"
        return ""
    raise NoReadableMember("no member copy is readable")


def _kind(code: str) -> torch.dtype:
    """A representative dtype for a safetensors dtype code: floating (F*, BF16) or not."""
    return torch.float32 if code[0] in "FB" and code != "BOOL" else torch.int64
