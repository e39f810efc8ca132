"""The upload state machine on its parts: a real catalog (SQLite file), a real cache folder,
in-memory remotes that succeed or fail on demand, and a clock that moves only when told.

No scheduler runs here: each test calls `pump()` itself and waits for the transfer pool to
go idle, so every retry, replacement and cancellation is a step the test chose.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmanagerd.cache import Cache
from cloudmanagerd.catalog import Catalog, IngestRecord
from cloudmanagerd.config import RetryConfig, UploadConfig
from cloudmanagerd.remotes.base import FILE, MISSING, REMOTE, TRANSIENT, RemoteError, SourceMismatch
from cloudmanagerd.uploads import SendCheck, Uploader, backoff_delay, next_attempt
from conftest import wait_for

T0 = 1_700_000_000.0
INITIAL = 30.0
MAX = 6 * 3600.0


def policy(redundancy: int = 2, concurrency: int = 4, max_attempts: int = 0, initial: float = INITIAL,
           maximum: float = MAX) -> UploadConfig:
    return UploadConfig(redundancy=redundancy, min_redundancy=redundancy, concurrency=concurrency,
                        retry=RetryConfig(initial=initial, max=maximum, max_attempts=max_attempts),
                        stall=60.0, min_rate=0.0)


# -- backoff ---------------------------------------------------------------------------------

def test_backoff_delay_stays_within_full_jitter_bounds_grows_and_is_capped() -> None:
    rng = random.Random(1234)
    means = []
    for attempt in range(1, 16):
        bound = min(MAX, INITIAL * 2 ** (attempt - 1))
        samples = [backoff_delay(attempt, INITIAL, MAX, rng) for _ in range(400)]
        assert all(0 <= d <= bound for d in samples), attempt
        assert max(samples) > 0.8 * bound  # the whole range is used, not a sliver of it
        means.append(sum(samples) / len(samples))
    # grows with the attempts until the cap...
    assert means[0] < means[3] < means[6] < means[9]
    # ...and is capped at max: attempt 15 would be 30 s * 2**14 = 5.7 days uncapped
    assert max(backoff_delay(40, INITIAL, MAX, rng) for _ in range(1000)) <= MAX


def test_backoff_delay_is_reproducible_with_a_seeded_rng() -> None:
    a = [backoff_delay(n, INITIAL, MAX, random.Random(7)) for n in range(1, 10)]
    b = [backoff_delay(n, INITIAL, MAX, random.Random(7)) for n in range(1, 10)]
    assert a == b


def test_next_attempt_gives_up_on_file_errors_at_once() -> None:
    assert next_attempt(FILE, 1, policy(max_attempts=0), T0, random.Random(1)) is None


def test_next_attempt_gives_up_when_max_attempts_is_reached() -> None:
    p = policy(max_attempts=3)
    rng = random.Random(1)
    assert next_attempt(TRANSIENT, 2, p, T0, rng) is not None
    assert next_attempt(TRANSIENT, 3, p, T0, rng) is None
    assert next_attempt(REMOTE, 4, p, T0, rng) is None


def test_next_attempt_never_gives_up_with_max_attempts_0() -> None:
    p = policy(max_attempts=0)
    rng = random.Random(1)
    for attempts in (1, 10, 1000, 10**6):
        for kind in (TRANSIENT, REMOTE):
            when = next_attempt(kind, attempts, p, T0, rng)
            assert when is not None and T0 <= when <= T0 + MAX


def test_next_attempt_is_now_plus_the_backoff_delay() -> None:
    p = policy(max_attempts=5)
    for attempts in (1, 2, 4):
        when = next_attempt(TRANSIENT, attempts, p, T0, random.Random(99))
        assert when == T0 + backoff_delay(attempts, INITIAL, MAX, random.Random(99))
        assert T0 <= when <= T0 + INITIAL * 2 ** (attempts - 1)


# -- fakes and the world they live in ----------------------------------------------------------

class FakeRemote:
    """An in-memory remote; `fail` = None (works) or the RemoteError kind it raises on put."""

    kind = "fake"
    reports_progress = True

    def __init__(self, name: str, fail: str | None = None) -> None:
        self.name = name
        self.fail = fail
        self.objects: dict[str, bytes] = {}
        self.puts = 0
        self.closed = False
        self.gate: threading.Event | None = None  # when set: put waits for it
        self.entered = threading.Semaphore(0)
        self._lock = threading.Lock()

    def put(self, h: str, src_fd: int, size: int, transfer=None) -> str:
        with self._lock:
            self.puts += 1
        if self.gate is not None:
            self.entered.release()
            while not self.gate.wait(0.01):
                if transfer is not None:
                    transfer.check()  # raises Cancelled once the uploader cancels it
        if self.fail is not None:
            raise RemoteError(f"remote {self.name}: refused ({self.fail})", self.fail)
        os.lseek(src_fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(src_fd, 1 << 16):
            chunks.append(chunk)
        data = b"".join(chunks)
        assert len(data) == size
        with self._lock:
            self.objects[h] = data
        return f"fake://{self.name}/{h}"

    def get(self, h: str, url: str, dst_fd: int, transfer=None) -> None:
        if h not in self.objects:
            raise RemoteError(f"remote {self.name}: {h} is missing", MISSING)
        os.write(dst_fd, self.objects[h])

    def exists(self, h: str, url: str) -> int | None:
        data = self.objects.get(h)
        return None if data is None else len(data)

    def delete(self, h: str, url: str) -> None:
        self.objects.pop(h, None)

    def probe(self) -> None:
        if self.fail == REMOTE:
            raise RemoteError(f"remote {self.name}: unreachable", REMOTE)

    def close(self) -> None:
        self.closed = True


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.db_path = root / "state" / "catalog.db"
        self.url = f"sqlite:///{self.db_path}"
        self.clock = T0
        self.catalog = Catalog.open(self.url, "node1")
        self.cache = Cache(str(root / "cache"), 1 << 30)
        self.uploaders: list[Uploader] = []
        self.catalogs: list[Catalog] = [self.catalog]

    def now(self) -> float:
        return self.clock

    def uploader(self, remotes: list[FakeRemote], catalog: Catalog | None = None, **policy_args) -> Uploader:
        up = Uploader(catalog or self.catalog, self.cache, {r.name: r for r in remotes}, [r.name for r in remotes],
                      policy(**policy_args), lease=60.0, now=self.now, rng=random.Random(42))
        self.uploaders.append(up)
        return up

    def batch_uploader(self, remote) -> tuple[Uploader, list[int], list[str]]:
        """One real remote's uploader, one pair at a time and redundancy 1: (uploader, the size of each
        put_many batch the remote was given, the hashes reported as bad cache objects)."""
        batches: list[int] = []
        bad: list[str] = []
        put_many = remote.put_many
        remote.put_many = lambda items: batches.append(len(items)) or put_many(items)
        up = Uploader(self.catalog, self.cache, {remote.name: remote}, [remote.name],
                      policy(redundancy=1, concurrency=1), lease=60.0, now=self.now, rng=random.Random(1),
                      bad_object=lambda h, size, why, seen: bad.append(h))
        self.uploaders.append(up)
        return up, batches, bad

    def reopen_catalog(self) -> Catalog:
        catalog = Catalog.open(self.url, "node1")
        self.catalogs.append(catalog)
        return catalog

    def add_file(self, data: bytes, remotes: list[str], name: bytes | None = None) -> str:
        """A file as ingest leaves it: its object in the cache, its rows in the catalog."""
        h = hashlib.sha256(data).hexdigest()
        self.cache.subdir_fd(h)  # creates <cache>/<h[:2]>
        with open(self.cache.object_path(h), "wb") as f:
            f.write(data)
        record = IngestRecord(h, name or f"file-{h[:8]}".encode(), len(data))
        self.catalog.begin_ingest([record], self.clock)
        assert self.catalog.finish_ingest([record], remotes, self.clock) == [h]
        return h

    def pairs(self, h: str) -> dict[str, dict]:
        """The uploads rows of a file, read straight from the database file."""
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM uploads WHERE hash=?", (h,)).fetchall()
        return {r["remote"]: dict(r) for r in rows}

    def copies(self, h: str) -> list[str]:
        return sorted(c["remote"] for c in self.catalog.file_info(h)["copies"])

    def close(self) -> None:
        for up in self.uploaders:
            up.close()
        for catalog in self.catalogs:
            catalog.close()
        self.cache.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def step(up: Uploader) -> None:
    """One scheduler tick: pump what is due, then wait until every transfer it started ended."""
    up.pump()
    wait_for(lambda: up.active_count() == 0, timeout=10, message="the upload pool to go idle")


def run_until_quiet(world: World, up: Uploader, rounds: int = 20) -> None:
    """Pump until nothing is due at the fixed `now` (new pairs queued by top-up included)."""
    for _ in range(rounds):
        due = world.catalog.next_due_time()
        if due is None or due > world.clock:
            return
        step(up)
    raise AssertionError("uploads still due after many rounds")


def remotes(*specs: str | tuple[str, str]) -> list[FakeRemote]:
    return [FakeRemote(s) if isinstance(s, str) else FakeRemote(*s) for s in specs]


# -- reaching redundancy -------------------------------------------------------------------------

def test_files_reach_redundancy_on_the_first_remotes_in_config_order(world: World) -> None:
    r0, r1, r2 = rs = remotes("r0", "r1", "r2")
    up = world.uploader(rs, redundancy=2)
    assert up.targets() == ["r0", "r1"]
    datas = [os.urandom(1000 + i) for i in range(6)]
    hashes = [world.add_file(d, up.targets()) for d in datas]
    run_until_quiet(world, up)
    for h, data in zip(hashes, datas):
        assert world.copies(h) == ["r0", "r1"]
        assert r0.objects[h] == data and r1.objects[h] == data
        info = world.catalog.file_info(h)
        assert info["pending"] == [] and info["failed"] == []
        assert {c["url"] for c in info["copies"]} == {f"fake://r0/{h}", f"fake://r1/{h}"}
        assert {p["state"] for p in world.pairs(h).values()} == {"done"}
    assert r2.objects == {} and r2.puts == 0
    counts = world.catalog.counts(2, 2)
    assert counts["below_redundancy"] == 0 and counts["copies"] == 12
    assert counts["total_outgoing"] == 2 * sum(len(d) for d in datas)
    assert world.catalog.list_files(state="pending") == []


def test_pump_never_runs_more_than_concurrency_transfers(world: World) -> None:
    r0, r1 = rs = remotes("r0", "r1")
    gate = threading.Event()
    r0.gate = r1.gate = gate
    up = world.uploader(rs, redundancy=2, concurrency=3)
    hashes = [world.add_file(os.urandom(100), ["r0", "r1"]) for _ in range(4)]
    try:
        up.pump()
        wait_for(lambda: r0.puts + r1.puts == 3, message="three transfers to start")
        assert up.active_count() == 3
        up.pump()  # no free slot: claims nothing more
        states = [p["state"] for h in hashes for p in world.pairs(h).values()]
        assert states.count("active") == 3 and states.count("queued") == 5
    finally:
        gate.set()
    wait_for(lambda: up.active_count() == 0, message="the pool to go idle")
    run_until_quiet(world, up)
    assert all(world.copies(h) == ["r0", "r1"] for h in hashes)


def test_a_transient_failure_is_replaced_by_the_next_healthy_remote(world: World) -> None:
    bad, r1, r2 = rs = remotes(("bad", TRANSIENT), "r1", "r2")
    up = world.uploader(rs, redundancy=2)
    h = world.add_file(b"payload" * 100, up.targets())
    assert set(world.pairs(h)) == {"bad", "r1"}

    step(up)
    pairs = world.pairs(h)
    # the failing pair keeps its place in the queue, with its attempt counted...
    assert pairs["bad"]["state"] == "retrying"
    assert pairs["bad"]["attempts"] == 1
    assert world.clock <= pairs["bad"]["next_attempt"] <= world.clock + INITIAL
    assert "refused" in pairs["bad"]["last_error"]
    assert pairs["bad"]["claim_owner"] is None
    # ...and the next healthy remote in config order is queued beside it
    assert pairs["r2"]["state"] == "queued"
    assert up.problems() == []  # a transient error says nothing about the remote's health

    run_until_quiet(world, up)
    assert world.copies(h) == ["r1", "r2"]
    # the file has its copies: the retrying pair is cancelled, never tried again
    assert "bad" not in world.pairs(h)
    world.clock += MAX + 1
    run_until_quiet(world, up)
    assert bad.puts == 1
    assert world.catalog.file_info(h)["pending"] == []


def test_a_pair_keeps_retrying_with_growing_backoff_while_redundancy_needs_it(world: World) -> None:
    r0, bad = rs = remotes("r0", ("bad", TRANSIENT))
    up = world.uploader(rs, redundancy=2, max_attempts=0)
    h = world.add_file(b"x" * 5000, up.targets())
    step(up)
    assert world.copies(h) == ["r0"]
    for attempt in range(1, 8):
        pair = world.pairs(h)["bad"]
        assert pair["state"] == "retrying"
        assert pair["attempts"] == attempt
        assert world.clock <= pair["next_attempt"] <= world.clock + min(MAX, INITIAL * 2 ** (attempt - 1))
        # not due yet: nothing is sent
        step(up)
        assert bad.puts == attempt
        world.clock = pair["next_attempt"]
        step(up)
        assert bad.puts == attempt + 1
    assert world.catalog.file_info(h)["pending"] == ["bad"]
    assert [f["hash"] for f in world.catalog.list_files(state="pending")] == [h]
    assert world.catalog.list_files(state="failed") == []
    assert world.catalog.counts(2, 2)["uploads"]["retrying"] == 1


def test_max_attempts_gives_a_pair_up_and_retry_revives_it(world: World) -> None:
    r0, bad = rs = remotes("r0", ("bad", TRANSIENT))
    up = world.uploader(rs, redundancy=2, max_attempts=3)
    h = world.add_file(b"y" * 5000, up.targets())
    for _ in range(5):
        step(up)
        world.clock += MAX + 1
    assert bad.puts == 3
    pair = world.pairs(h)["bad"]
    assert pair["state"] == "failed" and pair["attempts"] == 3
    info = world.catalog.file_info(h)
    assert info["pending"] == []
    assert info["failed"] == [{"remote": "bad", "error": "remote bad: refused (transient)", "attempts": 3}]
    assert [f["hash"] for f in world.catalog.list_files(state="failed")] == [h]

    bad.fail = None  # someone fixed it
    assert world.catalog.retry_failed([h], world.clock) == 1
    pair = world.pairs(h)["bad"]
    assert pair["state"] == "queued" and pair["attempts"] == 0
    run_until_quiet(world, up)
    assert world.copies(h) == ["bad", "r0"]
    assert world.catalog.list_files(state="failed") == []


def test_a_remote_error_marks_the_remote_unhealthy_and_new_files_avoid_it(world: World) -> None:
    sick, r1, r2 = rs = remotes(("sick", REMOTE), "r1", "r2")
    up = world.uploader(rs, redundancy=2)
    h1 = world.add_file(b"first" * 100, up.targets())
    step(up)
    assert up.problems() == ["remote sick: remote sick: refused (remote)"]
    assert up.targets() == ["r1", "r2"]
    assert world.pairs(h1)["sick"]["state"] == "retrying"  # a remote error is retried, not given up
    run_until_quiet(world, up)
    assert world.copies(h1) == ["r1", "r2"]

    h2 = world.add_file(b"second" * 100, up.targets())
    run_until_quiet(world, up)
    assert world.copies(h2) == ["r1", "r2"]
    assert sick.puts == 1

    # the probe finds it working again: healthy, and first in line once more
    sick.fail = None
    up.probe_unhealthy()
    assert up.problems() == []
    assert up.targets() == ["sick", "r1"]


def test_a_probe_that_still_fails_keeps_the_remote_unhealthy(world: World) -> None:
    sick, r1 = rs = remotes(("sick", REMOTE), "r1")
    up = world.uploader(rs, redundancy=1)
    world.add_file(b"z" * 10, ["sick"])
    step(up)
    up.probe_unhealthy()
    assert up.problems() == ["remote sick: remote sick: unreachable"]


def test_a_file_error_gives_up_the_pair_at_once_and_a_spare_takes_over(world: World) -> None:
    picky, r1, r2 = rs = remotes(("picky", FILE), "r1", "r2")
    up = world.uploader(rs, redundancy=2, max_attempts=0)
    h = world.add_file(b"too big for picky" * 10, up.targets())
    step(up)
    pair = world.pairs(h)["picky"]
    assert pair["state"] == "failed" and pair["attempts"] == 1
    assert up.problems() == []  # the remote is fine; this file is not for it
    run_until_quiet(world, up)
    assert world.copies(h) == ["r1", "r2"]
    world.clock += MAX + 1
    run_until_quiet(world, up)
    assert picky.puts == 1
    # once the spare gave the file its redundancy, the given-up pair is moot: cancelled, not listed
    assert world.catalog.file_info(h)["failed"] == []
    assert world.catalog.list_files(state="failed") == []


def test_a_given_up_file_is_listed_as_failed_until_retry(world: World) -> None:
    picky, r1 = rs = remotes(("picky", FILE), "r1")
    up = world.uploader(rs, redundancy=2)
    h = world.add_file(b"p" * 300, up.targets())
    other = world.add_file(b"q" * 300, ["r1"])
    run_until_quiet(world, up)
    assert world.copies(h) == ["r1"]  # no spare remote left: one copy for now
    assert [f["hash"] for f in world.catalog.list_files(state="failed")] == [h]
    assert world.catalog.counts(2, 2)["uploads"]["failed"] == 1

    picky.fail = None
    assert world.catalog.retry_failed(None, world.clock) == 1
    assert world.catalog.list_files(state="failed") == []
    run_until_quiet(world, up)
    assert world.copies(h) == ["picky", "r1"]
    assert world.copies(other) == ["r1"]
    assert world.catalog.retry_failed(None, world.clock) == 0


def test_once_a_file_has_its_copies_its_other_pending_pairs_are_cancelled(world: World) -> None:
    rs = remotes("r0", "r1", "r2")
    up = world.uploader(rs, redundancy=2, concurrency=1)
    h = world.add_file(b"c" * 1000, ["r0", "r1", "r2"])  # three pairs queued for two copies
    step(up)
    assert len(world.copies(h)) == 1
    step(up)
    assert len(world.copies(h)) == 2
    assert sorted(p["state"] for p in world.pairs(h).values()) == ["done", "done"]
    run_until_quiet(world, up)
    assert len(world.copies(h)) == 2
    assert sum(1 for r in rs if h in r.objects) == 2


def test_targets_are_the_first_healthy_remotes_in_config_order(world: World) -> None:
    a, b, c = rs = remotes(("a", REMOTE), ("b", REMOTE), "c")
    up = world.uploader(rs, redundancy=2)
    assert up.targets() == ["a", "b"]
    world.add_file(b"one" * 10, ["a"])
    step(up)
    assert up.targets() == ["b", "c"]
    world.add_file(b"two" * 10, ["b"])
    step(up)
    # too few healthy remotes: the healthy one first, then sick ones (they retry until fixed)
    targets = up.targets()
    assert targets[0] == "c" and len(targets) == 2 and len(set(targets)) == 2


def test_a_restart_resumes_claims_left_by_a_dead_process(world: World) -> None:
    hashes = [world.add_file(os.urandom(2000), ["r0", "r1"]) for _ in range(3)]
    # a process claimed every pair and died without a word
    claims = world.catalog.claim_due(world.clock, 100, 60.0)
    assert len(claims) == 6
    world.catalog.close()

    catalog = world.reopen_catalog()
    rs = remotes("r0", "r1")
    up = world.uploader(rs, catalog=catalog, redundancy=2)
    step(up)
    assert sum(r.puts for r in rs) == 0  # still claimed: nothing is sent twice
    assert catalog.release_claims(world.clock) == 6
    run_until_quiet(world, up)
    assert all(sorted(c["remote"] for c in catalog.file_info(h)["copies"]) == ["r0", "r1"] for h in hashes)


def test_a_restart_resumes_a_retrying_pair_at_its_next_attempt(world: World) -> None:
    r0, bad = rs = remotes("r0", ("bad", TRANSIENT))
    up = world.uploader(rs, redundancy=2)
    h = world.add_file(b"r" * 4000, up.targets())
    step(up)
    due = world.pairs(h)["bad"]["next_attempt"]
    up.close()
    world.catalog.close()

    catalog = world.reopen_catalog()
    catalog.release_claims(world.clock)
    fixed = remotes("r0", "bad")
    up2 = world.uploader(fixed, catalog=catalog, redundancy=2)
    step(up2)
    assert fixed[1].puts == 0  # not due yet: the backoff survived the restart
    assert world.pairs(h)["bad"]["attempts"] == 1
    world.clock = due
    step(up2)
    assert fixed[1].puts == 1
    assert sorted(c["remote"] for c in catalog.file_info(h)["copies"]) == ["bad", "r0"]


def test_close_stops_transfers_in_flight_and_queues_them_again_uncounted(world: World) -> None:
    r0, r1 = rs = remotes("r0", "r1")
    r0.gate = threading.Event()  # r0 hangs until cancelled
    up = world.uploader(rs, redundancy=2)
    h = world.add_file(b"s" * 3000, up.targets())
    up.pump()
    assert r0.entered.acquire(timeout=10)
    wait_for(lambda: world.copies(h) == ["r1"], message="the r1 copy")
    up.close()  # cancels r0's transfer and waits for it
    assert not r0.closed  # the daemon owns the remotes: fetch, scrub and rm share them
    pair = world.pairs(h)["r0"]
    assert pair["state"] == "queued" and pair["attempts"] == 0 and pair["claim_owner"] is None
    up.pump()  # a closed uploader claims nothing
    assert world.pairs(h)["r0"]["state"] == "queued"


def test_a_pair_that_failed_thousands_of_times_still_gets_a_next_attempt(world: World) -> None:
    # max_attempts 0 never gives up: after a long outage the attempt count is large, and the
    # backoff must still compute (it once overflowed a float and left the pair stuck 'active')
    r0, bad = rs = remotes("r0", ("bad", TRANSIENT))
    up = world.uploader(rs, redundancy=2, max_attempts=0)
    h = world.add_file(b"long outage" * 10, up.targets())
    with contextlib.closing(sqlite3.connect(world.db_path)) as conn, conn:  # a year-long outage's history
        conn.execute("UPDATE uploads SET attempts=5000 WHERE hash=? AND remote='bad'", (h,))
    step(up)
    pair = world.pairs(h)["bad"]
    assert pair["state"] == "retrying" and pair["attempts"] == 5001
    assert world.clock <= pair["next_attempt"] <= world.clock + MAX
    assert pair["claim_owner"] is None


@pytest.mark.parametrize("good, pairs, unhealthy, expected", [
    (set(), {}, set(), ["a", "b"]),                                  # a new file: the first two
    (set(), {}, {"a"}, ["b", "c"]),                                  # a sick remote is skipped
    (set(), {}, {"a", "b", "c"}, ["a", "b"]),                        # none healthy: queued anyway, they retry
    ({"a"}, {"b": "retrying"}, set(), ["c"]),                        # a failing pair does not count
    ({"a"}, {"b": "queued"}, set(), []),                             # enough in play
    ({"a", "b"}, {}, set(), []),                                     # enough copies
    ({"a"}, {"b": "retrying"}, {"c"}, []),                           # no healthy spare: wait for b
])
def test_one_target_policy_for_new_files_and_spares(good, pairs, unhealthy, expected):
    from cloudmanagerd.uploads import choose_targets
    assert choose_targets(["a", "b", "c"], unhealthy, 2, good, pairs) == expected


# -- batches: remotes with put_many ----------------------------------------------------------------

class BatchRemote(FakeRemote):
    """A FakeRemote with put_many: each item through put(); `fail_items` fails those hashes alone,
    `fail` (as for put) refuses the whole batch."""

    def __init__(self, name: str, fail: str | None = None) -> None:
        super().__init__(name, fail)
        self.batches: list[int] = []
        self.fail_items: dict[str, str] = {}

    def put_many(self, items):
        self.batches.append(len(items))
        if self.fail is not None:
            raise RemoteError(f"remote {self.name}: refused ({self.fail})", self.fail)
        results = []
        for h, fd, size, transfer in items:
            try:
                transfer.begin()
                if h in self.fail_items:
                    raise RemoteError(f"remote {self.name}: refused {h[:8]}", self.fail_items[h])
                url = self.put(h, fd, size, transfer)
                transfer.update(size)
                transfer.confirm_source()
                results.append(url)
            except RemoteError as exc:
                results.append(exc)
        return results


def count_commits(catalog: Catalog) -> list[int]:
    """Wrap catalog.uploads_done: how many copies each call recorded."""
    calls: list[int] = []
    original = catalog.uploads_done

    def spy(copies, redundancy, now):
        calls.append(len(copies))
        return original(copies, redundancy, now)
    catalog.uploads_done = spy  # type: ignore[method-assign]
    return calls


def test_small_files_go_to_a_batch_remote_in_batches_recorded_in_one_commit_each(world: World) -> None:
    r0 = BatchRemote("r0")
    up = world.uploader([r0], redundancy=1, concurrency=1)
    commits = count_commits(world.catalog)
    hashes = [world.add_file(f"small {i}".encode(), up.targets()) for i in range(40)]
    step(up)
    assert r0.batches == [40] and commits == [40]
    assert all(world.copies(h) == ["r0"] for h in hashes)
    assert world.catalog.counts(1, 1)["copies"] == 40


def test_a_file_above_the_batch_size_limit_is_sent_on_its_own(world: World, monkeypatch) -> None:
    monkeypatch.setattr("cloudmanagerd.uploads.BATCH_MAX_SIZE", 100)
    r0 = BatchRemote("r0")
    up = world.uploader([r0], redundancy=1, concurrency=1)
    big = world.add_file(b"B" * 500, up.targets())
    world.clock += 1
    small = [world.add_file(f"s{i}".encode(), up.targets()) for i in range(5)]
    step(up)  # the oldest pair (the big file) goes alone through put()
    assert r0.batches == [] and world.copies(big) == ["r0"]
    step(up)
    assert r0.batches == [5] and all(world.copies(h) == ["r0"] for h in small)


def test_a_mismatching_object_in_the_middle_of_a_batch_is_not_recorded_and_the_rest_is(world: World) -> None:
    from cloudmanagerd.remotes.directory import DirectoryRemote
    folder = world.root / "nas"
    folder.mkdir()
    nas = DirectoryRemote("nas", str(folder))
    bad: list[tuple[str, str]] = []
    up = Uploader(world.catalog, world.cache, {"nas": nas}, ["nas"], policy(redundancy=1, concurrency=1),
                  lease=60.0, now=world.now, rng=random.Random(42),
                  bad_object=lambda h, size, why, seen: bad.append((h, why)))
    world.uploaders.append(up)
    hashes = [world.add_file(f"object number {i:02d}".encode(), ["nas"]) for i in range(30)]
    rotten = hashes[15]
    with open(world.cache.object_path(rotten), "r+b") as f:
        f.write(b"X")  # the same size, other bytes
    step(up)
    assert [h for h, _ in bad] == [rotten] and "other bytes" in bad[0][1]
    assert world.copies(rotten) == []
    pair = world.pairs(rotten)["nas"]
    assert pair["state"] == "retrying" and "other bytes" in pair["last_error"]
    assert all(world.copies(h) == ["nas"] for h in hashes if h != rotten)
    on_remote = {p.name for sub in folder.iterdir() for p in sub.iterdir()}
    assert on_remote == set(hashes) - {rotten}  # no copy of the wrong bytes, no temp file
    assert world.catalog.remote_stats()["nas"]["errors"] == 0  # the local copy was at fault


def test_a_batch_refused_by_its_remote_fails_every_pair_and_queues_spares(world: World) -> None:
    r0, r1 = BatchRemote("r0", fail=REMOTE), BatchRemote("r1")
    up = world.uploader([r0, r1], redundancy=1, concurrency=1)
    hashes = [world.add_file(f"f{i}".encode(), ["r0"]) for i in range(10)]
    step(up)
    assert r0.batches == [10] and "r0" in up.unhealthy
    for h in hashes:
        pairs = world.pairs(h)
        assert pairs["r0"]["state"] == "retrying" and pairs["r0"]["attempts"] == 1
        assert pairs["r1"]["state"] == "queued"  # the spare
    run_until_quiet(world, up)
    assert all(world.copies(h) == ["r1"] for h in hashes)


def test_one_pair_failing_inside_a_batch_fails_alone(world: World) -> None:
    r0, r1 = BatchRemote("r0"), BatchRemote("r1")
    up = world.uploader([r0, r1], redundancy=1, concurrency=1)
    hashes = [world.add_file(f"f{i}".encode(), ["r0"]) for i in range(10)]
    r0.fail_items[hashes[4]] = FILE
    step(up)
    assert world.pairs(hashes[4])["r0"]["state"] == "failed"
    assert world.pairs(hashes[4])["r1"]["state"] == "queued"
    assert all(world.copies(h) == ["r0"] for h in hashes if h != hashes[4])
    assert "r0" not in up.unhealthy


def test_close_during_a_batch_cancels_it_and_queues_every_pair_again_uncounted(world: World) -> None:
    r0 = BatchRemote("r0")
    r0.gate = threading.Event()  # the batch's first put hangs until cancelled
    up = world.uploader([r0], redundancy=1, concurrency=1)
    hashes = [world.add_file(f"f{i}".encode(), ["r0"]) for i in range(8)]
    up.pump()
    assert r0.entered.acquire(timeout=10)
    up.check_stalls()  # the items the batch has not reached are never counted as stalled
    up.close()
    assert r0.puts == 1  # the others were cancelled before their first byte
    for h in hashes:
        pair = world.pairs(h)["r0"]
        assert pair["state"] == "queued" and pair["attempts"] == 0 and pair["claim_owner"] is None
        assert world.copies(h) == []


def test_a_batch_counts_as_one_transfer_slot_and_renews_the_lease_of_each_pair(world: World) -> None:
    r0 = BatchRemote("r0")
    r0.gate = threading.Event()
    up = world.uploader([r0], redundancy=1, concurrency=2)
    hashes = [world.add_file(f"f{i}".encode(), ["r0"]) for i in range(100)]
    up.pump()  # two slots: two batches (64 + 36)
    assert r0.entered.acquire(timeout=10) and r0.entered.acquire(timeout=10)
    assert sorted(r0.batches) == [36, 64] and up.active_count() == 100
    world.clock += 50
    assert up.reclaim() == 0  # every pair in flight keeps its claim
    r0.gate.set()
    wait_for(lambda: up.active_count() == 0, timeout=10, message="the batches to end")
    assert all(world.copies(h) == ["r0"] for h in hashes)


def test_a_pump_claims_its_batches_in_one_transaction(world: World) -> None:
    r0, r1 = BatchRemote("r0"), BatchRemote("r1")
    up = world.uploader([r0, r1], redundancy=2, concurrency=2)
    hashes = [world.add_file(f"small {i}".encode(), up.targets()) for i in range(30)]
    pump_thread = threading.current_thread()
    writes: list[threading.Thread] = []
    tx = world.catalog.db.tx

    def counting_tx():
        writes.append(threading.current_thread())
        return tx()
    world.catalog.db.tx = counting_tx  # type: ignore[method-assign]
    try:
        step(up)
    finally:
        world.catalog.db.tx = tx  # type: ignore[method-assign]
    assert writes.count(pump_thread) == 1, "both batches claimed in the pump's one transaction"
    assert sorted(r0.batches + r1.batches) == [30, 30]
    assert all(world.copies(h) == ["r0", "r1"] for h in hashes)


def test_a_check_given_the_bytes_sent_hashes_them_not_the_source(tmp_path: Path) -> None:
    """A backend that sent a small object from memory hands those bytes to the check: bytes that are
    not the file are refused even when the cache object itself is sound."""
    data = os.urandom(5000)
    h = hashlib.sha256(data).hexdigest()
    fd = os.open(tmp_path, os.O_RDWR | os.O_TMPFILE, 0o600)
    try:
        os.write(fd, data)
        SendCheck(h, fd, len(data), True).confirm(data)  # the same bytes: fine
        with pytest.raises(SourceMismatch):
            SendCheck(h, fd, len(data), True).confirm(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(SourceMismatch, match="shorter"):
            SendCheck(h, fd, len(data), True).confirm(data[:-1])
    finally:
        os.close(fd)


def test_each_recorded_copy_says_when_the_files_good_copies_were_proven(world: World) -> None:
    """The "uploaded" event carries the file's good copies as the commit that recorded it left them (the
    file-safe line counts them without a read per copy): one, then two, as the copies land one by one."""
    from cloudmanagerd.events import Events
    events = Events()
    seen: list[tuple[str, str, list[float]]] = []
    events.on("uploaded", lambda h, remote, size, seconds, proven: seen.append((h, remote, sorted(proven))))
    r0, r1 = BatchRemote("r0"), BatchRemote("r1")
    up = Uploader(world.catalog, world.cache, {"r0": r0, "r1": r1}, ["r0", "r1"], policy(redundancy=2, concurrency=1),
                  lease=60.0, now=world.now, rng=random.Random(1), events=events)
    world.uploaders.append(up)
    hashes = [world.add_file(f"two copies {i}".encode(), up.targets()) for i in range(3)]
    step(up)  # r0's batch (the oldest pairs first: all to one remote)
    world.clock += 5
    step(up)
    assert sorted((h, remote) for h, remote, _ in seen) == sorted((h, r) for h in hashes for r in ("r0", "r1"))
    first, second = {h: p for h, r, p in seen[:3]}, {h: p for h, r, p in seen[3:]}
    assert all(first[h] == [T0] and second[h] == [T0, T0 + 5] for h in hashes), seen
