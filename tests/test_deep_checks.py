"""Issue 14, items 3-5 without a daemon: checks that read the bytes (verify --deep, the budgeted scrub of
remote copies), pairs in backoff made due when a remote works again or on `retry`, and the warnings
for configs that cannot keep their promise. Real folder remotes, a real SQLite catalog, a fake clock."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import wait_for
from test_eviction import REMOTES, World

from cloudmanagerd.config import DEFAULT_REMOTE_READ, ConfigError, load_config, upload_policy
from cloudmanagerd.events import Events
from cloudmanagerd.preflight import promise_warnings
from cloudmanagerd.remotes.base import REMOTE, RemoteError
from cloudmanagerd.remotes.directory import DirectoryRemote
from cloudmanagerd.scrub import read_back
from cloudmanagerd.uploads import Uploader


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, capacity=1000)
    yield w
    w.close()


def flip_a_byte(path: Path, offset: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def proven(w: World) -> dict[tuple[str, str], float | None]:
    return {(h, r): p for h, r, p in w.catalog.db.connection().execute("SELECT hash, remote, proven FROM copies")}


# -- verify --remotes, quick and deep -------------------------------------------------------------------

def test_a_flipped_byte_passes_the_quick_check_and_the_deep_one_finds_it_and_queues_a_new_copy(world: World) -> None:
    a = world.add("a", 300)
    b = world.add("b", 300)
    flip_a_byte(world.remote_copy("r0", a))  # same size: only the content tells

    quick = world.scrubber.verify_remotes()
    assert (quick["depth"], quick["checked"], quick["bad"]) == ("quick", 4, 0)
    assert world.pending(a) == []

    deep = world.scrubber.verify_remotes(deep=True)
    assert deep["depth"] == "deep" and deep["checked"] == 4 and deep["bad"] == 1 and deep["unreachable"] == 0
    assert deep["per_remote"] == {"r0": {"depth": "deep", "checked": 2, "bad": 1, "unreachable": 0},
                                  "r1": {"depth": "deep", "checked": 2, "bad": 0, "unreachable": 0}}
    assert deep["bytes_read"] == 4 * 300
    # the one bad-copy path: it no longer counts, its remote is charged, a new copy is queued
    assert world.good_remotes(a) == ["r1"] and world.pending(a) == ["r0"]
    assert world.catalog.remote_stats()["r0"]["errors"] == 1
    assert sorted(world.good_remotes(b)) == ["r0", "r1"]
    marks = proven(world)
    assert marks[(b, "r0")] == marks[(b, "r1")] == world.clock() and (a, "r0") not in marks


def test_deep_verify_finds_a_missing_and_a_shortened_copy_and_spares_an_unreachable_remote(world: World) -> None:
    a = world.add("a", 300)
    b = world.add("b", 300)
    world.remote_copy("r0", a).unlink()
    world.remote_copy("r0", b).write_bytes(world.data[b][:100])
    report = world.scrubber.verify_remotes(deep=True)
    assert report["per_remote"]["r0"]["bad"] == 2 and report["per_remote"]["r1"]["bad"] == 0
    assert world.pending(a) == ["r0"] and world.pending(b) == ["r0"]

    c = world.add("c", 300)
    world.remote_dirs["r1"].rename(world.root / "away")
    report = world.scrubber.verify_remotes(deep=True)
    assert report["per_remote"]["r1"]["unreachable"] == 3 and report["per_remote"]["r1"]["bad"] == 0
    assert sorted(world.good_remotes(c)) == ["r0", "r1"], "a remote that cannot be read is not blamed"


def test_read_back_streams_a_large_copy_in_bounded_memory(tmp_path: Path) -> None:
    remote = DirectoryRemote("r", str(tmp_path))
    body = random.Random(1).randbytes(24 << 20)
    h = hashlib.sha256(body).hexdigest()
    (tmp_path / h[:2]).mkdir()
    (tmp_path / h[:2] / h).write_bytes(body)
    del body
    tracemalloc.start()
    try:
        digest, size = read_back(remote, h, "")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (digest, size) == (h, 24 << 20)
    assert peak < 4 << 20, f"reading back 24 MiB peaked at {peak} bytes of Python memory"


def test_read_back_passes_on_the_backends_error(tmp_path: Path) -> None:
    remote = DirectoryRemote("r", str(tmp_path / "gone"))
    with pytest.raises(RemoteError) as caught:
        read_back(remote, "ab" * 32, "")
    assert caught.value.kind == REMOTE
    assert len(os.listdir("/proc/self/fd")) < 200, "no descriptor left behind"


class EndlessRemote:
    """A folder remote whose download never ends (a huge copy, a slow link) until it is cancelled."""

    def __init__(self, inner: DirectoryRemote) -> None:
        self.inner = inner
        self.entered = threading.Event()

    def get(self, h, url, dst_fd, transfer=None):
        self.entered.set()
        done = 0
        while True:
            done += os.write(dst_fd, b"x" * 4096)
            transfer.update(done)  # raises Cancelled once cancelled
            transfer.wait(0.01)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_stop_cancels_a_deep_read_in_progress_and_ends_the_check(world: World) -> None:
    """A daemon stopping never waits for a deep read of a large copy (scrub or verify)."""
    for i in range(3):
        world.add(f"f{i}", 100)
    slow = EndlessRemote(world.dir_remotes["r0"].inner)
    world.remotes["r0"] = slow
    reports: list[dict] = []
    worker = threading.Thread(target=lambda: reports.append(world.scrubber.verify_remotes(deep=True)))
    worker.start()
    try:
        assert slow.entered.wait(10), "the deep check never started reading"
    finally:
        world.scrubber.stop()
        worker.join(10)
    assert not worker.is_alive(), "the check went on after stop()"
    (report,) = reports
    assert report["unreachable"] == 1 and report["bad"] == 0 and report["checked"] <= 4
    assert world.pending(next(iter(world.data))) == [], "a cancelled read blames no copy"


# -- the background scrub of remote copies ---------------------------------------------------------------

def test_the_scrub_reads_remote_copies_within_its_budget_the_one_proven_longest_ago_first(world: World) -> None:
    world.capacity = world.cache.capacity = 10_000
    files = [world.add(f"f{i}", 100) for i in range(5)]
    copies = {(h, r) for h in files for r in REMOTES}
    world.clock.tick()
    report = world.scrubber.step(0, 250)
    first = {k for k, v in proven(world).items() if v is not None}
    assert report["remotes"]["depth"] == "deep" and report["remotes"]["bytes_read"] == 300
    assert len(first) == 3 and {h for h, _ in first} <= set(files[:2]), "the oldest copies first"
    assert report["cache"]["checked"] == 0, "a cache budget of 0 re-hashes nothing"
    # the budget left over (-50) is paid back first: 200 bytes this time
    world.clock.tick()
    world.scrubber.step(0, 250)
    assert len({k for k, v in proven(world).items() if v is not None}) == 5
    for _ in range(3):
        world.clock.tick()
        world.scrubber.step(0, 250)
    before = proven(world)
    assert set(before) == copies and None not in before.values()
    # and round again, starting with the copy proven longest ago
    world.clock.tick()
    world.scrubber.step(0, 100)
    latest = [k for k, v in proven(world).items() if v == world.clock()]
    assert len(latest) == 1 and before[latest[0]] == min(before.values())


def test_a_copy_larger_than_the_scrub_budget_is_read_and_the_excess_is_paid_back(world: World) -> None:
    a = world.add("a", 800, copies=("r0",))
    flip_a_byte(world.remote_copy("r0", a))
    report = world.scrubber.step(0, 100)
    assert report["remotes"]["bad"] == 1 and report["remotes"]["bytes_read"] == 800
    assert world.pending(a) == ["r0"] or "r0" in world.pending(a)
    assert world.scrubber.remote_credit == 100 - 800
    for _ in range(7):  # 700 bytes of debt at 100 a step: nothing is read meanwhile
        assert world.scrubber.step(0, 100)["remotes"]["checked"] == 0
    assert world.scrubber.remote_credit == 0


def test_an_unreachable_remote_does_not_hold_back_the_scrub_of_the_others(world: World) -> None:
    world.capacity = world.cache.capacity = 10_000
    files = [world.add(f"f{i}", 100) for i in range(4)]
    world.remote_dirs["r1"].rename(world.root / "away")
    report = world.scrubber.step(0, 10_000)["remotes"]
    assert report["unreachable"] == 1, "one failed read pauses the remote for the rest of the tick"
    assert report["checked"] == 5 and report["bad"] == 0
    assert {h for (h, r), v in proven(world).items() if v is not None} == set(files)
    assert all(r == "r0" for (h, r), v in proven(world).items() if v is not None)
    world.clock.tick()
    report = world.scrubber.step(0, 10_000)["remotes"]
    assert report["unreachable"] == 0, "paused: not tried again at every tick"
    assert sorted(world.good_remotes(files[0])) == ["r0", "r1"], "an unreachable remote is not blamed"


def test_without_a_remote_budget_the_scrub_checks_quickly_and_with_no_budget_at_all_does_nothing(
        world: World) -> None:
    a = world.add("a", 300)
    flip_a_byte(world.remote_copy("r0", a))
    report = world.scrubber.step(1000, 0)
    assert report["remotes"]["depth"] == "quick" and report["remotes"]["checked"] == 2
    assert report["remotes"]["bad"] == 0, "a quick check cannot see a flipped byte"
    report = world.scrubber.step(0, 0)
    assert report["cache"]["checked"] == 0 and report["remotes"]["checked"] == 0


class OneUnreadable:
    """A remote that answers, but one of its objects cannot be read (S3: an object a lifecycle rule moved
    to an archive class fails its GET with InvalidObjectState; a folder: one file's permissions)."""

    def __init__(self, inner, h: str) -> None:
        self.inner = inner
        self.h = h

    def get(self, h, url, dst_fd, transfer=None):
        if h == self.h:
            raise RemoteError("InvalidObjectState: the object is archived", REMOTE)
        return self.inner.get(h, url, dst_fd, transfer)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_one_unreadable_copy_does_not_keep_the_scrub_from_proving_the_rest_of_its_remote(world: World) -> None:
    """The copy proven longest ago comes first: one that can never be read came first at every tick, paused
    its remote, and no other copy there was ever proven (the README's period broken for all of them)."""
    world.capacity = world.cache.capacity = 10_000
    files = [world.add(f"f{i}", 100) for i in range(4)]
    world.remotes["r1"] = OneUnreadable(world.remotes["r1"], files[0])
    for _ in range(4):
        world.clock.tick()
        world.scrubber._paused.clear()  # the remote's pause (real time, 10 min) ran out
        world.scrubber.step(0, 250)
    done = {(h, r) for (h, r), v in proven(world).items() if v is not None}
    assert {(h, "r1") for h in files[1:]} <= done, sorted(done)
    assert (files[0], "r1") not in done and sorted(world.good_remotes(files[0])) == ["r0", "r1"], \
        "a copy that could not be read is neither proven nor blamed"


# -- pairs waiting out a backoff ---------------------------------------------------------------------------

def backoff(w: World, h: str, remote: str, wait: float = 3600.0) -> None:
    w.catalog.upload_failed(h, remote, "remote down", w.clock() + wait, w.clock())


def states(w: World) -> dict[tuple[str, str], tuple[str, float, int]]:
    return {(h, r): (s, n, a) for h, r, s, n, a in w.catalog.db.connection().execute(
        "SELECT hash, remote, state, next_attempt, attempts FROM uploads")}


def two_files_waiting_on_both_remotes(w: World) -> tuple[str, str]:
    a = w.add("a", 100, copies=())
    b = w.add("b", 100, copies=())
    for h in (a, b):
        for r in REMOTES:
            backoff(w, h, r)
    return a, b


def test_wake_remote_makes_only_that_remotes_waiting_pairs_due_now(world: World) -> None:
    a, b = two_files_waiting_on_both_remotes(world)
    world.catalog.upload_failed(a, "r1", "gave up", None, world.clock())  # given up: only `retry` revives it
    now = world.clock.tick()
    assert world.catalog.wake_remote("r0", now) == 2
    s = states(world)
    assert s[(a, "r0")] == s[(b, "r0")] == ("retrying", now, 1), "due now; the attempt still counts"
    assert s[(b, "r1")][0] == "retrying" and s[(b, "r1")][1] > now
    assert s[(a, "r1")][0] == "failed"
    assert world.catalog.wake_remote("r0", now) == 0, "nothing waits any more"


def test_retry_waiting_counts_and_moves_pairs_in_backoff(world: World) -> None:
    a, _ = two_files_waiting_on_both_remotes(world)
    now = world.clock.tick()
    assert world.catalog.retry_waiting([a], now) == 2
    assert world.catalog.retry_waiting(None, now) == 2
    assert {v[0] for v in states(world).values()} == {"queued"}
    assert world.catalog.retry_waiting(None, now) == 0


class FlakyRemote:
    """A real folder remote whose uploads and probe fail with `kind` while `broken` (a remote down, then
    repaired)."""

    def __init__(self, inner: DirectoryRemote, kind: str = REMOTE) -> None:
        self.inner = inner
        self.kind = kind
        self.broken = True

    def probe(self) -> None:
        if self.broken:
            raise RemoteError("remote down", self.kind)

    def put(self, h, src_fd, size, transfer=None):
        self.probe()
        return self.inner.put(h, src_fd, size, transfer)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Pipeline:
    """An Uploader over r0 (flaky) and r1, recording the events it emits."""

    def __init__(self, w: World, flaky: FlakyRemote) -> None:
        self.events = Events()
        self.seen: list[tuple[str, ...]] = []
        self.events.on("remote-healthy", lambda name: self.seen.append(("remote-healthy", name)))
        self.up = Uploader(w.catalog, w.cache, {"r0": flaky, "r1": w.dir_remotes["r1"]}, list(REMOTES),
                           upload_policy(2), 60.0, now=w.clock, events=self.events, rng=random.Random(3))


def test_a_probe_that_finds_a_remote_working_again_makes_its_waiting_pairs_due_at_once(world: World) -> None:
    a = world.add("a", 100, copies=())
    backoff(world, a, "r0", wait=6 * 3600)
    flaky = FlakyRemote(world.dir_remotes["r0"].inner)
    p = Pipeline(world, flaky)
    try:
        p.up.unhealthy["r0"] = "remote down"
        p.up.probe_unhealthy()
        assert states(world)[(a, "r0")][0] == "retrying" and p.seen == []
        flaky.broken = False
        p.up.probe_unhealthy()
        assert states(world)[(a, "r0")] == ("retrying", world.clock(), 1), "due now, its attempt still counted"
        assert p.seen == [("remote-healthy", "r0")]
        p.up.pump()
        wait_for(lambda: "r0" in world.good_remotes(a), message="sent at once, not after its 6 h backoff")
    finally:
        p.up.close()


def test_a_server_that_was_down_with_transient_errors_is_probed_and_its_pairs_go_when_it_answers(
        world: World) -> None:
    """A server down fails uploads as transient (no "unhealthy" mark): the probe finds it down, then back."""
    a = world.add("a", 100, copies=("r1",))
    flaky = FlakyRemote(world.dir_remotes["r0"].inner, kind="transient")
    p = Pipeline(world, flaky)
    try:
        p.up.pump()
        wait_for(lambda: states(world)[(a, "r0")][0] == "retrying", message="the r0 upload failed")
        assert p.up.unhealthy == {}
        world.catalog.db.connection().execute("UPDATE uploads SET next_attempt=? WHERE hash=?",
                                              (world.clock() + 6 * 3600, a))  # a long backoff, to be sure
        p.up.probe_unhealthy()  # still down: noted
        assert states(world)[(a, "r0")][0] == "retrying" and p.seen == []
        flaky.broken = False
        p.up.probe_unhealthy()
        assert states(world)[(a, "r0")][1] == world.clock() and p.seen == [("remote-healthy", "r0")]
        p.up.pump()
        wait_for(lambda: "r0" in world.good_remotes(a), message="sent once the server answered")
    finally:
        p.up.close()


class PoisonRemote(FlakyRemote):
    """A remote that answers its probe and takes other copies, but fails one object every time."""

    def __init__(self, inner: DirectoryRemote, poison: str) -> None:
        super().__init__(inner, kind="transient")
        self.broken = False
        self.poison = poison

    def put(self, h, src_fd, size, transfer=None):
        if h == self.poison:
            raise RemoteError("this one object fails", "transient")
        return self.inner.put(h, src_fd, size, transfer)


def test_a_server_back_before_the_probe_looked_is_woken_once_and_a_pair_failing_on_a_working_remote_keeps_its_backoff(
        world: World) -> None:
    a = world.add("a", 100, copies=("r1",))
    p = Pipeline(world, PoisonRemote(world.dir_remotes["r0"].inner, a))
    try:
        p.up.pump()
        wait_for(lambda: states(world)[(a, "r0")][2] == 1, message="the r0 upload failed")
        # the probe answers at once: maybe the server came back before it looked, so its pairs go now, once
        p.up.probe_unhealthy()
        assert states(world)[(a, "r0")][1] == world.clock() and p.seen == [("remote-healthy", "r0")]
        p.up.pump()
        wait_for(lambda: states(world)[(a, "r0")][2] == 2, message="the second attempt failed too")
        due = states(world)[(a, "r0")][1]
        assert due > world.clock()
        # no copy to r0 succeeded since: the pair failing on a working remote keeps its backoff
        for _ in range(3):
            p.up.probe_unhealthy()
        assert states(world)[(a, "r0")][1] == due and len(p.seen) == 1
    finally:
        p.up.close()


def test_copies_of_other_files_do_not_undo_the_backoff_of_a_pair_that_fails_on_a_working_remote(
        world: World) -> None:
    """A retry storm: one object fails every time while other files reach the same remote. Each of their
    copies must not re-arm the wake, or the failing pair goes again after every probe (every 10 s)
    instead of its backoff (up to retry.max): with a large file, gigabytes sent again and again."""
    a = world.add("a", 100, copies=("r1",))
    p = Pipeline(world, PoisonRemote(world.dir_remotes["r0"].inner, a))
    try:
        p.up.pump()
        wait_for(lambda: states(world)[(a, "r0")][2] == 1, message="the r0 upload failed")
        p.up.probe_unhealthy()  # woken once: the server may have come back before the probe looked
        assert len(p.seen) == 1
        p.up.pump()
        wait_for(lambda: states(world)[(a, "r0")][2] == 2, message="the second attempt failed too")
        for attempt in (3, 4, 5):
            b = world.add(f"b{attempt}", 100, copies=("r1",))
            p.up.pump()
            wait_for(lambda: "r0" in world.good_remotes(b), message="another file reached r0")
            world.clock.tick()
            world.catalog.db.connection().execute(  # its backoff ran out
                "UPDATE uploads SET next_attempt=? WHERE hash=? AND remote='r0'", (world.clock(), a))
            p.up.pump()
            wait_for(lambda: states(world)[(a, "r0")][2] == attempt, message="it failed again")
            due = states(world)[(a, "r0")][1]
            p.up.probe_unhealthy()
            assert states(world)[(a, "r0")][1] == due > world.clock(), f"attempt {attempt}: backoff undone"
        assert len(p.seen) == 1
    finally:
        p.up.close()


# -- configs that cannot keep a promise ---------------------------------------------------------------------

def write_config(root: Path, remotes: list[dict], **extra) -> Path:
    (root / "inbox").mkdir(exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({"inbox": str(root / "inbox"), "cache": {"path": str(root / "cache"),
                                    "capacity": "1GiB"}, "state": str(root / "state"),
                                    "control": {"socket": str(root / "c.sock")}, "remotes": remotes, **extra}))
    return path


@pytest.fixture
def elsewhere() -> Iterator[Path]:
    """A folder on another filesystem than /tmp (tmpfs)."""
    if os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev:
        pytest.skip("/dev/shm is on the filesystem of /tmp here")
    path = Path(tempfile.mkdtemp(prefix="cm-elsewhere-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_warnings_name_a_remote_on_the_cache_disk_redundancy_1_and_too_few_usable_remotes(
        tmp_path: Path, elsewhere: Path) -> None:
    (tmp_path / "same").mkdir()
    config = load_config(write_config(tmp_path, [{"name": "same", "type": "directory", "path": str(tmp_path / "same")},
                                                 {"name": "far", "type": "directory", "path": str(elsewhere)}]))
    assert promise_warnings(config) == [
        f"remote same: {tmp_path / 'same'} is on the same filesystem as the cache: this copy dies with the disk "
        "(point it at another disk or a mounted NAS)"]

    config = load_config(write_config(tmp_path, [{"name": "far", "type": "directory", "path": str(elsewhere)}]))
    assert promise_warnings(config) == ["upload.redundancy is 1: each file has one copy, lost with its remote "
                                        "(set 2 or more, with as many remotes)"]

    config = load_config(write_config(tmp_path, [{"name": "far", "type": "directory", "path": str(elsewhere)},
                                                 {"name": "gone", "type": "directory", "path": str(elsewhere / "x")}],
                                      upload={"redundancy": 2}))
    assert promise_warnings(config) == [
        f"remote gone: {elsewhere / 'x'} does not exist: no copy can be made there until it does (mount it, or "
        f"mkdir -p {elsewhere / 'x'})",
        "upload.redundancy is 2 but only 1 remote is usable: files stay below it (fix the remotes named above, "
        "or add remotes)"]

    (elsewhere / "y").mkdir()
    config = load_config(write_config(tmp_path, [{"name": "far", "type": "directory", "path": str(elsewhere)},
                                                 {"name": "near", "type": "directory", "path": str(elsewhere / "y")}],
                                      upload={"redundancy": 2}))
    assert promise_warnings(config) == [
        f"remote near: {elsewhere / 'y'} is on the same filesystem as remote far: their copies die together with "
        "that disk (point one at another disk)"]


def test_a_safe_config_has_no_warning(tmp_path: Path, elsewhere: Path) -> None:
    for name in ("a", "b"):
        (elsewhere / name).mkdir()
    config = load_config(write_config(tmp_path, [
        {"name": "a", "type": "directory", "path": str(elsewhere / "a")},
        {"name": "s3", "type": "s3", "bucket": "b", "endpoint": "http://127.0.0.1:1", "access_key_id": "k",
         "secret_access_key": "s"}]))
    assert config.upload.redundancy == 2 and promise_warnings(config) == []


def test_scrub_remote_read_is_a_rate_with_a_default(tmp_path: Path) -> None:
    remotes = [{"name": "r", "type": "directory", "path": str(tmp_path / "r")}]
    assert load_config(write_config(tmp_path, remotes)).scrub.remote_read == DEFAULT_REMOTE_READ
    assert load_config(write_config(tmp_path, remotes, scrub={"remote_read": "5GiB/d"})).scrub.remote_read == \
        5 * 2**30 / 86400
    assert load_config(write_config(tmp_path, remotes, scrub={"remote_read": 0})).scrub.remote_read == 0
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, remotes, scrub={"remote_read": "lots"}))
    assert caught.value.errors == ["scrub.remote_read: expected a rate like 64KiB/s, got 'lots'"]
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, remotes, scrub={"remote_reed": "1GiB/d"}))
    assert caught.value.errors == ["scrub.remote_reed: unknown key (did you mean remote_read?)"]
