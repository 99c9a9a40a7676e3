"""The evaluation gate end to end (issue 12): real checkpoints, the real daemon, the real evaluation program.

The checkpoints come from ``tests/soup_models.py``: neighbours of one trained MLP (one basin) and a permuted copy
of it (another basin: the same function, so its own loss is as good, but averaging it with the first basin is
ruinous). The evaluator is ``tests/eval_program.py`` run as a subprocess by the daemon. ``ckptd once`` runs as a
real process where a process boundary matters (the greedy run with its CoreML export, the restart); elsewhere the
same ``Daemon.run_once`` runs in this process (no second torch import per step), its log captured by structlog.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
import torch
import yaml
from safetensors.torch import load_file
from structlog.testing import capture_logs

from ckptd.cli import main as ckptd_main
from ckptd.daemon import evaluation_runner, evaluation_store
from ckptd.daemon.config import load_config
from ckptd.daemon.config_evaluate import EvaluatePolicy
from ckptd.daemon.evaluation_runner import LOG_TAIL, STDERR_TAIL, EvaluationProcesses, Verdict, run_evaluation
from ckptd.daemon.evaluation_store import EVALUATION_ID, load_gate
from ckptd.daemon.evaluations import HOUR, Budget, BudgetSpent, Evaluator
from ckptd.daemon.export_state import average_signature, export_target
from ckptd.daemon.ledger import Ledger, MemberRow
from ckptd.daemon.policy import Record, ranked
from ckptd.daemon.service import Daemon
from tests import soup_models as sm
from tests.conftest import PYTHON, REPO, subprocess_env
from tests.daemon_helpers import DaemonProcess, atomic_save

pytestmark = pytest.mark.slow

EVAL_PROGRAM = Path(__file__).resolve().parent / "eval_program.py"
GREEDY = {"top_k": 4, "min_members": 4, "strategy": "greedy"}
WINNER_EXPORT = {"enabled": True, "source": "winner", "factory": "tests.soup_models:build", "python_path": [str(REPO)],
                 "inputs": [{"name": "x", "shape": [1, sm.IN]}], "outputs": ["y"], "precision": "float32",
                 "timeout": "3m", "keep": 1}


# --- helpers -----------------------------------------------------------------------------------------------------
T0 = time.time() - 86_400  # a checkpoint's mtime is T0 + its step: ckptd takes files in mtime order, newest last


def save(path: Path, state: dict[str, torch.Tensor], *, step: int, val_loss: float | None = None) -> Path:
    return sm.save(path, state, step=step, val_loss=val_loss, mtime=T0 + step)


def write_config(base: Path, *, average: dict[str, Any], evaluate: dict[str, Any] | None = None,
                 export: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
    policy: dict[str, Any] = {
        "metric": {"mode": "min", "sources": [{"checkpoint": "val_loss"}]},
        "average": average,
        "evaluate": {"command": [PYTHON, str(EVAL_PROGRAM)], "metric": "loss", "mode": "min", "timeout": "30s",
                     **(evaluate or {})},
    }
    if export is not None:
        policy["export"] = {"coreml": export}
    cfg = {"state_dir": str(base / "state"), "log": {"format": "json", "level": "info"},
           "watches": [{"name": "w", "root": str(base / "train"), "runs": "*",
                        "output": str(base / "out/{watch}/{run}"), "settle": "1s"}],
           "policies": {"default": policy}}
    path = base / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def once(config: Path) -> list[dict[str, Any]]:
    """``Daemon.run_once`` in this process; returns its log events."""
    with capture_logs() as logs:
        assert Daemon(load_config(config), config, once=True).run_once() == 0
    return logs


def ckptd_once(config: Path) -> list[dict[str, Any]]:
    """``ckptd once`` as its own process; returns its JSON log events."""
    done = subprocess.run([PYTHON, "-m", "ckptd.cli", "once", "-c", str(config)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def evaluation_rows(base: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(base / "state/ledger.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) | {"members": json.loads(r["members"])}
                for r in db.execute("SELECT * FROM evaluations ORDER BY id")]
    finally:
        db.close()


def checkpoint_status(base: Path, path: Path) -> str | None:
    db = sqlite3.connect(base / "state/ledger.sqlite3")
    try:
        rows = db.execute("SELECT status FROM checkpoints WHERE path=? ORDER BY id DESC", (str(path),)).fetchall()
        return rows[0][0] if rows else None
    finally:
        db.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def sources(entries: list[dict[str, Any]]) -> list[str]:
    return [e["source"] for e in entries]


def assert_uniform_average_of(out: Path, members: list[dict[str, Any]]) -> None:
    """average.safetensors is bitwise the uniform average of these manifest members' pinned copies."""
    expected = sm.uniform_average([out / m["path"] for m in members])
    got = load_file(out / "average.safetensors")
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _environ_has(pid: str, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def processes_with_env(name: str, value: str) -> list[str]:
    """Live processes (not zombies) whose environment holds ``name=value``."""
    marker = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _environ_has(proc.name, marker):
            try:
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                found.append(proc.name)
    return found


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return sm.trained()


# --- greedy soup (a real `ckptd once` process, with the 'winner' CoreML export) ---------------------------------
@dataclass
class GreedyRun:
    base: Path
    config: Path
    out: Path
    files: dict[str, Path]
    events: list[dict[str, Any]]


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory: pytest.TempPathFactory, base_state: dict[str, torch.Tensor]) -> GreedyRun:
    """Three same-basin members and, newest, a permuted one whose own metric ranks second; top_k 4, min_members 4."""
    base = tmp_path_factory.mktemp("greedy")
    run = base / "train" / "exp"
    good = sm.good_members(base_state, 3)
    files = {f"g{i}": save(run / f"g{i}.pt", s, step=i) for i, s in enumerate(good)}
    losses = [sm.loss_of(s) for s in good]
    files["bad"] = save(run / "bad.pt", sm.permuted(sm.nudged(base_state, 99)), step=3,
                           val_loss=(losses[0] + losses[1]) / 2)
    config = write_config(base, average=GREEDY, export=WINNER_EXPORT)
    events = ckptd_once(config)
    return GreedyRun(base, config, base / "out/w/exp", files, events)


