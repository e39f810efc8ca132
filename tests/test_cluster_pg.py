"""Several daemons on one PostgreSQL catalog and shared remotes behave as one store (issue 13, items 3, 4, 6).

Two or three daemons run as subprocesses, each with its own inbox, cache and state folder, on one
real PostgreSQL catalog (tests/postgres.py), one SeaweedFS S3 bucket (tests/seaweed.py) and one
folder remote. Every write to a remote is counted where it lands, not in the catalog:

- the folder remote: the kernel's inotify queue on its 256 object folders, made beforehand, sees
  each rename of a finished copy onto its final name (IN_MOVED_TO); nothing is read until the end,
  so no thread runs while the daemons work;
- S3: the bucket has versioning on, so every PUT of a key leaves a version of its own.

A file sent twice (two nodes racing for one pair, a takeover that also lets the old owner finish)
shows up as two renames or two versions, though the listing still shows one object.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Daemon, wait_for
from postgres import PostgresServer, _unavailable, start_server
from seaweed import SeaweedFS, seaweed  # noqa: F401  (the session-scoped fixture)
from test_postgres_e2e import drop

from cloudmanagerd import CloudManager

pytestmark = pytest.mark.e2e

LEASE = "3s"  # short, so that a dead node's claims go to the others quickly
FAKES = str(Path(__file__).resolve().parent / "fakes")


# -- counting what reaches the remotes -------------------------------------------------------

IN_MOVED_TO = 0x80
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000


class Renames:
    """Renames onto final names in a folder remote's object folders, counted per object (inotify).

    The folders h[:2] are made up front (the directory remote makes a missing one, and accepts one
    that exists), so that no copy can land before its folder is watched."""

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.counts: collections.Counter[str] = collections.Counter()
        for i in range(256):
            folder = path / f"{i:02x}"
            folder.mkdir(parents=True, exist_ok=True)
            assert self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_MOVED_TO) >= 0

    def read(self) -> collections.Counter[str]:
        """Every rename seen so far (the kernel queued them; an overflow would fail the test)."""
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return self.counts
            pos = 0
            while pos < len(buf):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", buf, pos)
                name = buf[pos + 16:pos + 16 + length].rstrip(b"\0").decode()
                pos += 16 + length
                assert mask & 0x4000 == 0, "the inotify queue overflowed: renames were lost"
                if not name.startswith("."):
                    self.counts[name] += 1

    def close(self) -> None:
        os.close(self.fd)


def s3_writes(server: SeaweedFS, bucket: str) -> collections.Counter[str]:
    """PUTs per key in a versioned bucket (every PUT made a version)."""
    counts: collections.Counter[str] = collections.Counter()
    with server.client() as s3:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for v in page.get("Versions", []):
                counts[v["Key"].rsplit("/", 1)[-1]] += 1
    return counts


# -- the cluster --------------------------------------------------------------------------------

class Cluster:
    """Nodes n1, n2, ... on one catalog URL and one list of remotes, each in its own folder."""

    def __init__(self, factory, workdir: Path, url: str, remotes: list[dict[str, Any]], **settings: Any) -> None:
        self.factory, self.workdir, self.url, self.remotes = factory, workdir, url, remotes
        self.settings = settings
        self.nodes: list[Daemon] = []

    def add(self, start: bool = True, **overrides: Any) -> Daemon:
        name = f"n{len(self.nodes) + 1}"
        root = self.workdir / name
        root.mkdir()
        settings = {"catalog": self.url, "node": name, "cluster": {"lease": LEASE}, **self.settings, **overrides}
        d = self.factory(remotes=0, root=root, start=False, **settings)
        d.config["remotes"] = self.remotes
        d.config_path.write_text(yaml.safe_dump(d.config))
        self.nodes.append(d)
        return d.start() if start else d


def shared_remotes(workdir: Path, server: SeaweedFS) -> tuple[list[dict[str, Any]], Renames, str]:
    """A folder remote r0 (renames counted) and an S3 remote s3 on a versioned bucket."""
    bucket = server.make_bucket()
    with server.client() as s3:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    folder = workdir / "nas"
    renames = Renames(folder)
    remotes = [{"name": "r0", "type": "directory", "path": str(folder)},
               {"name": "s3", **server.remote_options(bucket, prefix="cm/")}]
    return remotes, renames, bucket


def copies_of(d: Daemon) -> dict[str, set[str]]:
    """hash -> the remotes holding a copy, as a node's `ls` shows them."""
    return {f["hash"]: {c["remote"] if isinstance(c, dict) else c for c in f["copies"]} for f in d.files()}


