"""Pure ranking and the metric/step sources, on real files where sources read files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckptd.errors import MetricError
from ckptd.metric_sources import first_value, parse_source, read_source
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
