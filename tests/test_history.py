"""`ckptd history` and ``collect_history`` over the shared real ledger (tests/test_status.py ``build_fleet``), and
the ``evaluations`` table read by status and history when a ledger has one."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from ckptd.daemon.config import load_config
from ckptd.daemon.history import AmbiguousRunError, UnknownRunError, collect_history
from ckptd.daemon.status import LedgerReadError
from tests.test_status import (
    EXP_CHECKPOINTS,
    HOSTILE_FILE,
    HOSTILE_REASON,
    HOSTILE_RUN,
    Fleet,
    build_fleet,
    ckptd_cli,
    copy_fleet,
    hostile_ledger,
    raw_controls,
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return build_fleet(tmp_path_factory)


def _history(fleet: Fleet, *args: str) -> dict:
    res = ckptd_cli("history", *args, "-c", str(fleet.config), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_checkpoints_in_the_order_seen_with_decisions_members_and_evictions(fleet: Fleet) -> None:
    h = _history(fleet, "w/exp")
    assert (h["watch"], h["run"], h["stream"], h["mode"]) == ("w", "exp", "model", "max")
    cps = h["checkpoints"]
    assert [c["name"] for c in cps] == [f"ep{i:02d}.pt" for i in range(EXP_CHECKPOINTS)]
    assert [c["first_seen"] for c in cps] == sorted(c["first_seen"] for c in cps)
    assert [c["step"] for c in cps] == [100 * (i + 1) for i in range(EXP_CHECKPOINTS)]
    assert [c["metric"] for c in cps] == pytest.approx([0.1 + 0.05 * i for i in range(EXP_CHECKPOINTS)])
    assert all(c["status"] == "done" and c["reason"] for c in cps), cps
    # the outputs' own record of the top-k (written by the daemon, read here without the ledger)
    manifest = json.loads((fleet.root / "out/w/exp/manifest.json").read_text())
    assert {c["path"] for c in cps if c["member"]} == {m["source"] for m in manifest["average"]["members"]}
    assert [c["path"] for c in cps if c["best"]] == [manifest["best"]["source"]] == [cps[-1]["path"]]
    assert [c["evicted"] for c in cps] == [i < EXP_CHECKPOINTS - 3 for i in range(EXP_CHECKPOINTS)]
    assert h["exports"] == [] and h["evaluations"] == []


def test_rejected_checkpoints_and_failed_exports_with_their_reasons(fleet: Fleet) -> None:
    broken = _history(fleet, "broken")
    assert [(c["name"], c["status"], c["member"], c["evicted"]) for c in broken["checkpoints"]] == [
        ("good.pt", "done", True, False), ("garbage.pt", "invalid", False, False)]
    assert "not a checkpoint" in broken["checkpoints"][1]["reason"]
    v = _history(fleet, "exp", "--watch", "v")
    assert [e["status"] for e in v["exports"]] == ["failed"], v["exports"]
    export = v["exports"][0]
    assert export["source"] == str(fleet.root / "train2/exp/a.pt") and export["reason"]
    assert export["metric"] == pytest.approx(0.6) and export["step"] == 7000 and export["path"] is None
    assert export["started_at"] <= export["finished_at"]
    res = ckptd_cli("history", "v/exp", "-c", str(fleet.config))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "v/exp  stream model  (max): 1 checkpoint(s), 1 in the top-k, 1 export(s)", lines
    assert lines[1].split() == ["TIME", "EVENT", "STEP", "METRIC", "RESULT", "NOTE", "SUBJECT", "REASON"]
    assert [line.split()[2:7] for line in lines[2:]] == [["checkpoint", "7000", "0.6", "done", "best"],
                                                         ["export", "7000", "0.6", "failed", lines[3].split()[6]]]
    assert lines[3].split()[6].endswith("s") and lines[3].split()[7] == "a.pt"
    assert export["reason"][:40] in lines[3]


def test_text_timeline_marks_best_top_k_and_evicted(fleet: Fleet) -> None:
    res = ckptd_cli("history", "w/exp", "-c", str(fleet.config))
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()[2:]]
    assert len(rows) == EXP_CHECKPOINTS
    notes = [r[6] for r in rows]
    assert notes == ["evicted"] * (EXP_CHECKPOINTS - 3) + ["top-k", "top-k", "best"], notes
    assert rows[-1][7] == "ep19.pt" and rows[0][2:5] == ["checkpoint", "100", "0.1"]


def test_text_timeline_escapes_what_a_hostile_trainer_controls(tmp_path: Path, fleet: Fleet) -> None:
    """File names and reasons (a refusal echoes pickle global names) reach the terminal as visible escapes, one
    line per event; --json keeps them as they are."""
    config = hostile_ledger(fleet, tmp_path)
    res = ckptd_cli("history", f"w/{HOSTILE_RUN}", "-c", str(config))
    assert res.returncode == 0 and not res.stderr, res
    assert raw_controls(res.stdout) == [], res.stdout
    lines = res.stdout.splitlines()
    assert lines[0].startswith("w/bro\\x1b[2Jken\\u202e  stream model  (max): 2 checkpoint(s)"), lines[0]
    assert len(lines) == 4, lines  # title, header, two checkpoints: the newline in the reason is escaped
    rejected = lines[3]
    assert "ev\\x1b]52;c;aGk=\\x07il\\u202egnp.pt" in rejected, rejected
    assert "os.system\\x1b]52;c;aGk=\\x07\\u2066\\x9b31m,\\nposix.system\\x08\\x08" in rejected
    data = json.loads(ckptd_cli("history", f"w/{HOSTILE_RUN}", "-c", str(config), "--json").stdout)
    assert data["run"] == HOSTILE_RUN and data["checkpoints"][1]["name"] == HOSTILE_FILE
    assert data["checkpoints"][1]["reason"] == HOSTILE_REASON


def test_run_names_unknown_ambiguous_and_unknown_streams(fleet: Fleet) -> None:
    config = load_config(fleet.config)
    assert collect_history(config, None, "w/exp")["run"] == "exp"
    assert collect_history(config, "v", "exp")["watch"] == "v"
    assert collect_history(config, "w", "w/exp")["watch"] == "w"
    with pytest.raises(AmbiguousRunError, match=r"'exp' is in several watches \(v, w\); name one: v/exp, w/exp"):
        collect_history(config, None, "exp")
    with pytest.raises(UnknownRunError, match=r"no run 'w/exq' in the ledger .*; did you mean w/exp"):
        collect_history(config, None, "w/exq")
    with pytest.raises(UnknownRunError, match=r"run w/exp has no stream 'ema' \(it has: model\)"):
        collect_history(config, None, "w/exp", stream="ema")
    with pytest.raises(UnknownRunError, match="is not in watch 'v'"):
        collect_history(config, "v", "w/broken")
    # the CLI: ambiguous is a usage error (2), unknown a failure (1); one clear line, no traceback
    for args, code, words in ((["exp"], 2, "name one: v/exp, w/exp"), (["nope"], 1, str(fleet.ledger)),
                              (["w/exp", "--stream", "ema"], 1, "no stream 'ema'")):
        res = ckptd_cli("history", *args, "-c", str(fleet.config))
        assert res.returncode == code and not res.stdout, res
        assert len(res.stderr.strip().splitlines()) == 1 and words in res.stderr, res.stderr


def test_missing_and_damaged_ledgers(tmp_path: Path, fleet: Fleet) -> None:
    config = load_config(copy_fleet(fleet, tmp_path))
    (tmp_path / "state" / "ledger.sqlite3").write_bytes(b"garbage, not SQLite " * 500)
    with pytest.raises(LedgerReadError, match="not a database"):
        collect_history(config, None, "w/exp")
    for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    with pytest.raises(UnknownRunError, match="it has no runs yet"):
        collect_history(config, None, "w/exp")


EVALUATIONS = """CREATE TABLE IF NOT EXISTS evaluations (id INTEGER PRIMARY KEY, watch TEXT, run TEXT, stream TEXT,
    kind TEXT, key TEXT, members TEXT, value REAL, status TEXT, reason TEXT, started_at REAL, finished_at REAL)"""


def test_evaluations_when_the_ledger_has_the_table(tmp_path: Path, fleet: Fleet) -> None:
    """The table as the evaluation feature writes it (schema from its issue); added here to a copy of the real
    ledger. Status shows the latest per run, history all of them in order."""
    cfg_path = copy_fleet(fleet, tmp_path)
    exp = fleet.root / "train/exp"
    with sqlite3.connect(tmp_path / "state/ledger.sqlite3") as db:
        db.execute(EVALUATIONS)
        db.executemany("INSERT INTO evaluations (watch, run, stream, kind, key, members, value, status, reason, "
                       "started_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", [
                           ("w", "exp", "model", "average", "top3-a", json.dumps([str(exp / "ep16.pt")]), None,
                            "failed", "factory raised", 100.0, 101.0),
                           ("w", "exp", "model", "average", "top3-b",
                            json.dumps([str(exp / f"ep{i}.pt") for i in (19, 18, 17)]), 0.8125, "ok", None,
                            200.0, 230.0),
                           ("w", "broken", "model", "best", "k", "not json", 0.5, "running", None, 300.0, None)])
    evals = collect_history(load_config(cfg_path), None, "w/exp")["evaluations"]
    assert [(e["key"], e["status"], e["value"]) for e in evals] == [("top3-a", "failed", None),
                                                                  ("top3-b", "ok", 0.8125)]
    assert evals[1]["members"] == [str(exp / f"ep{i}.pt") for i in (19, 18, 17)]
    assert set(evals[0]) == {"id", "kind", "key", "members", "value", "status", "reason", "started_at",
                             "finished_at"}
    rows = {f"{r['watch']}/{r['run']}": r for r in json.loads(ckptd_cli("status", "-c", str(cfg_path),
                                                                          "--json").stdout)}
    assert rows["w/exp"]["evaluation"]["key"] == "top3-b" and len(rows["w/exp"]["evaluation"]["members"]) == 3
    assert rows["w/broken"]["evaluation"]["members"] == [] and rows["v/exp"]["evaluation"] is None
    verbose = ckptd_cli("status", "-c", str(cfg_path), "-v", "--run", "w/exp").stdout
    assert "  eval      average ok: 0.8125 over 3 member(s) (" in verbose, verbose  # the kind; the key is in JSON
    text = ckptd_cli("history", "w/exp", "-c", str(cfg_path)).stdout.splitlines()
    assert text[0].endswith("2 evaluation(s)")
    # merged by time: the evaluations (1970 stamps here) come first
    assert [line.split()[2] for line in text[2:4]] == ["evaluation", "evaluation"], text
    assert "factory raised" in text[2] and "average over 3" in text[3]
