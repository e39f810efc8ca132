"""The catalog as a hostile operator meets it (issue 10, items 8 and 13): damaged pages, garbage
written over it while the daemon runs, a schema version that is not a number, the meta row gone,
a file the daemon's user may not write. Each is one line naming the file and what to do, exit 1,
no traceback; a damage found while running stops the daemon (never runs on)."""

from __future__ import annotations

import os
import pwd
import sqlite3
from pathlib import Path

import pytest

from cloudmanagerd.catalog import SCHEMA_VERSION, Catalog
from conftest import Daemon, wait_for

from .tmpfs import fill, tmpfs

PAGE = 4096


def catalog_path(d: Daemon) -> Path:
    return Path(d.config["state"]) / "catalog.sqlite3"


def daemon_with_files(daemon_factory, n: int = 30) -> Daemon:
    d = daemon_factory()
    for i in range(n):
        (d.inbox / f"f{i:03}.txt").write_bytes(f"file {i}\n".encode() * 50)
    wait_for(lambda: d.status()["catalog"]["files"] == n, message=f"{n} files registered")
    return d


def refused(d: Daemon) -> list[str]:
    """Start the daemon, expect exit 1; its ERROR lines."""
    d.start(wait=False)
    assert d.proc.wait(60) == 1, d.log()[-3000:]
    d._close_log()
    log = d.log()
    assert "Traceback" not in log, log[-3000:]
    return [line for line in log.splitlines() if " ERROR " in line]


def one_error_since(d: Daemon, mark: int) -> str:
    errors = [line for line in d.log()[mark:].splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_catalog_with_four_pages_overwritten_is_refused_at_start(daemon_factory) -> None:
    d = daemon_with_files(daemon_factory, 200)
    assert d.stop() == 0
    path = catalog_path(d)
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    pages = path.stat().st_size // PAGE
    assert pages >= 6, pages
    with open(path, "r+b") as f:
        for page in (2, 3, pages - 2, pages - 1):  # not page 1: the header stays valid
            f.seek(page * PAGE)
            f.write(os.urandom(PAGE))
    mark = len(d.log())
    errors = refused(d)
    line = one_error_since(d, mark)
    assert errors[-1] == line
    assert str(path) in line and "damaged" in line
    assert "cloudmanagerctl backup" in line and ".recover" in line, line


@pytest.mark.parametrize("how", ["overwritten", "renamed-over", "deleted"])
def test_garbage_over_the_catalog_while_running_stops_the_daemon(daemon_factory, how: str) -> None:
    d = daemon_with_files(daemon_factory, 20)
    path = catalog_path(d)
    mark = len(d.log())
    # everything into the main file first (the WAL would otherwise still serve the pages)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    finally:
        conn.close()
    size = path.stat().st_size
    if how == "overwritten":
        with open(path, "r+b") as f:  # every page, the header too: what `dd` or a bad restore does
            f.write(os.urandom(max(size, 8 * PAGE)))
    elif how == "renamed-over":  # open connections keep the old file, new ones meet this one
        garbage = path.with_name("garbage")
        garbage.write_bytes(os.urandom(max(size, 8 * PAGE)))
        garbage.rename(path)
    else:  # open connections would write on into a file nobody opens again
        path.unlink()
    if how == "overwritten":  # found by the next query that reads the file (a client's fresh connection)
        assert d.ctl("ls").returncode != 0
    assert d.proc.wait(30) == 1, "the daemon must stop (exit 1), not run on"
    d._close_log()
    log = d.log()[mark:]
    stops = [line for line in log.splitlines() if "stopping: catalog" in line]
    assert len(stops) == 1 and str(path) in stops[0] and "damaged" in stops[0], log[-3000:]
    assert "cloudmanagerctl backup" in stops[0]
    assert "Traceback" not in log, log[-3000:]


def _edit(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("sql, words", [
    ("UPDATE meta SET value='banana' WHERE key='schema_version'", ["'banana'", "not a number"]),
    ("DELETE FROM meta WHERE key='schema_version'", ["no schema_version row"]),
], ids=["banana", "meta-row-deleted"])
def test_a_catalog_whose_version_cannot_be_told_is_one_line(daemon_factory, sql: str, words: list[str]) -> None:
    d = daemon_with_files(daemon_factory, 3)
    assert d.stop() == 0
    path = catalog_path(d)
    _edit(path, sql)
    mark = len(d.log())
    refused(d)
    line = one_error_since(d, mark)
    assert str(path) in line and all(w in line for w in words), line
    assert "INSERT OR REPLACE INTO meta" in line and "cloudmanagerctl backup" in line, line
    # and nothing was changed by the refused start: the operator's fix still applies
    _edit(path, f"INSERT OR REPLACE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}')")
    d.start()
    assert d.status()["catalog"]["files"] == 3


def test_a_read_only_catalog_is_one_line_as_an_unprivileged_daemon(daemon_factory, workdir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    base = workdir / "nb"
    base.mkdir(mode=0o755)
    d = daemon_factory(user="nobody", start=False, root=base)
    for folder, dirs, files in os.walk(base):
        for name in [folder] + [os.path.join(folder, x) for x in dirs + files]:
            os.chown(name, nobody.pw_uid, nobody.pw_gid)
    d.start()
    (d.inbox / "a.txt").write_bytes(b"one file\n")
    wait_for(lambda: d.status()["catalog"]["files"] == 1, message="a file registered")
    assert d.stop() == 0
    path = catalog_path(d)
    os.chown(path, 0, 0)  # root's now, and read-only to everyone else
    os.chmod(path, 0o644)
    mark = len(d.log())
    refused(d)
    line = one_error_since(d, mark)
    assert str(path) in line and "not writable by user nobody" in line and "chown" in line, line


def test_a_disk_that_fills_mid_commit_leaves_the_thread_able_to_write_again(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", "1m") as state:
        catalog = Catalog.open(f"sqlite:///{state / 'catalog.sqlite3'}", "node1")
        try:
            catalog.db.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # commits need new room
            filler = fill(state)
            with pytest.raises(sqlite3.OperationalError, match="full"):
                catalog.add_transfer(1_700_000_000.0, incoming=5)
            assert "full" in catalog.db.write_error
            filler.unlink()
            catalog.add_transfer(1_700_000_000.0, incoming=7)  # the same thread, the same connection
            assert catalog.db.write_error is None
            assert catalog.counts(1, 1)["total_incoming"] == 7
        finally:
            catalog.close()


def rows(catalog: Catalog) -> int:
    return catalog.db.connection().execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0]


def test_a_checkpoint_on_a_full_disk_is_reported_loses_nothing_and_is_done_once_there_is_room(
        tmp_path: Path) -> None:
    # the WAL's pages go into the database file, which must grow: on a full disk the checkpoint fails,
    # the health check hears of it, every row stays readable (from the WAL), and closing does not raise
    with tmpfs(tmp_path / "state", "4m") as state:
        path = state / "catalog.sqlite3"
        catalog = Catalog.open(f"sqlite:///{path}", "node1")
        try:
            with catalog.db.tx() as conn:
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                                 [(f"k{i}", "x" * 500) for i in range(2000)])
            filler = fill(state)
            catalog.db.checkpoint()
            assert "full" in (catalog.db.write_error or "")
            assert rows(catalog) == 2000
            catalog.close()  # checkpoints what it wrote: fails again, quietly
            filler.unlink()
            catalog = Catalog.open(f"sqlite:///{path}", "node1")
            catalog.db.checkpoint()
            assert catalog.db.connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0
            assert rows(catalog) == 2000
        finally:
            catalog.close()
