"""cloudmanagerd migrate-catalog: a single node's SQLite catalog copied into another catalog (PostgreSQL
when a node grows to several), all or nothing, with the daemon stopped, then served by a daemon on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import Daemon, sha256_of, wait_for

from cloudmanagerd.daemon import redact_url


def migrate(d: Daemon, to: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudmanagerd", "migrate-catalog", "-c", str(d.config_path),
                           "--to", to, *extra], capture_output=True, text=True, timeout=120)


@pytest.fixture(params=["postgresql", "sqlite"])
def target(request, workdir: Path) -> str:
    """The new catalog: a fresh database on a real PostgreSQL (what users grow into), or a SQLite file."""
    if request.param == "sqlite":
        return f"sqlite:///{workdir}/new/catalog.sqlite3"
    return request.getfixturevalue("postgres_url")


def filled(daemon_factory, count: int = 5) -> tuple[Daemon, dict[str, bytes]]:
    """A node with `count` files, each with its two copies, one of them evicted-ready, stopped."""
    d = daemon_factory(remotes=2)
    contents = {}
    for i in range(count):
        data = f"file {i} ".encode() * (100 + i)
        (d.inbox / f".f{i}").write_bytes(data)
        (d.inbox / f".f{i}").rename(d.inbox / f"f{i}.txt")
        contents[f"f{i}.txt"] = data
    wait_for(lambda: len(d.files()) == count and all(len(f["copies"]) == 2 for f in d.files()),
             timeout=30, message="every file with its two copies")
    return d, contents


def use_catalog(d: Daemon, url: str) -> None:
    d.config["catalog"] = url
    d.config_path.write_text(yaml.safe_dump(d.config))


def test_round_trip_keeps_every_file_copy_and_upload_and_serves_get(daemon_factory, target, workdir):
    d, contents = filled(daemon_factory)
    before = d.files()
    status_before = d.status()
    assert d.stop() == 0
    out = migrate(d, target)
    assert out.returncode == 0, out.stderr
    assert "5 files" in out.stdout and f"now set `catalog: {redact_url(target)}`" in out.stdout
    use_catalog(d, target)
    d.start()
    assert sorted(d.files(), key=lambda f: f["hash"]) == sorted(before, key=lambda f: f["hash"])
    after = d.status()
    for key in ("catalog", "uploads", "safety"):
        assert after[key] == status_before[key], key
    assert after["cache"]["files"] == 5 and after["cache"]["used"] == status_before["cache"]["used"]
    h = next(f["hash"] for f in before if f["name"] == "f3.txt")
    got = workdir / "got"
    assert d.ctl("get", h, "-o", str(got)).returncode == 0
    assert got.read_bytes() == contents["f3.txt"] and sha256_of(got) == h
    assert d.stop() == 0


def test_refused_while_the_daemon_runs(daemon_factory, target):
    d, _ = filled(daemon_factory, 1)
    out = migrate(d, target)
    assert out.returncode == 1
    assert "another cloudmanagerd is already running with this state folder (stop it first)" in out.stderr
    assert "Traceback" not in out.stderr
    assert d.stop() == 0


def test_a_non_empty_target_is_refused_unless_replace(daemon_factory, target):
    d, _ = filled(daemon_factory, 2)
    assert d.stop() == 0
    assert migrate(d, target).returncode == 0
    again = migrate(d, target)
    assert again.returncode == 1
    assert "the target catalog is not empty (2 files" in again.stderr
    assert "pass --replace to empty this one first" in again.stderr
    replaced = migrate(d, target, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    use_catalog(d, target)
    d.start()
    assert len(d.files()) == 2 and d.status()["catalog"]["files"] == 2
    assert d.stop() == 0


def test_refuses_a_catalog_another_live_node_uses_and_itself(daemon_factory, target, workdir):
    d, _ = filled(daemon_factory, 1)
    # a second node on the same SQLite file, from its own state folder: the lock does not see it
    other_root = workdir / "other"
    other_root.mkdir()
    other = daemon_factory(remotes=0, root=other_root, start=False, node="other",
                           catalog=f"sqlite:///{d.config['state']}/catalog.sqlite3")
    other.config["remotes"] = d.config["remotes"]
    other.config_path.write_text(yaml.safe_dump(other.config))
    other.start()
    assert d.stop() == 0
    out = migrate(d, target)
    assert out.returncode == 1
    assert f"node other is running on catalog sqlite:///{d.config['state']}/catalog.sqlite3" in out.stderr
    assert "stop it first" in out.stderr
    assert other.stop() == 0
    self_copy = migrate(d, f"sqlite:///{d.config['state']}/catalog.sqlite3")
    assert self_copy.returncode == 1 and "--to names the catalog itself" in self_copy.stderr


# -- the copy itself, through the catalog's interface -------------------------------------------

def _catalog_with_files(url: str, n: int = 3):
    from cloudmanagerd.catalog import Catalog, IngestRecord
    c = Catalog.open(url, "n1")
    for i in range(n):
        h = f"{i:02x}" * 32
        rec = IngestRecord(h, f"f{i}".encode(), 100 + i)
        c.begin_ingest([rec], 1000.0)
        c.finish_ingest([rec], ["r0", "r1"], 1000.0)
        c.upload_done(h, "r0", f"r0/{h}", 100 + i, 2, 1001.0)
    c.mark_copy_bad("00" * 32, "r0", "rotten", 1002.0)
    return c


def test_copy_counts_every_table_and_the_targets_counters_agree(tmp_path, target):
    from cloudmanagerd.catalog import Catalog
    from cloudmanagerd.catalog.migrate import copy_catalog
    source = _catalog_with_files(f"sqlite:///{tmp_path}/a.sqlite3")
    into = Catalog.open(target, "n1")
    try:
        counts = copy_catalog(source, into)
        assert (counts["files"], counts["copies"], counts["cache_entries"]) == (3, 3, 3)
        assert into.counts(2, 2) == source.counts(2, 2)
        assert into.good_copies("01" * 32) == source.good_copies("01" * 32)
        assert into.good_copies("00" * 32) == []  # the copy marked bad stays bad
    finally:
        source.close()
        into.close()


def test_a_copy_that_does_not_match_keeps_nothing(tmp_path, target, monkeypatch):
    from cloudmanagerd.catalog import Catalog, migrate
    source = _catalog_with_files(f"sqlite:///{tmp_path}/a.sqlite3")
    into = Catalog.open(target, "n1")
    real = migrate._batches

    def lossy(catalog, table):  # an engine that silently drops a row
        for columns, rows in real(catalog, table):
            yield columns, rows[1:] if table == "copies" else rows
    monkeypatch.setattr(migrate, "_batches", lossy)
    try:
        with pytest.raises(migrate.MigrationError, match="copies: 3 in the source, 2 copied"):
            migrate.copy_catalog(source, into)
        assert into.counts(2, 2)["files"] == 0 and into.list_files() == []
    finally:
        source.close()
        into.close()


def test_bad_arguments_are_one_line_each(daemon_factory, workdir):
    d = daemon_factory(remotes=1, start=False)
    out = migrate(d, "sqlite:///nowhere.sqlite3")
    assert out.returncode == 1
    assert f"catalog {d.config['state']}/catalog.sqlite3 does not exist: nothing to migrate" in out.stderr
    d.start()
    assert d.stop() == 0
    for to, says in (("mysql://x/y", "not a sqlite:/// or postgresql:// URL"),
                     ("postgresql://127.0.0.1:1/x", "cannot connect")):
        out = migrate(d, to)
        assert out.returncode == 1 and says in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_copy_broken_off_half_way_leaves_the_target_empty_and_can_be_run_again(tmp_path, target, monkeypatch):
    # (a SIGKILL half-way through 100,000 files into PostgreSQL was tried by hand: the target stayed empty)
    from cloudmanagerd.catalog import Catalog, migrate
    source = _catalog_with_files(f"sqlite:///{tmp_path}/a.sqlite3")
    into = Catalog.open(target, "n1")
    real = migrate._batches

    def broken(catalog, table):
        if table == "copies":
            raise OSError("the machine went down")
        yield from real(catalog, table)
    try:
        monkeypatch.setattr(migrate, "_batches", broken)
        with pytest.raises(OSError):
            migrate.copy_catalog(source, into)
        assert into.counts(2, 2)["files"] == 0 and into.list_files() == []
        monkeypatch.setattr(migrate, "_batches", real)
        assert migrate.copy_catalog(source, into)["files"] == 3
        assert into.counts(2, 2) == source.counts(2, 2)
    finally:
        source.close()
        into.close()
