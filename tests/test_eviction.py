"""Eviction, verified fetch-back, scrub and removal on their parts (issue 5).

A real catalog (SQLite file), a real cache folder and real directory remotes in a temp
folder; no daemon, no scheduler, no sleeping. The clock is a fake that moves only when a
test says so, so "least recently used" is exactly the order the test wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import wait_for

from cloudmanagerd.cache import Cache
from cloudmanagerd.catalog import Catalog, IngestRecord
from cloudmanagerd.errors import CacheFull, CloudManagerError, NotFound
from cloudmanagerd.eviction import Evictor, choose_victims
from cloudmanagerd.fetch import Fetcher
from cloudmanagerd.remotes.directory import DirectoryRemote
from cloudmanagerd.removal import Remover
from cloudmanagerd.scrub import Scrubber

T0 = 1_700_000_000.0
REMOTES = ("r0", "r1")


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def tick(self, dt: float = 1.0) -> float:
        self.t += dt
        return self.t


class CountingRemote:
    """A DirectoryRemote that counts `get` calls and can hold them until released."""

    def __init__(self, inner: DirectoryRemote) -> None:
        self.inner = inner
        self.name = inner.name
        self.kind = inner.kind
        self.reports_progress = True
        self.gets = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self._lock = threading.Lock()

    def get(self, h, url, dst_fd, transfer=None):
        with self._lock:
            self.gets += 1
        self.entered.set()
        assert self.release.wait(30), "the test never released the held get"
        return self.inner.get(h, url, dst_fd, transfer)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@dataclass
class World:
    root: Path
    capacity: int
    clock: Clock = field(default_factory=Clock)
    min_copies: int = 2

    def __post_init__(self) -> None:
        self.catalog = Catalog.open(f"sqlite:///{self.root / 'state' / 'catalog.sqlite3'}", "n1")
        self.cache = Cache(str(self.root / "cache"), self.capacity)
        self.remote_dirs = {}
        self.dir_remotes = {}
        for name in REMOTES:
            path = self.root / "remotes" / name
            path.mkdir(parents=True)
            self.remote_dirs[name] = path
            self.dir_remotes[name] = CountingRemote(DirectoryRemote(name, str(path)))
        self.remotes = dict(self.dir_remotes)
        self.evictor = Evictor(self.cache, self.catalog, lambda: self.min_copies)
        self.fetcher = Fetcher(self.cache, self.catalog, self.remotes, self.evictor, now=self.clock)
        self.scrubber = Scrubber(self.cache, self.catalog, self.remotes, self.fetcher, now=self.clock)
        self.remover = Remover(self.cache, self.catalog, self.remotes, self.evictor)
        self.data: dict[str, bytes] = {}

    def close(self) -> None:
        self.cache.close()
        self.catalog.close()

    # -- making files the way ingest and the uploader do ---------------------------------

    def add(self, name: str, size: int = 100, copies: tuple[str, ...] = REMOTES, fill: bytes | None = None) -> str:
        """Register a cached file at the next clock tick (room made by eviction, like ingest does)
        and copy it to `copies`."""
        body = (fill or name.encode()) * (size // len(fill or name.encode()) + 1)
        body = body[:size]
        h = hashlib.sha256(body).hexdigest()
        assert self.evictor.reserve(size), f"no room for {name}"
        fd = os.open(h, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=self.cache.subdir_fd(h))
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        now = self.clock.tick()
        self.catalog.finish_ingest([IngestRecord(h, name.encode(), size)], list(REMOTES), now)
        self.cache.commit(size)
        self.data[h] = body
        for r in copies:
            self.copy_to(h, r)
        return h

    def copy_to(self, h: str, remote: str) -> None:
        fd = self.cache.open_object(h)
        try:
            url = self.dir_remotes[remote].inner.put(h, fd, len(self.data[h]))
        finally:
            os.close(fd)
        self.catalog.upload_done(h, remote, url, len(self.data[h]), 2, self.clock())

    # -- looking --------------------------------------------------------------------------

    def cached(self, h: str) -> bool:
        return bool(self.catalog.cached_here([h])) and self.cache.has_object(h)

    def object_bytes(self, h: str) -> bytes:
        return (self.root / "cache" / h[:2] / h).read_bytes()

    def remote_copy(self, remote: str, h: str) -> Path:
        return self.remote_dirs[remote] / h[:2] / h

    def tmp_files(self) -> list[str]:
        return os.listdir(self.root / "cache" / "tmp")

    def disk_usage(self) -> int:
        total = 0
        for folder in (self.root / "cache").iterdir():
            for f in folder.iterdir():
                total += f.stat().st_size
        return total

    def good_remotes(self, h: str) -> list[str]:
        return [r for r, _ in self.catalog.good_copies(h)]

    def pending(self, h: str) -> list[str]:
        return self.catalog.file_info(h)["pending"]

    def evict(self, h: str) -> None:
        self.evictor.evict([(h, len(self.data[h]))])
        assert not self.cached(h)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, capacity=1000)
    yield w
    w.close()


# -- choose_victims ---------------------------------------------------------------------------

def test_choose_victims_takes_the_shortest_lru_prefix_that_frees_enough() -> None:
    candidates = [("a", 100), ("b", 50), ("c", 200), ("d", 10)]
    assert choose_victims(candidates, 120) == [("a", 100), ("b", 50)]
    assert choose_victims(candidates, 1) == [("a", 100)]


def test_choose_victims_stops_at_an_exact_fit() -> None:
    candidates = [("a", 100), ("b", 50), ("c", 200)]
    assert choose_victims(candidates, 150) == [("a", 100), ("b", 50)]
    assert choose_victims(candidates, 350) == candidates


def test_choose_victims_returns_nothing_when_everything_would_not_be_enough() -> None:
    candidates = [("a", 100), ("b", 50)]
    assert choose_victims(candidates, 151) == []
    assert choose_victims([], 1) == []


# -- LRU order and what may never go ----------------------------------------------------------

def test_eviction_takes_the_least_recently_used_file_first_and_a_get_counts_as_a_use(world: World) -> None:
    a, b, c = (world.add(n, 300) for n in "abc")  # 900 of 1000 bytes
    world.clock.tick()
    world.fetcher.ensure_cached(a)  # a cache hit: `get` / warm_up make `a` recently used
    assert world.dir_remotes["r0"].gets == world.dir_remotes["r1"].gets == 0

    d = world.add("d", 300)
    assert not world.cached(b), "b was the least recently used file"
    assert world.cached(a) and world.cached(c) and world.cached(d)
    e = world.add("e", 300)
    assert not world.cached(c)
    f = world.add("f", 300)
    assert not world.cached(a), "a goes last of the old ones: its get made it younger than b and c"
    assert all(world.cached(h) for h in (d, e, f))
    assert world.cache.used == world.catalog.cache_usage()[0] == 900 == world.disk_usage()


def test_a_pinned_file_is_never_evicted(world: World) -> None:
    a = world.add("a", 400)
    b = world.add("b", 400)
    world.catalog.set_pinned(a, True)
    c = world.add("c", 400)
    assert world.cached(a), "pinned, so kept although least recently used"
    assert not world.cached(b)
    # only pinned a and c (unpinned, evictable) remain: room for one more 400-byte file, by evicting c
    world.catalog.set_pinned(c, True)
    assert world.evictor.reserve(400) is False, "everything in the cache is pinned"
    assert world.cached(a) and world.cached(c)
    world.catalog.set_pinned(a, False)
    assert world.evictor.reserve(400) is True
    assert not world.cached(a) and world.cached(c)


def test_a_file_below_min_redundancy_is_never_evicted(world: World) -> None:
    one = world.add("one-copy", 400, copies=("r0",))
    two = world.add("two-copies", 400)
    world.add("third", 400)
    assert world.cached(one), "one copy is below min_redundancy 2"
    assert not world.cached(two)
    world.copy_to(one, "r1")
    world.add("fourth", 400)
    assert not world.cached(one), "with its second copy it may go"


def test_a_file_that_exists_nowhere_else_is_never_evicted_even_with_min_redundancy_0(world: World) -> None:
    world.min_copies = 0
    alone = world.add("alone", 600, copies=())
    assert world.evictor.reserve(600) is False
    assert world.cached(alone)
    assert world.cache.reserved == 0 and world.cache.used == 600


def test_a_bad_copy_does_not_count_towards_min_redundancy(world: World) -> None:
    a = world.add("a", 600)
    world.catalog.mark_copy_bad(a, "r1", "copy holds other bytes", world.clock())
    assert world.evictor.reserve(600) is False, "one good copy is below min_redundancy 2"
    assert world.cached(a)


def test_a_request_larger_than_the_cache_is_refused_without_evicting_anything(world: World) -> None:
    a = world.add("a", 400)
    assert world.evictor.reserve(1001) is False
    assert world.cached(a)


def test_many_unevictable_old_files_do_not_hide_the_evictable_ones(world: World) -> None:
    """The oldest cached files may all be pinned (pins are never touched again, so they age to
    the front of the LRU order): eviction must still find the evictable files behind them."""
    conn = world.catalog.db.connection()
    count = 10_050
    rows = [(f"{i:064x}", i) for i in range(count)]
    with world.catalog.db.tx() as tx:
        tx.executemany("INSERT INTO files(hash, name, size, added, pinned) VALUES (?, 'p', 0, ?, 1)",
                       [(h, T0 - count + i) for h, i in rows])
        tx.executemany("INSERT INTO cache_entries(hash, node, size, last_used) VALUES (?, 'n1', 0, ?)",
                       [(h, T0 - count + i) for h, i in rows])
    assert conn.execute("SELECT COUNT(*) FROM files WHERE pinned=1").fetchone()[0] == count
    a = world.add("a", 600)
    world.add("b", 600)
    assert not world.cached(a), "a had two copies and was the least recently used unpinned file"


def _fabricate(world: World, count: int, pinned: bool, copies: int, first_used: float) -> list[str]:
    """`count` cached 1-byte files in one transaction (as many as a busy cache holds)."""
    # one cache folder for all of them ("ee"): an eviction fsyncs each folder it touched once
    hashes = sorted("ee" + hashlib.sha256(b"fabricated %d %f" % (i, first_used)).hexdigest()[2:]
                    for i in range(count))  # in key order: B-tree appends
    world.catalog.db.connection().execute("PRAGMA cache_size=-65536")  # no page spills mid-transaction
    with world.catalog.db.tx() as tx:
        tx.executemany("INSERT INTO files(hash, name, size, added, pinned) VALUES (?, 'x', 1, ?, ?)",
                       [(h, first_used + i, int(pinned)) for i, h in enumerate(hashes)])
        tx.executemany("INSERT INTO cache_entries(hash, node, size, last_used) VALUES (?, 'n1', 1, ?)",
                       [(h, first_used + i) for i, h in enumerate(hashes)])
        # verified, as upload_done writes them (an unverified, imported copy does not count for eviction)
        tx.executemany("INSERT INTO copies(hash, remote, url, created, verified) VALUES (?, ?, 'u', ?, ?)",
                       [(h, r, first_used, first_used) for h in hashes for r in REMOTES[:copies]])
    world.cache.set_used(world.catalog.cache_usage()[0])
    return hashes


def test_a_request_that_needs_more_files_than_a_fixed_window_still_finds_room(world: World) -> None:
    """A big `get` in a cache full of small files: every one of them may have to go."""
    world.capacity = world.cache.capacity = 12_000
    hashes = _fabricate(world, 12_000, pinned=False, copies=2, first_used=T0 - 100_000)
    assert world.evictor.reserve(11_000)
    assert world.catalog.cache_usage() == (1_000, 1_000)
    assert world.catalog.cached_here(hashes[:11_000]) == set(), "the 11,000 least recently used went"
    assert world.catalog.cached_here(hashes[11_000:]) == set(hashes[11_000:])


def test_files_short_of_copies_are_skipped_up_to_the_scan_limit(world: World) -> None:
    short = _fabricate(world, 3, pinned=False, copies=1, first_used=T0 - 1_000)
    ok = _fabricate(world, 2, pinned=False, copies=2, first_used=T0 - 500)
    assert list(world.catalog.eviction_candidates(2, scan_limit=4)) == [(h, 1) for h in ok]
    assert list(world.catalog.eviction_candidates(2, scan_limit=3)) == [], "the bound holds"
    assert list(world.catalog.eviction_candidates(1)) == [(h, 1) for h in short + ok]


# -- crash-safe eviction ----------------------------------------------------------------------

def test_a_crash_after_marking_but_before_the_unlink_keeps_the_file_cached(world: World) -> None:
    a = world.add("a", 300)
    world.catalog.mark_evicting([a])
    # crash: the object was never unlinked; a restart reconciles
    Evictor(world.cache, world.catalog, lambda: 2).reconcile()
    assert world.catalog.evicting() == []
    assert world.cached(a)
    assert list(world.catalog.eviction_candidates(2)) == [(a, 300)], "it may be evicted again later"


def test_a_crash_after_the_unlink_drops_the_catalog_entry_at_start_up(world: World) -> None:
    a = world.add("a", 300)
    b = world.add("b", 300)
    world.catalog.mark_evicting([a, b])
    world.cache.remove_object(a)
    # crash before drop_cache_entries: the catalog still says a is cached, but it is gone
    assert world.catalog.cached_here([a, b]) == {a, b}
    Evictor(world.cache, world.catalog, lambda: 2).reconcile()
    world.cache.set_used(world.catalog.cache_usage()[0])  # as start-up does after reconciling
    assert world.catalog.cached_here([a, b]) == {b}
    assert world.catalog.evicting() == []
    assert world.catalog.cache_usage() == (300, 1)
    world.fetcher.ensure_cached(a)  # and it comes back on demand
    assert world.object_bytes(a) == world.data[a]


# -- fetch back ---------------------------------------------------------------------------------

def test_an_evicted_file_is_fetched_verified_into_the_cache(world: World) -> None:
    a = world.add("a", 300)
    world.evict(a)
    world.clock.tick()
    world.fetcher.ensure_cached(a)
    assert world.object_bytes(a) == world.data[a]
    assert world.cached(a)
    assert world.tmp_files() == []
    assert world.cache.used == 300 and world.cache.reserved == 0
    assert world.dir_remotes["r0"].gets + world.dir_remotes["r1"].gets == 1
    assert sorted(world.good_remotes(a)) == ["r0", "r1"]


def _first_and_second(world: World, h: str) -> tuple[str, str]:
    order = world.good_remotes(h)
    assert len(order) == 2
    return order[0], order[1]


def test_a_corrupt_copy_is_marked_bad_charged_to_its_remote_and_replaced(world: World) -> None:
    a = world.add("a", 300)
    world.evict(a)
    first, second = _first_and_second(world, a)
    world.remote_copy(first, a).write_bytes(b"x" * 300)  # same size, other bytes
    world.fetcher.ensure_cached(a)
    assert world.object_bytes(a) == world.data[a]
    assert world.dir_remotes[first].gets == 1 and world.dir_remotes[second].gets == 1
    assert world.good_remotes(a) == [second], "the bad copy no longer counts"
    stats = world.catalog.remote_stats()
    assert stats[first]["errors"] == 1 and "other bytes" in stats[first]["last_error"]
    assert stats[second]["errors"] == 0
    assert world.pending(a) == [first], "a new upload to the bad remote is queued"
    assert world.tmp_files() == []


def test_a_missing_copy_is_marked_bad_and_the_next_remote_used(world: World) -> None:
    a = world.add("a", 300)
    world.evict(a)
    first, second = _first_and_second(world, a)
    world.remote_copy(first, a).unlink()
    world.fetcher.ensure_cached(a)
    assert world.object_bytes(a) == world.data[a]
    assert world.good_remotes(a) == [second]
    assert world.catalog.remote_stats()[first]["errors"] == 1
    assert "missing" in world.catalog.remote_stats()[first]["last_error"]
    assert world.pending(a) == [first]


def test_an_unreachable_remote_is_skipped_but_its_copy_still_counts(world: World) -> None:
    a = world.add("a", 300)
    world.evict(a)
    first, _ = _first_and_second(world, a)
    world.remote_dirs[first].rename(world.root / "away")  # the whole remote is gone, not the copy
    world.fetcher.ensure_cached(a)
    assert world.object_bytes(a) == world.data[a]
    assert sorted(world.good_remotes(a)) == ["r0", "r1"], "the copy was not proven bad"
    assert world.pending(a) == []


def test_with_every_copy_bad_the_fetch_fails_with_a_reason_and_leaves_nothing(world: World) -> None:
    a = world.add("a", 300)
    world.evict(a)
    for r in REMOTES:
        world.remote_copy(r, a).write_bytes(b"y" * 300)
    with pytest.raises(CloudManagerError) as err:
        world.fetcher.ensure_cached(a)
    message = str(err.value)
    assert "could not fetch" in message and "\n" not in message
    assert not world.cached(a)
    assert not (world.root / "cache" / a[:2] / a).exists()
    assert world.tmp_files() == []
    assert world.cache.used == 0 and world.cache.reserved == 0
    assert world.good_remotes(a) == []
    # asked again: the file is known to be lost
    with pytest.raises(CloudManagerError, match="lost"):
        world.fetcher.ensure_cached(a)


def test_an_unknown_hash_is_not_found(world: World) -> None:
    with pytest.raises(NotFound):
        world.fetcher.ensure_cached("ab" * 32)
    assert world.tmp_files() == []
    assert world.cache.reserved == 0


# -- get of an evicted file: the output written while it is fetched ----------------------------------

def _sequential(world: World) -> None:
    for r in world.dir_remotes.values():
        r.sequential_get = True  # as DirectoryRemote says: fetch hashes behind its writes, and tees


def test_a_get_of_an_evicted_file_writes_the_output_as_it_is_fetched(world: World, tmp_path, monkeypatch) -> None:
    import cloudmanagerd.fetch as fetch_module
    monkeypatch.setattr(fetch_module, "FETCH_PIECE", 64)
    _sequential(world)
    a = world.add("a", 900)
    world.evict(a)
    monkeypatch.setattr(fetch_module, "_send_verified", lambda *args: pytest.fail("the object was read again"))
    out = tmp_path / "out"
    with open(out, "wb") as f:
        assert world.fetcher.send(a, f.fileno()) == 900
    assert out.read_bytes() == world.data[a]
    assert world.cached(a) and world.object_bytes(a) == world.data[a]
    assert world.tmp_files() == []


def test_a_get_whose_first_copy_is_corrupt_writes_only_the_good_copy(world: World, tmp_path, monkeypatch) -> None:
    import cloudmanagerd.fetch as fetch_module
    monkeypatch.setattr(fetch_module, "FETCH_PIECE", 64)
    _sequential(world)
    a = world.add("a", 900)
    world.evict(a)
    first, second = _first_and_second(world, a)
    world.remote_copy(first, a).write_bytes(b"x" * 900)  # same size, other bytes
    out = tmp_path / "out"
    with open(out, "wb") as f:
        assert world.fetcher.send(a, f.fileno()) == 900
    assert out.read_bytes() == world.data[a]
    assert world.good_remotes(a) == [second]


def test_a_get_with_every_copy_bad_leaves_the_output_as_it_was(world: World, tmp_path, monkeypatch) -> None:
    import cloudmanagerd.fetch as fetch_module
    monkeypatch.setattr(fetch_module, "FETCH_PIECE", 64)
    _sequential(world)
    a = world.add("a", 900)
    world.evict(a)
    for r in REMOTES:
        world.remote_copy(r, a).write_bytes(b"y" * 900)
    out = tmp_path / "out"
    out.write_bytes(b"before\n")
    with open(out, "ab") as f:
        with pytest.raises(CloudManagerError, match="could not fetch"):
            world.fetcher.send(a, f.fileno())
    assert out.read_bytes() == b"before\n", "no byte of a bad copy is left in the output"


def test_a_get_whose_output_fails_midway_still_fetches_the_file_and_leaves_no_thread(world: World, tmp_path,
                                                                                    monkeypatch) -> None:
    """The output is written by a thread of its own while the fetch goes on: a full output disk fails the
    get with the reason, the fetch (more pieces than the hasher's buffers) still ends verified in the
    cache, and no thread is left waiting for a buffer or a piece."""
    import cloudmanagerd.fetch as fetch_module
    from cloudmanagerd.errors import OutputError
    monkeypatch.setattr(fetch_module, "FETCH_PIECE", 64)
    _sequential(world)
    a = world.add("a", 900)  # 15 pieces of 64 bytes, more than TrailingHasher.POOL buffers
    world.evict(a)
    real_write, calls = fetch_module._write_output, []

    def full_after_two(dst, data, stall):
        calls.append(len(data))
        if len(calls) > 2:
            raise OutputError("writing the output failed: No space left on device", 28)
        real_write(dst, data, stall)

    monkeypatch.setattr(fetch_module, "_write_output", full_after_two)
    before = threading.active_count()
    out = tmp_path / "out"
    with open(out, "wb") as f:
        with pytest.raises(OutputError, match="No space left on device"):
            world.fetcher.send(a, f.fileno())
    assert threading.active_count() == before, "a hasher or output thread was left behind"
    assert len(calls) == 3, "the output stopped at its first error"
    assert world.cached(a) and world.object_bytes(a) == world.data[a]
    assert out.read_bytes() == world.data[a][:128], "only bytes of the file, in order"
    assert world.tmp_files() == []


def _blocked_in_gate(thread: threading.Thread) -> bool:
    """True when `thread` waits at the hash's gate (Fetcher._gated) for another request's fetch."""
    frame = sys._current_frames().get(thread.ident)
    source, first = inspect.getsourcelines(Fetcher._gated)
    gate_line = first + next(i for i, line in enumerate(source) if "with gate" in line)
    while frame is not None:
        if frame.f_code is Fetcher._gated.__code__:
            return frame.f_lineno == gate_line
        frame = frame.f_back
    return False


def test_two_requests_for_one_hash_at_once_fetch_it_once(world: World) -> None:
    a = world.add("a", 300)
    world.evict(a)
    for r in world.dir_remotes.values():
        r.release.clear()
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            world.fetcher.ensure_cached(a)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    first = threading.Thread(target=fetch)
    second = threading.Thread(target=fetch)
    first.start()
    wait_for(lambda: any(r.entered.is_set() for r in world.dir_remotes.values()), message="the first fetch")
    second.start()
    try:
        wait_for(lambda: _blocked_in_gate(second), message="the second request to wait for the first")
    finally:
        for r in world.dir_remotes.values():
            r.release.set()
        first.join(30)
        second.join(30)
    assert errors == []
    assert sum(r.gets for r in world.dir_remotes.values()) == 1
    assert world.object_bytes(a) == world.data[a]
    assert world.cache.used == 300 and world.cache.reserved == 0
    assert world.fetcher._inflight == {}


def test_a_fetch_in_flight_counts_against_the_budget(world: World) -> None:
    a = world.add("a", 600)
    world.evict(a)
    b = world.add("b", 400, copies=("r0",))  # below min_redundancy: cannot make room
    for r in world.dir_remotes.values():
        r.release.clear()
    t = threading.Thread(target=world.fetcher.ensure_cached, args=(a,))
    t.start()
    try:
        wait_for(lambda: any(r.entered.is_set() for r in world.dir_remotes.values()), message="the fetch")
        assert world.cache.used + world.cache.reserved == 1000
        assert world.evictor.reserve(1) is False, "the 600 bytes on their way in are taken"
    finally:
        for r in world.dir_remotes.values():
            r.release.set()
        t.join(30)
    assert world.cached(a) and world.cached(b)
    assert world.disk_usage() == 1000


def test_a_fetch_with_no_room_fails_with_the_reason(world: World) -> None:
    a = world.add("a", 300)
    world.evict(a)
    for name in ("p", "q", "s"):
        world.catalog.set_pinned(world.add(name, 300), True)
    with pytest.raises(CacheFull) as err:
        world.fetcher.ensure_cached(a)
    assert "pinned" in str(err.value) and "no room" in str(err.value)
    assert world.dir_remotes["r0"].gets == world.dir_remotes["r1"].gets == 0
    assert world.cache.used == 900 and world.cache.reserved == 0
    assert world.tmp_files() == []


# -- scrub ----------------------------------------------------------------------------------------

def test_verify_cache_drops_a_truncated_object_and_fetches_it_again(world: World) -> None:
    a = world.add("a", 300)
    b = world.add("b", 300)
    path = world.root / "cache" / a[:2] / a
    path.write_bytes(world.data[a][:100])  # truncated behind the daemon's back
    report = world.scrubber.verify_cache()
    assert report == {"checked": 2, "missing": 0, "corrupt": 1, "refetched": 1, "lost": 0}
    assert world.object_bytes(a) == world.data[a]
    assert world.object_bytes(b) == world.data[b]
    assert world.cache.used == 600 == world.catalog.cache_usage()[0]


def test_verify_cache_finds_same_size_corruption_and_a_missing_object(world: World) -> None:
    a = world.add("a", 300)
    b = world.add("b", 300)
    (world.root / "cache" / a[:2] / a).write_bytes(b"z" * 300)
    (world.root / "cache" / b[:2] / b).unlink()
    report = world.scrubber.verify_cache()
    assert report == {"checked": 2, "missing": 1, "corrupt": 1, "refetched": 2, "lost": 0}
    assert world.object_bytes(a) == world.data[a] and world.object_bytes(b) == world.data[b]
    assert world.cache.used == 600 == world.catalog.cache_usage()[0] == world.disk_usage()


def test_verify_cache_reports_a_file_lost_when_no_good_copy_exists(world: World) -> None:
    a = world.add("a", 300, copies=())
    (world.root / "cache" / a[:2] / a).write_bytes(b"z" * 300)
    report = world.scrubber.verify_cache()
    assert report["corrupt"] == 1 and report["lost"] == 1 and report["refetched"] == 0
    # the only copy is never dropped blindly (issue 10): kept, named in status, not uploaded
    assert world.cached(a) and world.object_bytes(a) == b"z" * 300
    assert world.cache.used == 300 and world.cache.reserved == 0
    assert world.catalog.file_size(a) == 300, "the catalog still knows the file (status counts it)"
    assert a[:12] in world.scrubber.problems()[0]


def test_verify_remotes_finds_a_deleted_and_a_resized_copy_and_queues_new_ones(world: World) -> None:
    a = world.add("a", 300)
    b = world.add("b", 300)
    c = world.add("c", 300)
    world.remote_copy("r0", a).unlink()
    world.remote_copy("r1", b).write_bytes(b"other bytes, other size")
    report = world.scrubber.verify_remotes()
    assert report == {"depth": "quick", "checked": 6, "bad": 2, "unreachable": 0, "bytes_read": 0, "per_remote": {
        "r0": {"depth": "quick", "checked": 3, "bad": 1, "unreachable": 0},
        "r1": {"depth": "quick", "checked": 3, "bad": 1, "unreachable": 0}}}
    assert world.good_remotes(a) == ["r1"] and world.pending(a) == ["r0"]
    assert world.good_remotes(b) == ["r0"] and world.pending(b) == ["r1"]
    assert sorted(world.good_remotes(c)) == ["r0", "r1"] and world.pending(c) == []
    stats = world.catalog.remote_stats()
    assert stats["r0"]["errors"] == 1 and stats["r1"]["errors"] == 1
    # the files with a bad copy are below min_redundancy again: no longer evictable
    assert [h for h, _ in world.catalog.eviction_candidates(2)] == [c]


def test_verify_remotes_does_not_blame_copies_on_an_unreachable_remote(world: World) -> None:
    a = world.add("a", 300)
    world.remote_dirs["r1"].rename(world.root / "away")
    report = world.scrubber.verify_remotes()
    assert {k: report[k] for k in ("checked", "bad", "unreachable")} == {"checked": 2, "bad": 0, "unreachable": 1}
    assert report["per_remote"]["r1"]["unreachable"] == 1
    assert sorted(world.good_remotes(a)) == ["r0", "r1"]


def test_scrub_step_spends_at_most_its_byte_budget_and_moves_on(world: World) -> None:
    world.capacity = world.cache.capacity = 10_000
    hashes = [world.add(f"f{i}", 100) for i in range(5)]
    conn = world.catalog.db.connection()

    def verified() -> set[str]:
        return {h for (h,) in conn.execute("SELECT hash FROM cache_entries WHERE verified IS NOT NULL")}

    world.clock.tick()
    report = world.scrubber.step(250)
    assert report["bytes"] == 200 and report["cache"]["checked"] == 2
    assert len(verified()) == 2
    world.clock.tick()
    report = world.scrubber.step(250)
    assert report["bytes"] == 200
    assert len(verified()) == 4, "the next step checks what was not checked yet"
    world.clock.tick()
    world.scrubber.step(250)
    assert verified() == set(hashes)
    # the remote half is bounded too, and checks copies
    assert report["remotes"]["checked"] == 10 and report["remotes"]["bad"] == 0


def test_scrub_step_checks_one_object_larger_than_the_budget(world: World) -> None:
    a = world.add("a", 800)
    (world.root / "cache" / a[:2] / a).write_bytes(b"q" * 800)
    report = world.scrubber.step(100)
    assert report["bytes"] == 800 and report["cache"]["corrupt"] == 1 and report["cache"]["refetched"] == 1
    assert world.object_bytes(a) == world.data[a]


# -- rm -------------------------------------------------------------------------------------------

def test_rm_removes_the_cache_object_every_copy_and_the_catalog_row(world: World) -> None:
    a = world.add("a", 300)
    b = world.add("b", 300)
    assert world.remover.remove(a) == {"hash": a, "removed": True}
    assert not (world.root / "cache" / a[:2] / a).exists()
    assert not world.remote_copy("r0", a).exists() and not world.remote_copy("r1", a).exists()
    assert world.catalog.file_size(a) is None
    with pytest.raises(NotFound):
        world.catalog.file_info(a)
    assert world.cache.used == 300 == world.catalog.cache_usage()[0]
    assert world.cached(b) and world.remote_copy("r0", b).exists()
    with pytest.raises(CloudManagerError, match="no file"):
        world.remover.remove(a)


def test_rm_of_an_evicted_file_removes_its_remote_copies(world: World) -> None:
    a = world.add("a", 300)
    world.evict(a)
    world.remover.remove(a)
    assert not world.remote_copy("r0", a).exists() and not world.remote_copy("r1", a).exists()
    assert world.catalog.file_size(a) is None


def test_a_removal_interrupted_by_a_crash_is_finished_by_resume(world: World) -> None:
    a = world.add("a", 300)
    world.catalog.begin_remove(a)  # crash right after: nothing deleted yet
    assert world.catalog.removing() == [a]
    assert list(world.catalog.eviction_candidates(2)) == [], "a file being removed is not evicted meanwhile"
    # the restart
    Remover(world.cache, world.catalog, world.remotes, world.evictor).resume()
    assert world.catalog.removing() == []
    assert world.catalog.file_size(a) is None
    assert not (world.root / "cache" / a[:2] / a).exists()
    assert not world.remote_copy("r0", a).exists() and not world.remote_copy("r1", a).exists()


def test_a_file_dropped_again_after_rm_is_a_new_file(world: World) -> None:
    a = world.add("a", 300)
    world.remover.remove(a)
    world.clock.tick()
    # the same bytes arrive again
    fd = os.open(a, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=world.cache.subdir_fd(a))
    with contextlib.closing(os.fdopen(fd, "wb")) as f:
        f.write(world.data[a])
    assert world.evictor.reserve(300)
    new = world.catalog.finish_ingest([IngestRecord(a, b"a-again", 300)], list(REMOTES), world.clock())
    world.cache.commit(300)
    assert new == [a], "registered as new, with fresh upload pairs"
    info = world.catalog.file_info(a)
    assert info["name"] == b"a-again" and info["copies"] == [] and sorted(info["pending"]) == ["r0", "r1"]
    assert not info["pinned"]


# -- back-pressure: files waiting for room ---------------------------------------------------------

class FullIngestor:
    """Stands in for the Ingestor with a full cache: every file offered waits for room.

    `hold` (when cleared) keeps an ingest call in progress until the test sets it."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.entered = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        self.cache = type("C", (), {"capacity": 1000})()

    def ingest(self, rels):
        from cloudmanagerd.ingest import IngestResult
        self.calls.append(list(rels))
        self.entered.set()
        assert self.hold.wait(30)
        return IngestResult(waiting=[(rel, "cache-full") for rel in rels])


@contextlib.contextmanager
def running_worker(ingestor) -> Iterator:
    from cloudmanagerd.inbox import PendingQueue
    from cloudmanagerd.ingest import IngestWorker
    queue = PendingQueue(0.0, lambda rel: None)
    worker = IngestWorker(ingestor, queue, lambda rel: None, lambda hashes, dropped: None)
    worker.start()
    try:
        yield worker, queue
    finally:
        ingestor.hold.set()
        worker.stop()
        worker.join(10)


def test_room_made_while_a_waiting_file_is_being_retried_is_not_missed() -> None:
    """A copy lands (offer_waiting) while the file it makes room for is inside an ingest attempt
    that already found no room: the file must get another chance, not wait for the 10-minute rescan."""
    ingestor = FullIngestor()
    with running_worker(ingestor) as (worker, queue):
        queue.put_ready(b"f")
        wait_for(lambda: worker.waiting == {b"f": "cache-full"}, message="f waiting for room")
        ingestor.entered.clear()
        ingestor.hold.clear()
        worker.offer_waiting("cache-full")  # a copy made room: f is tried again...
        assert ingestor.entered.wait(10)
        worker.offer_waiting("cache-full")  # ...and another copy lands while that attempt runs
        ingestor.hold.set()
        wait_for(lambda: len(ingestor.calls) >= 3, timeout=5,
                 message="a third attempt for the room that appeared during the second")
        wait_for(lambda: worker.waiting == {b"f": "cache-full"}, message="f waiting again")
        assert worker.is_alive()


def test_offers_from_other_threads_never_break_the_ingest_thread() -> None:
    """Copies land on upload threads while the ingest thread sorts a batch of waiting files."""
    ingestor = FullIngestor()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up at once
    errors: list[BaseException] = []
    try:
        with running_worker(ingestor) as (worker, queue):
            for i in range(2000):
                queue.put_ready(b"f%d" % i)
            wait_for(lambda: len(worker.waiting) == 2000, message="2000 files waiting")
            calls = len(ingestor.calls)
            while len(ingestor.calls) < calls + 50:
                try:
                    worker.offer_waiting("cache-full")
                    worker.problems()
                except RuntimeError as exc:  # "dictionary changed size during iteration"
                    errors.append(exc)
                    break
                assert worker.is_alive(), "the ingest thread died"
    finally:
        sys.setswitchinterval(switch)
    assert errors == []


def test_a_read_error_in_the_trailing_hasher_gives_no_digest_and_no_thread_traceback(tmp_path, monkeypatch) -> None:
    """EIO while the hasher reads the fetch's temp back: finish() says "no digest" (the fetch then reads
    the file itself and meets the error where it is reported), and the thread ends without a traceback."""
    from cloudmanagerd import fetch as fetch_module

    path = tmp_path / "temp"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    seen: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fetch_module.os, "preadv", failing)
    try:
        hasher = fetch_module.TrailingHasher(fd, chunk=1024)
        hasher.advance(4096)
        assert hasher.finish(4096) is None
        assert isinstance(hasher.error, OSError) and hasher.error.errno == 5
        assert seen == []
        assert not hasher._thread.is_alive()
    finally:
        os.close(fd)
