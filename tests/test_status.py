"""`ckptd status` and what ships with the package: real ledgers written by `ckptd once`, real damaged ledgers,
a real wheel built from the source tree.

``build_fleet`` is the ledger the status, history and pipe tests share: two real ``ckptd once`` passes over real
``torch.save`` checkpoints, built once per session (tests that change a ledger work on ``copy_fleet``)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import ckptd
from ckptd.daemon.status import TABLE_WIDEST, terminal_safe
from ckptd.examples import TinyConvNet
from tests.conftest import PYTHON, REPO, subprocess_env
from tests.daemon_helpers import write_config

LONG_RUN = "a-very-long-run-name-" + "x" * 60
EXP_CHECKPOINTS = 20  # w/exp: metric 0.1 + 0.05*i at step 100*(i+1), i = 0..19; top-3 keeps the last three


@dataclass(frozen=True)
class Fleet:
    root: Path
    config: Path

    @property
    def ledger(self) -> Path:
        return self.root / "state" / "ledger.sqlite3"


def _save(path: Path, seed: int, metric: float) -> None:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": TinyConvNet().state_dict(), "metric": metric, "step": seed * 100}, path)


def _once(config: Path) -> None:
    res = ckptd_cli("once", "-c", str(config))
    assert res.returncode == 0, res.stderr[-3000:]


def build_fleet(factory: pytest.TempPathFactory) -> Fleet:
    """Watch ``w`` (top-3): ``exp`` (20 rising checkpoints: 17 evicted), ``broken`` (good, then a rejected file:
    an error), ``healed`` (a rejected file, then a good one: no error), and a run with an 81-character name;
    watch ``v`` (top-2, CoreML export that fails: a 1 s timeout on a factory that does not exist) with ``exp``,
    processed in the second pass, so that a bare ``exp`` is ambiguous."""
    root = factory.getbasetemp() / "status-fleet"
    fleet = Fleet(root, root / "config.yaml")
    if (root / "built").exists():
        return fleet
    shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
    root.mkdir()
    (root / "train2").mkdir()
    coreml = {"enabled": True, "factory": "no_such_module:build", "timeout": "1s",
              "inputs": [{"name": "image", "shape": [1, 3, 8, 8]}]}
    watch = {"runs": "*", "output": str(root / "out/{watch}/{run}"), "settle": "1s", "mode": "events"}
    write_config(root, extra={
        "watches": [{"name": "w", "root": str(root / "train"), **watch},
                    {"name": "v", "root": str(root / "train2"), "policy": "exporting", **watch}],
        "policies": {"default": {"average": {"top_k": 3}},
                     "exporting": {"average": {"top_k": 2}, "export": {"coreml": coreml}}}})
    for i in range(EXP_CHECKPOINTS):
        _save(root / f"train/exp/ep{i:02d}.pt", i + 1, 0.1 + 0.05 * i)
    _save(root / "train/broken/good.pt", 50, 0.3)
    (root / "train/healed").mkdir()
    (root / "train/healed/garbage.pt").write_bytes(b"definitely not a checkpoint" * 100)
    _save(root / "train" / LONG_RUN / "only.pt", 60, 0.4)
    _once(fleet.config)
    (root / "train/broken/garbage.pt").write_bytes(b"definitely not a checkpoint" * 100)
    _save(root / "train/healed/good.pt", 80, 0.5)
    _save(root / "train2/exp/a.pt", 70, 0.6)
    _once(fleet.config)
    (root / "built").touch()
    return fleet


def copy_fleet(fleet: Fleet, dest: Path) -> Path:
    """A private copy of the fleet's ledger, and a config that reads it; returns the config."""
    shutil.copytree(fleet.root / "state", dest / "state")
    cfg = yaml.safe_load(fleet.config.read_text())
    cfg["state_dir"] = str(dest / "state")
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest / "config.yaml"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return build_fleet(tmp_path_factory)


def ckptd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "ckptd.cli", *args], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)



def _status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return ckptd_cli("status", "-c", str(config), *extra)


