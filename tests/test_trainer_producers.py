"""Real producers: each trainer writes its own files the way it does in a real run, and what the trainer plan and
``ckptd check --explain`` resolve (streams, each file's metric and step and where they came from, the top-k per
stream) is compared, by value, with that trainer's own bookkeeping.

Producers: a writer of ml-cvnets' exact layout and sequence of saves (ml-cvnets itself needs its whole package);
timm's own ``CheckpointSaver`` source (timm does not import with the CPU torch here: its ``__init__`` needs
torchvision, so the saver's module is loaded from the installed timm by path, with timm's two-line
``unwrap_model``/``get_state_dict`` supplied); a real Hugging Face ``Trainer`` run of a tiny BERT built from a
config; a real Lightning run with two ModelCheckpoint callbacks and EMA weight averaging.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from ckptd.daemon.config import parse_config, run_plan
from ckptd.daemon.explain import explain_run
from ckptd.examples import TinyConvNet
from tests.conftest import PYTHON, subprocess_env
from tests.producers import Follower, cvnets_save_checkpoint


def _config(tmp_path: Path, train: Path, policy: dict, watch: dict | None = None):
    data = {"state_dir": str(tmp_path / "state"),
            "watches": [{"name": "w", "root": str(train), "runs": "*", "output": str(tmp_path / "out/{watch}/{run}"),
                         **(watch or {})}],
            "policies": {"default": policy}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, parse_config(data, str(path))


def _daemon_once(config_path: Path) -> None:
    """The real daemon (``ckptd once``, a subprocess) over the producer's directory."""
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "once", "-c", str(config_path)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"level": "error"' not in res.stderr, res.stderr[-3000:]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _member_names(out: Path) -> list[str]:
    return [Path(m["source"]).name for m in _manifest(out)["average"]["members"]]


