"""Catalog snapshots on the remotes (issue 14, item 1): the reserved namespace of each backend, the
snapshot step (only after a change, retention, a remote that cannot hold them), and the daemon's
schedule, stop snapshot and status."""

from __future__ import annotations

import gc
import gzip
import hashlib
import os
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for
from seaweed import seaweed

__all__ = ["seaweed"]  # the session-scoped S3 server, a fixture here (and pyflakes sees it used)

from cloudmanagerd.catalog import Catalog, IngestRecord
from cloudmanagerd.config import ConfigError, config_from_mapping
from cloudmanagerd.remotes.base import RESERVED, RemoteError, Transfer
from cloudmanagerd.remotes.directory import DirectoryRemote
from cloudmanagerd.remotes.rclone import RcloneRemote
from cloudmanagerd.remotes.s3 import S3Remote
from cloudmanagerd.snapshots import Snapshot, Snapshotter, listed, node_folder, parse, snapshot_name, to_keep
from cloudmanagerd.uploads import SendCheck

DAY = 86400.0


# -- each backend's reserved namespace ------------------------------------------------------------

@pytest.fixture(params=["directory", "s3", "rclone"])
def remote(request, workdir: Path, seaweed):  # seaweed: set up before the leak guard
    if request.param == "directory":
        r = DirectoryRemote("d", str(workdir / "remote"))
        (workdir / "remote").mkdir()
    elif request.param == "s3":
        r = S3Remote("s", seaweed.make_bucket(), prefix="p/", endpoint=seaweed.endpoint, region=seaweed.region,
                     access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key)
    else:
        (workdir / "rc").mkdir()
        r = RcloneRemote("rc", str(workdir / "rc"))
    yield r
    r.close()


def _file(workdir: Path, data: bytes) -> int:
    path = workdir / f"src-{hashlib.sha256(data).hexdigest()[:8]}"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def _put(remote, workdir: Path, rel: str, data: bytes) -> None:
    fd = _file(workdir, data)
    try:
        check = SendCheck(hashlib.sha256(data).hexdigest(), fd, len(data), getattr(remote, "reports_progress", True))
        remote.put_snapshot(rel, fd, len(data), Transfer(len(data), source=check))
        check.confirm()
    finally:
        os.close(fd)


def test_snapshots_live_apart_from_objects_and_round_trip(remote, workdir: Path) -> None:
    data = os.urandom(3000)
    folder = node_folder("node-1")
    rel = f"{folder}/catalog-x.sqlite.gz"
    assert remote.list_snapshots(folder) == []  # nothing yet: an empty list, not an error
    _put(remote, workdir, rel, data)
    obj = os.urandom(100)
    h = hashlib.sha256(obj).hexdigest()
    fd = _file(workdir, obj)
    try:
        remote.put(h, fd, len(obj))
    finally:
        os.close(fd)
    assert remote.list_snapshots(folder) == [("catalog-x.sqlite.gz", len(data))]
    assert remote.list_snapshot_folders(RESERVED) == ["node-1"]  # the nodes with snapshots
    # the listing of objects holds the object only: the reserved folder is never taken for one
    assert list(remote.list_objects()) == [(h, len(obj))]
    assert remote.object_url(h).endswith(h)
    out = workdir / "out"
    with open(out, "wb") as f:
        remote.get_snapshot(rel, f.fileno())
    assert out.read_bytes() == data
    remote.delete_snapshot(rel)
    remote.delete_snapshot(rel)  # twice: harmless
    assert remote.list_snapshots(folder) == []
    with pytest.raises(ValueError):
        remote.list_snapshots("../elsewhere")  # only the reserved namespace can be named


