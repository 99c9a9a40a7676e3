"""Training state: build/save/resume through wrappers, atomic saves under kill -9, auto-resume, seed layout."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptd.atomic import cleanup_stale_temps
from ckptd.errors import CheckpointError, WeightsMismatchError
from ckptd.training_state import (
    SeedLayoutSaver,
    auto_resume,
    build_training_state,
    find_latest_training_state,
    load_training_state,
    save_training_state,
)
from ckptd.weights import open_checkpoint
from tests.conftest import PYTHON, assert_same_state, subprocess_env, train_a_bit


def _setup(tiny, seed: int = 0):
    model = tiny(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, ema, scaler


def test_resume_continues_exactly(tmp_path: Path, tiny) -> None:
    model, opt, ema, scaler = _setup(tiny)
    train_a_bit(model, opt)
    ema.update_parameters(model)
    state = build_training_state(model, opt, scaler=scaler, ema=ema, epoch=3, iteration=42, best_metric=0.8,
                                 metric=0.75, extra={"run": "exp7"})
    save_training_state(state, tmp_path / "training_checkpoint_last.pt")
    torch.manual_seed(123)
    train_a_bit(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, ema2, scaler2 = _setup(tiny, seed=9)  # different initial weights
    info = load_training_state(tmp_path / "training_checkpoint_last.pt", model2, opt2, scaler=scaler2, ema=ema2)
    assert (info.epoch, info.iteration, info.best_metric, info.metric) == (3, 42, 0.8, 0.75)
    assert info.extra == {"run": "exp7"}
    assert scaler2.get_scale() == 1024.0
    assert int(ema2.n_averaged) == int(ema.n_averaged)
    assert_same_state(ema2.module.state_dict(), ema.module.state_dict())
    torch.manual_seed(123)
    train_a_bit(model2, opt2)
    assert_same_state(model2.state_dict(), expected)


def test_wrappers_are_seen_through(tmp_path: Path, tiny) -> None:
    model = tiny(seed=1)
    wrapped = torch.compile(nn.DataParallel(model))  # compile is lazy: nothing is compiled here
    state = build_training_state(wrapped, None, epoch=1)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model_state_dict"])
    save_training_state(state, tmp_path / "t.pt")
    target = nn.DataParallel(tiny(seed=2))
    load_training_state(tmp_path / "t.pt", target)
    assert_same_state(target.module.state_dict(), model.state_dict())


def test_map_location_and_strict_mismatch_report(tmp_path: Path, tiny) -> None:
    save_training_state(build_training_state(tiny(width=8)), tmp_path / "t.pt")
    expected = r"shape mismatch.*conv\.weight model \[4, 3, 3, 3\] vs checkpoint \[8, 3, 3, 3\]"
    with pytest.raises(WeightsMismatchError, match=expected):
        load_training_state(tmp_path / "t.pt", tiny(width=4))
    info = load_training_state(tmp_path / "t.pt", tiny(width=8), map_location=torch.device("cpu"))
    assert info.epoch == 0


def test_auto_resume_skips_corrupt_newest(tmp_path: Path, tiny, caplog) -> None:
    model = tiny(seed=1)
    for it in (10, 20):
        save_training_state(build_training_state(model, iteration=it), tmp_path / f"training_checkpoint_0_{it}.pt")
    good = tmp_path / "training_checkpoint_0_30.pt"
    save_training_state(build_training_state(model, iteration=30), good)
    bad = tmp_path / "training_checkpoint_0_40.pt"
    bad.write_bytes(good.read_bytes()[:500])  # truncated newest
    assert find_latest_training_state(tmp_path) == good
    assert "training_checkpoint_0_40.pt" in caplog.text
    fresh = tiny(seed=5)
    info = auto_resume(tmp_path, fresh)
    assert info is not None and info.iteration == 30
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert auto_resume(tmp_path / "nothing-here", fresh) is None


def test_model_only_file_is_not_a_training_state(tmp_path: Path, tiny) -> None:
    torch.save(tiny().state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="not a training state"):
        load_training_state(tmp_path / "m.pt", tiny())


_WRITER = r"""
import sys, torch
from ckptd.training_state import save_training_state
state = {"model_state_dict": {"w": torch.randn(4096, 4096)}, "iterations": 0}  # 64 MiB
i = 0
while True:
    i += 1
    state["iterations"] = i
    save_training_state(state, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.slow
def test_reader_never_sees_partial_file_when_writer_is_killed(tmp_path: Path) -> None:
    target = tmp_path / "training_checkpoint_last.pt"
    proc = subprocess.Popen([PYTHON, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # first save complete
        loads = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            state = torch.load(target, weights_only=True, mmap=True)
            assert state["model_state_dict"]["w"].shape == (4096, 4096)
            loads += 1
        # kill -9 while it is (very likely) mid-write: it writes continuously
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert loads > 0
    state = torch.load(target, weights_only=True)  # the final name still holds a complete checkpoint
    assert state["iterations"] >= 1
    leftovers = list(tmp_path.glob(".ckptd-tmp-*"))
    assert len(leftovers) <= 1  # the killed write's temp, under a name every scanner ignores
    assert cleanup_stale_temps(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["training_checkpoint_last.pt"]


def test_seed_layout_saver(tmp_path: Path, tiny) -> None:
    model = tiny(seed=1)
    ema = torch.optim.swa_utils.AveragedModel(model)
    saver = SeedLayoutSaver(tmp_path, mode="max", top_k=2)
    best = None
    scores = [0.5, 0.7, 0.7000001, 0.6, 0.9]
    for it, score in enumerate(scores, start=1):
        written = saver.save(model, epoch=it, iteration=it * 10, metric=score, best_metric=best, ema=ema)
        best = score if best is None or score > best else best
        assert written["training_last"].exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    # 0.7 and 0.7000001 agree to 4 decimals: both kept as distinct files, no overwrite; 0.6 was no new best, so
    # (as in ml-cvnets) no score file; without an EMA metric only the EMA's last copy is written
    assert names == sorted([
        "training_checkpoint_last.pt", "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_ema_last.pt",
        "checkpoint_score_0.9000.pt", "checkpoint_score_0.7000_it30.pt", "checkpoint_avg.pt",
    ])
    last = open_checkpoint(tmp_path / "training_checkpoint_last.pt")
    assert last.obj["metric"] == 0.9 and last.obj["best_metric"] == 0.9 and last.obj["iterations"] == 50
    assert_same_state(open_checkpoint(tmp_path / "checkpoint_best.pt").weights, model.state_dict())
    assert_same_state(open_checkpoint(tmp_path / "checkpoint_ema_last.pt").weights, ema.module.state_dict())


def test_seed_layout_saver_mirrors_cvnets_topk_with_its_own_ema_metric(tmp_path: Path, tiny) -> None:
    """ml-cvnets semantics: a score file per new best (ties count), the k best kept, the average over them; the
    EMA files are named by the EMA model's own metric. Followed like the daemon does, with the cvnets preset."""
    from ckptd.trainers import PlanSettings, build_plan
    from tests.producers import Follower

    model, ema_model = tiny(seed=1), tiny(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = SeedLayoutSaver(tmp_path, mode="min", top_k=3)
    follower = Follower(tmp_path, build_plan("cvnets", "t", PlanSettings(exclude=(".*",))), "min", 3)
    best = ema_best = None
    losses = [-0.1, -0.3, -0.2, -0.45, -0.45, -0.5, -0.4, -0.62]
    ema_losses = [-0.05, -0.2, -0.25, -0.3, -0.28, -0.5, -0.55, -0.6]
    for it, (m, em) in enumerate(zip(losses, ema_losses), start=1):
        train_a_bit(model, opt)
        with torch.no_grad():
            for pe, p in zip(ema_model.parameters(), model.parameters()):
                pe.mul_(0.5).add_(p, alpha=0.5)
        saver.save(model, opt, epoch=it, iteration=it, metric=m, best_metric=best, ema=ema_model, ema_metric=em,
                   ema_best_metric=ema_best)
        best = m if best is None else min(best, m)
        ema_best = em if ema_best is None else min(ema_best, em)
        follower.poll()
    kept = sorted(p.name for p in tmp_path.glob("checkpoint_score_*.pt"))
    assert kept == ["checkpoint_score_-0.4500_it5.pt", "checkpoint_score_-0.5000.pt", "checkpoint_score_-0.6200.pt"]
    kept_ema = sorted(p.name for p in tmp_path.glob("checkpoint_ema_score_*.pt"))
    assert kept_ema == ["checkpoint_ema_score_-0.5000.pt", "checkpoint_ema_score_-0.5500.pt",
                        "checkpoint_ema_score_-0.6000.pt"]
    assert sorted(follower.member_names("model")) == kept and sorted(follower.member_names("ema")) == kept_ema
    for stream, avg_name in (("model", "checkpoint_avg.pt"), ("ema", "checkpoint_ema_avg.pt")):
        avg = open_checkpoint(tmp_path / avg_name).weights
        expected = follower.average(stream)
        assert sorted(avg) == sorted(expected)
        for k, t in avg.items():
            assert torch.allclose(t, expected[k], atol=1e-6) if t.is_floating_point() else torch.equal(t, expected[k])
    assert not list(tmp_path.glob(".ckptd-tmp-*"))