def _step(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.train()
    loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(0.9).add_(p, alpha=0.1)
        for be, b in zip(ema.buffers(), model.buffers()):
            be.copy_(b)


CVNETS_RUNS = {
    # mode: (model metrics, EMA metrics) per epoch; 0.61 twice: ml-cvnets' >= rewrites that score file in place
    "max": ([0.40, 0.55, 0.50, 0.61, 0.61, 0.58, 0.70, 0.74, 0.72, 0.80],
            [0.38, 0.52, 0.57, 0.60, 0.63, 0.66, 0.69, 0.71, 0.73, 0.75]),
    "min": ([-0.10, -0.25, -0.20, -0.31, -0.45, -0.40, -0.52, -0.60],
            [-0.05, -0.15, -0.22, -0.30, -0.35, -0.41, -0.48, -0.55]),
}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_cvnets_streams_follow_cvnets_topk(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "train" / "exp1"
    run.mkdir(parents=True)
    k = 3
    config_path, config = _config(tmp_path, tmp_path / "train", {"metric": {"mode": mode},
                                                                  "average": {"top_k": k}})
    watch, policy = config.watches[0], config.policies["default"]
    torch.manual_seed(0)
    model, maximize = TinyConvNet(), mode == "max"
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    best = ema_best = 0.0 if maximize else float("inf")  # ml-cvnets' initial best; the EMA's starts from it too
    follower = None
    for epoch, (m, em) in enumerate(zip(*CVNETS_RUNS[mode])):
        _step(model, ema, opt)
        is_best = m >= best if maximize else m <= best
        best = max(m, best) if maximize else min(m, best)
        is_ema_best = em >= ema_best if maximize else em <= ema_best
        ema_best = max(em, ema_best) if maximize else min(em, ema_best)
        cvnets_save_checkpoint(run, iterations=(epoch + 1) * 10, epoch=epoch, model=model, optimizer=opt,
                               best_metric=best, is_best=is_best, ema=ema, is_ema_best=is_ema_best,
                               ema_best_metric=ema_best, maximize=maximize, k=k)
        if follower is None:
            plan = run_plan(watch, policy, run)
            assert plan.trainer == "cvnets" and "checkpoint_score_" in plan.detected_because
            follower = Follower(run, plan, mode, k)
        follower.poll()

    # ml-cvnets' own top-k per stream is the set of score files it kept on disk
    kept = sorted(p.name for p in run.glob("checkpoint_score_*.pt"))
    kept_ema = sorted(p.name for p in run.glob("checkpoint_ema_score_*.pt"))
    assert len(kept) == k and len(kept_ema) == k
    assert sorted(follower.member_names("model")) == kept
    assert sorted(follower.member_names("ema")) == kept_ema
    # each file's metric is the (possibly negative) score in its own name; EMA files carry the EMA's own score
    for stream, names in (("model", kept), ("ema", kept_ema)):
        for name in names:
            value, where = follower.metrics[(stream, name)]
            assert value == float(name.rsplit("_score_", 1)[1][:-3]) and name in where
    expected_ema = sorted(CVNETS_RUNS[mode][1], reverse=maximize)[:k]
    assert sorted(m.metric for m in follower.members["ema"]) == sorted(expected_ema)
    # derived copies and resume states never feed a stream, even when rewritten in place every epoch
    for name in ("checkpoint_best.pt", "checkpoint_last.pt", "checkpoint_avg.pt", "checkpoint_ema_best.pt",
                 "checkpoint_ema_last.pt", "checkpoint_ema_avg.pt"):
        assert follower.verdicts[name] == "ignored", name
    assert follower.verdicts["training_checkpoint_last.pt"] == "resume"
    # ml-cvnets' checkpoint_avg.pt = the daemon's average of the same members for floating tensors; its integer
    # buffers are a truncated float64 mean (a pitfall), ckptd takes the best member's
    for stream, avg_name in (("model", "checkpoint_avg.pt"), ("ema", "checkpoint_ema_avg.pt")):
        theirs = torch.load(run / avg_name, weights_only=True)
        ours = follower.average(stream)
        assert sorted(theirs) == sorted(ours)
        for key, t in theirs.items():
            if t.is_floating_point():
                assert torch.allclose(t, ours[key], atol=1e-6), key
        best_member = follower.weights[(stream, follower.members[stream][0].ckpt_id)]
        assert torch.equal(ours["bn.num_batches_tracked"], best_member["bn.num_batches_tracked"])
    # the real daemon with only `metric: {mode}` set: two streams, never mixed, each with its own outputs
    _daemon_once(config_path)
    out = tmp_path / "out" / "w" / "exp1"
    assert sorted(_member_names(out)) == kept and sorted(_member_names(out / "ema")) == kept_ema
    assert _manifest(out)["stream"] == "model" and _manifest(out / "ema")["stream"] == "ema"
    for stream_out, avg_name in ((out, "checkpoint_avg.pt"), (out / "ema", "checkpoint_ema_avg.pt")):
        theirs = torch.load(run / avg_name, weights_only=True)
        ours = load_file(stream_out / "average.safetensors")
        assert all(torch.allclose(t, ours[key], atol=1e-6) for key, t in theirs.items() if t.is_floating_point())


def test_cvnets_explain_cli_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "train" / "exp1"
    run.mkdir(parents=True)
    cfg, _ = _config(tmp_path, tmp_path / "train", {"metric": {"mode": "max"}, "average": {"top_k": 2},
                                                    "streams": {"ema": False}})
    torch.manual_seed(0)
    model = TinyConvNet()
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    best = ema_best = 0.0
    for epoch, (m, em) in enumerate([(0.5, 0.45), (-0.1, 0.5), (0.7, 0.6)]):
        _step(model, ema, opt)
        is_best, best = m >= best, max(m, best)
        is_ema_best, ema_best = em >= ema_best, max(em, ema_best)
        cvnets_save_checkpoint(run, iterations=epoch, epoch=epoch, model=model, optimizer=opt, best_metric=best,
                               is_best=is_best, ema=ema, is_ema_best=is_ema_best, ema_best_metric=ema_best,
                               maximize=True, k=2)
    res = subprocess.run([PYTHON, "-m", "ckptd.cli", "check", "-c", str(cfg), "--explain", "--json"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    [r] = json.loads(res.stdout)
    assert r["trainer"] == "cvnets"
    [model_stream] = r["streams"]
    assert model_stream["name"] == "model" and r["disabled_streams"][0]["name"] == "ema"
    got = {c["path"]: (c["metric"], c["metric_source"]) for c in model_stream["candidates"]}
    assert set(got) == {"checkpoint_score_0.5000.pt", "checkpoint_score_0.7000.pt"}
    assert got["checkpoint_score_0.7000.pt"][0] == 0.7 and got["checkpoint_score_0.7000.pt"][1].startswith("filename")
    assert [p["path"] for p in model_stream["picked"]] == ["checkpoint_score_0.7000.pt", "checkpoint_score_0.5000.pt"]
    ignored = {x["path"]: x["reason"] for x in r["ignored"]}
    assert "derived copy" in ignored["checkpoint_best.pt"] and "in place" in ignored["checkpoint_last.pt"]
    assert "switched-off" in ignored["checkpoint_ema_score_0.6000.pt"]
    assert [x["path"] for x in r["resume_states"]] == ["training_checkpoint_last.pt"]
    assert "best so far" in r["resume_states"][0]["reason"]
    assert not (tmp_path / "state").exists() and not (tmp_path / "out").exists()  # a dry run writes nothing
    text = subprocess.run([PYTHON, "-m", "ckptd.cli", "check", "-c", str(cfg), "--explain"], capture_output=True,
                          text=True, env=subprocess_env(), timeout=120).stdout
    assert "trainer cvnets" in text and "checkpoint_score_0.7000.pt: metric 0.7 from file name" in text
    plain = subprocess.run([PYTHON, "-m", "ckptd.cli", "check", "-c", str(cfg)], capture_output=True, text=True,
                           env=subprocess_env(), timeout=120).stdout
    assert "trainer cvnets: found checkpoint_score_" in plain


# --- timm ---------------------------------------------------------------------------------------------------------

def _timm_saver_class(monkeypatch: pytest.MonkeyPatch):
    """timm's own CheckpointSaver, from the installed timm's source file (timm's package __init__ needs torchvision,
    which has no build for this CPU torch); its ``.model`` import gets timm's unwrap_model/get_state_dict."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    source = Path(next(iter(spec.submodule_search_locations))) / "utils" / "checkpoint_saver.py"

    def unwrap_model(m: nn.Module) -> nn.Module:  # timm.utils.model.unwrap_model, minus its ModelEma case
        while hasattr(m, "module") or hasattr(m, "_orig_mod"):
            m = getattr(m, "module", None) or m._orig_mod
        return m

    pkg, model_mod = types.ModuleType("_timm_utils"), types.ModuleType("_timm_utils.model")
    pkg.__path__ = []  # type: ignore[attr-defined]
    model_mod.unwrap_model = unwrap_model  # type: ignore[attr-defined]
    model_mod.get_state_dict = lambda m, unwrap_fn=unwrap_model: unwrap_fn(m).state_dict()  # type: ignore
    monkeypatch.setitem(sys.modules, "_timm_utils", pkg)
    monkeypatch.setitem(sys.modules, "_timm_utils.model", model_mod)
    loader = importlib.util.spec_from_file_location("_timm_utils.checkpoint_saver", source)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.CheckpointSaver


def test_timm_checkpoint_saver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    saver_cls = _timm_saver_class(monkeypatch)
    run = tmp_path / "train" / "exp"
    run.mkdir(parents=True)
    config_path, config = _config(tmp_path, tmp_path / "train", {"metric": {"mode": "max"},
                                                                  "average": {"top_k": 3}})
    torch.manual_seed(0)
    model = TinyConvNet()
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="tinyconvnet", lr=0.1)
    saver = saver_cls(model, opt, args=args, model_ema=ema, checkpoint_dir=str(run), recovery_dir=str(run),
                      max_history=3)
    follower = None
    for epoch, metric in enumerate([0.31, 0.52, 0.47, 0.66, 0.12, 0.58, 0.71]):
        _step(model, ema, opt)
        saver.save_checkpoint(epoch, metric=metric)
        if epoch == 2:
            saver.save_recovery(epoch, batch_idx=5)
        if follower is None:
            plan = run_plan(config.watches[0], config.policies["default"], run)
            assert plan.trainer == "timm" and plan.streams[1].name == "ema"
            follower = Follower(run, plan, "max", 3)
        follower.poll()
    # timm's own top-k (its history, best first) equals each stream's members; the EMA ranks by the same metric
    theirs = [Path(f).name for f, _ in saver.checkpoint_files]
    assert follower.member_names("model") == theirs == ["checkpoint-6.pth.tar", "checkpoint-3.pth.tar",
                                                        "checkpoint-5.pth.tar"]
    assert follower.member_names("ema") == theirs
    assert [m.metric for m in follower.members["model"]] == [m for _, m in saver.checkpoint_files]
    assert [m.step for m in follower.members["model"]] == [6, 3, 5]
    assert follower.verdicts["model_best.pth.tar"] == follower.verdicts["last.pth.tar"] == "ignored"
    assert follower.verdicts["recovery-2-5.pth.tar"] == "resume"
    # the EMA stream's weights are state_dict_ema, not the model's
    best = torch.load(run / "checkpoint-6.pth.tar", weights_only=False)
    member = follower.weights[("ema", follower.members["ema"][0].ckpt_id)]
    assert torch.equal(member["conv.weight"], best["state_dict_ema"]["conv.weight"])
    assert not torch.equal(member["conv.weight"], best["state_dict"]["conv.weight"])
    # the real daemon: model and EMA streams from the same files, each its own best (args Namespace allowed)
    _daemon_once(config_path)
    out = tmp_path / "out" / "w" / "exp"
    assert _member_names(out) == theirs and _member_names(out / "ema") == theirs
    ema_best = load_file(out / "ema" / "best.safetensors")
    assert torch.equal(ema_best["conv.weight"], best["state_dict_ema"]["conv.weight"])
    assert torch.equal(load_file(out / "best.safetensors")["conv.weight"], best["state_dict"]["conv.weight"])


# --- Hugging Face Trainer ------------------------------------------------------------------------------------------

def test_hf_trainer_run(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    run = tmp_path / "train" / "bert"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)

    class Data(torch.utils.data.Dataset):
        def __init__(self, n: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randint(0, 64, (n, 8), generator=g)
            self.y = (self.x[:, 0] > 32).long()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.x[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.y[i]}

    args = transformers.TrainingArguments(
        output_dir=str(run), eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        max_steps=8, logging_steps=1, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=5e-3, report_to=[], use_cpu=True, metric_for_best_model="loss", greater_is_better=False,
        save_only_model=False, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(64, 1), eval_dataset=Data(32, 2))
    trainer.train()
    trainer.save_model()  # the final copy at the run root: not a checkpoint

    config_path, config = _config(tmp_path, tmp_path / "train", {"metric": {"name": "loss", "mode": "min"},
                                                                  "average": {"top_k": 2}})
    r = explain_run(config.watches[0], config.policies["default"], run)
    assert r["trainer"] == "hf" and "trainer_state.json" in r["detected_because"]
    [stream] = r["streams"]
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert sorted(evals) == [2, 4, 6, 8]
    rows = {c["path"]: c for c in stream["candidates"]}
    assert sorted(rows) == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    for step, loss in evals.items():
        row = rows[f"checkpoint-{step}"]
        # "loss" resolves to eval_loss (HF's metric_for_best_model rule), of this folder's own step, not the
        # training loss logged at the same step nor trainer_state's best_metric
        assert row["metric"] == loss and row["step"] == step and row["error"] is None
        assert row["metric_where"] == f"checkpoint-{step}/trainer_state.json log_history[step={step}].eval_loss"
    best2 = sorted(evals, key=lambda s: evals[s])[:2]
    assert [p["path"] for p in stream["picked"]] == [f"checkpoint-{s}" for s in best2]
    assert stream["best"] == Path(trainer.state.best_model_checkpoint).name  # HF's own best
    ignored = {x["path"]: x["reason"] for x in r["ignored"]}
    assert "save_model" in ignored["model.safetensors"]
    # the real daemon: members are the checkpoint-N folders (their source in the manifest), best is HF's own
    _daemon_once(config_path)
    out = tmp_path / "out" / "w" / "bert"
    assert _member_names(out) == [f"checkpoint-{s}" for s in best2]
    assert _manifest(out)["best"]["source"] == str(run / f"checkpoint-{best2[0]}")
    theirs = load_file(run / f"checkpoint-{best2[0]}" / "model.safetensors")
    ours = load_file(out / "best.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --- Lightning -----------------------------------------------------------------------------------------------------

def test_lightning_run_with_two_monitors_and_ema(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    run = tmp_path / "train" / "lit"

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            logits = self.model(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    by_loss = ModelCheckpoint(dirpath=run, monitor="val_loss", mode="min", save_top_k=2, save_last=True,
                              filename="{epoch}-{step}-{val_loss:.4f}")
    by_acc = ModelCheckpoint(dirpath=run, monitor="val_acc", mode="max", save_top_k=1, filename="acc-{epoch}")
    trainer = L.Trainer(max_epochs=5, callbacks=[by_loss, by_acc, EMAWeightAveraging()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Lit(), loader, loader)

    config_path, config = _config(tmp_path, tmp_path / "train", {"metric": {"name": "val_loss", "mode": "min"},
                                                                  "average": {"top_k": 2}})
    r = explain_run(config.watches[0], config.policies["default"], run)
    assert r["trainer"] == "lightning"
    streams = {s["name"]: s for s in r["streams"]}
    theirs = {Path(p).name: float(v) for p, v in by_loss.best_k_models.items()}
    for name in ("model", "ema"):
        s = streams[name]
        rows = {c["path"]: c for c in s["candidates"]}
        for path, score in theirs.items():  # current_score of the val_loss callback, exactly
            assert rows[path]["metric"] == pytest.approx(score, abs=0)
            assert "current_score" in rows[path]["metric_where"]
        # the val_acc callback's file carries a stale val_loss current_score: not used, and its name has none
        [acc_file] = [p for p in rows if p.startswith("acc-")]
        assert rows[acc_file]["metric"] is None and "saved by another callback" in rows[acc_file]["metric_where"]
        assert sorted(p["path"] for p in s["picked"]) == sorted(theirs)
        assert s["best"] == Path(by_loss.best_model_path).name
    # WeightAveraging: state_dict holds the average (the EMA stream), current_model_state the raw weights
    assert {c["weights_key"] for c in streams["model"]["candidates"]} == {"current_model_state"}
    assert {c["weights_key"] for c in streams["ema"]["candidates"]} == {"state_dict"}
    assert [x["path"] for x in r["resume_states"]] == ["last.ckpt"]
    # the real daemon: model and EMA streams, each with val_loss's own top-2 (never the val_acc file)
    _daemon_once(config_path)
    out = tmp_path / "out" / "w" / "lit"
    assert sorted(_member_names(out)) == sorted(theirs) == sorted(_member_names(out / "ema"))
    assert _manifest(out)["best"]["metric"] == pytest.approx(float(by_loss.best_model_score), abs=0)