def test_a_large_snapshot_round_trips(remote, workdir: Path) -> None:
    """Above S3's single checked PUT (8 MiB): the managed transfer, streamed from disk."""
    data = os.urandom(9 * (1 << 20))
    rel = f"{node_folder('big')}/catalog-big.sqlite.gz"
    _put(remote, workdir, rel, data)
    assert remote.list_snapshots(node_folder("big")) == [("catalog-big.sqlite.gz", len(data))]
    out = workdir / "out"
    with open(out, "wb") as f:
        remote.get_snapshot(rel, f.fileno())
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_a_snapshot_of_other_bytes_than_its_check_expects_is_not_kept(remote, workdir: Path) -> None:
    """The checked-send path: what the remote read must hash to the name's digest."""
    data = os.urandom(5000)
    rel = f"{node_folder('n')}/catalog-y.sqlite.gz"
    fd = _file(workdir, data)
    try:
        check = SendCheck("0" * 64, fd, len(data), getattr(remote, "reports_progress", True))
        with pytest.raises(RemoteError):
            remote.put_snapshot(rel, fd, len(data), Transfer(len(data), source=check))
            check.confirm()
    finally:
        os.close(fd)
    assert remote.list_snapshots(node_folder("n")) == []


def test_an_interrupted_snapshot_upload_leaves_nothing_under_its_name(workdir: Path) -> None:
    (workdir / "remote").mkdir()
    remote = DirectoryRemote("d", str(workdir / "remote"))
    data = os.urandom(1 << 20)
    fd = _file(workdir, data)
    transfer = Transfer(len(data))
    transfer.cancel("the daemon is stopping")
    try:
        with pytest.raises(RemoteError):
            remote.put_snapshot(f"{node_folder('n')}/catalog-z.sqlite.gz", fd, len(data), transfer)
    finally:
        os.close(fd)
    assert remote.list_snapshots(node_folder("n")) == []
    assert not [p for p in (workdir / "remote").rglob("*") if p.is_file()]


def test_node_names_become_one_safe_folder() -> None:
    assert node_folder("web-1") == f"{RESERVED}/web-1"
    assert node_folder("a/b") == f"{RESERVED}/a%2Fb"
    assert node_folder("..") == f"{RESERVED}/%2E."


# -- names and retention --------------------------------------------------------------------------

def test_names_carry_time_and_hash_and_nothing_else_parses() -> None:
    digest = "ab" * 32
    name = snapshot_name(1_700_000_000, digest)
    assert name == f"catalog-20231114T221320.000Z-{digest}.sqlite.gz"
    assert snapshot_name(1_700_000_000.25, digest) == f"catalog-20231114T221320.250Z-{digest}.sqlite.gz"
    assert parse(snapshot_name(1_700_000_000.25, digest), 1).when == 1_700_000_000.25
    assert parse(name, 10) == Snapshot(1_700_000_000.0, digest, name, 10)
    for other in (digest, f".{name}.1234abcd.tmp", name + ".part", "catalog-2023-x.sqlite.gz",
                  f"catalog-20231114T221320Z-{digest}.sqlite.gz"):
        assert parse(other, 1) is None