def test_greedy_soup_leaves_out_the_member_from_another_basin(greedy_run: GreedyRun) -> None:
    g, out = greedy_run.files, greedy_run.out
    kept = [str(g["g0"]), str(g["g1"]), str(g["g2"])]
    m = manifest(out)
    # min_members counts the top-k (4 here), not the soup: a 3-member soup is published
    assert sources(m["top_k_members"]) == [str(g["g0"]), str(g["bad"]), str(g["g1"]), str(g["g2"])]
    avg = m["average"]
    assert sources(avg["members"]) == kept and avg["k"] == 3 and avg["path"] == "average.safetensors"
    assert avg["strategy"] == "greedy" and avg["gate"] is True
    ev = avg["evaluation"]
    assert ev["metric"] == "loss" and ev["mode"] == "min" and ev["status"] == "ok" and ev["current"] is True
    assert ev["kept"] == kept
    assert [t["members"] for t in ev["tried"]] == [kept[:1], [kept[0], str(g["bad"])], kept[:2], kept]
    assert ev["value"] == pytest.approx(sm.evaluated_loss(out / "average.safetensors"), rel=1e-12)
    assert ev["best_value"] == pytest.approx(sm.evaluated_loss(out / "best.safetensors"), rel=1e-12)
    assert ev["value"] < ev["best_value"]  # the soup beats the best member; the permuted member would ruin it
    rejected = ev["rejected"]  # the newest member was left out: said so
    assert rejected["source"] == str(g["bad"]) and rejected["against"] == pytest.approx(ev["tried"][0]["value"])
    assert rejected["value"] > 10 * rejected["against"] and "made the soup worse" in rejected["reason"]
    assert [e["source"] for e in ev["excluded"]] == [str(g["bad"])]
    assert m["best"]["evaluation"]["value"] == pytest.approx(ev["best_value"])
    # what is published is bitwise the uniform average of the kept members' pinned copies
    assert_uniform_average_of(out, avg["members"])
    everything = sm.uniform_average([out / e["path"] for e in m["top_k_members"]])
    assert not torch.equal(load_file(out / "average.safetensors")["0.weight"], everything["0.weight"])
    assert digest(out / "best.safetensors") == digest(out / m["best"]["member_path"])
    assert not (out / ".candidates").exists()
    published = named(greedy_run.events, "average.published")
    assert len(published) == 1 and published[0]["members"] == 3


def test_greedy_run_evaluates_each_member_set_once(greedy_run: GreedyRun) -> None:
    rows = evaluation_rows(greedy_run.base)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert len({r["key"] for r in rows}) == 4
    assert [r["kind"] for r in rows] == ["member", "soup", "soup", "soup"]
    assert len(named(greedy_run.events, "evaluation.started")) == 4


def test_winner_export_is_the_average_that_evaluated_better(greedy_run: GreedyRun) -> None:
    out = greedy_run.out
    ledger, _ = Ledger.open(greedy_run.base / "state/ledger.sqlite3")
    try:
        gate = load_gate(ledger, "w", "exp", "model")
        members = ledger.members("w", "exp")
    finally:
        ledger.close()
    by_record = {r.record: r for r in members}
    members = [by_record[r] for r in ranked([m.record for m in members], "min")]
    assert gate.winner == "average"
    assert [mm.record.path for mm in gate.members] == manifest(out)["average"]["evaluation"]["kept"]
    policy = load_config(greedy_run.config).policies["default"]
    target = export_target(policy, members, gate)
    assert target == average_signature(gate.members) != members[0].record.sha256
    coreml = manifest(out)["coreml"]  # the real export ran: the published package is the winning average
    assert coreml["status"] == "ok" and coreml["source"] == "average" and coreml["sha256"] == target, coreml
    assert (out / "best.mlpackage").is_dir()
    assert not [e for e in greedy_run.events if e["event"] == "export.failed"]