def all_stored(d: Daemon, hashes: set[str], remotes: set[str]) -> bool:
    seen = copies_of(d)
    return all(h in seen and seen[h] >= remotes for h in hashes)


def get(d: Daemon, h: str, out: Path) -> bytes:
    result = d.ctl("get", h, "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def nodes_of(d: Daemon) -> dict[str, dict[str, Any]]:
    out = d.ctl("--json", "nodes")
    assert out.returncode == 0, out.stderr
    return {n["node"]: n for n in json.loads(out.stdout)}


def no_tracebacks(*nodes: Daemon) -> None:
    for d in nodes:
        assert "Traceback" not in d.log(), d.log()[-3000:]


@pytest.fixture
def remotes(workdir: Path, seaweed: SeaweedFS) -> Iterator[tuple[list[dict[str, Any]], Renames, str]]:  # noqa: F811
    found = shared_remotes(workdir, seaweed)
    yield found
    found[1].close()


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, to stop under running daemons: with fsync and synchronous_commit
    on, so that `pg_ctl stop -m immediate` is a crash that keeps every commit (the shared test
    server runs without them, and an immediate stop would lose the last commits)."""
    try:
        server = start_server(fsync=True)
    except RuntimeError as exc:
        _unavailable(str(exc))  # fails under CI=true, skips elsewhere
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


# -- the tests --------------------------------------------------------------------------------------

def test_files_dropped_on_three_nodes_are_stored_once_and_fetchable_on_every_node(
        daemon_factory, workdir: Path, postgres_url: str, seaweed: SeaweedFS, remotes) -> None:  # noqa: F811
    remote_list, renames, bucket = remotes
    cluster = Cluster(daemon_factory, workdir, postgres_url, remote_list)
    n1, n2, n3 = cluster.add(), cluster.add(), cluster.add()
    mine = {d.config["node"]: drop(d, {f"{d.config['node']}-{i}.bin": os.urandom(3000 + i) for i in range(8)})
            for d in (n1, n2, n3)}
    # the same bytes under other names on every node: one file
    shared = b"dropped on every node" * 100
    for d in (n1, n2, n3):
        drop(d, {f"common-{d.config['node']}.txt": shared})
    everything = {h for files in mine.values() for h in files.values()} | {hashlib.sha256(shared).hexdigest()}
    assert len(everything) == 25

    for d in (n1, n2, n3):  # each node's view of the shared catalog
        wait_for(lambda d=d: all_stored(d, everything, {"r0", "s3"}), timeout=90,
                 message=f"25 files with copies on r0 and s3, seen from {d.config['node']}")
        assert set(copies_of(d)) == everything
    assert renames.read() == {h: 1 for h in everything}, "a file was written to the folder remote twice"
    assert s3_writes(seaweed, bucket) == {h: 1 for h in everything}, "a file was PUT to S3 twice"

    # item 4: every node serves a file registered on another node, fetched from the remotes and verified
    for d, other in ((n1, "n2"), (n2, "n3"), (n3, "n1")):
        h = next(iter(mine[other].values()))
        got = get(d, h, workdir / f"got-{d.config['node']}")
        assert hashlib.sha256(got).hexdigest() == h
        info = json.loads(d.ctl("info", "--json", h).stdout)
        assert info["hash"] == h
    # the fetched copies are now in the fetching node's own cache, never written into another's
    # (9 files dropped on each, and the one `get` fetched)
    assert {k: v["cache_files"] for k, v in nodes_of(n1).items()} == {"n1": 10, "n2": 10, "n3": 10}

    # the Python API on the PostgreSQL catalog: warm_up of a file another node registered
    name, h = next(iter(mine["n2"].items()))
    with CloudManager(postgres_url, str(workdir / "api-cache"), 1 << 20, remotes=remote_list) as cm:
        path = cm.warm_up(h)
        assert path and hashlib.sha256(Path(path).read_bytes()).hexdigest() == h
        assert cm.exists(h) and cm.warm_up("0" * 64) is None
    assert renames.read() == {h: 1 for h in everything} and s3_writes(seaweed, bucket) == {h: 1 for h in everything}
    no_tracebacks(n1, n2, n3)
    for d in (n1, n2, n3):
        assert d.stop() == 0


def test_the_same_200_files_dropped_on_two_nodes_at_once_are_200_entries_with_one_set_of_copies(
        daemon_factory, workdir: Path, postgres_url: str, seaweed: SeaweedFS, remotes) -> None:  # noqa: F811
    remote_list, renames, bucket = remotes
    cluster = Cluster(daemon_factory, workdir, postgres_url, remote_list)
    n1, n2 = cluster.add(), cluster.add()
    files = {f"same-{i:03}.bin": os.urandom(2048) + i.to_bytes(2, "big") for i in range(200)}
    for d in (n1, n2):  # written aside first, so that both inboxes fill within the same moment
        for name, data in files.items():
            (d.root / f".{name}.part").write_bytes(data)
    for name in files:
        for d in (n1, n2):
            os.rename(d.root / f".{name}.part", d.inbox / name)
    hashes = {hashlib.sha256(data).hexdigest() for data in files.values()}

    wait_for(lambda: all_stored(n1, hashes, {"r0", "s3"}), timeout=120, message="200 files with both copies")
    for d in (n1, n2):
        wait_for(lambda d=d: not any(d.inbox.iterdir()), message=f"{d.config['node']}'s inbox taken")
        listed = d.files()
        assert len(listed) == 200 and {f["hash"] for f in listed} == hashes
    assert renames.read() == {h: 1 for h in hashes}, "a file was written to the folder remote twice"
    assert s3_writes(seaweed, bucket) == {h: 1 for h in hashes}, "a file was PUT to S3 twice"
    # each node keeps the bytes it was given, in its own cache
    nodes = nodes_of(n1)
    assert nodes["n1"]["cache_files"] == nodes["n2"]["cache_files"] == 200
    assert n1.status()["cluster"]["nodes"] == 2
    no_tracebacks(n1, n2)
    assert n1.stop() == 0 and n2.stop() == 0


def hangs(locker: Path) -> list[tuple[int, int]]:
    """The plowup stand-ins hanging now: (plowup's pid, its `sleep` child's pid) each."""
    folder = locker / "hangs"
    pairs = [tuple(map(int, f.read_text().split())) for f in folder.iterdir()] if folder.exists() else []
    return [p for p in pairs if len(p) == 2]


def locker_remotes(workdir: Path, locker: Path, hang: int, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A folder remote r0 and a file locker (the plowshare stand-ins) whose first `hang` uploads hang."""
    locker.mkdir()
    (workdir / "nas").mkdir(exist_ok=True)
    (locker / "control.json").write_text(json.dumps({"plowup": {"hang": True, "times": hang}}))
    monkeypatch.setenv("FAKE_PLOWSHARE_STORE", str(locker))
    return [{"name": "r0", "type": "directory", "path": str(workdir / "nas")},
            {"name": "locker", "type": "plowshare", "host": "fakelocker", "bin_dir": FAKES}]


def test_a_node_killed_in_the_middle_of_uploads_leaves_its_claims_to_the_others_after_the_lease(
        daemon_factory, workdir: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # a file locker (the plowshare stand-ins) whose first three uploads hang: n1 is caught sending
    locker = workdir / "locker"
    remote_list = locker_remotes(workdir, locker, 3, monkeypatch)
    renames = Renames(workdir / "nas")
    try:
        cluster = Cluster(daemon_factory, workdir, postgres_url, remote_list)
        n1 = cluster.add(upload={"concurrency": 8})
        hashes = set(drop(n1, {f"k{i}.bin": os.urandom(100_000 + i) for i in range(3)}).values())

        def hanging() -> list[int]:
            return [pid for pair in hangs(locker) for pid in pair]
        wait_for(lambda: len(hanging()) == 6 and all_stored(n1, hashes, {"r0"}), timeout=60,
                 message="n1 sending its three files to the locker (hanging) after r0 took them")
        n2, n3 = cluster.add(), cluster.add()
        held = nodes_of(n2)
        assert (held["n1"]["claims"], held["n2"]["claims"], held["n3"]["claims"]) == (3, 0, 0)

        n1.kill()  # SIGKILL: no release of its claims; its plowup children are orphans now
        for pid in hanging():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # the others take the pairs over once n1's lease runs out, fetching the bytes from r0
        wait_for(lambda: all_stored(n2, hashes, {"r0", "locker"}), timeout=90,
                 message="the locker copies sent by n2 or n3 after n1's lease ran out")
        took = time.monotonic() - killed
        stored = sorted(p.name for p in (locker / "files" / "fakelocker").iterdir() if "." not in p.name)
        assert len(stored) == 3, stored
        plowups = [c for c in map(json.loads, (locker / "calls.log").read_text().splitlines())
                   if c["tool"] == "plowup"]
        assert len(plowups) == 6  # three hung on n1, three sent by the others: no pair sent twice
        assert renames.read() == {h: 1 for h in hashes}
        # not before the lease: n1 renewed it every lease/2 (1.5 s) up to the kill, so it ran out
        # 1.5 to 3 s after it; n1 shows down once its heartbeat (renewed every lease/4) is 3 s old
        assert took >= 1.4, took
        seen = wait_for(lambda: (s := nodes_of(n3))["n1"]["state"] == "down" and s, timeout=20,
                        message="n1 shown down")
        assert seen["n1"]["claims"] == seen["n2"]["claims"] == seen["n3"]["claims"] == 0
        no_tracebacks(n2, n3)
        assert n2.stop() == 0 and n3.stop() == 0
    finally:
        renames.close()


def test_postgresql_stopped_for_30_s_under_load_every_node_waits_and_resumes_losing_nothing(
        daemon_factory, workdir: Path, own_server: PostgresServer, seaweed: SeaweedFS, remotes) -> None:  # noqa: F811
    remote_list, renames, bucket = remotes
    cluster = Cluster(daemon_factory, workdir, own_server.create_database(), remote_list)
    n1, n2 = cluster.add(), cluster.add()
    hashes: set[str] = set()
    for d in (n1, n2):  # work in flight on every node when the server goes
        hashes |= set(drop(d, {f"{d.config['node']}-a{i}": os.urandom(65536) for i in range(30)}).values())
    wait_for(lambda: len(n1.files()) >= 10, timeout=30, message="ingest under way")
    own_server.stop("immediate")  # no goodbye to the clients: a crash or a cut network
    in_flight = set(hashes)  # the files whose copies may have been in flight then
    stopped = time.monotonic()

    def unreachable(d: Daemon) -> bool:
        return any(p.startswith("catalog unreachable: ") for p in d.status()["problems"])
    rounds = 0
    while time.monotonic() - stopped < 30:  # 30 s of outage with files still arriving on every node
        for d in (n1, n2):
            hashes |= set(drop(d, {f"{d.config['node']}-b{rounds}-{i}": os.urandom(4096) for i in range(5)}).values())
            wait_for(lambda d=d: unreachable(d), timeout=60, message=f"{d.config['node']} saying why it waits")
            assert d.proc.poll() is None
        rounds += 1
        time.sleep(1)  # pacing the load, not waiting for anything
    for d in (n1, n2):
        assert any(not p.name.startswith(".") for p in d.inbox.iterdir())  # ingest waits, files left in place
        summary = d.ctl("status")
        assert summary.returncode == 0 and b"catalog unreachable" in summary.stdout

    own_server.start()
    for d in (n1, n2):
        try:
            wait_for(lambda d=d: all_stored(d, hashes, {"r0", "s3"}), timeout=120,
                     message=f"every file with both copies after the outage, seen from {d.config['node']}")
        except AssertionError:
            seen = copies_of(d)
            missing = {h: seen.get(h) for h in hashes if h not in seen or seen[h] < {"r0", "s3"}}
            print("files without both copies:", len(missing), list(missing.items())[:5])
            for x in (n1, n2):
                print(x.config["node"], "INBOX", sorted(p.name for p in x.inbox.iterdir())[:10])
                print(x.config["node"], "STATUS", json.dumps(x.status())[:3000])
                print(x.config["node"], "LOG", "\n".join(line for line in x.log().splitlines()
                                                         if " WARNING " in line or " ERROR " in line)[-6000:])
            raise
        assert not any(d.inbox.iterdir())
        assert not unreachable(d)
    assert len(n1.files()) == len(hashes) == 60 + 10 * rounds
    # A copy whose send was in flight when the server went was written, but its record could not be
    # (the catalog was gone): after the outage the pair is still pending and is sent again, the same
    # bytes under the same name. Only those: nothing dropped during the outage is written twice, and
    # nothing more than twice.
    for writes in (renames.read(), s3_writes(seaweed, bucket)):
        assert set(writes) == hashes
        again = {h for h, n in writes.items() if n > 1}
        assert again <= in_flight and max(writes.values()) <= 2, (len(again), writes.most_common(3))
    for d in (n1, n2):  # waiting is no hang: the watchdog was fed all along
        assert "no more watchdog pings" not in d.log()
    no_tracebacks(n1, n2)
    assert n1.stop() == 0 and n2.stop() == 0


def test_a_catalog_is_back_within_seconds_of_the_server_after_a_long_outage(own_server: PostgresServer) -> None:
    """psycopg_pool alone retries with a doubling delay: after 30 s away its next try came up to 30 s
    after the server was back. The catalog tries one direct connection a second meanwhile."""
    from cloudmanagerd.catalog import DB_ERRORS, Catalog
    catalog = Catalog.open(own_server.create_database(), "n1")
    try:
        assert catalog.cache_bytes() == 0
        own_server.stop("immediate")
        started = time.monotonic()

        def refused() -> bool:  # the pool's backoff grows while callers keep asking
            try:
                catalog.cache_bytes()
            except DB_ERRORS:
                return time.monotonic() - started > 20
            raise AssertionError("the catalog answered with the server stopped")
        wait_for(refused, timeout=60, interval=0.5, message="20 s of refusals")
        assert catalog.health().unreachable
        own_server.start()
        back = time.monotonic()
        wait_for(lambda: catalog.cache_bytes() == 0, timeout=30, interval=0.1, message="the catalog back")
        assert time.monotonic() - back < 5
        assert catalog.counts(1, 1)["files"] == 0  # a transaction: the outage is over for status too
        assert catalog.health().unreachable is None
    finally:
        catalog.close()  # the replaced pools' threads are gone too (no_leaks)


def test_a_node_frozen_past_its_lease_while_sending_leaves_the_pair_to_the_node_that_took_it(
        daemon_factory, workdir: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # n1 is frozen (a VM paused, a cut network) in the middle of a send; once its lease has run out
    # n2 takes the pair over and sends it. When n1 wakes up and its old send fails, that failure
    # must not undo n2's copy or queue the pair again.
    locker = workdir / "locker"
    cluster = Cluster(daemon_factory, workdir, postgres_url, locker_remotes(workdir, locker, 1, monkeypatch))
    n1, n2 = cluster.add(), cluster.add()
    h = drop(n1, {"frozen.bin": os.urandom(50_000)})["frozen.bin"]
    wait_for(lambda: hangs(locker) and all_stored(n2, {h}, {"r0"}), timeout=60,
             message="n1 sending to the locker (hanging) after r0 took the file")
    assert nodes_of(n2)["n1"]["claims"] == 1
    os.kill(n1.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: all_stored(n2, {h}, {"r0", "locker"}), timeout=60,
                 message="n2 sending the pair once n1's lease ran out")
    finally:
        os.kill(n1.proc.pid, signal.SIGCONT)
    (plowup, sleeper), = hangs(locker)
    os.kill(sleeper, signal.SIGKILL)  # n1's old send now fails (the stand-in exits 1)
    wait_for(lambda: "upload of hash=" in n1.log() and "remote=locker failed" in n1.log(), timeout=30,
             message="n1 seeing its old send fail")
    for d in (n1, n2):
        assert copies_of(d)[h] == {"r0", "locker"}
        uploads = d.status()["uploads"]
        assert uploads["queued"] + uploads["retrying"] + uploads["active"] + uploads["failed"] == 0, uploads
    assert [n["claims"] for n in nodes_of(n1).values()] == [0, 0]
    assert len([p for p in (locker / "files" / "fakelocker").iterdir() if "." not in p.name]) == 1
    assert n1.proc.poll() is None  # its name was never taken: it runs on
    no_tracebacks(n1, n2)
    assert n1.stop() == 0 and n2.stop() == 0
