"""The inbox parts on their own: the pending queue (fixed clocks), the move grouper, the real
inotify watcher on real temp folders, and the descriptor-based scan.

Background loops stay off: each part is built directly and driven one step at a time. The
queue's clocks are injected, so settle decisions never wait for real time.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudmanagerd.errors import StartupError
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD
from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent

from cloudmanagerd import fsutil
from cloudmanagerd.inbox import (
    CookieMoveGrouper,
    InboxWatcher,
    InboxWatchGroup,
    PendingQueue,
    scan,
    stat_in,
)
from conftest import wait_for

SETTLE = 2.0


# -- fixed clocks and fake stats ------------------------------------------------------------

class Clock:
    """A monotonic and a wall clock that move only when the test says so."""

    def __init__(self, mono: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.mono = mono
        self.wall = wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def fake_stat(size: int = 10, ctime: float = 0.0, mtime: float | None = None,
              mode: int = stat.S_IFREG | 0o644) -> os.stat_result:
    mtime = ctime if mtime is None else mtime
    # the 16 first fields of os.stat_result: the ten classic ones, the float times, the ns times
    return os.stat_result((mode, 1, 1, 1, 0, 0, size, int(mtime), int(mtime), int(ctime),
                           mtime, mtime, ctime, int(mtime * 1e9), int(mtime * 1e9), int(ctime * 1e9)))


class FakeStats:
    """stat_rel for the queue: a dict of results (None = gone), or an exception to raise."""

    def __init__(self) -> None:
        self.results: dict[bytes, os.stat_result | None | Exception] = {}
        self.calls: list[bytes] = []

    def __call__(self, rel: bytes) -> os.stat_result | None:
        self.calls.append(rel)
        result = self.results.get(rel)
        if isinstance(result, Exception):
            raise result
        return result


def make_queue(clock: Clock, stats: FakeStats, settle: float = SETTLE) -> PendingQueue:
    return PendingQueue(settle, stats, monotonic=lambda: clock.mono, wall=lambda: clock.wall)


def take_now(queue: PendingQueue, limit: int = 100) -> list[bytes]:
    """One step of the consumer: whatever is ready at the fake clock's current time.

    The timeout is measured on the injected monotonic clock; with the clock standing
    still, 0 means "look once and return".
    """
    return queue.take(limit, 0)


# -- PendingQueue ------------------------------------------------------------------------------

def test_ready_entries_come_out_at_once_in_batches_without_duplicates() -> None:
    clock, stats = Clock(), FakeStats()
    q = make_queue(clock, stats)
    for i in range(5):
        q.put_ready(b"f%d" % i)
    q.put_ready(b"f1")  # an entry announced twice is taken once
    q.put_ready(b"f3")
    assert len(q) == 5
    assert take_now(q, limit=2) == [b"f0", b"f1"]
    assert take_now(q, limit=2) == [b"f2", b"f3"]
    assert take_now(q, limit=2) == [b"f4"]
    assert take_now(q) == []
    assert len(q) == 0
    assert stats.calls == []  # ready entries are never stat'ed by the queue


def test_a_file_whose_ctime_is_older_than_settle_is_ready_at_once() -> None:
    clock, stats = Clock(), FakeStats()
    stats.results[b"old"] = fake_stat(ctime=clock.wall - SETTLE - 1)
    q = make_queue(clock, stats)
    q.put_settle(b"old")
    assert take_now(q) == [b"old"]


def test_a_recent_file_is_ready_only_once_it_has_been_still_for_settle() -> None:
    clock, stats = Clock(), FakeStats()
    stats.results[b"new"] = fake_stat(size=5, ctime=clock.wall - 0.5)
    q = make_queue(clock, stats)
    q.put_settle(b"new")
    assert take_now(q) == []
    clock.advance(1.0)  # still for 1.5 s
    assert take_now(q) == []
    clock.advance(0.5)  # still for 2.0 s = settle
    assert take_now(q) == [b"new"]
    assert len(q) == 0


def test_with_a_ctime_ahead_of_the_wall_clock_the_unchanged_signature_decides() -> None:
    # A file stamped by a machine whose clock runs ahead (NFS, SMB): the ctime says nothing,
    # so the entry is ready once size, mtime and ctime stayed the same for `settle`.
    clock, stats = Clock(), FakeStats()
    stats.results[b"skewed"] = fake_stat(size=5, ctime=clock.wall + 3600)
    q = make_queue(clock, stats)
    q.put_settle(b"skewed")
    assert take_now(q) == []
    clock.mono += SETTLE / 2
    assert take_now(q) == []
    clock.mono += SETTLE / 2
    assert take_now(q) == [b"skewed"]


def test_a_file_that_keeps_growing_keeps_waiting() -> None:
    clock, stats = Clock(), FakeStats()
    q = make_queue(clock, stats)
    size = 100
    stats.results[b"growing"] = fake_stat(size=size, ctime=clock.wall)
    q.put_settle(b"growing")
    for _ in range(10):
        assert take_now(q) == []
        clock.advance(SETTLE * 0.75)
        size += 100  # a writer appends: size, mtime and ctime move on
        stats.results[b"growing"] = fake_stat(size=size, ctime=clock.wall)
    assert len(q) == 1
    # the writer stops: ready `settle` after its last write, not before
    assert take_now(q) == []
    clock.advance(SETTLE * 0.75)
    assert take_now(q) == []
    clock.advance(SETTLE * 0.25)
    assert take_now(q) == [b"growing"]


def test_a_file_whose_size_changes_with_a_stale_ctime_keeps_waiting() -> None:
    # ctime in the future (clock skew) so only the signature decides; the size changes
    clock, stats = Clock(), FakeStats()
    stats.results[b"f"] = fake_stat(size=1, ctime=clock.wall + 3600)
    q = make_queue(clock, stats)
    q.put_settle(b"f")
    assert take_now(q) == []
    clock.mono += SETTLE
    stats.results[b"f"] = fake_stat(size=2, ctime=clock.wall + 3600)
    assert take_now(q) == []  # changed: the quiet time starts again
    clock.mono += SETTLE / 2
    assert take_now(q) == []
    clock.mono += SETTLE / 2
    assert take_now(q) == [b"f"]


def test_a_file_that_disappears_is_dropped() -> None:
    clock, stats = Clock(), FakeStats()
    stats.results[b"gone"] = fake_stat(ctime=clock.wall)
    q = make_queue(clock, stats)
    q.put_settle(b"gone")
    assert take_now(q) == []
    del stats.results[b"gone"]  # stat_rel now returns None
    clock.advance(SETTLE)
    assert take_now(q) == []
    assert len(q) == 0
    clock.advance(SETTLE * 10)
    assert take_now(q) == []


def test_a_stat_error_hands_the_entry_over_as_ready() -> None:
    # e.g. a folder on the path was swapped for a symlink (ELOOP): ingest rejects or reports it
    clock, stats = Clock(), FakeStats()
    stats.results[b"dir/x"] = OSError(errno.ELOOP, "Too many levels of symbolic links")
    q = make_queue(clock, stats)
    q.put_settle(b"dir/x")
    assert take_now(q) == [b"dir/x"]
    assert len(q) == 0


def test_a_fifo_is_ready_at_once_without_settling() -> None:
    clock, stats = Clock(), FakeStats()
    stats.results[b"pipe"] = fake_stat(ctime=clock.wall, mode=stat.S_IFIFO | 0o644)
    q = make_queue(clock, stats)
    q.put_settle(b"pipe")
    assert take_now(q) == [b"pipe"]


def test_put_ready_upgrades_a_settling_entry() -> None:
    clock, stats = Clock(), FakeStats()
    stats.results[b"f"] = fake_stat(ctime=clock.wall)
    q = make_queue(clock, stats)
    q.put_settle(b"f")
    assert take_now(q) == []
    q.put_ready(b"f")  # its writer closed it
    assert take_now(q) == [b"f"]
    assert len(q) == 0
    # the stale settle timer that is still queued does not bring it back
    clock.advance(SETTLE * 2)
    assert take_now(q) == []


def test_put_settle_does_not_downgrade_a_ready_entry() -> None:
    clock, stats = Clock(), FakeStats()
    stats.results[b"f"] = fake_stat(ctime=clock.wall)
    q = make_queue(clock, stats)
    q.put_ready(b"f")
    q.put_settle(b"f")  # a rescan finds it again before it is taken
    assert take_now(q) == [b"f"]
    assert stats.calls == []


def test_take_waits_no_longer_than_its_timeout_on_the_injected_clock() -> None:
    # nothing is ready: take() returns [] once its (tiny) timeout has passed on the monotonic
    # clock; here the clock moves a little at every reading, as a real one does
    mono = [0.0]

    def ticking() -> float:
        mono[0] += 0.005
        return mono[0]

    q = PendingQueue(SETTLE, FakeStats(), monotonic=ticking, wall=lambda: 1e9)
    assert q.take(10, 0.01) == []


def test_close_makes_take_return_an_empty_batch() -> None:
    clock, stats = Clock(), FakeStats()
    q = make_queue(clock, stats)
    q.close()
    assert q.take(10, 0.01) == []


def test_close_wakes_a_consumer_blocked_in_take() -> None:
    # real clocks here: the consumer waits on the condition until close() wakes it
    q = PendingQueue(SETTLE, FakeStats())
    got: list[list[bytes]] = []
    started = threading.Event()

    def consumer() -> None:
        started.set()
        got.append(q.take(10, 60))

    t = threading.Thread(target=consumer, name="test-consumer")
    t.start()
    started.wait(10)
    q.close()
    t.join(10)
    assert not t.is_alive(), "take() stayed blocked after close()"
    assert got == [[]]


def test_a_blocked_consumer_gets_an_entry_as_soon_as_it_is_put() -> None:
    q = PendingQueue(SETTLE, FakeStats())
    got: list[list[bytes]] = []
    t = threading.Thread(target=lambda: got.append(q.take(10, 60)), name="test-consumer")
    t.start()
    q.put_ready(b"x")
    t.join(10)
    assert not t.is_alive()
    assert got == [[b"x"]]


# -- CookieMoveGrouper -------------------------------------------------------------------------

IN = InotifyConstants


def pathed(mask: int, cookie: int, name: bytes, wd: int = 1) -> PathedInotifyEvent:
    return PathedInotifyEvent(InotifyEvent(wd, mask, cookie, name), b"/inbox/" + name)


def test_a_move_within_the_watch_comes_out_as_one_pair_at_once() -> None:
    g = CookieMoveGrouper()
    src = pathed(IN.IN_MOVED_FROM, 42, b"a")
    dst = pathed(IN.IN_MOVED_TO, 42, b"b")
    g.put_event(src)
    assert len(g._queue) == 0  # the source alone is never queued
    g.put_event(dst)
    # already queued: nothing is held back waiting for a timer
    assert list(g._queue) == [(src, dst)]
    assert g.read_event() == (src, dst)
    assert g.get_queued_moved_from_event(42) is None  # paired: forgotten


def test_events_behind_a_move_out_are_not_held_back() -> None:
    g = CookieMoveGrouper()
    g.put_event(pathed(IN.IN_MOVED_FROM, 7, b"leaving"))  # ingest renames a file out
    closed = pathed(IN.IN_CLOSE_WRITE, 0, b"next")
    g.put_event(closed)
    assert list(g._queue) == [closed]
    assert g.read_event() == closed


def test_an_unpaired_moved_to_comes_out_alone() -> None:
    g = CookieMoveGrouper()
    g.put_event(pathed(IN.IN_MOVED_FROM, 1, b"other"))
    dst = pathed(IN.IN_MOVED_TO, 2, b"arrived")  # moved in from outside the inbox
    g.put_event(dst)
    assert list(g._queue) == [dst]
    assert g.read_event() == dst
    assert g.get_queued_moved_from_event(1) is not None


def test_events_keep_their_order() -> None:
    g = CookieMoveGrouper()
    events = [pathed(IN.IN_CREATE, 0, b"x"), pathed(IN.IN_CLOSE_WRITE, 0, b"x"),
              pathed(IN.IN_MOVED_TO, 9, b"y"), pathed(IN.IN_CREATE | IN.IN_ISDIR, 0, b"d")]
    for e in events:
        g.put_event(e)
    assert [g.read_event() for _ in events] == events


def test_unpaired_moved_from_events_are_never_queued_and_their_memory_is_bounded() -> None:
    g = CookieMoveGrouper()
    n = CookieMoveGrouper.MAX_UNPAIRED + 500
    for cookie in range(1, n + 1):
        g.put_event(pathed(IN.IN_MOVED_FROM, cookie, b"f%d" % cookie))
    assert len(g._queue) == 0
    assert len(g._moved_from) == CookieMoveGrouper.MAX_UNPAIRED
    # the oldest are forgotten first, the newest are still there to pair
    assert g.get_queued_moved_from_event(1) is None
    assert g.get_queued_moved_from_event(500) is None
    assert g.get_queued_moved_from_event(n) is not None
    dst = pathed(IN.IN_MOVED_TO, n, b"moved")
    g.put_event(dst)
    assert g.read_event()[1] == dst
    # a late IN_MOVED_TO whose source was forgotten still comes out, alone
    late = pathed(IN.IN_MOVED_TO, 1, b"late")
    g.put_event(late)
    assert g.read_event() == late


def test_get_queued_moved_from_event_finds_a_pending_source_by_cookie() -> None:
    g = CookieMoveGrouper()
    src = pathed(IN.IN_MOVED_FROM | IN.IN_ISDIR, 77, b"folder")
    g.put_event(src)
    assert g.get_queued_moved_from_event(77) == src
    assert g.get_queued_moved_from_event(78) is None
    # asking does not consume it: the IN_MOVED_TO still pairs
    assert g.get_queued_moved_from_event(77) == src
    dst = pathed(IN.IN_MOVED_TO | IN.IN_ISDIR, 77, b"renamed")
    g.put_event(dst)
    assert g.read_event() == (src, dst)


def test_discard_pending_events_forgets_everything() -> None:
    g = CookieMoveGrouper()
    g.put_event(pathed(IN.IN_MOVED_FROM, 3, b"a"))
    g.put_event(pathed(IN.IN_CLOSE_WRITE, 0, b"b"))
    g.discard_pending_events()
    assert len(g._queue) == 0
    assert g.get_queued_moved_from_event(3) is None


def test_close_unblocks_read_event() -> None:
    g = CookieMoveGrouper()
    got: list[object] = ["not returned"]
    started = threading.Event()

    def reader() -> None:
        started.set()
        got[0] = g.read_event()

    t = threading.Thread(target=reader, name="test-reader")
    t.start()
    started.wait(10)
    g.close()
    t.join(10)
    assert not t.is_alive(), "read_event() stayed blocked after close()"
    assert got[0] is None
    assert g.read_event() is None  # and stays closed


# -- the real watcher on a real inbox ---------------------------------------------------------

class Watched:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.outside = root / "outside"
        self.inbox.mkdir()
        self.outside.mkdir()
        self.fd = os.open(self.inbox, fsutil.O_DIR)
        self.queue = PendingQueue(0.3, lambda rel: stat_in(self.fd, rel))
        self.scans: list[bytes] = []
        self.lost: list[str] = []
        self.watcher: InboxWatcher | None = None

    def start(self) -> InboxWatcher:
        self.watcher = InboxWatcher(str(self.inbox), self.queue, self.scans.append, "inotify", self.lost.append)
        self.watcher.start()
        return self.watcher

    def group(self) -> InboxWatchGroup:
        assert self.watcher is not None
        (emitter,) = self.watcher.observer.emitters
        return emitter._inotify

    def take_until(self, expected: set[bytes], timeout: float = 10.0) -> list[bytes]:
        """Everything the queue hands out until `expected` has all come (deadline `timeout`)."""
        got: list[bytes] = []
        wait_for(lambda: got.extend(self.queue.take(1000, 0.05)) or expected <= set(got), timeout=timeout,
                 message=f"{sorted(expected - set(got))!r} to be ready")
        return got

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.join(10)
            assert not self.watcher.is_alive()
        self.queue.close()
        os.close(self.fd)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Watched]:
    w = Watched(tmp_path)
    yield w
    w.close()


def test_a_written_and_closed_file_is_ready(watched: Watched) -> None:
    watched.start()
    (watched.inbox / "report.pdf").write_bytes(b"%PDF" * 100)
    assert watched.take_until({b"report.pdf"}) == [b"report.pdf"]


def test_a_file_in_a_subfolder_is_ready_with_its_relative_path(watched: Watched) -> None:
    (watched.inbox / "a" / "b").mkdir(parents=True)
    watched.start()
    (watched.inbox / "a" / "b" / "deep.txt").write_bytes(b"deep")
    assert watched.take_until({b"a/b/deep.txt"}) == [b"a/b/deep.txt"]


def test_a_file_renamed_into_the_inbox_is_ready(watched: Watched) -> None:
    watched.start()
    src = watched.outside / "moved.bin"
    src.write_bytes(b"x" * 1000)
    os.rename(src, watched.inbox / "moved.bin")
    assert watched.take_until({b"moved.bin"}) == [b"moved.bin"]


def test_a_rename_within_the_inbox_makes_the_new_name_ready(watched: Watched) -> None:
    (watched.inbox / "x.part").write_bytes(b"partial")
    watched.start()
    os.rename(watched.inbox / "x.part", watched.inbox / "x.done")
    assert watched.take_until({b"x.done"}) == [b"x.done"]


def test_moving_files_out_never_holds_back_the_next_file(watched: Watched) -> None:
    # As ingest does: each file is renamed out of the inbox once taken, and only then is the
    # next one dropped. With watchdog's own grouper every IN_MOVED_FROM held the events behind
    # it for 0.5 s, so this ping-pong of 200 files took 100 s; the whole run has one deadline
    # that such a delay cannot meet (the cookie grouper needs a fraction of a second).
    watched.start()
    assert isinstance(watched.group()._move_event_grouper, CookieMoveGrouper)
    n = 200
    deadline = time.monotonic() + 30
    for i in range(n):
        src = watched.outside / f"f{i}"
        src.write_bytes(b"%d" % i)
        os.rename(src, watched.inbox / f"f{i}")
        got = watched.take_until({b"f%d" % i}, timeout=max(deadline - time.monotonic(), 0.05))
        assert got == [b"f%d" % i]
        os.rename(watched.inbox / f"f{i}", watched.outside / f"taken{i}")
    # and the moves out were never reported as anything to take
    assert watched.queue.take(10, 0.05) == []


def test_moving_folders_out_never_holds_back_the_next_folder(watched: Watched) -> None:
    # folder events still go through the move grouper (watchdog keeps its recursive watches
    # right with them): a folder moved out must not delay the next one's scan by 0.5 s each
    watched.start()
    n = 100
    deadline = time.monotonic() + 30  # 100 x 0.5 s = 50 s with watchdog's own grouper
    for i in range(n):
        (watched.inbox / f"d{i}").mkdir()
        wait_for(lambda: b"d%d" % i in watched.scans, timeout=max(deadline - time.monotonic(), 0.05),
                 interval=0.001, message=f"the scan of d{i}")
        os.rename(watched.inbox / f"d{i}", watched.outside / f"d{i}")
    assert watched.scans == [b"d%d" % i for i in range(n)]


def test_a_burst_of_moves_in_and_out_all_arrive_in_order(watched: Watched) -> None:
    watched.start()
    for i in range(200):
        (watched.outside / f"in{i}").write_bytes(b"i")
        (watched.inbox / f"out{i}").write_bytes(b"o")
    got = watched.take_until({b"out%d" % i for i in range(200)})
    assert sorted(got) == sorted(b"out%d" % i for i in range(200))
    for i in range(200):
        os.rename(watched.inbox / f"out{i}", watched.outside / f"out{i}")
        os.rename(watched.outside / f"in{i}", watched.inbox / f"in{i}")
    expected = [b"in%d" % i for i in range(200)]
    got = watched.take_until(set(expected))
    assert got == expected


def test_a_new_subfolder_is_handed_to_the_scan_callback(watched: Watched) -> None:
    watched.start()
    (watched.inbox / "photos").mkdir()
    wait_for(lambda: b"photos" in watched.scans, message="a scan of the new folder")
    (watched.inbox / "photos" / "2024").mkdir()
    wait_for(lambda: b"photos/2024" in watched.scans, message="a scan of the nested folder")
    # a folder moved in with files inside: scanned, since its files bring no close events
    tree = watched.outside / "album"
    (tree / "inner").mkdir(parents=True)
    (tree / "inner" / "p.jpg").write_bytes(b"jpg")
    os.rename(tree, watched.inbox / "album")
    wait_for(lambda: b"album" in watched.scans, message="a scan of the folder moved in")
    # and files written into the new folders are watched too
    (watched.inbox / "photos" / "2024" / "img.jpg").write_bytes(b"img")
    assert b"photos/2024/img.jpg" in watched.take_until({b"photos/2024/img.jpg"})


def test_special_files_are_ready_at_once_but_a_file_being_written_is_not(watched: Watched) -> None:
    watched.start()
    # a file opened for writing and not yet closed: announced by IN_CREATE only
    fd = os.open(watched.inbox / "writing.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"half")
        # events come in order: once these have been handed over, the open file's
        # IN_CREATE has been seen too, and it must not have been
        os.symlink("/etc/passwd", watched.inbox / "link")
        os.mkfifo(watched.inbox / "pipe")
        got = watched.take_until({b"link", b"pipe"})
        assert sorted(got) == [b"link", b"pipe"]
        assert watched.queue.take(10, 0.05) == []
    finally:
        os.close(fd)
    assert watched.take_until({b"writing.bin"}) == [b"writing.bin"]


def test_queue_overflow_is_reported_to_on_lost_events(watched: Watched) -> None:
    (watched.inbox / "sub").mkdir()
    watched.start()
    group = watched.group()
    assert isinstance(group, InboxWatchGroup)
    # what InotifyFD.handle_event calls on IN_Q_OVERFLOW (the kernel queue cannot be
    # overflowed here without changing a system-wide sysctl)
    group.on_queue_overflow()
    assert watched.lost == ["overflow"]
    # the watches were rebuilt: the inbox and its subfolder still deliver events
    (watched.inbox / "sub" / "after.txt").write_bytes(b"after")
    assert watched.take_until({b"sub/after.txt"}) == [b"sub/after.txt"]


def test_a_real_in_q_overflow_event_reaches_on_lost_events(watched: Watched) -> None:
    watched.start()
    # the event the kernel sends (wd -1), through watchdog's own dispatch
    watched.watcher.observer._inotify_fd.handle_event(InotifyEvent(-1, IN.IN_Q_OVERFLOW, 0, b""))
    assert watched.lost == ["overflow"]


def test_a_watch_limit_error_on_a_subfolder_is_reported(watched: Watched, monkeypatch) -> None:
    (watched.inbox / "full").mkdir()
    (watched.inbox / "ok").mkdir()
    original = InotifyFD.add_callback

    def add_callback(self, path: bytes, *args):
        if os.path.basename(path) in (b"full", b"later"):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return original(self, path, *args)

    monkeypatch.setattr(InotifyFD, "add_callback", add_callback)
    watched.start()
    assert watched.lost == ["watch-limit"]
    # the rest is still watched
    (watched.inbox / "ok" / "f").write_bytes(b"f")
    (watched.inbox / "top").write_bytes(b"t")
    assert sorted(watched.take_until({b"ok/f", b"top"})) == [b"ok/f", b"top"]
    # a folder created later that cannot be watched: reported, and still handed to the scan
    (watched.inbox / "later").mkdir()
    wait_for(lambda: b"later" in watched.scans, message="the scan of the unwatchable folder")
    assert watched.lost == ["watch-limit", "watch-limit"]


def test_a_watch_limit_error_on_the_inbox_itself_fails_the_start(tmp_path: Path, monkeypatch) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    lost: list[str] = []

    def add_callback(self, path: bytes, *args):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(InotifyFD, "add_callback", add_callback)
    watcher = InboxWatcher(str(inbox), PendingQueue(1, lambda rel: None), lambda rel: None, "inotify", lost.append)
    try:
        with pytest.raises(StartupError) as info:
            watcher.start()
        # one line that names the sysctl to raise, not "no space left on the device"
        assert "fs.inotify.max_user_watches" in str(info.value) and "\n" not in str(info.value)
        assert lost == ["watch-limit"]
    finally:
        # the daemon's stop() runs after a failed start too: stop and join must not raise
        watcher.stop()
        watcher.join(10)
        assert not watcher.is_alive()
        observer_fd = watcher.observer._inotify_fd
        observer_fd.join(10)
        assert not observer_fd.is_alive()


# -- scan ----------------------------------------------------------------------------------------

class ScanRun:
    def __init__(self, inbox: Path, ignore: Callable[[bytes], bool] = lambda rel: False) -> None:
        self.inbox = inbox
        self.ignore = ignore
        self.found: list[bytes] = []
        self.on_found: Callable[[bytes], None] = lambda rel: None

    def __call__(self, rel: bytes = b"") -> int:
        fd = os.open(self.inbox, fsutil.O_DIR)
        try:
            def found(child: bytes) -> None:
                self.found.append(child)
                self.on_found(child)
            return scan(fd, rel, self.ignore, found)
        finally:
            os.close(fd)


def build(tree: dict[str, bytes], root: Path) -> None:
    for rel, data in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_scan_finds_files_in_nested_folders(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    build({"a.txt": b"a", "x/b.txt": b"b", "x/y/z/c.txt": b"c", "x/y/z/w/v/d.txt": b"d"}, inbox)
    (inbox / "empty").mkdir()
    run = ScanRun(inbox)
    assert run() == 4
    assert sorted(run.found) == [b"a.txt", b"x/b.txt", b"x/y/z/c.txt", b"x/y/z/w/v/d.txt"]


def test_scan_of_a_subfolder_reports_paths_relative_to_the_inbox(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    build({"a.txt": b"a", "x/b.txt": b"b", "x/y/c.txt": b"c"}, inbox)
    run = ScanRun(inbox)
    assert run(b"x") == 2
    assert sorted(run.found) == [b"x/b.txt", b"x/y/c.txt"]


def test_scan_of_a_folder_that_vanished_finds_nothing(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    run = ScanRun(inbox)
    assert run(b"gone") == 0
    assert run.found == []


def test_scan_skips_ignored_names(tmp_path: Path) -> None:
    import fnmatch
    inbox = tmp_path / "inbox"
    build({"keep.txt": b"k", ".hidden": b"h", "movie.part": b"p", "x/notes~": b"n", "x/keep2": b"k",
           ".git/objects/o": b"o"}, inbox)
    patterns = [".*", "*.part", "*~"]

    def ignored(rel: bytes) -> bool:
        return any(fnmatch.fnmatchcase(os.fsdecode(os.path.basename(rel)), p) for p in patterns)

    run = ScanRun(inbox, ignored)
    run()
    assert sorted(run.found) == [b"keep.txt", b"x/keep2"]


def test_scan_reports_a_symlinked_folder_as_an_entry_but_never_descends(tmp_path: Path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    build({"real/a.txt": b"a"}, inbox)
    build({"secret.txt": b"s", "deeper/secret2.txt": b"s"}, outside)
    os.symlink(outside, inbox / "link")
    os.symlink(outside, inbox / "real" / "link2")
    run = ScanRun(inbox)
    run()
    # the links themselves are handed on (ingest rejects them); nothing behind them is
    assert sorted(run.found) == [b"link", b"real/a.txt", b"real/link2"]


def test_scan_with_non_utf8_names(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkdir(os.path.join(os.fsencode(inbox), b"d\xff"))
    with open(os.path.join(os.fsencode(inbox), b"d\xff", b"caf\xe9 n\nx"), "wb") as f:
        f.write(b"x")
    run = ScanRun(inbox)
    run()
    assert run.found == [b"d\xff/caf\xe9 n\nx"]


def test_a_folder_swapped_for_a_symlink_mid_walk_is_never_followed(tmp_path: Path) -> None:
    inbox, outside, away = tmp_path / "inbox", tmp_path / "outside", tmp_path / "away"
    away.mkdir()
    build({"top.txt": b"t", "later/f.txt": b"f", "later/sub/g.txt": b"g"}, inbox)
    build({"secret.txt": b"s", "sub/secret2.txt": b"s"}, outside)
    run = ScanRun(inbox)
    swapped = []

    def swap_once(rel: bytes) -> None:
        # the first entry found is at the top (the root's listing finishes before any
        # subfolder is opened), so "later" has not been visited yet
        if not swapped:
            os.rename(inbox / "later", away / "later")
            os.symlink(outside, inbox / "later")
            swapped.append(rel)

    run.on_found = swap_once
    run()
    assert swapped == [b"top.txt"]
    assert not any(b"secret" in rel for rel in run.found), run.found
    # the swapped folder itself is handed on, for ingest to reject
    assert sorted(run.found) == [b"later", b"top.txt"]


def test_a_parent_swapped_for_a_symlink_while_its_subfolder_waits_is_never_followed(tmp_path: Path) -> None:
    # "outer" is being listed (its descriptor is open) when it is swapped; its subfolder
    # "inner" is opened from that descriptor: the real folder (moved away), never the link
    inbox, outside, away = tmp_path / "inbox", tmp_path / "outside", tmp_path / "away"
    away.mkdir()
    build({"outer/f0.txt": b"0", "outer/inner/f1.txt": b"1"}, inbox)
    build({"inner/secret.txt": b"s", "f0.txt": b"decoy"}, outside)
    run = ScanRun(inbox)
    swapped = []

    def swap_during_outer(rel: bytes) -> None:
        if rel.startswith(b"outer/") and not swapped:
            os.rename(inbox / "outer", away / "outer")
            os.symlink(outside, inbox / "outer")
            swapped.append(rel)

    run.on_found = swap_during_outer
    run()
    assert swapped, "the walk never listed outer"
    assert not any(b"secret" in rel for rel in run.found), run.found
    # both listings came from the real folders (open descriptors); ingest then opens each
    # name from the inbox again, component by component, and rejects the link in its path
    assert sorted(run.found) == [b"outer/f0.txt", b"outer/inner/f1.txt"]
