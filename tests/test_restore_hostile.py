"""`cloudmanagerd restore` against what a hostile or broken remote may hold (issue 14, review): snapshots
planted under this node's name that are not catalogs, and listings whose sizes lie. Real folder remotes
and a real SQLite catalog; restore runs in-process, as its command line does."""

from __future__ import annotations

import gzip
import hashlib
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import yaml
from conftest import default_config

from cloudmanagerd import restore as restore_cmd
from cloudmanagerd.catalog import Catalog, IngestRecord
from cloudmanagerd.remotes.directory import DirectoryRemote
from cloudmanagerd.snapshots import Snapshotter, listed, node_folder, snapshot_name


def put_object(folder: Path, data: bytes) -> str:
    h = hashlib.sha256(data).hexdigest()
    (folder / h[:2]).mkdir(parents=True, exist_ok=True)
    (folder / h[:2] / h).write_bytes(data)
    return h


def setup(workdir: Path, remotes: int = 1) -> tuple[Path, list[Path], dict[str, bytes]]:
    """A node (its daemon running: the name held) with two named files on r0 and a snapshot there; then
    its state is lost."""
    config = default_config(workdir, remotes, node="n1")
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    folders = [Path(r["path"]) for r in config["remotes"]]
    (workdir / "state").mkdir()
    catalog = Catalog.open(f"sqlite:///{workdir / 'state' / 'catalog.sqlite3'}", "n1")
    made = {}
    try:
        assert catalog.register_node("lost-instance", "lost-seat", 4242, "lost-host", time.time(), 60.0) is None
        for i in range(2):
            data = os.urandom(1000 + i)
            h = put_object(folders[0], data)
            made[h] = data
            catalog.begin_ingest([IngestRecord(h, b"named-%d" % i, len(data))], time.time())
            catalog.finish_ingest([IngestRecord(h, b"named-%d" % i, len(data))], [], time.time())
            catalog.adopt_objects("r0", [(h, len(data), str(folders[0] / h[:2] / h))], time.time())
        remote = DirectoryRemote("r0", str(folders[0]))
        assert Snapshotter(catalog, {"r0": remote}, "n1", str(workdir / "state")).step() == ["r0"]
    finally:
        catalog.close()
    for p in (workdir / "state").iterdir():
        p.unlink()
    return path, folders, made


def plant(folder: Path, raw: bytes, when: float | None = None) -> str:
    """A snapshot someone else put under this node's name: newer than the real one, hashing to its name."""
    body = gzip.compress(raw)
    name = snapshot_name(when or time.time() + 60, hashlib.sha256(body).hexdigest())
    where = folder / node_folder("n1")
    where.mkdir(parents=True, exist_ok=True)
    (where / name).write_bytes(body)
    return name


