"""The evaluation gate's pure parts: the soup decisions, the winner, the evaluator's verdict line, and the config.

The decisions get an ``evaluate`` that looks values up in a table (by member set), records every call, and can
fail for chosen sets, so each test states exactly which sets were evaluated and what was decided.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from ckptd.daemon.config import parse_config
from ckptd.daemon.config_evaluate import EvaluatePolicy
from ckptd.daemon.evaluation_runner import parse_verdict
from ckptd.daemon.ledger import MemberRow
from ckptd.daemon.policy import Record
from ckptd.daemon.soup import Outcome, gated_uniform, greedy, winner
from ckptd.errors import ConfigError
from tests import soup_models as sm

MIN = EvaluatePolicy(command=("eval",), metric="loss", mode="min")
MAX = EvaluatePolicy(command=("eval",), metric="acc", mode="max")


def member(name: str, mtime: float) -> MemberRow:
    return MemberRow(Record(hash(name) % 1000, name, f"sha-{name}", 0.0, None, mtime), f"/out/members/{name}")


class Table:
    """``evaluate`` for the decisions: the value of each member set (by names, any order), or a failure."""

    def __init__(self, values: dict[str, float | None]) -> None:
        self.values = values
        self.calls: list[str] = []

    def __call__(self, subset: Sequence[MemberRow]) -> Outcome:
        key = "+".join(sorted(m.record.path for m in subset))
        self.calls.append("+".join(m.record.path for m in subset))
        value = self.values[key]
        return Outcome(value) if value is not None else Outcome(None, f"{key} failed")


A, B, C, D = (member(n, t) for n, t in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)))  # d is the newest


# --- gated uniform -----------------------------------------------------------------------------------------------
def test_gated_uniform_publishes_an_average_at_least_as_good_as_the_best() -> None:
    table = Table({"a": 0.5, "a+b+c": 0.4})
    d = gated_uniform([A, B, C], table, MIN, 0.0)
    assert d.publish and d.kept == [A, B, C] and d.value == 0.4 and d.best_value == 0.5 and d.rejected is None
    assert table.calls == ["a", "a+b+c"]
    assert d.tried == [{"members": ["a"], "value": 0.5}, {"members": ["a", "b", "c"], "value": 0.4}]
    assert gated_uniform([A, B, C], Table({"a": 0.5, "a+b+c": 0.5}), MIN, 0.0).publish  # a tie wins


def test_gated_uniform_rejects_a_worse_average_and_says_by_how_much() -> None:
    d = gated_uniform([A, B, C], Table({"a": 0.5, "a+b+c": 0.75}), MIN, 0.1)
    assert not d.publish and d.kept == [] and d.value is None and d.best_value == 0.5
    assert d.rejected is not None
    assert {k: d.rejected[k] for k in ("members", "value", "against")} == {"members": ["a", "b", "c"],
                                                                            "value": 0.75, "against": 0.5}
    assert d.rejected["reason"] == ("the uniform average of 3 members scored loss=0.75, worse than the best "
                                    "member's 0.5 (min, margin 0.1)")


@pytest.mark.parametrize(("ev", "best", "average", "margin", "publish"), [
    (MIN, 0.5, 0.55, 0.05, True),  # worse by exactly the margin
    (MIN, 0.5, 0.56, 0.05, False),
    (MIN, 0.5, 0.5, -0.01, False),  # a negative margin demands a strict improvement
    (MIN, 0.5, 0.48, -0.01, True),
    (MAX, 0.9, 0.91, 0.0, True),  # max: higher is better
    (MAX, 0.9, 0.89, 0.0, False),
    (MAX, 0.9, 0.85, 0.05, True),
])
def test_gated_uniform_margin_and_mode(ev: EvaluatePolicy, best: float, average: float, margin: float,
                                       publish: bool) -> None:
    assert gated_uniform([A, B], Table({"a": best, "a+b": average}), ev, margin).publish is publish


def test_gated_uniform_never_publishes_without_both_values() -> None:
    d = gated_uniform([A, B], Table({"a": 0.5, "a+b": None}), MIN, 0.0)
    assert not d.publish and d.rejected is not None and d.rejected["value"] is None
    assert d.rejected["reason"] == "the average could not be evaluated: a+b failed"
    assert d.tried[1] == {"members": ["a", "b"], "value": None, "failed": "a+b failed"}
    d = gated_uniform([A, B], Table({"a": None, "a+b": 0.1}), MIN, 0.0)
    assert not d.publish and d.best_value is None and d.rejected is not None
    assert d.rejected["reason"].startswith("the best member could not be evaluated: a failed")


# --- greedy soup -------------------------------------------------------------------------------------------------
def test_greedy_adds_members_in_metric_order_while_the_soup_does_not_get_worse() -> None:
    table = Table({"a": 0.5, "a+b": 0.45, "a+b+c": 0.9, "a+b+d": 0.45})
    d = greedy([A, B, C, D], table, MIN, 0.0)
    assert d.publish and d.kept == [A, B, D] and d.value == 0.45 and d.best_value == 0.5
    assert table.calls == ["a", "a+b", "a+b+c", "a+b+d"]  # one evaluation per member, each against the soup so far
    assert [e["source"] for e in d.excluded] == ["c"]
    assert d.excluded[0] == {"source": "c", "members": ["a", "b", "c"], "value": 0.9, "against": 0.45,
                             "reason": "adding it made the soup worse: loss=0.9 against 0.45 (min, margin 0)"}
    assert d.rejected is None  # c is not the newest member: nothing new was rejected


def test_greedy_reports_the_newest_member_it_left_out() -> None:
    d = greedy([A, B, C, D], Table({"a": 0.5, "a+b": 0.4, "a+b+c": 0.3, "a+b+c+d": 0.31}), MIN, 0.0)
    assert d.kept == [A, B, C] and d.value == 0.3
    assert d.rejected is not None and d.rejected["source"] == "d" and d.rejected["against"] == 0.3
    assert greedy([A, B, C, D], Table({"a": 0.5, "a+b": 0.4, "a+b+c": 0.3, "a+b+c+d": 0.31}), MIN, 0.02).kept == \
        [A, B, C, D]  # within the margin


def test_greedy_keeps_only_the_best_when_every_addition_hurts() -> None:
    d = greedy([A, B, C], Table({"a": 0.9, "a+b": 0.8, "a+c": 0.7}), MAX, 0.0)
    assert d.publish and d.kept == [A] and d.value == 0.9
    assert [e["source"] for e in d.excluded] == ["b", "c"] and d.rejected is not None and d.rejected["source"] == "c"


def test_greedy_excludes_a_member_whose_soup_cannot_be_evaluated() -> None:
    d = greedy([A, B, C], Table({"a": 0.5, "a+b": None, "a+c": 0.4}), MIN, 0.0)
    assert d.kept == [A, C] and d.excluded[0]["reason"] == "the soup with it could not be evaluated: a+b failed"


def test_greedy_publishes_nothing_when_the_best_member_cannot_be_evaluated() -> None:
    table = Table({"a": None})
    d = greedy([A, B, C], table, MIN, 0.0)
    assert not d.publish and d.kept == [] and table.calls == ["a"]  # it stops: nothing to compare against
    assert d.rejected is not None and d.rejected["reason"] == "the best member could not be evaluated: a failed"


# --- winner ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("best", "average", "ev", "expected"), [
    (0.5, 0.4, MIN, "average"), (0.5, 0.6, MIN, "best"), (0.5, 0.5, MIN, "average"),  # a tie: the average
    (0.8, 0.9, MAX, "average"), (0.8, 0.7, MAX, "best"),
    (0.5, None, MIN, "best"), (None, 0.4, MIN, "average"), (None, None, MIN, None),
])
def test_winner(best: float | None, average: float | None, ev: EvaluatePolicy, expected: str | None) -> None:
    assert winner(best, average, ev) == expected


# --- the evaluator's verdict ---------------------------------------------------------------------------------------
def test_parse_verdict_reads_the_metric_from_the_last_non_empty_line() -> None:
    value, reason, obj = parse_verdict('loading…\n{"loss": 9}\nstep 3\n{"loss": 0.25, "n": 256}\n\n  \n', "loss")
    assert value == 0.25 and isinstance(value, float) and reason is None and obj == {"loss": 0.25, "n": 256}
    assert parse_verdict('{"acc": 1}', "acc")[0] == 1.0


@pytest.mark.parametrize(("stdout", "why"), [
    ("", "it printed nothing on stdout"),
    ("\n \n", "it printed nothing on stdout"),
    ('{"loss": 0.1}\nall done', "its last stdout line is not JSON: 'all done'"),
    ("[0.1]", "its last stdout line is JSON but not an object"),
    ('{"acc": 0.9, "n": 3}', "its JSON has no 'loss' (keys: acc, n)"),
    ('{"loss": NaN}', "'loss' is not a finite number: nan"),
    ('{"loss": -Infinity}', "'loss' is not a finite number: -inf"),
    ('{"loss": "0.1"}', "'loss' is not a finite number: '0.1'"),
    ('{"loss": true}', "'loss' is not a finite number: True"),
    ('{"loss": null}', "'loss' is not a finite number: None"),
    ('{"loss": 1' + "0" * 400 + "}", "'loss' is not a finite number: 1000"),  # an int too large for a float
])
def test_parse_verdict_refuses_unusable_answers(stdout: str, why: str) -> None:
    value, reason, _ = parse_verdict(stdout, "loss")
    assert value is None and reason is not None and reason.startswith(why), reason


# --- the evaluator policy and the config ---------------------------------------------------------------------------
def test_signature_names_what_makes_values_comparable() -> None:
    base = EvaluatePolicy(command=("python", "eval.py"), metric="loss", mode="min", env={"A": "1"})
    same = [EvaluatePolicy(command=("python", "eval.py"), metric="loss", mode="min", env={"A": "1"}, timeout=5,
                           max_per_hour=1)]
    different = [EvaluatePolicy(command=("python", "eval2.py"), metric="loss", mode="min", env={"A": "1"}),
                 EvaluatePolicy(command=("python", "eval.py"), metric="acc", mode="min", env={"A": "1"}),
                 EvaluatePolicy(command=("python", "eval.py"), metric="loss", mode="max", env={"A": "1"}),
                 EvaluatePolicy(command=("python", "eval.py"), metric="loss", mode="min", env={"A": "2"})]
    assert all(p.signature() == base.signature() for p in same)
    assert len({p.signature() for p in [base, *different]}) == 5


def tree(policy: dict[str, Any]) -> dict[str, Any]:
    return {"state_dir": "/tmp/ckptd-test-state",
            "watches": [{"name": "w", "root": "/tmp", "output": "/srv/ckptd/{watch}/{run}"}],
            "policies": {"default": policy}}


def problems(policy: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(tree(policy))
    return err.value.problems


EVALUATE = {"command": ["python", "eval.py"], "metric": "loss", "mode": "min"}


def test_config_reads_the_evaluate_section_and_the_strategy() -> None:
    policy = parse_config(tree({
        "evaluate": {**EVALUATE, "timeout": "90s", "env": {"SPLIT": "val", "N": 3}, "max_per_hour": 4},
        "average": {"strategy": "greedy", "gate": True, "margin": 0.01},
        "export": {"coreml": {"enabled": False, "source": "winner"}},
    })).policies["default"]
    ev = policy.evaluate
    assert ev.enabled and ev.command == ("python", "eval.py") and ev.timeout == 90.0 and ev.max_per_hour == 4
    assert dict(ev.env) == {"SPLIT": "val", "N": "3"} and (ev.metric, ev.mode) == ("loss", "min")
    assert (policy.average.strategy, policy.average.gate, policy.average.margin) == ("greedy", True, 0.01)
    assert policy.average.evaluated and policy.coreml.source == "winner"
    default = parse_config(tree({})).policies["default"]
    assert not default.evaluate.enabled and not default.average.evaluated and default.average.strategy == "uniform"


def test_config_needs_an_evaluator_for_greedy_gate_and_winner() -> None:
    assert problems({"average": {"strategy": "greedy", "gate": True},
                     "export": {"coreml": {"enabled": False, "source": "winner"}}}) == [
        "policies.default.average.strategy: greedy needs an evaluator: add policies.<p>.evaluate",
        "policies.default.average.gate: a gate needs an evaluator: add policies.<p>.evaluate",
        "policies.default.export.coreml.source: winner needs an evaluator: add policies.<p>.evaluate",
    ]


@pytest.mark.parametrize(("policy", "where"), [
    ({"evaluate": {"metric": "loss", "mode": "min"}}, "policies.default.evaluate.command"),
    ({"evaluate": {**EVALUATE, "command": "python eval.py"}}, "policies.default.evaluate.command"),
    ({"evaluate": {**EVALUATE, "command": []}}, "policies.default.evaluate.command"),
    ({"evaluate": {**EVALUATE, "command": ["python", ""]}}, "policies.default.evaluate.command"),
    ({"evaluate": {"command": ["e"], "mode": "min"}}, "policies.default.evaluate.metric"),
    ({"evaluate": {"command": ["e"], "metric": "loss"}}, "policies.default.evaluate.mode"),
    ({"evaluate": {**EVALUATE, "mode": "lower"}}, "policies.default.evaluate.mode"),
    ({"evaluate": {**EVALUATE, "timeout": "soon"}}, "policies.default.evaluate.timeout"),
    ({"evaluate": {**EVALUATE, "timeout": "0s"}}, "policies.default.evaluate.timeout"),
    ({"evaluate": {**EVALUATE, "timeout": 0}}, "policies.default.evaluate.timeout"),
    ({"evaluate": {**EVALUATE, "max_per_hour": 0}}, "policies.default.evaluate.max_per_hour"),
    ({"evaluate": {**EVALUATE, "env": {"A=B": "1"}}}, "policies.default.evaluate.env"),
    ({"evaluate": {**EVALUATE, "env": {"A": [1]}}}, "policies.default.evaluate.env"),
    ({"evaluate": {**EVALUATE, "shell": True}}, "policies.default.evaluate.shell"),
    ({"evaluate": EVALUATE, "average": {"strategy": "best-of"}}, "policies.default.average.strategy"),
    ({"evaluate": EVALUATE, "average": {"gate": "yes"}}, "policies.default.average.gate"),
    ({"evaluate": EVALUATE, "average": {"margin": math.inf}}, "policies.default.average.margin"),
    ({"evaluate": EVALUATE, "average": {"margin": math.nan}}, "policies.default.average.margin"),
    ({"evaluate": EVALUATE, "average": {"margin": True}}, "policies.default.average.margin"),
    ({"evaluate": EVALUATE, "export": {"coreml": {"enabled": False, "source": "better"}}},
     "policies.default.export.coreml.source"),
])
def test_config_refuses_a_bad_evaluate_or_average_with_its_key_path(policy: dict[str, Any], where: str) -> None:
    found = problems(policy)
    assert len(found) == 1 and found[0].startswith(f"{where}: "), found


def test_config_refuses_an_evaluate_that_is_not_a_mapping() -> None:
    found = problems({"evaluate": ["python", "eval.py"]})
    assert found == ["policies.default.evaluate: expected a mapping with command, metric and mode, got list"], found


# --- the test checkpoints' premise (tests/soup_models.py) ------------------------------------------------------------
def test_soup_models_have_one_good_basin_and_a_ruinous_permutation() -> None:
    base = sm.trained()
    good = sm.good_members(base)
    losses = [sm.loss_of(s) for s in good]
    assert losses == sorted(losses)  # GOOD_SEEDS are in metric order
    prefix = [sm.loss_of({k: sum(s[k] for s in good[:n]) / n for k in base}) for n in range(1, len(good) + 1)]
    assert all(later < earlier for earlier, later in itertools.pairwise(prefix)), prefix
    other = sm.permuted(good[0])
    assert sm.loss_of(other) == pytest.approx(losses[0], rel=1e-5)  # the same function from another basin
    mixed = {k: (good[0][k] + other[k]) / 2 for k in base}
    assert sm.loss_of(mixed) > 10 * losses[0]
    x, _ = sm.data()
    assert torch.equal(x, torch.from_numpy(sm.eval_program.data()[0]))  # trained on the evaluator's data
