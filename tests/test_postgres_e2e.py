"""The daemon on a PostgreSQL catalog, end to end: files dropped in the inbox register, reach both
folder remotes, `ls`/`info`/`get` answer, and a restart keeps everything; the server going away
for a while loses nothing (ingest waits with the files in the inbox, status says why, and
everything resumes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon, wait_for
from postgres import PostgresServer, start_server, CI

pytestmark = pytest.mark.e2e


def drop(d: Daemon, files: dict[str, bytes]) -> dict[str, str]:
    """Write files into the inbox (written aside, then renamed in); name -> hash."""
    for name, data in files.items():
        tmp = d.root / f".{name}.part"
        tmp.write_bytes(data)
        os.rename(tmp, d.inbox / name)
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def registered(d: Daemon, hashes: dict[str, str], copies: int = 0) -> bool:
    files = {f["hash"]: f for f in d.files()}
    return all(h in files and len(files[h]["copies"]) >= copies for h in hashes.values())


def test_a_daemon_on_postgresql_stores_lists_serves_and_restarts(daemon_factory, postgres_url: str,
                                                                   workdir: Path) -> None:
    d = daemon_factory(catalog=postgres_url, upload={"redundancy": 2, "min_redundancy": 1})
    files = {f"f{i}.bin": os.urandom(1000 + i) for i in range(20)}
    files["caf\xe9.txt"] = b"latin"
    hashes = drop(d, files)
    wait_for(lambda: registered(d, hashes, copies=2), timeout=60, message="20 files with 2 copies each")
    assert not any(d.inbox.iterdir())
    for remote in ("r0", "r1"):  # each file sent once to each remote
        stored = [p for p in (workdir / "remotes" / remote).rglob("*") if p.is_file()]
        assert len(stored) == len(files)
    listed = json.loads(d.ctl("ls", "--json").stdout)
    assert {f["hash"] for f in listed} == set(hashes.values())
    glob = json.loads(d.ctl("ls", "--json", "--name", "caf?.txt").stdout)
    assert [f["hash"] for f in glob] == [hashes["caf\xe9.txt"]]
    h = hashes["f3.bin"]
    info = json.loads(d.ctl("info", "--json", h[:10]).stdout)
    assert info["hash"] == h and info["size"] == 1003
    out = workdir / "got.bin"
    result = d.ctl("get", h, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == files["f3.bin"]
    assert d.stop() == 0

    d.start()
    assert registered(d, hashes, copies=2)
    assert {f["hash"] for f in d.files()} == set(hashes.values())
    assert d.stop() == 0


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, to stop and start under a running daemon."""
    try:
        server = start_server()
    except RuntimeError as exc:
        if CI:
            pytest.fail(f"PostgreSQL for the tests: {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL for the tests: {exc}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def test_postgresql_going_away_loses_nothing(daemon_factory, own_server: PostgresServer) -> None:
    url = own_server.create_database()
    d = daemon_factory(catalog=url, upload={"redundancy": 2})
    before = drop(d, {f"a{i}": os.urandom(500) for i in range(5)})
    wait_for(lambda: registered(d, before, copies=1), timeout=60, message="the first files")

    own_server.stop("fast")
    during = drop(d, {f"b{i}": os.urandom(500) for i in range(5)})
    # ingest waits: the files stay in the inbox, status (served without the catalog's counts) says why
    def outage_reported() -> list[str]:
        return [p for p in d.status()["problems"] if p.startswith("catalog unreachable: ")]
    line = wait_for(outage_reported, timeout=60, message="status saying the catalog is unreachable")[0]
    assert f"127.0.0.1:{own_server.port}" in line and "\n" not in line
    summary = d.ctl("status")
    assert summary.returncode == 0 and b"catalog unreachable" in summary.stdout
    assert {p.name for p in d.inbox.iterdir()} >= set(during)
    assert d.proc.poll() is None  # only waiting: not dead, not killed

    own_server.start()
    wait_for(lambda: registered(d, {**before, **during}, copies=1), timeout=90,
             message="every file registered after the outage")
    assert not any(d.inbox.iterdir())
    assert len(d.files()) == 10
    for remote in ("r0", "r1"):  # each file once on each remote: nothing sent twice
        assert len([p for p in (d.root / "remotes" / remote).rglob("*") if p.is_file()]) == 10
    # the health check waited the outage out: no loop was taken for stuck, no watchdog ping withheld
    assert "no more watchdog pings" not in d.log() and "Traceback" not in d.log()
    assert d.stop() == 0


def test_the_python_api_on_a_postgresql_catalog(postgres_url: str, workdir: Path) -> None:
    from cloudmanagerd import CloudManager
    remotes = []
    for name in ("a", "b"):
        (workdir / name).mkdir()
        remotes.append({"name": name, "type": "directory", "path": str(workdir / name)})
    (workdir / "f.txt").write_bytes(b"on postgres\n" * 50)
    with CloudManager(postgres_url, str(workdir / "store"), 10_000, remotes=remotes) as cm:
        h = cm.upload(str(workdir / "f.txt"))
        assert h == hashlib.sha256(b"on postgres\n" * 50).hexdigest()
        assert cm.upload_queue_info() == {"size": 600, "count": 1}
        assert cm.cloud_sync() == 2
        assert cm.upload_queue_info() == {"size": 0, "count": 0}
        assert {u["host_name"] for u in cm.info(h)["uploads"]} == {"a", "b"}
        assert cm.total_incoming() == 600 and cm.total_outgoing() == 1200
    # another process's view (a second CloudManager, another cache): the file is known and fetched
    with CloudManager(postgres_url, str(workdir / "store2"), 10_000, remotes=remotes) as other:
        assert other.exists(h) and not other.on_cache(h)
        assert Path(other.warm_up(h)).read_bytes() == b"on postgres\n" * 50
