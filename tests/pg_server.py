"""A real PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a temporary directory, TCP on a free 127.0.0.1 port.

Session-wide: one server (per xdist worker); each test that asks for ``pg_url`` gets its own fresh database, dropped
afterwards, so tests stay independent. Tests run as root in CI and ``initdb`` refuses root, so the server runs as an
unprivileged user (``postgres`` when it exists, else ``nobody``) that owns the data and socket directories.

Roles: the superuser ``ckptd`` logs in with ``trust`` (the URL carries no password); ``ckptd_pw`` (password
``PW_PASSWORD``) must authenticate with a password (scram), for tests of password handling and redaction.

No server (no binaries, no psycopg, initdb/pg_ctl failing): the tests skip with the reason, unless
``CKPTD_REQUIRE_PG=1`` (set by ``.ci/run``), where they fail: CI must not skip them.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SUPERUSER = "ckptd"
PW_USER = "ckptd_pw"
PW_PASSWORD = "s3cret-pw"  # a throwaway test server's password
_COUNTER = itertools.count()


@dataclass
class PgServer:
    host: str
    port: int
    bindir: Path
    datadir: Path

    def url(self, dbname: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> Any:
        """A new psycopg connection (autocommit) to ``dbname`` as the superuser: a second client in tests."""
        return connect(self.url(dbname), **kwargs)

    def create_database(self) -> str:
        name = f"ckptd_test_{os.getpid()}_{next(_COUNTER)}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def connect(url: str, **kwargs: Any) -> Any:
    """A psycopg connection in autocommit mode (what a test uses as an independent second client)."""
    import psycopg

    return psycopg.connect(url, autocommit=True, **kwargs)


def _unavailable(reason: str) -> None:
    if os.environ.get("CKPTD_REQUIRE_PG") == "1":
        pytest.fail(f"PostgreSQL is required here (CKPTD_REQUIRE_PG=1) but {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL server for the tests: {reason}")


def find_bindir() -> Path | None:
    """Where initdb/pg_ctl live: ``pg_config --bindir``, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (subprocess.SubprocessError, OSError):
            pass
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                      if Path(p).parent.name.isdigit() else 0, reverse=True)
    candidates += [Path(p) for p in versions]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)  # type: ignore[arg-type]
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _run_as() -> tuple[int, int] | None:
    """The (uid, gid) to run the server as: None when not root (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cmd(args: list[str], ids: tuple[int, int] | None, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    kwargs: dict[str, Any] = {}
    if ids is not None:
        kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def _start(bindir: Path, tmp: Path, ids: tuple[int, int] | None) -> PgServer:
    datadir, sockdir = tmp / "data", tmp / "sock"
    sockdir.mkdir()
    if ids is not None:
        for path in (tmp, sockdir):
            os.chown(path, *ids)
    os.chmod(tmp, 0o700)
    init = _cmd([str(bindir / "initdb"), "-D", str(datadir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                 "--locale=C", "--no-sync"], ids, tmp, timeout=120)
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed ({init.returncode}): {(init.stderr or init.stdout).strip()[-800:]}")
    # password role first (scram), then everyone else on loopback by trust
    (datadir / "pg_hba.conf").write_text(
        f"local all all trust\n"
        f"host all {PW_USER} 127.0.0.1/32 scram-sha-256\n"
        f"host all all 127.0.0.1/32 trust\n")
    last = ""
    for _ in range(3):  # the free port may be taken between probing and binding: retry on another
        port = _free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sockdir} -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
        start = _cmd([str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(tmp / "server.log"), "-w", "-t", "60",
                      "-o", opts, "start"], ids, tmp, timeout=90)
        if start.returncode == 0:
            server = PgServer("127.0.0.1", port, bindir, datadir)
            with server.connect() as conn:
                conn.execute(f"CREATE ROLE {PW_USER} LOGIN CREATEDB PASSWORD '{PW_PASSWORD}'")
            return server
        log = (tmp / "server.log").read_text(errors="replace") if (tmp / "server.log").exists() else ""
        last = f"pg_ctl start failed ({start.returncode}): {(start.stderr or start.stdout).strip()} {log[-800:]}"
    raise RuntimeError(last)


def _stop(server: PgServer, ids: tuple[int, int] | None, tmp: Path) -> None:
    _cmd([str(server.bindir / "pg_ctl"), "-D", str(server.datadir), "-m", "immediate", "-w", "stop"], ids, tmp)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session (see the module docstring)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[test]')")
    bindir = find_bindir()
    if bindir is None:
        _unavailable("initdb/pg_ctl not found (pg_config --bindir, /usr/lib/postgresql/*/bin, PATH): "
                     "install the Debian package postgresql")
    assert bindir is not None
    ids = _run_as()
    if os.geteuid() == 0 and ids is None:
        _unavailable("running as root and neither a 'postgres' nor a 'nobody' user exists to run the server as")
    # run as another user: under /tmp, which every user may enter (a TMPDIR under /root may not be)
    tmp = Path(tempfile.mkdtemp(prefix="ckptd-pg-", dir="/tmp" if ids is not None else None))
    try:
        server = _start(bindir, tmp, ids)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _unavailable(f"could not start it: {exc}")
        raise  # unreachable (skip/fail raise)
    try:
        yield server
    finally:
        _stop(server, ids, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database for this test: ``postgresql://ckptd@127.0.0.1:PORT/NAME`` (trust auth, no password)."""
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)