def test_retention_keeps_the_last_four_and_one_a_day_for_a_week() -> None:
    now = 100 * DAY + 12 * 3600
    # every 6 hours for 10 days
    snaps = [Snapshot(now - i * 6 * 3600, f"{i:064x}", f"s{i}", 1) for i in range(40)]
    keep = to_keep(snaps, now)
    assert {"s0", "s1", "s2", "s3"} <= keep  # the last four
    days = {int(s.when // DAY) for s in snaps if s.name in keep}
    assert days == {int(now // DAY) - d for d in range(7)}  # one for each of the last 7 days
    # the one kept for a day is that day's newest
    for s in snaps:
        if s.name in keep and s.name not in {"s0", "s1", "s2", "s3"}:
            assert not any(o.when > s.when and int(o.when // DAY) == int(s.when // DAY) for o in snaps)
    assert len(keep) == 4 + 5  # the last four cover today and yesterday (s3 is yesterday's 18:00)
    assert to_keep(snaps[:2], now) == {"s0", "s1"}


# -- the snapshot step ------------------------------------------------------------------------------

class _Locker:
    """A remote that cannot list what it holds (as a plowshare locker): no snapshot methods."""
    kind = "plowshare"

    def close(self) -> None:
        pass


def _catalog(workdir: Path, files: int = 3) -> Catalog:
    catalog = Catalog.open(f"sqlite:///{workdir / 'state' / 'catalog.sqlite3'}", "n1")
    _add(catalog, files)
    return catalog


def _add(catalog: Catalog, files: int, start: int = 0) -> list[str]:
    records = [IngestRecord(hashlib.sha256(b"f%d" % i).hexdigest(), b"file-%d" % i, 10 + i)
               for i in range(start, start + files)]
    catalog.begin_ingest(records, time.time())
    catalog.finish_ingest(records, [], time.time())
    return [r.hash for r in records]


def _names_in(remote, snap: Snapshot, workdir: Path) -> set[bytes]:
    gz = workdir / "snap.gz"
    with open(gz, "wb") as f:
        remote.get_snapshot(f"{node_folder('n1')}/{snap.name}", f.fileno())
    assert hashlib.sha256(gz.read_bytes()).hexdigest() == snap.digest
    db = workdir / "snap.sqlite3"
    db.write_bytes(gzip.decompress(gz.read_bytes()))
    with sqlite3.connect(db) as conn:
        return {bytes(n) for (n,) in conn.execute("SELECT name FROM files")}


def test_a_snapshot_goes_to_every_remote_that_can_hold_one_and_only_after_a_change(workdir: Path) -> None:
    for name in ("state", "a", "b"):
        (workdir / name).mkdir()
    catalog = _catalog(workdir)
    remotes = {"a": DirectoryRemote("a", str(workdir / "a")), "locker": _Locker(),
               "b": DirectoryRemote("b", str(workdir / "b"))}
    clock = [1_000 * DAY]
    snapper = Snapshotter(catalog, remotes, "n1", str(workdir / "state"), now=lambda: clock[0])
    try:
        assert snapper.step() == ["a", "b"]  # the locker is skipped
        for name in ("a", "b"):
            (snap,) = listed(remotes[name], "n1")
            assert _names_in(remotes[name], snap, workdir) == {b"file-0", b"file-1", b"file-2"}
        assert snapper.status("locker", clock[0]) is None
        assert snapper.status("a", clock[0] + 60)["age"] == 60
        clock[0] += 900
        assert snapper.step() == []  # nothing changed: no new snapshot
        _add(catalog, 1, start=3)
        assert snapper.step() == ["a", "b"]
        snaps = listed(remotes["a"], "n1")
        assert len(snaps) == 2 and _names_in(remotes["a"], snaps[0], workdir) >= {b"file-3"}
        # retention: every 15 minutes for a while, only the last four stay (all from one day)
        for i in range(6):
            clock[0] += 900
            _add(catalog, 1, start=10 + i)
            snapper.step()
        assert len(listed(remotes["a"], "n1")) == 4
        # the compressed copy waited in the state folder only while it was sent
        assert not [p for p in (workdir / "state").iterdir() if p.name.startswith(".catalog-snapshot")]
    finally:
        catalog.close()


def test_a_snapshot_left_behind_by_changes_is_a_warning_but_an_idle_catalog_is_not(workdir: Path) -> None:
    for name in ("state", "a"):
        (workdir / name).mkdir()
    catalog = _catalog(workdir)
    remotes = {"a": DirectoryRemote("a", str(workdir / "a"))}
    clock = [1_000 * DAY]
    snapper = Snapshotter(catalog, remotes, "n1", str(workdir / "state"), now=lambda: clock[0])
    try:
        assert snapper.behind(900) == []  # no snapshot yet: the first is due one interval after start
        assert snapper.step() == ["a"]
        clock[0] += DAY
        assert snapper.behind(900) == []  # a day old, but nothing changed: still the whole catalog
        _add(catalog, 1, start=3)
        (line,) = snapper.behind(900)
        assert line.startswith("remote a: newest catalog snapshot is 1d") and "catalog_backup.interval 15m" in line
        assert snapper.behind(0) == []  # snapshots turned off: nothing to be late
        assert snapper.step() == ["a"] and snapper.behind(900) == []
    finally:
        catalog.close()


def test_a_failing_remote_is_a_problem_and_the_other_still_gets_its_snapshot(workdir: Path) -> None:
    for name in ("state", "g"):
        (workdir / name).mkdir()
    (workdir / "ro").write_text("a file where the remote folder should be")
    catalog = _catalog(workdir)
    remotes = {"bad": DirectoryRemote("bad", str(workdir / "ro")), "good": DirectoryRemote("good", str(workdir / "g"))}
    snapper = Snapshotter(catalog, remotes, "n1", str(workdir / "state"))
    try:
        assert snapper.step() == ["good"]
        assert [p for p in snapper.problems() if p.startswith("remote bad: catalog snapshot not stored")]
        assert snapper.status("bad", time.time())["error"]
        # the failed remote is tried again at the next step even though nothing changed
        (workdir / "ro").unlink()
        (workdir / "ro").mkdir()
        assert snapper.step() == ["bad"]
        assert snapper.problems() == []
    finally:
        catalog.close()


# -- the daemon ----------------------------------------------------------------------------------------

def _snapshots(path: Path, node: str) -> list[Path]:
    folder = path / RESERVED / node
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def test_the_daemon_snapshots_on_schedule_and_at_stop_and_status_shows_the_age(daemon_factory, workdir) -> None:
    d = daemon_factory(remotes=2, node="n1", catalog_backup={"interval": "1s"})
    r0 = Path(d.config["remotes"][0]["path"])
    (d.inbox / "one.txt").write_bytes(b"one")
    wait_for(lambda: d.files() and all(r["catalog_snapshot"]["age"] is not None for r in d.status()["remotes"]),
             timeout=30, message="a scheduled snapshot on both remotes")
    assert _snapshots(r0, "n1")
    for r in d.status()["remotes"]:
        assert r["catalog_snapshot"]["age"] is not None and r["catalog_snapshot"]["age"] < 60, r
    out = d.ctl("status").stdout.decode()
    assert "catalog snapshot" in out and "ago" in out
    (d.inbox / "two.txt").write_bytes(b"two")
    wait_for(lambda: len(d.files()) == 2, message="the second file")
    assert d.stop() == 0
    newest = _snapshots(r0, "n1")[-1]
    assert "catalog snapshot" in d.log()
    # the stop snapshot holds both files
    db = workdir / "check.sqlite3"
    db.write_bytes(gzip.decompress(newest.read_bytes()))
    with sqlite3.connect(db) as conn:
        names = {bytes(n) for (n,) in conn.execute("SELECT name FROM files")}
    assert names == {b"one.txt", b"two.txt"}


def test_a_snapshot_that_cannot_be_made_is_a_problem_line_not_a_crash(workdir: Path) -> None:
    (workdir / "state").mkdir()
    (workdir / "a").mkdir()
    catalog = _catalog(workdir)
    remotes = {"a": DirectoryRemote("a", str(workdir / "a"))}
    snapper = Snapshotter(catalog, remotes, "n1", str(workdir / "no-such-folder"))
    try:
        assert snapper.step() == []
        (line,) = snapper.problems()
        assert line.startswith("remote a: catalog snapshot failed:") and "\n" not in line
        assert listed(remotes["a"], "n1") == []
    finally:
        catalog.close()


def test_a_reload_changes_the_interval_and_0_turns_snapshots_off(daemon_factory) -> None:
    d = daemon_factory(remotes=1, node="n1", catalog_backup={"interval": "1h"})
    r0 = Path(d.config["remotes"][0]["path"])
    (d.inbox / "a").write_bytes(b"a")
    wait_for(lambda: d.files(), message="the file registered")
    assert _snapshots(r0, "n1") == []  # not before the hour
    d.config["catalog_backup"] = {"interval": "1s"}
    d.config_path.write_text(__import__("yaml").safe_dump(d.config))
    assert d.ctl("reload").returncode == 0
    wait_for(lambda: _snapshots(r0, "n1"), timeout=30, message="a snapshot at the new interval")
    d.config["catalog_backup"] = {"interval": 0}
    d.config_path.write_text(__import__("yaml").safe_dump(d.config))
    assert d.ctl("reload").returncode == 0
    (d.inbox / "b").write_bytes(b"b")
    wait_for(lambda: len(d.files()) == 2, message="the second file")
    assert d.stop() == 0  # off: not even at stop
    for snap in _snapshots(r0, "n1"):  # no snapshot knows the file that came after
        db = r0.parent / "check.sqlite3"
        db.write_bytes(gzip.decompress(snap.read_bytes()))
        with sqlite3.connect(db) as conn:
            assert {bytes(n) for (n,) in conn.execute("SELECT name FROM files")} == {b"a"}
        db.unlink()


def test_a_snapshot_out_of_time_is_cancelled_and_leaves_nothing(workdir: Path) -> None:
    """The stop's snapshot has a budget (systemd kills a stop that takes too long)."""
    for name in ("state", "a"):
        (workdir / name).mkdir()
    catalog = _catalog(workdir)
    remotes = {"a": DirectoryRemote("a", str(workdir / "a"))}
    snapper = Snapshotter(catalog, remotes, "n1", str(workdir / "state"))
    try:
        assert snapper.step(budget=0) == []
        assert "ran out" in snapper.problems()[0]
        assert not [p for p in (workdir / "a").rglob("*") if p.is_file()]
        assert snapper.step(budget=60) == ["a"]  # in time: taken, and the problem is gone
        assert snapper.problems() == []
    finally:
        catalog.close()


class _Silent:
    """A server that accepts connections, reads what it is sent and never answers (a hung S3 endpoint)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="silent-server")
        self.thread.start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)
        while not self.done.is_set():
            try:
                self.conns.append(self.server.accept()[0])
            except TimeoutError:
                continue

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        for c in self.conns:
            c.close()
        self.server.close()


def test_the_stops_snapshot_ends_in_its_time_though_remotes_hang(workdir: Path) -> None:
    """S3 remotes that take the bytes and never answer: the cancel at the budget's end cannot reach a call
    waiting for the answer (botocore's read timeout, 60 s). The stop's 45 s budget became 105 s, past
    systemd's 90 s TimeoutStopSec (measured here: a 3 s budget took 61 s)."""
    (workdir / "state").mkdir()
    catalog = _catalog(workdir)
    silent = _Silent()
    endpoint = f"http://127.0.0.1:{silent.server.getsockname()[1]}"
    remotes = {n: S3Remote(n, "bucket", endpoint=endpoint, region="us-east-1", access_key_id="k",
                           secret_access_key="s") for n in ("s1", "s2")}
    snapper = Snapshotter(catalog, remotes, "n1", str(workdir / "state"))
    try:
        started = time.monotonic()
        # 3 s: past botocore's 1 s wait for "100 Continue", the bytes are sent before the budget ends
        assert snapper.step(budget=3.0) == []
        assert time.monotonic() - started < 3.0 + 5.0 + 2.0
    finally:
        silent.close()  # the calls left behind fail now
        wait_for(lambda: not [t for t in threading.enumerate() if t.name == "catalog-snapshot-stop"],
                 message="the snapshot left behind ends once the server is gone")
        for r in remotes.values():
            r.close()
        catalog.close()


def test_a_full_state_disk_fails_the_snapshot_cleanly(workdir: Path) -> None:
    """The compressed snapshot waits in the state folder: a full disk there is a problem line, and
    no pipe, thread or half file is left behind (the leak guard checks the threads)."""
    for name in ("state", "a", "tiny"):
        (workdir / name).mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(workdir / "tiny")], check=True)
    gc.collect()  # an earlier test's garbage closing its descriptors mid-test would skew the count
    fds = len(os.listdir("/proc/self/fd"))
    catalog = _catalog(workdir, files=0)
    records = [IngestRecord(hashlib.sha256(os.urandom(8)).hexdigest(), os.urandom(200), 1) for _ in range(3000)]
    catalog.begin_ingest(records, time.time())
    catalog.finish_ingest(records, [], time.time())  # ~1 MB of names that do not compress
    remotes = {"a": DirectoryRemote("a", str(workdir / "a"))}
    snapper = Snapshotter(catalog, remotes, "n1", str(workdir / "tiny"))
    try:
        assert snapper.step() == []
        (line,) = snapper.problems()
        assert "catalog snapshot failed" in line and "No space left" in line, line
        assert listed(remotes["a"], "n1") == []
        assert os.listdir(workdir / "tiny") == []
    finally:
        catalog.close()
        subprocess.run(["umount", "-l", str(workdir / "tiny")], check=False)
    # (SQLite keeps a closed connection's descriptor until the file's last connection closes)
    assert len(os.listdir("/proc/self/fd")) <= fds


@pytest.mark.parametrize("value, seconds", [(None, 900.0), ("2m", 120.0), (0, 0.0), ("0s", 0.0), (False, 0.0)])
def test_catalog_backup_interval_is_read_with_its_default_and_off(value, seconds, workdir: Path) -> None:
    data = {"inbox": str(workdir / "i"), "cache": {"path": str(workdir / "c"), "capacity": "1GiB"}, "node": "n"}
    if value is not None:
        data["catalog_backup"] = {"interval": value}
    assert config_from_mapping(data, base_dir=str(workdir)).catalog_backup.interval == seconds


@pytest.mark.parametrize("value, message", [
    ("0.5s", "catalog_backup.interval: must be at least 1s (or 0 to turn snapshots off)"),
    ("soon", "catalog_backup.interval: "),
])
def test_a_bad_catalog_backup_interval_names_the_key(value, message, workdir: Path) -> None:
    data = {"inbox": str(workdir / "i"), "cache": {"path": str(workdir / "c"), "capacity": "1GiB"}, "node": "n",
            "catalog_backup": {"interval": value}}
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, base_dir=str(workdir))
    assert [e for e in info.value.errors if e.startswith(message)], info.value.errors
    data["catalog_backup"] = {"intervall": "1m"}
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, base_dir=str(workdir))
    assert any("catalog_backup.intervall" in e and "did you mean interval" in e for e in info.value.errors)


def test_a_broken_remote_is_one_problem_line_and_its_snapshot_error_is_in_the_status(daemon_factory) -> None:
    d = daemon_factory(remotes=2, node="n1", start=False, catalog_backup={"interval": "1s"})
    r1 = Path(d.config["remotes"][1]["path"])
    r1.rmdir()
    r1.write_text("a file where the remote folder should be")
    d.start()
    (d.inbox / "a").write_bytes(b"a")

    def snapshot_error():
        r = next(r for r in d.status()["remotes"] if r["name"] == "r1")
        return r["catalog_snapshot"]["error"] and not r["healthy"]

    wait_for(snapshot_error, timeout=30, message="r1 unhealthy and its snapshot failed")
    problems = d.status()["problems"]
    assert len([p for p in problems if "r1" in p]) == 1, problems
    r0 = next(r for r in d.status()["remotes"] if r["name"] == "r0")
    assert r0["catalog_snapshot"]["error"] is None and r0["catalog_snapshot"]["age"] is not None
    assert d.stop() == 0
