"""`ckptd status` and what ships with the package: real ledgers written by `ckptd once`, real damaged ledgers,
a real wheel built from the source tree."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import ckptd
from tests.conftest import PYTHON, REPO, subprocess_env
from tests.daemon_helpers import make_run, write_config


def _ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "ckptd.cli", *args], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)


def _status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _ckptd("status", "-c", str(config), *extra)


def _assert_one_clear_error(res: subprocess.CompletedProcess[str], ledger: Path, *words: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "no runs recorded" not in res.stdout, "a damaged ledger must not look like an empty one"
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(ledger) in lines[0], res.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.slow
def test_status_counts_rejected_checkpoints_as_invalid(tmp_path: Path, tiny) -> None:
    config = write_config(tmp_path)
    run = make_run(tmp_path)
    torch.save({"model_state_dict": tiny(seed=1).state_dict(), "metric": 0.5}, run / "good.pt")
    (run / "garbage.pt").write_bytes(b"definitely not a checkpoint" * 100)
    res = _ckptd("once", "-c", str(config))
    assert res.returncode == 0, res.stderr  # a rejected checkpoint is data, not a failure
    rows = json.loads(_status(config, "--json").stdout)
    assert len(rows) == 1 and rows[0]["run"] == "exp"
    row = rows[0]
    assert row["checkpoints"].get("invalid") == 1 and row["invalid"] == 1, row
    assert row["last_invalid"]["source"] == str(run / "garbage.pt") and row["last_invalid"]["reason"]
    assert row["best"]["source"] == str(run / "good.pt") and len(row["members"]) == 1
    text = _status(config)
    assert text.returncode == 0
    assert "1 invalid" in text.stdout and "invalid   1 rejected; latest garbage.pt" in text.stdout, text.stdout


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
def test_locked_ledger_is_a_clear_error(tmp_path: Path, tiny) -> None:
    """Another process holds the ledger exclusively (locking_mode=EXCLUSIVE, which shuts out WAL readers too)."""
    config = write_config(tmp_path)
    run = make_run(tmp_path)
    torch.save({"model_state_dict": tiny(seed=1).state_dict(), "metric": 0.5}, run / "good.pt")
    assert _ckptd("once", "-c", str(config)).returncode == 0
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


def test_status_read_model_does_not_import_torch() -> None:
    code = ("import sys, ckptd.cli, ckptd.cli_daemon, ckptd.daemon.status; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert res.returncode == 0, res.stderr


def test_status_and_check_commands_do_not_import_torch(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code = ("import sys; from ckptd.cli import main; rc = [main(['check', '-c', sys.argv[1]]), "
            "main(['status', '-c', sys.argv[1]])]; assert rc == [0, 0], rc; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([PYTHON, "-c", code, str(config)], capture_output=True, text=True, env=subprocess_env(),
                         timeout=60)
    assert res.returncode == 0, res.stderr


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
