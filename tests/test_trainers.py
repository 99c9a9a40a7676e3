"""Trainer presets as data: classification of every trainer's names, auto-detection, precedence of explicit
settings, weight picking per stream, and the config keys (trainer, metric.name, streams) with their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptd.daemon.config import parse_config, plan_settings, run_plan
from ckptd.errors import ConfigError
from ckptd.trainers import PlanSettings, build_plan, detect, ema_weights_key, pick_weights
from ckptd.trainers.detect import list_names

CLASSIFY = {
    "cvnets": [
        ("checkpoint_score_0.7812.pt", "candidate", ("model",)),
        ("checkpoint_score_-0.1234_it40.pt", "candidate", ("model",)),
        ("checkpoint_ema_score_0.7900.pt", "candidate", ("ema",)),
        ("checkpoint_best.pt", "ignored", ()), ("checkpoint_last.pt", "ignored", ()),
        ("checkpoint_avg.pt", "ignored", ()), ("checkpoint_ema_best.pt", "ignored", ()),
        ("checkpoint_ema_last.pt", "ignored", ()), ("checkpoint_ema_avg.pt", "ignored", ()),
        ("checkpoint_epoch3.pt", "ignored", ()),
        ("training_checkpoint_last.pt", "resume", ()), ("training_checkpoint_3_400.pt", "resume", ()),
        (".ckptd-tmp-checkpoint_score_0.5.pt.1.ab", "ignored", ()), ("notes.txt", "ignored", ()),
    ],
    "timm": [
        ("checkpoint-7.pth.tar", "candidate", ("model", "ema")), ("model_best.pth.tar", "ignored", ()),
        ("last.pth.tar", "ignored", ()), ("tmp.pth.tar", "ignored", ()), ("recovery-3-100.pth.tar", "resume", ()),
        ("summary.csv", "ignored", ()),
    ],
    "hf": [
        ("checkpoint-200", "candidate", ("model",)), ("tmp-checkpoint-300", "ignored", ()),
        ("checkpoint-200/model.safetensors", "ignored", ()), ("model.safetensors", "ignored", ()),
    ],
    "lightning": [
        ("lightning_logs/version_0/checkpoints/epoch=3-step=400.ckpt", "candidate", ("model", "ema")),
        ("last.ckpt", "resume", ()), ("last-v1.ckpt", "resume", ()),
    ],
    "fairseq": [
        ("checkpoint3.pt", "candidate", ("model", "ema")), ("checkpoint_2_5000.pt", "candidate", ("model", "ema")),
        ("checkpoint_best.pt", "ignored", ()), ("checkpoint.best_loss_2.31.pt", "ignored", ()),
    ],
    "deepspeed": [
        ("global_step100/mp_rank_00_model_states.pt", "candidate", ("model",)),
        ("global_step100/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ignored", ()),
    ],
    "plain": [("a.pt", "candidate", ("model",)), ("x.safetensors", "candidate", ("model",)),
              ("x.pt.tmp", "ignored", ()), ("notes.txt", "ignored", ())],
}


@pytest.mark.parametrize("trainer", sorted(CLASSIFY))
def test_every_preset_classifies_its_files(trainer: str) -> None:
    settings = PlanSettings(trainer=trainer, metric_name="val_loss",
                            exclude=("*.tmp", ".*", "tmp-*"))
    plan = build_plan(trainer, "test", settings)
    for rel, kind, streams in CLASSIFY[trainer]:
        verdict = plan.classify(rel, is_dir="." not in rel.rsplit("/", 1)[-1])
        assert (verdict.kind, verdict.streams) == (kind, streams), (rel, verdict)
        assert verdict.reason


def test_reasons_say_why() -> None:
    plan = build_plan("cvnets", "t", PlanSettings())
    assert "best so far" in plan.classify("training_checkpoint_last.pt").reason
    assert "rewritten in place" in plan.classify("checkpoint_last.pt").reason
    assert "does not match include" in plan.classify("notes.txt").reason
    off = build_plan("cvnets", "t", PlanSettings(streams_off=("ema",)))
    assert [s.name for s in off.streams] == ["model"]
    assert off.classify("checkpoint_ema_score_0.5000.pt").reason == "feeds only switched-off stream(s): ema"


@pytest.mark.parametrize(("names", "trainer"), [
    (["checkpoint_score_0.5000.pt", "checkpoint_best.pt"], "cvnets"),
    (["training_checkpoint_last.pt", "checkpoint_last.pt"], "cvnets"),
    (["training_checkpoint_0.pt", "training_checkpoint_1.pt"], "plain"),  # the demo: plain, not cvnets
    (["checkpoint-10", "checkpoint-10/trainer_state.json", "runs"], "hf"),
    (["checkpoint-3.pth.tar", "last.pth.tar"], "timm"),
    (["lightning_logs/version_0/checkpoints/epoch=0-step=10.ckpt"], "lightning"),
    (["last.ckpt"], "plain"),  # a last.ckpt alone proves nothing
    (["step_100", "step_100/.metadata"], "dcp"),
    (["global_step5", "global_step5/mp_rank_00_model_states.pt"], "deepspeed"),
    (["checkpoint1.pt", "checkpoint_best.pt"], "fairseq"),
])
def test_auto_detection(names: list[str], trainer: str) -> None:
    got, why = detect(names)
    assert got == trainer and f"→ {trainer}" in why


def test_detection_walks_the_run(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert "checkpoint-4/trainer_state.json" in list_names(tmp_path, 0)
    assert detect(list_names(tmp_path, 0))[0] == "hf"


def test_explicit_settings_win_over_the_preset() -> None:
    from ckptd.metric_sources import parse_source

    base = build_plan("cvnets", "t", PlanSettings())
    assert base.include == ("*.pt",) and base.streams[0].metric_sources[0].kind == "filename"
    mine = (parse_source("checkpoint:my.metric"),)
    plan = build_plan("cvnets", "t", PlanSettings(include=("*.pt", "*.pth"), metric_sources=mine,
                                                 step_sources=mine, weights_key="model_state_dict"))
    assert plan.include == ("*.pt", "*.pth")
    assert all(s.metric_sources == mine and s.step_sources == mine for s in plan.streams)
    assert plan.stream("model").weights_key == "model_state_dict" and plan.stream("ema").weights_key == "auto"
    assert plan.metric_where == "explicit metric.sources"
    # HF: metric_for_best_model spelling without eval_ resolves like HF does; eval_ names stay
    assert build_plan("hf", "t", PlanSettings(metric_name="loss")).streams[0].metric_sources[0].spec == "eval_loss"
    assert build_plan("hf", "t", PlanSettings(metric_name="eval_bleu")).streams[0].metric_sources[0].spec \
        == "eval_bleu"
    nameless = build_plan("hf", "t", PlanSettings(where="policies.p"))
    assert nameless.streams[0].metric_sources == () and "policies.p.metric.name" in nameless.problems[0]


def test_pick_weights_never_feeds_ema_with_model_weights() -> None:
    sd = {"w": torch.ones(2)}
    timm = build_plan("timm", "t", PlanSettings())
    with_ema = {"state_dict": sd, "state_dict_ema": {"w": torch.zeros(2)}, "metric": 0.5, "epoch": 3}
    assert pick_weights(timm.stream("ema"), with_ema).key == "state_dict_ema"
    assert pick_weights(timm.stream("ema"), {"state_dict": sd, "metric": 0.5}) is None
    assert pick_weights(timm.stream("model"), with_ema).key == "state_dict"
    lit = build_plan("lightning", "t", PlanSettings(metric_name="val_loss"))
    averaging = {"pytorch-lightning_version": "2.6", "state_dict": sd, "current_model_state": sd,
                 "averaging_state": {"n_averaged": torch.tensor(3)}}
    assert pick_weights(lit.stream("model"), averaging).key == "current_model_state"
    assert pick_weights(lit.stream("ema"), averaging).key == "state_dict"
    plain_lit = {"pytorch-lightning_version": "2.6", "state_dict": sd}
    assert pick_weights(lit.stream("model"), plain_lit).key == "state_dict"
    assert pick_weights(lit.stream("ema"), plain_lit) is None
    callback_ema = {**plain_lit, "callbacks": {"EMACallback": {"ema_state_dict": {"w": torch.zeros(2)}}}}
    assert pick_weights(lit.stream("ema"), callback_ema).key == "callbacks.EMACallback.ema_state_dict"
    assert ema_weights_key({"model_state_dict": sd, "ema_state_dict": sd}) == "ema_state_dict"
    assert ema_weights_key({"model_state_dict": sd}) is None


def _cfg(tmp_path: Path, watch: dict, policy: dict) -> dict:
    return {"state_dir": str(tmp_path / "s"),
            "watches": [{"name": "w", "root": str(tmp_path), "output": "/srv/o/{run}", **watch}],
            "policies": {"p": policy}}


def test_config_keys_and_errors_with_key_paths(tmp_path: Path) -> None:
    cfg = parse_config(_cfg(tmp_path, {"trainer": "hf", "policy": "p", "include": ["checkpoint-*"]},
                            {"metric": {"name": "accuracy", "mode": "max"}, "streams": {"ema": False},
                             "step": {"sources": [{"trainer_state": "global_step"}]}}))
    watch, policy = cfg.watches[0], cfg.policies["p"]
    assert watch.trainer == "hf" and watch.explicit == {"include"}
    assert policy.metric.name == "accuracy" and policy.streams_off == ("ema",)
    s = plan_settings(watch, policy)
    assert s.include == ("checkpoint-*",) and s.metric_sources is None and s.step_sources is not None
    assert s.where == "policies.p"
    # defaults: auto, nothing explicit
    d = parse_config(_cfg(tmp_path, {}, {}))
    assert d.watches[0].trainer == "auto" and plan_settings(d.watches[0], d.policies["default"]).include is None
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(tmp_path, {"trainer": "keras", "policy": "p"},
                          {"metric": {"nam": "x"}, "streams": {"emma": False, "model": "no"}}))
    text = str(err.value)
    assert "watches[0].trainer: expected auto | cvnets" in text
    assert "policies.p.metric.nam: unknown key" in text
    assert "policies.p.streams.emma: unknown key (known: model, ema)" in text
    assert "policies.p.streams.model: expected true or false" in text
    for trainer in ("hf", "lightning"):
        with pytest.raises(ConfigError, match=rf"policies\.p\.metric\.name: is required by watches\[0\] "
                                              rf"\(trainer: {trainer}\)"):
            parse_config(_cfg(tmp_path, {"trainer": trainer, "policy": "p"}, {"metric": {"mode": "min"}}))
    # explicit sources instead of a name are fine; cvnets and timm need no name
    parse_config(_cfg(tmp_path, {"trainer": "hf", "policy": "p"}, {"metric": {"sources": ["trainer_state:x"]}}))
    for trainer in ("cvnets", "timm"):
        parse_config(_cfg(tmp_path, {"trainer": trainer, "policy": "p"}, {"metric": {"mode": "max"}}))
    with pytest.raises(ConfigError, match=r"policies\.p\.streams: switches every stream off"):
        parse_config(_cfg(tmp_path, {"policy": "p"}, {"streams": {"model": False, "ema": False}}))


def test_run_plan_for_a_watch(tmp_path: Path) -> None:
    run = tmp_path / "exp"
    run.mkdir()
    (run / "checkpoint_score_0.5000.pt").write_bytes(b"")
    cfg = parse_config(_cfg(tmp_path, {"policy": "p"}, {"streams": {"ema": False}}))
    plan = run_plan(cfg.watches[0], cfg.policies["p"], run)
    assert plan.trainer == "cvnets" and [s.name for s in plan.streams] == ["model"]
    assert plan.disabled == (("ema", "switched off by policies.p.streams.ema: false"),)