def test_status_json_reports_the_latest_evaluation(greedy_run: GreedyRun, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    assert ckptd_main(["status", "-c", str(greedy_run.config), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["run"] == "exp"
    if "evaluation" not in rows[0]:
        pytest.skip("`ckptd status --json` has no 'evaluation' key (yet)")
    last = rows[0]["evaluation"]
    assert last["status"] == "ok" and last["kind"] == "soup"
    assert last["members"] == [str(greedy_run.files[n]) for n in ("g0", "g1", "g2")]


# --- gated uniform average -------------------------------------------------------------------------------------
def test_gate_publishes_a_better_average_then_keeps_it_against_a_worse_one(
        tmp_path: Path, base_state: dict[str, torch.Tensor]) -> None:
    run, out = tmp_path / "train/exp", tmp_path / "out/w/exp"
    good = sm.good_members(base_state)
    losses = [sm.loss_of(s) for s in good]
    files = [save(run / f"g{i}.pt", s, step=i) for i, s in enumerate(good[:3])]
    gated = {"top_k": 5, "min_members": 3, "gate": True}
    config = write_config(tmp_path, average=gated)

    once(config)  # 1: the uniform average of three neighbours beats the best member: published
    m = manifest(out)
    ev = m["average"]["evaluation"]
    assert sources(m["average"]["members"]) == [str(f) for f in files]
    assert ev["status"] == "ok" and "rejected" not in ev and ev["value"] < ev["best_value"]
    assert_uniform_average_of(out, m["average"]["members"])
    published, value = digest(out / "average.safetensors"), ev["value"]
    assert len(evaluation_rows(tmp_path)) == 2  # the best member and the average; nothing twice

    bad = save(run / "bad.pt", sm.permuted(sm.nudged(base_state, 99)), step=9,
                  val_loss=(losses[0] + losses[1]) / 2)
    events = once(config)  # 2: a newcomer from another basin would ruin the average: rejected, the old one stays
    m = manifest(out)
    ev = m["average"]["evaluation"]
    assert digest(out / "average.safetensors") == published
    assert sources(m["average"]["members"]) == [str(f) for f in files] and m["average"]["path"] == "average.safetensors"
    assert ev["value"] == value and ev["status"] == "ok" and ev["current"] is True
    rejected = ev["rejected"]
    assert rejected["members"] == [str(files[0]), str(bad), str(files[1]), str(files[2])]
    assert rejected["against"] == pytest.approx(ev["best_value"]) and rejected["value"] > 10 * rejected["against"]
    assert "worse than the best member" in rejected["reason"] and "margin 0" in rejected["reason"]
    warned = named(events, "average.rejected")
    assert len(warned) == 1 and warned[0]["value"] == rejected["value"] and warned[0]["against"] == rejected["against"]
    assert len(evaluation_rows(tmp_path)) == 3  # only the new candidate: the best member's value is cached

    g3 = save(run / "g3.pt", good[3], step=10, val_loss=losses[3])
    margin = write_config(tmp_path, average={**gated, "margin": 100.0}, name="margin.yaml")
    once(margin)  # 3: a margin larger than the loss it costs lets the same kind of average through
    m = manifest(out)
    ev = m["average"]["evaluation"]
    assert sources(m["average"]["members"]) == [str(files[0]), str(bad), str(files[1]), str(files[2]), str(g3)]
    assert ev["status"] == "ok" and ev["margin"] == 100.0 and "rejected" not in ev
    assert ev["best_value"] < ev["value"] <= ev["best_value"] + 100.0
    assert digest(out / "average.safetensors") != published
    assert_uniform_average_of(out, m["average"]["members"])
    assert len(evaluation_rows(tmp_path)) == 4  # same evaluator (the margin is not part of it): best member cached


def test_gate_publishes_no_average_while_the_only_candidate_is_worse(
        tmp_path: Path, base_state: dict[str, torch.Tensor]) -> None:
    run, out = tmp_path / "train/exp", tmp_path / "out/w/exp"
    good = sm.good_members(base_state, 2)
    losses = [sm.loss_of(s) for s in good]
    g0, g1 = (save(run / f"g{i}.pt", s, step=i) for i, s in enumerate(good))
    bad = save(run / "bad.pt", sm.permuted(sm.nudged(base_state, 99)), step=2,
                  val_loss=(losses[0] + losses[1]) / 2)
    config = write_config(tmp_path, average={"top_k": 3, "min_members": 3, "gate": True})
    once(config)
    m = manifest(out)
    assert not (out / "average.safetensors").exists() and not (out / "current/average.safetensors").exists()
    avg = m["average"]
    assert avg["path"] is None and avg["k"] == 0 and avg["members"] == [] and "evaluates at least as well" in \
        avg["waiting_for"]
    ev = avg["evaluation"]
    assert ev["status"] == "rejected" and ev["value"] is None and ev["kept"] == []
    assert ev["rejected"]["members"] == [str(g0), str(bad), str(g1)]
    best_value = sm.evaluated_loss(out / "best.safetensors")
    assert ev["rejected"]["value"] > ev["rejected"]["against"] == pytest.approx(best_value)
    # the 'winner' decision: the best member, since no average exists; an average export has no target
    ledger, _ = Ledger.open(tmp_path / "state/ledger.sqlite3")
    try:
        gate, members = load_gate(ledger, "w", "exp", "model"), ledger.members("w", "exp")
    finally:
        ledger.close()
    members = sorted(members, key=lambda mm: mm.record.metric)
    policy = load_config(config).policies["default"]
    assert gate.winner == "best" and gate.members == ()
    winner = replace(policy, coreml=replace(policy.coreml, source="winner"))
    assert export_target(winner, members, gate) == members[0].record.sha256 == m["best"]["sha256"]
    average = replace(policy, coreml=replace(policy.coreml, source="average"))
    assert export_target(average, members, gate) is None


# --- the cache -------------------------------------------------------------------------------------------------
def test_no_member_set_is_evaluated_twice_not_even_after_a_restart(
        tmp_path: Path, base_state: dict[str, torch.Tensor]) -> None:
    run = tmp_path / "train/exp"
    good = sm.good_members(base_state)
    losses = [sm.loss_of(s) for s in good]
    names = [save(run / f"g{i}.pt", s, step=i) for i, s in enumerate(good[:3])]
    save(run / "bad.pt", sm.permuted(sm.nudged(base_state, 99)), step=3, val_loss=(losses[0] + losses[1]) / 2)
    config = write_config(tmp_path, average={"top_k": 4, "min_members": 2, "strategy": "greedy"})
    first = once(config)
    rows = evaluation_rows(tmp_path)
    assert len(rows) == len(named(first, "evaluation.started")) >= 4
    assert len({r["key"] for r in rows}) == len(rows) and {r["status"] for r in rows} == {"ok"}
    average = digest(tmp_path / "out/w/exp/average.safetensors")

    again = ckptd_once(config)  # a new process, nothing new: nothing evaluated, nothing republished
    assert named(again, "evaluation.started") == [] and evaluation_rows(tmp_path) == rows
    assert digest(tmp_path / "out/w/exp/average.safetensors") == average

    # a new member displaces g2: of the greedy chain only the set holding it is new
    mid = save(run / "mid.pt", good[3], step=4, val_loss=(losses[1] + losses[2]) / 2)
    third = once(config)
    started = named(third, "evaluation.started")
    assert [e["members_sources"] for e in started] == [[str(names[0]), str(names[1]), str(mid)]]
    after = evaluation_rows(tmp_path)
    assert after[:len(rows)] == rows and len(after) == len(rows) + 1
    assert len({r["key"] for r in after}) == len(after)


# --- a member evicted while its set is being evaluated (a real `ckptd run`) ---------------------------------------
def test_a_member_evicted_during_an_evaluation_supersedes_the_job_without_an_error(
        tmp_path: Path, base_state: dict[str, torch.Tensor]) -> None:
    run = tmp_path / "train/exp"
    run.mkdir(parents=True)
    config = write_config(tmp_path, average={"top_k": 2, "min_members": 2, "strategy": "greedy"},
                          evaluate={"env": {"EVAL_SLEEP": "1"}})  # well-behaved, slow: time to evict meanwhile
    states = sm.good_members(base_state, 3)
    a, b, c = (run / f"{n}.pt" for n in "abc")
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        atomic_save({"model": states[2], "step": 1, "val_loss": 0.5}, a)
        atomic_save({"model": states[1], "step": 2, "val_loss": 0.4}, b)  # the best: its set {b, a} is next
        daemon.wait_for(lambda ev: any(e["event"] == "evaluation.started" and e["members_sources"] == [str(b)]
                                       for e in ev), 60, "b evaluated alone, first of the set {b, a}")
        atomic_save({"model": states[0], "step": 3, "val_loss": 0.3}, c)  # evicts a (top-2) while b is evaluated
        daemon.wait_for(lambda ev: any(e["event"] == "evaluation.started" and e["members_sources"] == [str(c), str(b)]
                                       for e in ev), 60, "the newer top-k {c, b} evaluated")
        daemon.wait_for(lambda ev: any(e["event"] in ("average.published", "average.rejected") for e in ev), 60,
                        "a decision")
    finally:
        assert daemon.stop() == 0
    events = daemon.events()
    assert not [e for e in events if e["level"] == "error"], [e for e in events if e["level"] == "error"]
    superseded = named(events, "evaluation.superseded")
    assert len(superseded) == 1 and "left the top-k" in superseded[0]["reason"]
    abandoned = [r for r in evaluation_rows(tmp_path) if r["status"] == "abandoned"]
    assert [r["members"] for r in abandoned] == [[str(b), str(a)]] and "left the top-k" in abandoned[0]["reason"]
    m = manifest(tmp_path / "out/w/exp")
    assert sources(m["top_k_members"]) == [str(c), str(b)] and m["average"]["evaluation"]["current"] is True


# --- evaluators that misbehave -----------------------------------------------------------------------------------
@dataclass
class Prepared:
    base: Path
    out: Path
    config: Path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, base_state: dict[str, torch.Tensor]) -> Prepared:
    """A greedy run with a published, evaluated average of two members (each test below adds worse members)."""
    base = tmp_path_factory.mktemp("misbehaving")
    for i, s in enumerate(sm.good_members(base_state, 2)):
        save(base / f"train/exp/g{i}.pt", s, step=i)
    config = write_config(base, average={"top_k": 16, "min_members": 2, "strategy": "greedy"})
    once(config)
    out = base / "out/w/exp"
    assert manifest(out)["average"]["k"] == 2
    return Prepared(base, out, config)


def published_files(out: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in (out / "average.safetensors", out / "best.safetensors",
                                         *(out / "members").iterdir())}


MISBEHAVIOURS = [
    ("fail", "the evaluator failed (exit code 3)"),
    ("lie", "its last stdout line is not JSON"),
    ("nan", "'loss' is not a finite number: nan"),
    ("touch", "the evaluator modified its input weights file"),
    ("hang", "timed out after 2s (its process group was killed)"),
    ("delete", "the evaluator deleted or replaced its input weights file"),
]


@pytest.mark.parametrize(("mode", "reason"), MISBEHAVIOURS, ids=[m for m, _ in MISBEHAVIOURS])
def test_a_misbehaving_evaluator_changes_nothing_published(prepared: Prepared, base_state: dict[str, torch.Tensor],
                                                         mode: str, reason: str) -> None:
    out = prepared.out
    before, average_before = published_files(out), manifest(out)["average"]
    rows_before = evaluation_rows(prepared.base)
    newcomer = save(prepared.base / f"train/exp/{mode}.pt",
                       sm.nudged(base_state, 200 + len(rows_before)), step=100 + len(rows_before), val_loss=1.0)
    config = write_config(prepared.base, average={"top_k": 16, "min_members": 2, "strategy": "greedy"},
                          evaluate={"env": {"EVAL_MODE": mode}, "timeout": "2s" if mode == "hang" else "30s"},
                          name=f"{mode}.yaml")
    started = time.monotonic()
    events = once(config)
    assert time.monotonic() - started < 25
    after = published_files(out)
    assert {k: v for k, v in after.items() if k in before} == before  # byte-identical; plus the newcomer's copy
    assert len(after) == len(before) + 1
    m = manifest(out)
    assert m["average"]["members"] == average_before["members"]
    assert str(newcomer) in sources(m["top_k_members"]) and checkpoint_status(prepared.base, newcomer) == "done"
    new_rows = evaluation_rows(prepared.base)[len(rows_before):]
    # greedy stops at the best member (once per job: a failure is not cached, a second job may try again)
    assert new_rows and {(r["kind"], r["status"]) for r in new_rows} == {("member", "failed")}
    assert all(reason in r["reason"] for r in new_rows), new_rows
    assert all(r["pid"] for r in new_rows)  # recorded while it ran, for a restarted daemon to kill it
    failed = named(events, "evaluation.failed")
    assert len(failed) == len(new_rows) and all(reason in e["reason"] for e in failed)
    assert reason in m["average"]["evaluation"]["rejected"]["reason"]
    assert not (out / ".candidates").exists()
    assert processes_with_env("CKPTD_OUTPUT", str(out)) == []  # the hung evaluator and its helper are gone


def test_evaluation_budget_defers_the_rest_and_keeps_the_outputs(prepared: Prepared,
                                                                 base_state: dict[str, torch.Tensor]) -> None:
    out = prepared.out
    before = published_files(out)
    rows_before = evaluation_rows(prepared.base)
    for i in range(3):  # new members below the two of the soup
        save(prepared.base / f"train/exp/b{i}.pt", sm.nudged(base_state, 300 + i), step=200 + i,
             val_loss=0.5 + i / 10)
    # another evaluator (its env differs): no cached value; every decision needs >= 3 evaluations ([g0], [g0, g1],
    # [g0, g1, b0], ...), whichever top-k the first job sees, and the budget allows 2 more than the ledger's
    # evaluations of the last hour (every earlier test of this module's run; they count, whichever process ran them)
    limit = len(rows_before) + 2
    config = write_config(prepared.base, average={"top_k": 16, "min_members": 2, "strategy": "greedy"},
                          evaluate={"max_per_hour": limit, "env": {"EVAL_SET": "budget"}}, name="budget.yaml")
    events = once(config)
    new_rows = evaluation_rows(prepared.base)[len(rows_before):]
    assert [r["status"] for r in new_rows] == ["ok", "ok"] and len(named(events, "evaluation.started")) == 2
    deferred = named(events, "evaluation.deferred")
    assert deferred and f"max_per_hour ({limit})" in deferred[0]["reason"]
    assert "previous outputs stay" in deferred[0]["reason"]
    after = published_files(out)
    assert {k: v for k, v in after.items() if k in before} == before
    avg = manifest(out)["average"]
    assert avg["evaluation"]["current"] is False  # the newest top-k is still waiting for its evaluation
    assert os.path.isfile(out / "average.safetensors")


# --- the evaluator's input, output and process: a scratch copy, bounded pipes, its pid in the ledger ---------------
def test_the_evaluator_rewriting_its_input_in_place_never_reaches_what_is_published(
        tmp_path: Path, base_state: dict[str, torch.Tensor]) -> None:
    """Each evaluation gets a scratch copy of its own (``.candidates/eval-*``, deleted after): an evaluator that
    overwrites its input after reading it, restoring size and mtime, changes neither the published average (still
    bitwise the members' uniform average) nor a member copy."""
    run, out = tmp_path / "train/exp", tmp_path / "out/w/exp"
    for i, s in enumerate(sm.good_members(base_state, 3)):
        save(run / f"g{i}.pt", s, step=i)
    config = write_config(tmp_path, average={"top_k": 3, "min_members": 3, "gate": True},
                          evaluate={"env": {"EVAL_MODE": "inplace"}})
    events = once(config)
    m = manifest(out)
    ev = m["average"]["evaluation"]
    assert ev["status"] == "ok" and m["average"]["k"] == 3
    assert_uniform_average_of(out, m["average"]["members"])
    assert ev["value"] == pytest.approx(sm.evaluated_loss(out / "average.safetensors"), rel=1e-12)
    assert ev["best_value"] == pytest.approx(sm.evaluated_loss(out / "best.safetensors"), rel=1e-12)
    assert digest(out / "best.safetensors") == digest(out / m["best"]["member_path"])
    rows, finished = evaluation_rows(tmp_path), named(events, "evaluation.finished")
    assert [(r["kind"], r["status"]) for r in rows] == [("member", "ok"), ("soup", "ok")] and len(finished) == 2
    for row, e in zip(rows, finished, strict=True):  # the evaluator saw its scratch copy and its row's id
        assert f"{out / '.candidates'}/eval-" in e["output"] and f"evaluation {row['id']})" in e["output"], e
        assert row["pid"] and row["pid"] != os.getpid()
    assert not (out / ".candidates").exists()


def _evaluate(code: str, **kwargs: Any) -> Verdict:
    policy = EvaluatePolicy(command=(PYTHON, "-c", code), metric="loss", mode="min", timeout=30)
    return run_evaluation(policy, Path("/nonexistent.safetensors"), {}, EvaluationProcesses(), **kwargs)


CHATTY = """
import json, os
line = b"x" * 1023 + b"\\n"
for _ in range(16 * 1024):  # 16 MiB on each stream
    os.write(1, line)
    os.write(2, line)
print(json.dumps({"loss": 0.5, "stdout": os.readlink("/proc/self/fd/1"), "stderr": os.readlink("/proc/self/fd/2"),
                  "pid": os.getpid(), "pgid": os.getpgid(0),
                  "per_class": {f"class_{i:04d}_accuracy": 0.5 for i in range(300)}}))
"""


def test_evaluator_output_goes_through_pipes_and_a_long_verdict_line_is_read_whole() -> None:
    """No temp files (a chatty evaluator cannot fill the disk); only bounded tails are kept; a 6 KB verdict line
    (300 per-class metrics) is read whole; ``on_start`` gets the pid, which is its process group's id."""
    pids: list[int] = []
    verdict = _evaluate(CHATTY, on_start=pids.append)
    assert verdict.value == 0.5 and verdict.reason is None, verdict.reason
    result = verdict.result or {}
    assert len(json.dumps(result)) > 6000 and len(result["per_class"]) == 300  # type: ignore[arg-type]
    assert str(result["stdout"]).startswith("pipe:") and str(result["stderr"]).startswith("pipe:")
    assert pids == [result["pid"]] == [result["pgid"]]
    assert 0 < len(verdict.output) <= LOG_TAIL + STDERR_TAIL + 8 and verdict.output.endswith("x")


def test_a_verdict_line_longer_than_what_ckptd_reads_is_refused_as_such() -> None:
    verdict = _evaluate('import sys; sys.stdout.write(\'{"loss": 1, "pad": "\' + "x" * (2 << 20) + \'"}\\n\')')
    assert verdict.value is None and "longer than the 1 MiB ckptd reads" in (verdict.reason or ""), verdict.reason


def test_an_escaped_grandchild_holding_the_output_pipe_does_not_hold_up_the_verdict(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation_runner, "DRAIN_SECONDS", 0.3)
    code = ("import json, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)'], start_new_session=True); print(json.dumps({'loss': 1, 'helper': p.pid}))")
    started = time.monotonic()
    verdict = _evaluate(code)
    try:
        assert verdict.value == 1.0 and time.monotonic() - started < 10
    finally:
        os.kill(int((verdict.result or {})["helper"]), signal.SIGKILL)  # type: ignore[call-overload]


def live_group_members(pgid: int) -> list[str]:
    """Live processes (not zombies) of process group ``pgid``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and fields[2] == str(pgid) and fields[0] != "Z":
            found.append(proc.name)
    return found


def _sleeper(evaluation_id: int, *, leave_helper: bool = False) -> subprocess.Popen[bytes]:
    code = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
            if leave_helper else "import time; time.sleep(60)")
    return subprocess.Popen([PYTHON, "-c", code], env={**os.environ, EVALUATION_ID: str(evaluation_id)},
                            start_new_session=True)


def test_a_restarted_daemon_kills_the_evaluators_a_killed_one_left_running_and_nothing_else(tmp_path: Path) -> None:
    """Rows left 'running' hold the evaluator's pid (its process group); the group is killed only if a process in
    it carries that row's ``CKPTD_EVALUATION_ID`` (a pid reused since is spared)."""
    ledger, _ = Ledger.open(tmp_path / "ledger.sqlite3")
    ids = [evaluation_store.started(ledger, "w", "r", "model", "soup", f"k{i}", ["a"]) for i in range(4)]
    hung = _sleeper(ids[0])  # its own evaluator, still running: killed with its group
    reused = _sleeper(ids[1] + 100)  # row 1's pid now belongs to another process: spared
    leader = _sleeper(ids[2], leave_helper=True)  # the evaluator exited, its helper stays in its group: killed
    leader.wait(timeout=30)
    for row_id, proc in zip(ids, (hung, reused, leader), strict=False):
        evaluation_store.set_pid(ledger, row_id, proc.pid)  # row 3: the daemon died before its evaluator ran
    try:
        assert live_group_members(leader.pid)  # the helper
        assert evaluation_store.abandon_running(ledger, "the daemon stopped") == (4, sorted([hung.pid, leader.pid]))
        assert hung.wait(timeout=10) == -signal.SIGKILL
        assert reused.poll() is None
        deadline = time.monotonic() + 10
        while live_group_members(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live_group_members(leader.pid) == []
        rows = ledger.query("SELECT id, status, reason FROM evaluations ORDER BY id")
        assert [r[1] for r in rows] == ["abandoned"] * 4
        assert ["was killed" in r[2] for r in rows] == [True, False, True, False], rows
    finally:
        for proc in (hung, reused):
            proc.kill()
            proc.wait()
        ledger.close()


def test_the_evaluation_budget_counts_the_ledgers_evaluations_of_the_last_hour(tmp_path: Path) -> None:
    """A fresh process (``ckptd once`` from cron, a daemon in a crash loop) still honours max_per_hour."""
    ledger, _ = Ledger.open(tmp_path / "ledger.sqlite3")
    now = time.time()
    with ledger.transaction() as db:
        for watch, age in (("w", 4000.0), ("w", 1800.0), ("w", 600.0), ("other", 60.0)):
            db.execute("INSERT INTO evaluations (watch, run, stream, kind, key, members, status, started_at) "
                       "VALUES (?, 'r', 'model', 'member', 'k', '[]', 'ok', ?)", (watch, now - age))
    try:
        Budget().take("p", 3, now, ledger=ledger, watch="w")  # two in the hour: the older one and 'other' don't count
        with pytest.raises(BudgetSpent) as spent:
            Budget().take("p", 2, now, ledger=ledger, watch="w")
        assert spent.value.wait == pytest.approx(HOUR - 1800 + 1)  # when the older of the two leaves the hour
    finally:
        ledger.close()


def _lone_evaluator(tmp_path: Path, member: Path, command: tuple[str, ...]) -> tuple[Evaluator, MemberRow]:
    """An ``Evaluator`` for one job of a run with one member, without a daemon around it."""
    ledger, _ = Ledger.open(tmp_path / "ledger.sqlite3")
    row = MemberRow(Record(1, str(tmp_path / "train/m.pt"), "ab" * 32, 0.5, 1, 0.0), str(member))
    policy = SimpleNamespace(name="default", evaluate=EvaluatePolicy(command=command, metric="loss", mode="min",
                                                                       timeout=30))
    ctx = SimpleNamespace(policy=policy, watch=SimpleNamespace(name="w"), run="r", stream="model",
                          output=tmp_path / "out")
    run = SimpleNamespace(ctx=ctx, log=structlog.get_logger(), ledger=ledger, members=lambda: [row])
    scheduler = SimpleNamespace(budget=Budget(), processes=EvaluationProcesses(), count=lambda result: None)
    return Evaluator(scheduler, run), row  # type: ignore[arg-type]


def test_a_copy_for_the_evaluator_cut_short_by_a_full_disk_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    member = tmp_path / "out/members/m.safetensors"
    member.parent.mkdir(parents=True)
    member.write_bytes(os.urandom(1 << 16))
    evaluator, row = _lone_evaluator(tmp_path, member, (PYTHON, "-c", "print('{\"loss\": 1}')"))

    def full_disk(src: Path, dst: Path, *args: Any, **kwargs: Any) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with capture_logs():
        outcome = evaluator([row])
    evaluator.cleanup()
    assert outcome.value is None and "No space left" in (outcome.reason or "")
    assert not (tmp_path / "out/.candidates").exists()
    evaluator.run.ledger.close()


def test_an_evaluator_that_deletes_its_input_is_blamed_for_it(tmp_path: Path) -> None:
    member = tmp_path / "out/members/m.safetensors"
    member.parent.mkdir(parents=True)
    member.write_bytes(content := os.urandom(1 << 16))
    code = "import json, os; os.remove(os.environ['CKPTD_WEIGHTS']); print(json.dumps({'loss': 1}))"
    evaluator, row = _lone_evaluator(tmp_path, member, (PYTHON, "-c", code))
    with capture_logs() as logs:
        outcome = evaluator([row])
    evaluator.cleanup()
    assert outcome.value is None and "the evaluator deleted or replaced its input" in (outcome.reason or "")
    failed = named(logs, "evaluation.failed")
    assert len(failed) == 1 and "ckptd could not" not in failed[0]["reason"] and "exc_info" not in failed[0]
    assert member.read_bytes() == content and evaluator.files == {evaluation_store.set_key(["ab" * 32]): member}
    assert not (tmp_path / "out/.candidates").exists()
    evaluator.run.ledger.close()


def test_switching_a_running_setup_to_the_gate_keeps_its_published_average_until_one_wins(
        tmp_path: Path, base_state: dict[str, torch.Tensor]) -> None:
    """An ungated average was published; the operator adds ``gate: true``. The published average is adopted (it
    stays, described by the manifest) and a candidate that loses does not take it away."""
    run, out = tmp_path / "train/exp", tmp_path / "out/w/exp"
    good = sm.good_members(base_state)
    losses = [sm.loss_of(s) for s in good]
    files = [save(run / f"g{i}.pt", s, step=i) for i, s in enumerate(good[:2])]
    plain = write_config(tmp_path, average={"top_k": 5, "min_members": 2}, name="plain.yaml")
    cfg = yaml.safe_load(plain.read_text())
    del cfg["policies"]["default"]["evaluate"]  # a setup from before the gate: no evaluator, no gate state
    plain.write_text(yaml.safe_dump(cfg))
    once(plain)
    published = digest(out / "average.safetensors")
    assert sources(manifest(out)["average"]["members"]) == [str(f) for f in files]

    bad = save(run / "bad.pt", sm.permuted(sm.nudged(base_state, 98)), step=9, val_loss=losses[0] / 2)
    events = once(write_config(tmp_path, average={"top_k": 5, "min_members": 2, "gate": True}, name="gated.yaml"))
    m = manifest(out)
    assert named(events, "average.adopted"), [e["event"] for e in events]
    assert digest(out / "average.safetensors") == published  # never dropped, never replaced by the loser
    assert sources(m["average"]["members"]) == [str(f) for f in files]
    assert m["average"]["evaluation"]["rejected"]["members"][0] == str(bad)


def test_a_failed_evaluation_is_not_final_it_is_retried_after_a_restart(
        tmp_path: Path, base_state: dict[str, torch.Tensor]) -> None:
    """A transient evaluator failure (a busy GPU, a full disk) must not leave the run without its average until
    the top-k happens to change: the decision is not recorded as made, and the next start evaluates again."""
    run, out = tmp_path / "train/exp", tmp_path / "out/w/exp"
    for i, s in enumerate(sm.good_members(base_state, 3)):
        save(run / f"g{i}.pt", s, step=i)
    gated = {"top_k": 5, "min_members": 3, "gate": True}
    events = once(write_config(tmp_path, average=gated, evaluate={"env": {"EVAL_MODE": "fail"}}, name="fail.yaml"))
    assert not (out / "average.safetensors").exists()
    assert named(events, "evaluation.retry_scheduled")
    assert manifest(out)["average"]["evaluation"]["current"] is False
    events = once(write_config(tmp_path, average=gated))  # the evaluator works again; nothing new arrived
    assert named(events, "evaluation.catch_up") and named(events, "average.published")
    m = manifest(out)
    assert m["average"]["path"] == "average.safetensors" and m["average"]["evaluation"]["current"] is True
    assert_uniform_average_of(out, m["average"]["members"])


def test_a_lost_ledger_keeps_the_published_soup_until_an_evaluation_decides(
        tmp_path: Path, base_state: dict[str, torch.Tensor]) -> None:
    """The ledger is deleted (or corrupt, moved aside): the gate's state and the cache are gone. The published
    greedy soup is adopted from its manifest (its member copies are still there), so a failing evaluation after
    the restart leaves it in place instead of withdrawing it."""
    run, out = tmp_path / "train/exp", tmp_path / "out/w/exp"
    good = sm.good_members(base_state, 2)
    losses = [sm.loss_of(s) for s in good]
    for i, s in enumerate(good):
        save(run / f"g{i}.pt", s, step=i)
    save(run / "bad.pt", sm.permuted(sm.nudged(base_state, 97)), step=5, val_loss=(losses[0] + losses[1]) / 2)
    greedy = {"top_k": 4, "min_members": 2, "strategy": "greedy"}
    once(write_config(tmp_path, average=greedy))
    soup = manifest(out)["average"]
    assert soup["k"] in (1, 2) and str(run / "bad.pt") not in sources(soup["members"])
    published = digest(out / "average.safetensors")
    for f in (tmp_path / "state").glob("ledger.sqlite3*"):
        f.unlink()
    events = once(write_config(tmp_path, average=greedy, evaluate={"env": {"EVAL_MODE": "fail"}}, name="f.yaml"))
    assert named(events, "ledger.restored") and named(events, "average.adopted")
    assert digest(out / "average.safetensors") == published
    assert sources(manifest(out)["average"]["members"]) == sources(soup["members"])
