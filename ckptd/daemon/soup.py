"""Which average to publish, decided by evaluations: the gated uniform average and the greedy soup. Pure logic.

Why: a uniform average of the top-k is not always better than the best single checkpoint (Wortsman et al. 2022,
"Model soups": members from different basins make the uniform soup worse; the greedy soup fixes that). Both
decisions here take the members (best first by the trainer's metric) and an ``evaluate`` callable that returns
the evaluated value of the uniform average of a subset (``None`` with a reason when the evaluation failed). The
caller caches evaluations by content, so calling ``evaluate`` twice for one subset costs one evaluation.

The ``margin`` lets a candidate be worse by at most that much than what it is compared against and still win
(0: ties win; a negative margin demands a strict improvement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptd.daemon.config_evaluate import EvaluatePolicy
from ckptd.daemon.ledger import MemberRow


@dataclass(frozen=True)
class Outcome:
    value: float | None
    reason: str | None = None  # why there is no value


Evaluate = Callable[[Sequence[MemberRow]], Outcome]


@dataclass
class SoupDecision:
    """``publish``: replace the published average by the uniform average of ``kept``. Otherwise the previous
    average stays (``rejected`` says why the new candidate lost)."""

    publish: bool
    kept: list[MemberRow]
    value: float | None
    best_value: float | None
    tried: list[dict[str, Any]] = field(default_factory=list)
    rejected: dict[str, Any] | None = None
    excluded: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> bool:
        """Did any evaluation of this decision fail (so it is not final: the failed ones are retried)?"""
        return any("failed" in t for t in self.tried)


def _sources(members: Sequence[MemberRow]) -> list[str]:
    return [m.record.path for m in members]


def _tried(members: Sequence[MemberRow], outcome: Outcome) -> dict[str, Any]:
    entry: dict[str, Any] = {"members": _sources(members), "value": outcome.value}
    if outcome.value is None:
        entry["failed"] = outcome.reason
    return entry


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def gated_uniform(members: Sequence[MemberRow], evaluate: Evaluate, ev: EvaluatePolicy, margin: float
                  ) -> SoupDecision:
    """Publish the uniform average of all ``members`` only if it evaluates at least as well as the best member."""
    best = evaluate(members[:1])
    tried = [_tried(members[:1], best)]
    candidate = evaluate(members)
    tried.append(_tried(members, candidate))
    lost = {"members": _sources(members), "value": candidate.value, "against": best.value}
    if candidate.value is None:
        return SoupDecision(False, [], None, best.value, tried,
                            {**lost, "reason": f"the average could not be evaluated: {candidate.reason}"})
    if best.value is None:
        return SoupDecision(False, [], None, None, tried,
                            {**lost, "reason": f"the best member could not be evaluated: {best.reason}; "
                                               "nothing to compare the average against"})
    if ev.better_or_equal(candidate.value, best.value, margin):
        return SoupDecision(True, list(members), candidate.value, best.value, tried)
    reason = (f"the uniform average of {len(members)} members scored {ev.metric}={_fmt(candidate.value)}, worse "
              f"than the best member's {_fmt(best.value)} ({ev.mode}, margin {margin:g})")
    return SoupDecision(False, [], None, best.value, tried, {**lost, "reason": reason})


def greedy(members: Sequence[MemberRow], evaluate: Evaluate, ev: EvaluatePolicy, margin: float) -> SoupDecision:
    """The greedy soup: start from the best member; add each next member (metric order) only if the evaluated
    soup does not get worse. The newest member's exclusion is reported as ``rejected``."""
    first = evaluate(members[:1])
    tried = [_tried(members[:1], first)]
    if first.value is None:
        return SoupDecision(False, [], None, None, tried,
                            {"members": _sources(members[:1]), "value": None, "against": None,
                             "reason": f"the best member could not be evaluated: {first.reason}"})
    soup, value = [members[0]], first.value
    excluded: list[dict[str, Any]] = []
    for m in members[1:]:
        candidate = [*soup, m]
        outcome = evaluate(candidate)
        tried.append(_tried(candidate, outcome))
        if outcome.value is not None and ev.better_or_equal(outcome.value, value, margin):
            soup, value = candidate, outcome.value
            continue
        why = (f"adding it made the soup worse: {ev.metric}={_fmt(outcome.value)} against {_fmt(value)} "
               f"({ev.mode}, margin {margin:g})" if outcome.value is not None
               else f"the soup with it could not be evaluated: {outcome.reason}")
        excluded.append({"source": m.record.path, "members": _sources(candidate), "value": outcome.value,
                         "against": value, "reason": why})
    newest = max(members, key=lambda m: m.record.mtime).record.path
    rejected = next((e for e in excluded if e["source"] == newest), None)
    return SoupDecision(True, soup, value, first.value, tried, rejected, excluded)


def winner(best_value: float | None, average_value: float | None, ev: EvaluatePolicy) -> str | None:
    """Which of the best member and the published average evaluated better (ties: the average, which is at least
    as good and usually more robust); None when neither has a value."""
    if average_value is None:
        return "best" if best_value is not None else None
    if best_value is None:
        return "average"
    return "average" if ev.better_or_equal(average_value, best_value) else "best"
