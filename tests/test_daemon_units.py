"""Daemon building blocks tested directly: config validation, policy, readiness, paths, pipeline."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ckptd.daemon.config import load_config, parse_config
from ckptd.daemon.discovery import Observation, list_runs, scan_run
from ckptd.daemon.ledger import Ledger
from ckptd.daemon.logs import get_logger
from ckptd.daemon.paths import resolve_output
from ckptd.daemon.pipeline import RunContext, RunProcessor
from ckptd.daemon.policy import Record, decide
from ckptd.daemon.readiness import ReadinessTracker
from ckptd.errors import ConfigError, OutputPathError
from tests.conftest import REPO


def _config(tmp_path: Path, **policy: object) -> dict:
    (tmp_path / "train").mkdir(exist_ok=True)
    return {"state_dir": str(tmp_path / "state"),
            "watches": [{"name": "w", "root": str(tmp_path / "train"), "output": str(tmp_path / "out/{watch}/{run}"),
                         "settle": "0s"}],
            "policies": {"default": policy}}


def test_example_config_documents_every_key_and_loads(tmp_path: Path) -> None:
    text = (REPO / "config.example.yaml").read_text()
    data = yaml.safe_load(text)
    data["state_dir"] = str(tmp_path / "state")
    for w in data["watches"]:
        w["root"] = str(tmp_path)
        w["output"] = str(tmp_path.parent / "out" / "{watch}" / "{run}")
    cfg = parse_config(data)
    policy = cfg.policies["default"]
    assert policy.metric.mode == "max" and policy.average.top_k == 5
    assert policy.coreml.inputs[0].shape == (1, 3, 256, 256)
    assert cfg.watches[0].settle == 5.0 and cfg.watches[0].poll_interval == 30.0
    # every key the parser knows appears (commented) in the example
    for key in ("state_dir", "log", "watches", "policies", "max_parallel_runs", "rescan_interval",
                "shutdown_deadline", "runs", "include", "exclude", "mode", "poll_interval", "settle", "output",
                "max_depth", "allow_output_in_root", "strip_prefixes", "prefer_ema", "allow_globals", "sources",
                "min_members", "dtype", "formats", "factory", "factory_kwargs", "python_path", "inputs", "outputs",
                "precision", "minimum_deployment_target", "timeout", "keep", "compression", "on_new_best",
                "on_average", "on_export", "publish_partial", "author", "version", "description", "metrics",
                "listen", "textfile", "retention", "enabled", "keep_last", "min_age", "dry_run"):
        assert f"{key}:" in text, key


def test_every_config_problem_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "state_dir": "relative", "colour": "blue",
        "watches": [{"name": "a", "root": "/does/not/exist", "output": "/srv/{watch}", "settle": "soon"},
                    {"name": "a", "root": str(tmp_path), "output": str(tmp_path / "{run}"), "policy": "nope",
                     "include": 3}],
        "policies": {"default": {"metric": {"mode": "biggest", "sources": [{"filename": "("}]},
                                 "average": {"top_k": 0}, "weights": {"wat": 1}}},
    }))
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    problems = "\n".join(info.value.problems)
    for expected in ("colour: unknown key", "watches[0].settle: expected a duration like 30s",
                     "watches[0].root: directory /does/not/exist does not exist",
                     "watches[0].output: must contain {run}", "watches[1].policy: no policy named 'nope'",
                     "watches[1].include: expected a list of globs", "watches[1].output: is inside the training root",
                     "policies.default.metric.mode: expected max or min", "policies.default.average.top_k",
                     "policies.default.weights.wat: unknown key", "state_dir: must be an absolute path",
                     "watch name 'a' is used more than once", "filename regex '(' is invalid"):
        assert expected in problems, expected
    broken = tmp_path / "broken.yaml"
    broken.write_text("watches: [\n  - {name: x\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(broken)


def test_policy_decisions() -> None:
    def rec(i: int, metric: float | None, step: int | None = None, sha: str | None = None) -> Record:
        return Record(i, f"c{i}", sha or f"sha{i}", metric, step if step is not None else i, float(i))

    members = [rec(1, 0.5), rec(2, 0.7), rec(3, 0.6)]
    d = decide(members, rec(4, 0.9), 3, "max")
    assert d.action == "join" and d.new_best and [m.ckpt_id for m in d.members] == [4, 2, 3]
    assert [m.ckpt_id for m in d.evicted] == [1] and "evicts c1 (0.5)" in d.reason
    d = decide(members, rec(5, 0.4), 3, "max")
    assert d.action == "skip" and "cutoff 0.5" in d.reason and not d.evicted
    assert decide(members, rec(6, 0.4), 3, "min").action == "join"
    assert decide(members, rec(7, None), 3, "max").action == "unranked"
    assert decide(members, rec(8, 0.99, sha="sha2"), 3, "max").action == "duplicate"
    tie = decide(members, rec(9, 0.7, step=100), 3, "max")  # ties: the newer step ranks first
    assert tie.new_best and tie.members[0].ckpt_id == 9


def test_readiness_settle_and_commit_signal(tmp_path: Path) -> None:
    t = ReadinessTracker()
    a = Observation(tmp_path / "a.pt", 10, 1)
    t.observe(a, now=100.0)
    assert not t.is_ready(a, 102.0, settle=5) and t.deadline(a, 5) == 105.0
    grown = Observation(a.path, 20, 2)
    t.observe(grown, now=104.0)  # still being written: the clock restarts
    assert not t.is_ready(grown, 108.0, settle=5) and t.is_ready(grown, 109.0, settle=5)
    b = Observation(tmp_path / "b.pt", 10, 1)
    t.note_moved_in(b.path)
    t.observe(b, now=200.0)
    assert t.is_ready(b, 200.0, settle=5)  # renamed into place: no need to wait
    dcp_reused = Observation(tmp_path / "dcp", 10, 1, is_dir=True, commit_ok=False)
    t.observe(dcp_reused, now=0.0)
    assert not t.is_ready(dcp_reused, 1000.0, settle=5)


def test_output_paths_cannot_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    assert resolve_output(str(root / "{watch}/{run}"), "w", "exp1") == root / "w" / "exp1"
    for bad in ("..", ".", "a/b", ".hidden", ""):
        with pytest.raises(OutputPathError):
            resolve_output(str(root / "{watch}/{run}"), "w", bad)
    (root / "w").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "w" / "evil")
    with pytest.raises(OutputPathError, match="outside the output root"):
        resolve_output(str(root / "{watch}/{run}"), "w", "evil")


def test_scan_ignores_temp_names_and_finds_folders(tmp_path: Path, tiny) -> None:
    cfg = parse_config(_config(tmp_path))
    run = tmp_path / "train" / "exp"
    (run / "sub").mkdir(parents=True)
    for name in ("a.pt", "x.pt.tmp", ".hidden.pt", "tmp-b.pt", ".ckptd-tmp-c.pt", "notes.txt", "sub/deep.ckpt"):
        torch.save({}, run / name)
    hf = run / "checkpoint-10"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text("{}")
    (run / "x.orbax-checkpoint-tmp-1").mkdir()
    names = sorted(str(o.path.relative_to(run)) for o in scan_run(run, cfg.watches[0]))
    assert names == ["a.pt", "checkpoint-10", "sub/deep.ckpt"]
    assert list_runs(cfg.watches[0]) == [run]


def test_average_after_100_updates_equals_fresh_average(tmp_path: Path, tiny) -> None:
    cfg = parse_config(_config(tmp_path, average={"top_k": 5}))
    run_dir = tmp_path / "train" / "exp"
    run_dir.mkdir()
    watch = cfg.watches[0]
    ctx = RunContext(watch=watch, policy=cfg.policies["default"], run="exp", run_dir=run_dir,
                     output=tmp_path / "out" / "w" / "exp")
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite3")
    proc = RunProcessor(ctx, ledger, get_logger())
    gen = torch.Generator().manual_seed(7)
    for i in range(100):
        metric = float(torch.rand((), generator=gen))
        model = tiny(seed=i)
        path = run_dir / f"ckpt_{i:03d}.pt"
        torch.save({"model_state_dict": model.state_dict(), "metric": metric, "iterations": i}, path)
        st = path.stat()
        proc.process(Observation(path, st.st_size, st.st_mtime_ns))
    manifest = json.loads((ctx.output / "manifest.json").read_text())
    members = manifest["average"]["members"]
    assert len(members) == 5
    metrics = [m["metric"] for m in members]
    assert metrics == sorted(metrics, reverse=True)
    sources = [torch.load(m["source"], weights_only=True)["model_state_dict"] for m in members]
    got = load_file(ctx.output / "average.safetensors")
    for k, v in got.items():
        if v.is_floating_point():
            fresh = sum(s[k].double() for s in sources) / 5
            assert (v.double() - fresh).abs().max() <= 1e-6 * max(1.0, float(fresh.abs().max())), k
        else:
            assert torch.equal(v, sources[0][k])  # integer buffers from the best
    best = load_file(ctx.output / "best.safetensors")
    assert all(torch.equal(best[k], sources[0][k]) for k in best)
    assert manifest["best"]["metric"] == max(metrics)
    # the 5 members, plus at most the copy the previous generation (kept for readers in the middle of it) names
    on_disk = {p.name for p in (ctx.output / "members").iterdir()}
    assert {Path(m["path"]).name for m in members} <= on_disk and len(on_disk) <= 6
    ledger.close()


def test_missing_outputs_are_rebuilt_on_restart(tmp_path: Path, tiny) -> None:
    cfg = parse_config(_config(tmp_path, average={"top_k": 3}))
    run_dir = tmp_path / "train" / "exp"
    run_dir.mkdir()
    ctx = RunContext(watch=cfg.watches[0], policy=cfg.policies["default"], run="exp", run_dir=run_dir,
                     output=tmp_path / "out" / "w" / "exp")
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite3")
    proc = RunProcessor(ctx, ledger, get_logger())
    for i, metric in enumerate((0.3, 0.9, 0.6)):
        path = run_dir / f"c{i}.pt"
        torch.save({"model_state_dict": tiny(seed=i).state_dict(), "metric": metric}, path)
        st = path.stat()
        proc.process(Observation(path, st.st_size, st.st_mtime_ns))
    out = ctx.output
    expected = {name: load_file(out / name) for name in ("best.safetensors", "average.safetensors")}
    member = next(iter((out / "members").iterdir()))
    member_before = load_file(member)
    for p in (out / "best.safetensors", out / "average.safetensors", out / "manifest.json", member):
        p.unlink()
    RunProcessor(ctx, ledger, get_logger()).reconcile()  # what a restart does first
    for name, tensors in expected.items():
        got = load_file(out / name)
        assert all(torch.equal(got[k], v) for k, v in tensors.items()), name
    assert all(torch.equal(load_file(member)[k], v) for k, v in member_before.items())
    assert json.loads((out / "manifest.json").read_text())["best"]["metric"] == 0.9
    ledger.close()


def _processor(tmp_path: Path, **policy: object) -> tuple[RunProcessor, Path, Ledger]:
    cfg = parse_config(_config(tmp_path, **policy))
    run_dir = tmp_path / "train" / "exp"
    run_dir.mkdir(exist_ok=True)
    ctx = RunContext(watch=cfg.watches[0], policy=cfg.policies["default"], run="exp", run_dir=run_dir,
                     output=tmp_path / "out" / "w" / "exp")
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite3")
    return RunProcessor(ctx, ledger, get_logger()), run_dir, ledger


def _obs(path: Path) -> Observation:
    st = path.stat()
    return Observation(path, st.st_size, st.st_mtime_ns)


def test_unranked_rewritten_refused_and_restart_cases(tmp_path: Path, tiny) -> None:
    proc, run_dir, ledger = _processor(tmp_path)
    # no metric: recorded as unranked, becomes "last", never ranked
    torch.save({"model_state_dict": tiny(seed=1).state_dict(), "iterations": 5}, run_dir / "nometric.pt")
    assert proc.process(_obs(run_dir / "nometric.pt")) == "unranked"
    manifest = json.loads((proc.ctx.output / "manifest.json").read_text())
    assert manifest["best"] is None and manifest["last"]["source"] == str(run_dir / "nometric.pt")
    # Lightning-style last.ckpt rewritten in place with new content counts as a new checkpoint
    last = run_dir / "last.ckpt"
    torch.save({"model_state_dict": tiny(seed=2).state_dict(), "metric": 0.4, "iterations": 10}, last)
    assert proc.process(_obs(last)) == "done"
    first = _obs(last)
    time.sleep(0.01)
    torch.save({"model_state_dict": tiny(seed=3).state_dict(), "metric": 0.7, "iterations": 20}, last)
    os.utime(last, ns=(first.mtime_ns + 10**7, first.mtime_ns + 10**7))
    assert proc.process(_obs(last)) == "done"
    members = proc.members()
    assert [m.record.metric for m in members] == [0.7, 0.4] and len({m.record.sha256 for m in members}) == 2
    # the same content again (a copy under another name) would double-weight the average: duplicate
    (run_dir / "copy.ckpt").write_bytes(last.read_bytes())
    assert proc.process(_obs(run_dir / "copy.ckpt")) == "duplicate"
    # a different architecture is refused, not averaged
    torch.save({"model_state_dict": tiny(width=4).state_dict(), "metric": 0.99}, run_dir / "other_arch.pt")
    assert proc.process(_obs(run_dir / "other_arch.pt")) == "invalid"
    row = ledger.find("w", "exp", str(run_dir / "other_arch.pt"), *_obs(run_dir / "other_arch.pt").signature)
    assert row is not None and "architecture differs" in row.reason
    assert "bn.bias members [8] vs checkpoint [4]" in row.reason
    assert [m.record.metric for m in proc.members()] == [0.7, 0.4]
    # a restart (new processor, same ledger) does not process anything twice
    again = RunProcessor(proc.ctx, ledger, get_logger())
    for name in ("nometric.pt", "last.ckpt", "copy.ckpt", "other_arch.pt"):
        assert again.known(_obs(run_dir / name))
    ledger.close()


def test_folder_checkpoints_are_processed(tmp_path: Path, tiny) -> None:
    import torch.distributed.checkpoint as dcp

    proc, run_dir, ledger = _processor(tmp_path)
    sd = tiny(seed=4).state_dict()
    dcp.save({"model": dict(sd), "metric": 0.5}, checkpoint_id=str(run_dir / "step_100"), no_dist=True)
    hf = run_dir / "checkpoint-200"
    hf.mkdir()
    from ckptd.safetensors_io import save_safetensors

    save_safetensors(hf / "model-00001-of-00001.safetensors", tiny(seed=5).state_dict())
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in sd}}))
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 200, "log_history": [
        {"step": 200, "eval_accuracy": 0.6}]}))
    policy_sources = [{"checkpoint": "metric"}, {"trainer_state": "eval_accuracy"}]
    cfg = parse_config(_config(tmp_path, metric={"mode": "max", "sources": policy_sources}))
    proc2 = RunProcessor(RunContext(cfg.watches[0], cfg.policies["default"], "exp", run_dir, proc.ctx.output),
                         ledger, get_logger())
    found = {o.path.name: o for o in scan_run(run_dir, cfg.watches[0])}
    assert set(found) == {"step_100", "checkpoint-200"} and all(o.is_dir for o in found.values())
    assert proc2.process(found["step_100"]) == "done"
    assert proc2.process(found["checkpoint-200"]) == "done"
    assert [(m.record.metric, m.record.step) for m in proc2.members()] == [(0.6, 200), (0.5, 100)]
    ledger.close()


def test_outputs_inside_the_root_are_never_scanned(tmp_path: Path, tiny) -> None:
    (tmp_path / "train").mkdir()
    cfg = parse_config({"state_dir": str(tmp_path / "state"),
                        "watches": [{"name": "w", "root": str(tmp_path / "train"), "runs": ".",
                                     "output": str(tmp_path / "train/ckptd-out/{run}"), "allow_output_in_root": True}]})
    watch = cfg.watches[0]
    torch.save({"model_state_dict": tiny().state_dict()}, tmp_path / "train" / "a.pt")
    (tmp_path / "train/ckptd-out/train").mkdir(parents=True)
    torch.save({}, tmp_path / "train/ckptd-out/train/best.pt")
    assert [o.path.name for o in scan_run(tmp_path / "train", watch)] == ["a.pt"]
    assert list_runs(watch) == [tmp_path / "train"]
