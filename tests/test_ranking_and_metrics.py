"""Pure ranking and the metric/step sources, on real files where sources read files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckptd.errors import MetricError
from ckptd.metric_sources import find_value, first_value, parse_source, read_source
from ckptd.ranking import Candidate, is_better, newest, rank, top_k


def test_rank_orders_by_metric_then_newer_step() -> None:
    cands = [Candidate("a", 0.5, 10), Candidate("b", 0.9, 20), Candidate("c", 0.9, 30), Candidate("d", None, 40)]
    assert [c.path for c in rank(cands, "max")] == ["c", "b", "a"]
    assert [c.path for c in rank(cands, "min")] == ["a", "c", "b"]
    assert [c.path for c in top_k(cands, 2, "max")] == ["c", "b"]
    assert newest(cands).path == "d"  # unranked can still be "last"
    assert is_better(1, 2, "min") and not is_better(1, 1, "max")
    with pytest.raises(ValueError):
        rank(cands, "biggest")


def test_sources_parse_from_cli_and_yaml_forms() -> None:
    assert parse_source("checkpoint:metrics.top1").spec == "metrics.top1"
    side = parse_source("sidecar:{stem}.json#val.acc")
    assert (side.spec, side.key) == ("{stem}.json", "val.acc")
    assert parse_source({"sidecar": "{stem}.json", "key": "acc"}).key == "acc"
    with pytest.raises(MetricError, match="invalid"):
        parse_source("filename:score_(")
    with pytest.raises(MetricError):
        parse_source({"checkpoint": "a", "filename": "b"})


def test_each_source_kind_reads_the_right_number(tmp_path: Path) -> None:
    ckpt = tmp_path / "epoch=3-step=300-val_acc=0.8125.ckpt"
    obj = {"metrics": {"top1": torch.tensor(0.61)}, "best_metric": 0.99, "iterations": 300,
           "callbacks": {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max', 'every_n_epochs': 1.0}":
                         {"current_score": torch.tensor(0.8125), "best_model_score": torch.tensor(0.9)}}}
    (tmp_path / f"{ckpt.stem}.json").write_text(json.dumps({"metric": 0.42, "eval": {"loss": 1.5}}))
    assert read_source(parse_source("checkpoint:metrics.top1"), ckpt, obj) == pytest.approx(0.61)
    assert read_source(parse_source("checkpoint:callbacks.ModelCheckpoint*.current_score"), ckpt, obj) == 0.8125
    assert read_source(parse_source(r"filename:val_acc=(?P<metric>[0-9.]+)\.ckpt"), ckpt) == 0.8125
    assert read_source(parse_source(r"filename:step=(?P<step>\d+)"), ckpt, group="step") == 300
    assert read_source(parse_source("sidecar:{stem}.json"), ckpt) == 0.42
    assert read_source(parse_source("sidecar:{stem}.json#eval.loss"), ckpt) == 1.5
    value, which = first_value([parse_source("checkpoint:nope"), parse_source("sidecar:{stem}.json")], ckpt, obj)
    assert (value, which) == (0.42, "sidecar:{stem}.json")
    value, why = first_value([parse_source("checkpoint:nope")], ckpt, obj)
    assert value is None and "no key 'nope'" in why


def test_hf_trainer_state_uses_this_steps_eval_not_best(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-200"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({
        "global_step": 200, "best_metric": 0.1,
        "log_history": [{"step": 100, "eval_loss": 0.1}, {"step": 200, "loss": 0.3}, {"step": 200, "eval_loss": 0.25}],
    }))
    src = parse_source("trainer_state:eval_loss")
    assert read_source(src, folder) == 0.25
    assert read_source(src, folder, group="step") == 200


def test_non_numbers_are_refused_with_reason(tmp_path: Path) -> None:
    obj = {"m": "high", "n": float("nan"), "t": torch.ones(3)}
    for key, reason in (("m", "not a number"), ("n", "nan"), ("t", "3 elements")):
        with pytest.raises(MetricError, match=reason):
            read_source(parse_source(f"checkpoint:{key}"), tmp_path / "x.pt", obj)


def _mc(monitor: str, score: float | None, files: list[str], with_field: bool = True) -> tuple[str, dict]:
    key = f"ModelCheckpoint{{'monitor': '{monitor}', 'mode': 'min', 'every_n_train_steps': 0}}"
    state = {"best_model_score": torch.tensor(0.01), "current_score": None if score is None else torch.tensor(score),
             "best_k_models": {f"/remote/ckpts/{f}": torch.tensor(0.5) for f in files}}
    if with_field:
        state["monitor"] = monitor
    return key, state


def test_lightning_source_reads_the_monitoring_callback_that_saved_the_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "epoch=3-val_loss=0.25.ckpt"
    obj = {"callbacks": dict([_mc("val_loss", 0.25, [ckpt.name]), _mc("val_acc", 0.8, ["acc.ckpt"])])}
    found = find_value([parse_source("lightning:val_loss")], ckpt, obj)
    assert found.value == 0.25 and "current_score" in found.where and "'val_loss'" in found.where
    assert read_source(parse_source("lightning:val_acc"), tmp_path / "acc.ckpt", obj) == pytest.approx(0.8)
    # older Lightning: no 'monitor' field, the state key says it
    old = {"callbacks": dict([_mc("val_loss", 0.25, [ckpt.name], with_field=False)])}
    assert read_source(parse_source("lightning:val_loss"), ckpt, old) == 0.25
    # a file saved by another callback carries a stale copy of this callback's score: refused
    with pytest.raises(MetricError, match="saved by another callback"):
        read_source(parse_source("lightning:val_loss"), tmp_path / "acc.ckpt", obj)
    # two callbacks monitor the same name: the one listing this file wins
    two = {"callbacks": dict([_mc("val_loss", 0.3, ["other.ckpt"]),
                              ("ModelCheckpoint{'monitor': 'val_loss', 'every_n_train_steps': 50}",
                               _mc("val_loss", 0.25, [ckpt.name])[1])])}
    assert read_source(parse_source("lightning:val_loss"), ckpt, two) == 0.25
    with pytest.raises(MetricError, match=r"monitored: val_loss, val_acc"):
        read_source(parse_source("lightning:train_loss"), ckpt, obj)
    none = {"callbacks": dict([_mc("val_loss", None, [ckpt.name])])}
    with pytest.raises(MetricError, match="is None"):
        read_source(parse_source("lightning:val_loss"), ckpt, none)
    # best_model_score (the best so far) is never what it returns
    assert find_value([parse_source("lightning:val_loss")], ckpt, obj).value != 0.01


def test_find_value_says_where(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint_score_-0.1250_it40.pt"
    from ckptd.trainers import PlanSettings, build_plan

    stream = build_plan("cvnets", "t", PlanSettings()).stream("model")
    metric = find_value(stream.metric_sources, ckpt)
    step = find_value(stream.step_sources, ckpt, group="step")
    assert (metric.value, step.value) == (-0.125, 40)
    assert metric.where == f"file name {ckpt.name!r}" and metric.source.startswith("filename:")
    missing = find_value(stream.step_sources, tmp_path / "checkpoint_score_0.5000.pt", group="step")
    assert missing.value is None and "does not match" in missing.where
