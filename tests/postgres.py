"""A real PostgreSQL server for the tests: Debian's `postgresql` package, a throw-away cluster in a
temp folder, listening on 127.0.0.1 at a free port (and a socket in that folder, never /run).

`postgres_server` (session-scoped) starts it once; `postgres_url` makes a fresh database per test
and yields its URL. initdb refuses to run as root, so as root the cluster belongs to the
`postgres` user (runuser). Under CI=true a server that cannot start fails the test; elsewhere the
test is skipped with the reason.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

CI = os.environ.get("CI") == "true"


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"PostgreSQL for the tests: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL for the tests: {reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    bindir: str
    root: str
    port: int
    user: str
    fsync: bool
    _names: Iterator[int] = itertools.count(1)

    @property
    def datadir(self) -> str:
        return os.path.join(self.root, "data")

    def _as_owner(self, *argv: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", self.user, "--", *argv]
        return list(argv)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200 "
                   f"-c fsync={'on' if self.fsync else 'off'} "
                   f"-c synchronous_commit={'on' if self.fsync else 'off'} -c full_page_writes=off")
        subprocess.run(self._as_owner(os.path.join(self.bindir, "pg_ctl"), "start", "-w", "-t", "60",
                                      "-D", self.datadir, "-l", os.path.join(self.root, "log"), "-o", options),
                       check=True, capture_output=True, text=True)

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(self._as_owner(os.path.join(self.bindir, "pg_ctl"), "stop", "-w", "-m", mode,
                                      "-D", self.datadir), capture_output=True, text=True)

    def create_database(self) -> str:
        """A new empty database (UTF8, C collation); its URL."""
        import psycopg
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING UTF8 LC_COLLATE \'C\' '
                         "LC_CTYPE 'C'")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg
        name = url.rsplit("/", 1)[1]
        try:
            with psycopg.connect(self.url(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            pass  # a stopped server: the cluster goes with its folder


def find_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def start_server(fsync: bool = False) -> PostgresServer:
    """A new cluster, started; the caller stops it and removes `root`."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)")
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    root = tempfile.mkdtemp(prefix="cm-pg-")
    server = PostgresServer(bindir, root, _free_port(), user, fsync)
    try:
        if os.geteuid() == 0:
            shutil.chown(root, user, user)
        os.chmod(root, 0o755)
        subprocess.run(server._as_owner(os.path.join(bindir, "initdb"), "-D", server.datadir, "-U", user,
                                        "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"),
                       check=True, capture_output=True, text=True)
        server.start()
    except (OSError, subprocess.CalledProcessError, KeyError, LookupError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"{exc} {detail.strip()[-500:]}") from None
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = start_server()
    except RuntimeError as exc:
        _unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database for one test."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
