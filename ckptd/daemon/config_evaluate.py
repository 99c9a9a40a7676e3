"""The ``evaluate`` section of a policy and the averaging strategy that uses it (issue 12: an evaluation gate).

Split from ``config.py`` to keep modules small; ``ckptd.daemon.config`` re-exports everything here.

``evaluate`` names the user's own evaluation program (an argv list, no shell): it receives a candidate's
model-only weights in ``CKPTD_WEIGHTS`` and prints one JSON object holding the metric on its last stdout line.
``average.strategy: greedy`` and ``average.gate: true`` need it; so does ``export.coreml.source: winner``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ckptd.daemon.config_checks import Problems, Section, check_choice, check_int, check_mapping, check_str
from ckptd.units import parse_duration

STRATEGIES = ("uniform", "greedy")


def _check_argv(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ValueError("expected an argv list of strings, e.g. [python, eval.py]")
    return tuple(v)


def _check_env(v: Any) -> Mapping[str, str]:
    data = check_mapping(v)
    if not all(isinstance(k, str) and k and "=" not in k and isinstance(x, (str, int, float)) for k, x in
               data.items()):
        raise ValueError("expected a mapping of variable names to strings")
    return MappingProxyType({k: str(x) for k, x in data.items()})


def _check_timeout(v: Any) -> float:
    seconds = parse_duration(v)
    if not seconds > 0 or seconds == float("inf"):  # 0s would time out every evaluation at once
        raise ValueError("a timeout must be longer than 0s")
    return seconds


def check_margin(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return float(v)


@dataclass(frozen=True)
class EvaluatePolicy:
    """How to evaluate a candidate. ``enabled`` is False when no command is configured."""

    command: tuple[str, ...] = ()
    timeout: float = 600.0
    metric: str = ""
    mode: str = "max"
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_per_hour: int = 60

    @property
    def enabled(self) -> bool:
        return bool(self.command)

    def signature(self) -> str:
        """What makes two evaluations of the same weights comparable: the command, metric, mode and env.
        Part of every cache key, so changing the evaluator never reuses an old value."""
        text = json.dumps([list(self.command), self.metric, self.mode, sorted(self.env.items())])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def better_or_equal(self, value: float, other: float, margin: float = 0.0) -> bool:
        """Is ``value`` at least as good as ``other``, allowing it to be worse by at most ``margin``?"""
        return value >= other - margin if self.mode == "max" else value <= other + margin


def parse_evaluate(data: Any, path: str, problems: Problems) -> EvaluatePolicy:
    if data is None:
        return EvaluatePolicy()
    if not isinstance(data, Mapping):
        problems.add(path, f"expected a mapping with command, metric and mode, got {type(data).__name__}")
        return EvaluatePolicy()
    sec = Section(data, path, problems, ("command", "timeout", "metric", "mode", "env", "max_per_hour"))
    return EvaluatePolicy(
        command=sec.required("command", _check_argv, "an argv list, e.g. [python, eval.py]") or (),
        timeout=sec.get("timeout", 600.0, _check_timeout, "a duration longer than 0s, like 5m"),
        metric=sec.required("metric", check_str, "the key of the metric in the evaluator's JSON line") or "",
        mode=sec.required("mode", check_choice("max", "min"), "max or min") or "max",
        env=sec.get("env", MappingProxyType({}), _check_env, "a mapping of variable names to strings"),
        max_per_hour=sec.get("max_per_hour", 60, check_int(1), "an integer >= 1"),
    )


def check_evaluation_needs(path: str, evaluate: EvaluatePolicy, strategy: str, gate: bool, export_source: str,
                           problems: Problems) -> None:
    """A gate, a greedy soup or a 'winner' export cannot work without an evaluator: say so at load time."""
    if evaluate.enabled:
        return
    if strategy == "greedy":
        problems.add(f"{path}.average.strategy", "greedy needs an evaluator: add policies.<p>.evaluate")
    if gate:
        problems.add(f"{path}.average.gate", "a gate needs an evaluator: add policies.<p>.evaluate")
    if export_source == "winner":
        problems.add(f"{path}.export.coreml.source", "winner needs an evaluator: add policies.<p>.evaluate")