def run(path: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = restore_cmd.main(["-c", str(path), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def names(workdir: Path) -> dict[str, bytes]:
    with sqlite3.connect(workdir / "state" / "catalog.sqlite3") as conn:
        return {h: bytes(n) for h, n in conn.execute("SELECT hash, name FROM files")}


def test_a_planted_snapshot_that_is_not_a_catalog_is_passed_over(workdir: Path, capsys) -> None:
    path, (r0,), made = setup(workdir)
    (real,) = listed(DirectoryRemote("r0", str(r0)), "n1")
    # a gzip of nothing (an empty database to SQLite), and a gzip of a database of another program
    other = workdir / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()
    empty = plant(r0, b"", time.time() + 60)
    foreign = plant(r0, other.read_bytes(), time.time() + 120)
    code, out, err = run(path, capsys)
    assert code == 0, err
    assert f"snapshot {empty} on remote r0 is not usable" in err, err
    assert f"snapshot {foreign} on remote r0 is not usable" in err, err
    assert f"restored 2 file(s) from snapshot {real.name}" in out, out
    assert sorted(names(workdir).values()) == [b"named-0", b"named-1"], "the names came back"


def test_an_object_the_snapshot_does_not_know_takes_its_size_from_a_copy_that_hashes_right(
        workdir: Path, capsys) -> None:
    """A file added after the snapshot, whose copy on the first remote is cut short (a listing's size that
    lies about the content): the whole copy on the second remote must be the one recorded, or the file
    is lost though its bytes are there (the short copy fails every fetch; the whole one, a "conflict",
    was never recorded, and nothing checks a copy that is not recorded)."""
    path, (r0, r1), _ = setup(workdir, remotes=2)
    data = os.urandom(5000)
    h = put_object(r1, data)
    put_object(r0, data)
    (r0 / h[:2] / h).write_bytes(data[:1000])
    code, out, err = run(path, capsys)
    assert code == 0, err
    with sqlite3.connect(workdir / "state" / "catalog.sqlite3") as conn:
        (size,) = conn.execute("SELECT size FROM files WHERE hash=?", (h,)).fetchone()
        good = {r for (r,) in conn.execute("SELECT remote FROM copies WHERE hash=? AND bad=0", (h,))}
    conn.close()
    assert size == 5000 and good == {"r1"}, (size, good, err)


def test_the_lost_daemons_hold_on_the_node_name_is_released(workdir: Path, capsys) -> None:
    """The snapshot holds the node's name as taken by the daemon on the lost disk (heartbeat fresh): a
    daemon started on the restored catalog waited out cluster.lease for a process that no longer exists
    (60 s: the issue's drill tests timed out starting it)."""
    path, _, _ = setup(workdir)
    code, _, err = run(path, capsys)
    assert code == 0, err
    catalog = Catalog.open(f"sqlite:///{workdir / 'state' / 'catalog.sqlite3'}", "n1")
    try:
        assert catalog.register_node("new-instance", "new-seat", 1, "new-host", time.time(), 60.0) is None
    finally:
        catalog.close()


def test_a_snapshot_made_by_a_newer_cloudmanagerd_stops_the_restore_instead_of_an_older_one(
        workdir: Path, capsys) -> None:
    """The newest snapshot needs a newer cloudmanagerd (this machine was reinstalled with an older
    package): falling back to an older snapshot would lose the names of everything added since, with
    exit 0. Restore stops, says to upgrade, and installs nothing."""
    path, (r0,), _ = setup(workdir)
    newer = workdir / "newer.sqlite3"
    Catalog.open(f"sqlite:///{newer}", "n1").close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    conn.close()
    name = plant(r0, newer.read_bytes())
    code, out, err = run(path, capsys)
    assert code == 1 and out == "", out
    assert name in err and "upgrade cloudmanagerd" in err, err
    assert not (workdir / "state" / "catalog.sqlite3").exists()
    assert not [p for p in (workdir / "state").iterdir() if p.name.startswith(".restore-")]


def test_restore_force_twice_in_one_second_keeps_the_catalog_it_replaced(workdir: Path, capsys) -> None:
    """`--force` keeps the catalog it replaces as <catalog>.before-restore-<time, to the second>; a second
    `--force` within that second (the summary says to run it again once a remote answers) renamed the
    first restore's catalog over it: the catalog there before either was gone."""
    path, _, _ = setup(workdir)
    catalog = workdir / "state" / "catalog.sqlite3"
    Catalog.open(f"sqlite:///{catalog}", "n1").close()
    before = catalog.read_bytes()
    for _ in range(2):
        code, _, err = run(path, capsys, "--force")
        assert code == 0, err
    kept = [p.read_bytes() for p in catalog.parent.iterdir()
            if p.name.startswith("catalog.sqlite3.before-restore-") and not p.name.endswith(("-wal", "-shm"))]
    assert before in kept and len(kept) == 2


def test_a_planted_gzip_bomb_is_passed_over_and_one_that_does_not_fit_is_named(workdir: Path, capsys) -> None:
    """A snapshot that decompresses to far more than it is (64 MiB of zeros in 64 KiB) on a state disk
    of 4 MiB: not a SQLite file, it is passed over as soon as its first bytes are read, not after filling
    the disk (which failed the whole restore with a bare "No space left on device"). One that is a SQLite
    file but does not fit stops the restore with a line that names it."""
    path, (r0,), _ = setup(workdir)
    state = workdir / "state"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)], check=True)
    try:
        bomb = plant(r0, bytes(64 << 20), time.time() + 60)
        code, out, err = run(path, capsys)
        assert code == 0, err
        assert f"snapshot {bomb} on remote r0 is not usable (it is not a SQLite database" in err, err
        assert "restored 2 file(s)" in out
        huge = plant(r0, b"SQLite format 3\x00" + bytes(64 << 20), time.time() + 120)
        code, out, err = run(path, capsys, "--force")
        assert code == 1 and huge in err and "does not fit" in err and len(err.splitlines()) == 2, err
        assert not [p for p in state.iterdir() if p.name.startswith(".restore-")]
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
