"""Pure policy decisions for one run: does a new checkpoint join the top-k, is it the new best, who leaves.

No I/O and no clock reads: records in, a decision with its reason out. Ranking itself is ``ckptd.ranking``,
shared with the library's top-k helper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckptd.ranking import Candidate, rank_key


@dataclass(frozen=True)
class Record:
    """A processed checkpoint as the policy sees it."""

    ckpt_id: int
    path: str
    sha256: str
    metric: float | None
    step: int | None
    mtime: float

    def candidate(self) -> Candidate:
        return Candidate(path=f"{self.path}#{self.ckpt_id}", metric=self.metric, step=self.step, mtime=self.mtime)


@dataclass(frozen=True)
class Decision:
    action: str  # "join" | "skip" | "unranked" | "duplicate"
    reason: str
    members: tuple[Record, ...]  # ranked, best first, after the decision
    evicted: tuple[Record, ...] = ()
    new_best: bool = False

    @property
    def changed(self) -> bool:
        return self.action == "join"


def ranked(records: Sequence[Record], mode: str) -> list[Record]:
    return sorted((r for r in records if r.metric is not None), key=lambda r: rank_key(r.candidate(), mode))


def decide(members: Sequence[Record], new: Record, top_k: int, mode: str) -> Decision:
    """What to do with ``new`` given the current ``members`` (at most ``top_k``)."""
    current = tuple(ranked(members, mode))
    if new.metric is None:
        return Decision("unranked", "no metric found: recorded, not ranked", current)
    for m in current:
        if m.sha256 == new.sha256:
            return Decision("duplicate", f"same content as member {m.path}", current)
    after = ranked([*current, new], mode)
    kept, dropped = tuple(after[:top_k]), tuple(after[top_k:])
    if new not in kept:
        cutoff = current[-1].metric if current else None
        return Decision("skip", f"metric {new.metric:g} does not beat the top-{top_k} cutoff {cutoff:g} ({mode})",
                        current)
    position = kept.index(new) + 1
    new_best = position == 1
    if new_best and current:
        reason = f"new best: {new.metric:g} beats {current[0].metric:g} ({mode}); joins top-{top_k}"
    elif new_best:
        reason = f"first ranked checkpoint: best with {new.metric:g}"
    else:
        reason = f"ranks {position} of {len(kept)}: joins top-{top_k}"
    if dropped:
        reason += "; evicts " + ", ".join(f"{d.path} ({d.metric:g})" for d in dropped)
    return Decision("join", reason, kept, dropped, new_best)