def _assert_one_clear_error(res: subprocess.CompletedProcess[str], ledger: Path, *words: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "no runs recorded" not in res.stdout, "a damaged ledger must not look like an empty one"
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(ledger) in lines[0], res.stderr
    assert all(w in lines[0] for w in words), lines[0]


def _rows(config: Path, *extra: str) -> list[dict]:
    res = _status(config, "--json", *extra)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {f"{r['watch']}/{r['run']}": r for r in rows}


def test_status_counts_rejected_checkpoints_as_invalid(fleet: Fleet) -> None:
    row = _by_name(_rows(fleet.config))["w/healed"]
    healed = fleet.root / "train/healed"
    assert row["checkpoints"] == {"invalid": 1, "done": 1} and row["invalid"] == 1, row
    assert row["last_invalid"]["source"] == str(healed / "garbage.pt") and row["last_invalid"]["reason"]
    assert row["best"]["source"] == str(healed / "good.pt") and len(row["members"]) == 1
    text = _status(fleet.config, "-v")
    assert text.returncode == 0
    assert "1 invalid" in text.stdout and "invalid   1 rejected; latest garbage.pt" in text.stdout, text.stdout


def test_json_keeps_every_field_and_adds_activity_errors_and_evaluation(fleet: Fleet) -> None:
    rows = _rows(fleet.config)
    assert [(r["watch"], r["run"]) for r in rows] == sorted((r["watch"], r["run"]) for r in rows)  # as before
    old = {"watch", "run", "run_dir", "output", "mode", "best", "members", "checkpoints", "invalid", "last_invalid",
           "last_event", "last_event_at", "last_error", "last_error_at", "export", "stream"}
    new = {"top_k", "last_ok_at", "last_activity_at", "has_error", "evaluation", "holder", "held_since"}
    for row in rows:
        assert set(row) == old | new, set(row) ^ (old | new)
        assert row["evaluation"] is None  # no evaluation recorded in this ledger
        assert row["last_activity_at"] >= max(t for t in (row["last_event_at"], row["last_ok_at"]) if t)
    by = _by_name(rows)
    exp = by["w/exp"]
    assert exp["top_k"] == 3 and [m["metric"] for m in exp["members"]] == pytest.approx([1.05, 1.0, 0.95])
    assert exp["best"]["step"] == 2000 and exp["checkpoints"] == {"done": EXP_CHECKPOINTS}
    assert set(exp["export"] or {}) == set() and by["v/exp"]["top_k"] == 2
    assert {"status", "reason", "source", "metric", "finished_at"} <= set(by["v/exp"]["export"])
    assert by["v/exp"]["export"]["status"] == "failed"
    assert by["v/exp"]["last_error"].startswith("coreml export:")
    # healed: an old rejected file, a newer good one; broken: the reverse
    assert by["w/healed"]["last_invalid"]["at"] < by["w/healed"]["last_ok_at"]
    assert by["w/broken"]["last_invalid"]["at"] > by["w/broken"]["last_ok_at"]
    assert {name for name, r in by.items() if r["has_error"]} == {"v/exp", "w/broken"}


def _table(config: Path, *extra: str) -> list[str]:
    res = _status(config, *extra)
    assert res.returncode == 0 and not res.stderr, res
    return res.stdout.splitlines()


def test_table_has_one_aligned_line_per_run_newest_activity_first(fleet: Fleet) -> None:
    rows = _rows(fleet.config)
    lines = _table(fleet.config)
    header, body = lines[0], lines[1:]
    assert header.split() == ["!", "RUN", "STREAM", "BEST", "STEP", "TOP-K", "SEEN", "LAST", "EVENT", "AGE",
                              "EXPORT"], header
    assert len(body) == len(rows) == 5
    newest_first = [f"{r['watch']}/{r['run']}" for r in sorted(rows, key=lambda r: -r["last_activity_at"])]
    run_col, stream_col = header.index("RUN"), header.index("STREAM")
    names = [line[run_col:stream_col].strip() for line in body]
    width = TABLE_WIDEST["RUN"]
    assert names == [n if len(n) <= width else n[:width - 1] + "…" for n in newest_first], names
    assert all(line[stream_col:stream_col + 5] == "model" for line in body), lines  # columns line up
    assert newest_first[0] == "v/exp"  # the second pass ran its export last
    cells = {line[run_col:stream_col].strip(): line for line in body}
    assert [line[0] for line in body] == ["!" if n in ("v/exp", "w/broken") else " " for n in names]
    exp = cells["w/exp"][stream_col:].split()
    assert exp[:5] == ["model", "1.05", "2000", "3/3", str(EXP_CHECKPOINTS)] and exp[-1] == "-", exp
    assert cells["v/exp"].split()[-1] == "failed" and "export_failed" in cells["v/exp"]
    long_name = next(n for n in names if n.startswith("w/a-very-long"))
    assert len(long_name) == width and long_name.endswith("…") and len(f"w/{LONG_RUN}") > width
    assert max(map(len, lines)) < 120 and all(line == line.rstrip() for line in lines)


def test_filters_apply_to_the_table_and_to_json(fleet: Fleet) -> None:
    def names(*extra: str) -> list[str]:
        return sorted(_by_name(_rows(fleet.config, *extra)))

    assert names("--run", "exp") == ["v/exp", "w/exp"]  # the run name
    assert names("--run", "w/*") == sorted(["w/broken", "w/exp", "w/healed", f"w/{LONG_RUN}"])  # or watch/run
    assert names("--watch", "v") == ["v/exp"]
    assert names("--errors") == ["v/exp", "w/broken"]
    assert names("--errors", "--watch", "w") == ["w/broken"]
    assert names("--run", "nothing*") == []
    table = _table(fleet.config, "--errors")
    assert len(table) == 3 and all(line.startswith("!") for line in table[1:]), table
    assert _table(fleet.config, "--run", "w/e*", "-v")[0] == "w/exp  (max)"
    empty = _table(fleet.config, "--run", "nothing*", "--errors")
    assert empty == ["no runs with errors matching --run 'nothing*' (5 recorded; plain `ckptd status` lists them "
                     "all)"], empty
    assert _table(fleet.config, "--watch", "nope") == [
        "no runs match --watch 'nope' (5 recorded; plain `ckptd status` lists them all)"]


def test_verbose_keeps_the_block_per_run(fleet: Fleet) -> None:
    text = "\n".join(_table(fleet.config, "-v"))
    blocks = text.split("\n" + "w/")[0]  # newest first: v/exp's block leads
    assert blocks.startswith("v/exp  (max)\n  best      0.6 from a.pt (step 7000)\n"), text
    assert "  coreml    failed: " in blocks and "  error     coreml export: " in blocks
    assert "w/exp  (max)\n  best      1.05 from ep19.pt (step 2000)\n  top-k     3 member(s): 1.05, 1, 0.95\n" \
           f"  seen      {EXP_CHECKPOINTS} done\n" in text, text
    assert "  eval " not in text


def test_no_ledger_yet_is_not_an_error(tmp_path: Path) -> None:
    res = _status(write_config(tmp_path))
    assert res.returncode == 0 and "no runs recorded yet" in res.stdout, res


def test_corrupt_ledger_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.parent.mkdir()
    ledger.write_bytes(b"\x13\x37 garbage, not SQLite " * 500)
    _assert_one_clear_error(_status(config), ledger, "not a database")


def test_unopenable_ledger_is_a_clear_error(tmp_path: Path) -> None:
    """The ledger path exists but cannot be opened (a directory here: tests run as root, so permission bits
    could not make a file unreadable)."""
    config = write_config(tmp_path)
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.mkdir(parents=True)
    _assert_one_clear_error(_status(config, "--json"), ledger, "not a regular file")


def test_foreign_sqlite_file_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.parent.mkdir()
    with sqlite3.connect(ledger) as db:
        db.execute("CREATE TABLE something_else (x)")
    _assert_one_clear_error(_status(config), ledger, "not a ckptd ledger")


@pytest.mark.slow
def test_locked_ledger_is_a_clear_error(tmp_path: Path, fleet: Fleet) -> None:
    """Another process holds the ledger exclusively (locking_mode=EXCLUSIVE, which shuts out WAL readers too)."""
    config = copy_fleet(fleet, tmp_path)
    ledger = tmp_path / "state" / "ledger.sqlite3"
    holder = sqlite3.connect(ledger, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE runs SET last_event = last_event")
        _assert_one_clear_error(_status(config), ledger, "locked")
    finally:
        holder.close()
    assert _status(config).returncode == 0  # and fine again once the lock is gone


def test_ledger_that_is_a_dangling_symlink_is_a_clear_error(tmp_path: Path) -> None:
    """A symlink to a moved or unmounted ledger is not "no runs recorded yet"."""
    config = write_config(tmp_path)
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.parent.mkdir()
    ledger.symlink_to(tmp_path / "elsewhere" / "ledger.sqlite3")
    for res in (_status(config), _status(config, "--json"), ckptd_cli("history", "w/exp", "-c", str(config))):
        _assert_one_clear_error(res, ledger, "is a symlink to a missing file", str(tmp_path / "elsewhere"))
        assert not res.stdout, res.stdout


def _unprivileged_main(args: list[str]) -> tuple[int, str, str]:
    """``main(args)`` as a user who is not the state dir's owner: as root, in a forked child that drops to uid and
    gid 65534 (nobody; the interpreter need not be reachable by that user: everything is already imported);
    otherwise in a subprocess as ourselves. Returns (exit status, stdout, stderr); an escaped exception is a
    failure whose traceback is in stderr."""
    if os.geteuid() != 0:
        res = ckptd_cli(*args)
        return res.returncode, res.stdout, res.stderr
    import io

    # imported before the fork: the child may not be able to read the sources
    import ckptd.cli
    import ckptd.cli_daemon
    import ckptd.daemon.config
    import ckptd.daemon.history

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        report: dict = {"rc": 99, "out": "", "err": ""}
        out, err = io.StringIO(), io.StringIO()
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stdout, sys.stderr = out, err
            report["rc"] = ckptd.cli.main(args)
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            err.write("escaped main():\n" + traceback.format_exc())
        finally:
            report.update(out=out.getvalue(), err=err.getvalue())
            os.write(write, json.dumps(report).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    report = json.loads(data)
    return report["rc"], report["out"], report["err"]


def test_state_dir_that_cannot_be_entered_is_a_clear_error(fleet: Fleet) -> None:
    """`chmod 750 state`, then `ckptd status` as another user: Path.exists() raises PermissionError (not "no
    such file"); that is an error naming the ledger and what to check (exit 1), not a traceback."""
    base = Path(tempfile.mkdtemp(prefix="ckptd-perm-"))  # not under pytest's 0700 tmp: the other user reads it
    try:
        base.chmod(0o755)
        config = copy_fleet(fleet, base)
        cfg = yaml.safe_load(config.read_text())
        for i, watch in enumerate(cfg["watches"]):  # roots the other user can see: only the state dir is shut
            watch["root"] = str(base / f"train{i}")
            (base / f"train{i}").mkdir(mode=0o755)
        config.write_text(yaml.safe_dump(cfg))
        config.chmod(0o644)
        state = base / "state"
        state.chmod(0o750 if os.geteuid() == 0 else 0o000)
        ledger = state / "ledger.sqlite3"
        for args in (["status", "-c", str(config)], ["status", "-c", str(config), "--json"],
                     ["history", "w/exp", "-c", str(config)]):
            rc, out, err = _unprivileged_main(args)
            assert rc == 1 and not out, (args, rc, out, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert str(ledger) in err and "Permission denied" in err, err
            assert "check its permissions and those of its directory" in err, err
    finally:
        (base / "state").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_status_and_history_answer_while_a_watch_root_is_missing(tmp_path: Path, fleet: Fleet) -> None:
    """An unmounted share: the read-only commands read the ledger, not the watch roots; `check` (like `run`)
    still refuses, and a structural config error still stops status (exit 2)."""
    config = copy_fleet(fleet, tmp_path)
    cfg = yaml.safe_load(config.read_text())
    for i, watch in enumerate(cfg["watches"]):
        watch["root"] = str(tmp_path / "nfs" / f"unmounted{i}")
    config.write_text(yaml.safe_dump(cfg))
    assert len(_rows(config)) == 5
    assert len(_table(config)) == 6 and _table(config, "-v")[0] == "v/exp  (max)"
    history = ckptd_cli("history", "w/exp", "-c", str(config))
    assert history.returncode == 0 and len(history.stdout.splitlines()) == EXP_CHECKPOINTS + 2, history
    check = ckptd_cli("check", "-c", str(config))
    assert check.returncode == 2 and f"directory {tmp_path / 'nfs' / 'unmounted0'} does not exist" in check.stderr
    cfg["watches"][0]["root"] = "relative/root"
    cfg["watches"][1]["bogus_key"] = 1
    config.write_text(yaml.safe_dump(cfg))
    for res in (_status(config), ckptd_cli("history", "w/exp", "-c", str(config))):
        assert res.returncode == 2 and not res.stdout, res
        assert "watches[0].root: must be an absolute path" in res.stderr and "bogus_key" in res.stderr, res.stderr
        assert "does not exist" not in res.stderr, res.stderr


BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def raw_controls(text: str) -> list[str]:
    """What a terminal would act on, left in ``text``: control characters other than the line ends, and the
    bidi controls."""
    return [c for c in text if (unicodedata.category(c) == "Cc" and c != "\n") or c in BIDI]


def test_terminal_safe_escapes_controls_and_bidi_and_keeps_everything_else() -> None:
    assert terminal_safe("\x1b[2J") == "\\x1b[2J"
    assert terminal_safe("\x1b]52;c;aGk=\x07") == "\\x1b]52;c;aGk=\\x07"
    assert terminal_safe("a\nb\tc\rd\x00\x7f\x85\x9b") == "a\\nb\\tc\\rd\\x00\\x7f\\x85\\x9b"
    assert terminal_safe("\u202egnp.exe") == "\\u202egnp.exe"
    assert terminal_safe(BIDI) == "".join(f"\\u{ord(c):04x}" for c in BIDI)
    every_control = "".join(map(chr, (*range(0x20), *range(0x7F, 0xA0))))
    assert raw_controls(terminal_safe(every_control + BIDI + "\u2028\u2029")) == []
    kept = "ep01 café 学習 ∑ — … \\x1b 😀 ~!@#$%^&*()[]{}"
    assert terminal_safe(kept) == kept
    assert terminal_safe("\udcff") == "\\udcff"  # an undecodable file-name byte: printable on any terminal
    assert terminal_safe(None) == "None" and terminal_safe(1.5) == "1.5"


HOSTILE_RUN = "bro\x1b[2Jken\u202e"  # clear screen; right-to-left override
CLIPBOARD = "\x1b]52;c;aGk=\x07"  # OSC 52: sets the operator's clipboard
HOSTILE_FILE = f"ev{CLIPBOARD}il\u202egnp.pt"
HOSTILE_REASON = f"refused to unpickle: it needs globals os.system{CLIPBOARD}\u2066\x9b31m,\nposix.system\x08\x08"


def hostile_ledger(fleet: Fleet, dest: Path) -> Path:
    """A copy of the fleet whose run ``w/broken`` carries what a hostile trainer controls: its run directory's
    name, its file names and the reasons that echo them (pickle global names in a refusal). Returns the config."""
    config = copy_fleet(fleet, dest)
    with sqlite3.connect(dest / "state" / "ledger.sqlite3") as db:
        for table in ("runs", "checkpoints", "members", "exports"):
            db.execute(f"UPDATE {table} SET run=? WHERE watch='w' AND run='broken'", (HOSTILE_RUN,))
        db.execute("UPDATE checkpoints SET path=?, reason=? WHERE run=? AND status='invalid'",
                   (str(fleet.root / "train" / HOSTILE_RUN / HOSTILE_FILE), HOSTILE_REASON, HOSTILE_RUN))
        db.execute("UPDATE runs SET last_error=?, last_error_at=?, output=? WHERE run=?",
                   (f"{HOSTILE_FILE}: {HOSTILE_REASON}", time.time(), f"/srv/out/{HOSTILE_RUN}", HOSTILE_RUN))
    return config


def test_status_views_escape_what_a_hostile_trainer_controls(tmp_path: Path, fleet: Fleet) -> None:
    """Run and file names and reasons reach the operator's terminal as visible escapes, in the table, the -v
    block, the filtered views and the error messages; --json keeps the data as it is (json.dumps escapes it)."""
    config = hostile_ledger(fleet, tmp_path)
    table = _status(config)
    verbose = _status(config, "-v")
    errors = _status(config, "--errors", "-v")
    for res in (table, verbose, errors):
        assert res.returncode == 0 and not res.stderr, res
        assert raw_controls(res.stdout) == [], res.stdout
    assert len(table.stdout.splitlines()) == 6  # one line per run: a newline in a field does not add one
    assert "w/bro\\x1b[2Jken\\u202e" in table.stdout
    block = verbose.stdout.split("w/bro\\x1b[2Jken\\u202e  (max)\n", 1)[1].split("\n\n")[0]
    assert f"latest {terminal_safe(HOSTILE_FILE)}: {terminal_safe(HOSTILE_REASON)}" in block, block
    assert "\\x1b]52;c;aGk=\\x07" in block and "\\x9b31m,\\nposix.system\\x08\\x08" in block
    assert "  output    /srv/out/bro\\x1b[2Jken\\u202e" in block, block
    rows = _by_name(_rows(config))
    assert rows[f"w/{HOSTILE_RUN}"]["last_invalid"]["reason"] == HOSTILE_REASON  # JSON: the data, unchanged
    assert rows[f"w/{HOSTILE_RUN}"]["last_invalid"]["source"].endswith(HOSTILE_FILE)
    # a run name from the ledger, quoted in an error message (a close match to a mistyped name)
    typo = ckptd_cli("history", "w/bro\x1b[2Jkem\u202e", "-c", str(config))
    assert typo.returncode == 1 and "did you mean w/bro\\x1b[2Jken\\u202e" in typo.stderr, typo.stderr
    assert raw_controls(typo.stderr) == [], typo.stderr


def test_check_and_explain_escape_hostile_run_and_file_names(tmp_path: Path) -> None:
    """A file name a trainer chose (in a run `check --explain` explains) and a run directory name (`check` lists
    it as skipped: such a name cannot be used in an output path) reach the terminal as visible escapes."""
    config = write_config(tmp_path)
    (tmp_path / "train" / "ru\x1b]52;c;eA==\x07n\u202e").mkdir(parents=True)
    (tmp_path / "train" / "exp").mkdir()
    (tmp_path / "train" / "exp" / "\u202eevil\x1b[2J.pt").write_bytes(b"not a checkpoint" * 64)
    check = ckptd_cli("check", "-c", str(config))
    explain = ckptd_cli("check", "-c", str(config), "--explain")
    for res in (check, explain):
        assert res.returncode == 1 and "Traceback" not in res.stderr, res  # the skipped run: exit 1
        assert raw_controls(res.stdout) == [], res.stdout
        assert "ru\\x1b]52;c;eA==\\x07n\\u202e" in res.stdout and "SKIPPED" in res.stdout, res.stdout
    assert "    \\u202eevil\\x1b[2J.pt: NOT USABLE: " in explain.stdout, explain.stdout


def test_status_read_model_does_not_import_torch() -> None:
    code = ("import sys, ckptd.cli, ckptd.cli_daemon, ckptd.daemon.status, ckptd.daemon.history; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert res.returncode == 0, res.stderr


def test_status_history_and_check_commands_do_not_import_torch_or_coremltools(fleet: Fleet) -> None:
    """Over a real ledger, every view: the table, -v, filtered JSON, history as text and JSON, check."""
    code = ("import sys; from ckptd.cli import main; c = sys.argv[1]; "
            "rc = [main(['check', '-c', c]), main(['status', '-c', c]), main(['status', '-c', c, '-v']), "
            "main(['status', '-c', c, '--json', '--errors', '--run', '*']), main(['history', 'w/exp', '-c', c]), "
            "main(['history', 'exp', '--watch', 'v', '-c', c, '--json'])]; "
            "assert rc == [0] * 6, rc; heavy = {'torch', 'coremltools'} & set(sys.modules); "
            "assert not heavy, f'imported {heavy}'")
    res = subprocess.run([PYTHON, "-c", code, str(fleet.config)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "w/exp  stream model  (max)" in res.stdout and '"status": "failed"' in res.stdout  # they did read it


def test_example_config_ships_in_the_package_and_the_demo_reads_it() -> None:
    package_copy = Path(ckptd.__file__).resolve().parent / "config.example.yaml"
    assert package_copy.read_bytes() == (REPO / "config.example.yaml").read_bytes(), (
        "ckptd/config.example.yaml (canonical, shipped) and the top-level config.example.yaml (the documented "
        "contract) differ: edit the package copy and copy it over the top-level one")
    from ckptd import demo

    assert Path(demo.EXAMPLE_CONFIG).resolve() == package_copy


@pytest.mark.slow
def test_wheel_install_has_the_example_config_for_the_demo(tmp_path: Path) -> None:
    """Build a real wheel from the source tree (offline, no build isolation), install it into a bare directory,
    and load the demo's config there: no repo checkout is reachable."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "ckptd", src / "ckptd", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel offline here: {built.stderr.strip()[-300:]}")
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("ckptd-*.whl"))
    assert "ckptd/config.example.yaml" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); import ckptd.demo as d; "
            "assert d.EXAMPLE_CONFIG.is_file() and str(d.EXAMPLE_CONFIG).startswith(sys.argv[1]), d.EXAMPLE_CONFIG; "
            "cfg = d.demo_config(pathlib.Path(sys.argv[2]), False); "
            "assert cfg['policies']['default']['weights']['key'] == 'auto', cfg")
    res = subprocess.run([PYTHON, "-c", code, str(target), str(tmp_path / "demo")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
