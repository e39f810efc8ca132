"""Reliability of the inbox and ingest side (issue 10, items 1, 4, 5, 6, 10).

Real daemons on real folders where the behaviour is the daemon's (hard links, a writer that
pauses, deep trees, a recreated inbox, a symlinked inbox); the parts themselves where a
descriptor count must be exact (the "changed while hashed" path).
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmanagerd import fsutil
from cloudmanagerd.cache import TMP as CACHE_TMP
from cloudmanagerd.cache import Cache
from cloudmanagerd.catalog import Catalog
from cloudmanagerd.inbox import InboxWatcher, PendingQueue, stat_in
from cloudmanagerd.ingest import Ingestor
from cloudmanagerd.rejects import Rejector
from conftest import wait_for

pytestmark = pytest.mark.e2e

QUIET = {"rescan": "1h"}  # no rescan rescues what the daemon should have done by itself


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def registered(d, h: str) -> bool:
    return any(f["hash"] == h for f in d.files())


def cache_object(d, h: str) -> Path:
    return d.cache / h[:2] / h


def get_bytes(d, h: str) -> bytes:
    out = d.ctl("get", h, "-o", str(d.root / "got.bin"))
    assert out.returncode == 0, out.stderr
    return (d.root / "got.bin").read_bytes()


# -- item 1: hard links --------------------------------------------------------------------------

def test_a_hard_link_is_taken_promptly_as_a_copy_and_later_writes_outside_do_not_reach_it(daemon_factory) -> None:
    d = daemon_factory(ingest={"settle": "2s", **QUIET})
    outside = d.root / "userfile"
    original = os.urandom(100_000)
    outside.write_bytes(original)
    os.link(outside, d.inbox / "userlink")  # `ln` makes no close event
    # counted as pending while it settles, not "0 pending"
    wait_for(lambda: d.status()["inbox"]["pending"] == 1, timeout=1.5, message="the link counted as pending")
    h = digest(original)
    wait_for(lambda: registered(d, h), timeout=15, message="the link to be taken (the rescan is an hour away)")
    wait_for(lambda: not (d.inbox / "userlink").exists(), message="the inbox entry to go")

    obj = cache_object(d, h)
    assert obj.stat().st_ino != outside.stat().st_ino
    assert obj.stat().st_nlink == 1
    assert outside.stat().st_nlink == 1 and outside.read_bytes() == original  # the dropper's file is theirs

    with open(outside, "r+b") as f:  # rewritten in place, same size
        f.write(os.urandom(len(original)))
    assert get_bytes(d, h) == original
    assert digest(obj.read_bytes()) == h


def test_a_link_and_its_original_both_in_the_inbox_leave_one_unshared_object(daemon_factory) -> None:
    d = daemon_factory(ingest=QUIET)
    staging = d.root / "staging"
    staging.mkdir()
    data = os.urandom(50_000)
    (staging / "a").write_bytes(data)
    os.link(staging / "a", staging / "b")
    os.link(staging / "a", staging / "keep")  # a third name stays outside
    os.rename(staging / "a", d.inbox / "a")
    os.rename(staging / "b", d.inbox / "b")
    h = digest(data)
    wait_for(lambda: registered(d, h) and not any(d.inbox.iterdir()), timeout=15,
             message="both names taken from the inbox")
    assert [f["hash"] for f in d.files()] == [h]
    obj = cache_object(d, h)
    assert obj.stat().st_nlink == 1 and obj.stat().st_ino != (staging / "keep").stat().st_ino
    (staging / "keep").write_bytes(os.urandom(len(data)))
    assert get_bytes(d, h) == data


def test_a_link_to_a_file_still_being_written_is_taken_only_complete(daemon_factory) -> None:
    d = daemon_factory(ingest={"settle": "0.5s", **QUIET})
    outside = d.root / "growing"
    written = bytearray()
    with open(outside, "wb") as f:
        chunk = os.urandom(1000)
        f.write(chunk)
        f.flush()
        written += chunk
        os.link(outside, d.inbox / "link")
        # pauses longer than settle, while the writer holds it open
        pid = d.proc.pid
        for _ in range(3):
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                assert not d.files(), "taken while its writer still held it open"
                time.sleep(0.05)
            chunk = os.urandom(1000)
            f.write(chunk)
            f.flush()
            written += chunk
        assert fd_count(pid) < 100
    h = digest(bytes(written))
    wait_for(lambda: registered(d, h), timeout=15, message="the complete file")
    assert [f["hash"] for f in d.files()] == [h]
    assert cache_object(d, h).stat().st_ino != outside.stat().st_ino


# -- item 4: a writer that pauses, found by a scan ------------------------------------------------

def test_a_scanned_file_whose_writer_pauses_neither_leaks_descriptors_nor_spins(daemon_factory) -> None:
    d = daemon_factory(ingest={"settle": "1s", "rescan": "1s"})
    pid = d.proc.pid
    # warm up first: each thread's catalog connection holds a few descriptors of its own
    (d.inbox / "warm.txt").write_bytes(b"warm")
    wait_for(lambda: registered(d, digest(b"warm")), message="a warm-up file")
    baseline = fd_count(pid)
    content = bytearray()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with open(d.inbox / "slow.bin", "wb") as f:
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    chunk = os.urandom(1000)
                    f.write(chunk)
                    f.flush()
                    content.extend(chunk)
                    if stop.wait(1.5):
                        return
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    t = threading.Thread(target=writer, name="slow-writer")
    t.start()
    peak = baseline
    try:
        while t.is_alive():
            peak = max(peak, fd_count(pid))
            assert len(d.files()) == 1, "taken while its writer still held it open"
            t.join(0.1)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert peak - baseline < 20, f"descriptors grew from {baseline} to {peak}"
    h = digest(bytes(content))
    wait_for(lambda: registered(d, h), timeout=15, message="slow.bin taken complete after its writer closed it")
    assert sorted(f["size"] for f in d.files()) == [4, len(content)]
    assert fd_count(pid) - baseline < 20
    log = d.log()
    assert log.count("still open for writing") <= 2, log.count("still open for writing")
    assert len(log.splitlines()) < 500


@pytest.fixture
def parts(workdir: Path) -> Iterator[tuple[Path, Ingestor]]:
    inbox = workdir / "inbox"
    inbox.mkdir()
    catalog = Catalog.open("sqlite:///" + str(workdir / "state" / "catalog.sqlite3"), "node1")
    cache = Cache(str(workdir / "cache"), 64 << 20)
    rejector = Rejector(str(workdir / "rejected"))
    inbox_fd = fsutil.open_root(str(inbox))
    try:
        yield inbox, Ingestor(inbox_fd, cache, catalog, rejector, remotes=lambda: ["r0"], ignore=[])
    finally:
        os.close(inbox_fd)
        rejector.close()
        cache.close()
        catalog.close()


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_file_changed_while_hashed_is_put_back_without_leaking_a_descriptor(parts) -> None:
    inbox, ingestor = parts
    path = inbox / "moving.bin"
    path.write_bytes(os.urandom(3 << 20))  # several reads, so the hash ticks between them
    changed = []

    def change_once() -> None:
        if not changed:
            with open(path, "ab") as f:
                f.write(b"more")
            changed.append(True)

    ingestor.tick = change_once
    before = own_fds()
    for _ in range(5):
        changed.clear()
        result = ingestor.ingest([b"moving.bin"])
        assert result.requeue == [b"moving.bin"] and not result.registered
    assert own_fds() == before
    assert path.exists()


def test_a_file_still_open_for_writing_waits_without_leaking_a_descriptor(parts) -> None:
    inbox, ingestor = parts
    path = inbox / "open.bin"
    with open(path, "wb") as writer:
        writer.write(b"x" * 5000)
        writer.flush()
        before = own_fds()
        for _ in range(5):
            result = ingestor.ingest([b"open.bin"])
            assert not result.registered and b"open.bin" in result.busy
        assert own_fds() == before
    result = ingestor.ingest([b"open.bin"])
    assert result.registered == [digest(b"x" * 5000)]
    assert own_fds() == before


def test_a_hard_link_made_out_of_the_inbox_while_the_file_is_hashed_gets_a_copy(parts, workdir: Path) -> None:
    inbox, ingestor = parts
    data = os.urandom(3 << 20)
    (inbox / "dropped.bin").write_bytes(data)
    outside = workdir / "grabbed"

    def link_once() -> None:  # `ln inbox/dropped.bin ~/grabbed` by the dropper, mid-hash
        if not outside.exists():
            os.link(inbox / "dropped.bin", outside)

    ingestor.tick = link_once
    # the link changes the file's ctime: put back as changed, then taken again, by a copy
    assert ingestor.ingest([b"dropped.bin"]).requeue == [b"dropped.bin"]
    result = ingestor.ingest([b"dropped.bin"])
    h = digest(data)
    assert result.registered == [h]
    obj = workdir / "cache" / h[:2] / h
    assert obj.stat().st_nlink == 1 and obj.stat().st_ino != outside.stat().st_ino
    with open(outside, "r+b") as f:
        f.write(b"changed through the other name")
    assert digest(obj.read_bytes()) == h
    assert not (inbox / "dropped.bin").exists()


def test_a_file_changed_through_another_name_while_copied_is_put_back(parts, workdir: Path) -> None:
    inbox, ingestor = parts
    data = os.urandom(3 << 20)
    outside = workdir / "original"
    outside.write_bytes(data)
    os.link(outside, inbox / "link.bin")
    ticks = []

    def change_during_the_copy() -> None:
        ticks.append(1)
        if len(ticks) == 5:  # three reads hash it, then the copy's second read
            with open(outside, "r+b") as f:
                f.seek(2 << 20)
                f.write(b"X" * 100)

    ingestor.tick = change_during_the_copy
    ingestor.cache.subdir_fd(digest(data))  # the cache keeps its folders open: not a leak
    before = own_fds()
    result = ingestor.ingest([b"link.bin"])
    assert not result.registered and result.requeue == [b"link.bin"]
    assert not (workdir / "cache" / digest(data)[:2] / digest(data)).exists()
    assert not any(os.scandir(workdir / "cache" / os.fsdecode(CACHE_TMP))), "a temp copy was left behind"
    assert own_fds() == before
    ingestor.tick = lambda: None
    now = outside.read_bytes()
    assert ingestor.ingest([b"link.bin"]).registered == [digest(now)]


def test_a_batch_that_runs_out_of_descriptors_goes_on_with_what_it_holds(parts) -> None:
    inbox, ingestor = parts
    for i in range(60):
        (inbox / f"f{i}").write_bytes(b"file %d" % i)
    for h in {digest(b"file %d" % i) for i in range(60)}:
        ingestor.cache.subdir_fd(h)  # the cache's folders, opened once, are not what runs out
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = own_fds()
    resource.setrlimit(resource.RLIMIT_NOFILE, (before + 40, hard))
    try:
        result = ingestor.ingest([b"f%d" % i for i in range(60)])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert result.registered and result.later
    assert len(result.registered) + len(result.later) == 60
    assert own_fds() == before
    assert len(ingestor.ingest(result.later).registered) == len(result.later)


def test_a_busy_file_is_not_looked_at_before_its_delay_unless_its_writer_closes_it() -> None:
    # the queue's clocks are injected: the delay is a decision, not a sleep
    clock = [1000.0]
    old = os.stat_result((0o100644, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0.0, 0.0, 0.0, 0, 0, 0))  # still for ages
    queue = PendingQueue(1.0, lambda rel: old, monotonic=lambda: clock[0], wall=lambda: 2e9)
    queue.put_later(b"f", 4.0)
    assert queue.take(10, 0) == []
    clock[0] += 3.9
    assert queue.take(10, 0) == []
    clock[0] += 0.2
    assert queue.take(10, 0) == [b"f"]
    queue.put_later(b"g", 10.0)
    queue.put_ready(b"g")  # its writer closed it: taken at once
    assert queue.take(10, 0) == [b"g"]
    queue.close()


# -- item 5: a deep tree, and an observer that dies ------------------------------------------------

def make_chain(top: Path, depth: int, every: int) -> dict[bytes, bytes]:
    """A chain of `depth` folders named "d" under top, a file every `every` levels: {rel: data}."""
    files = {}
    fd = os.open(top, fsutil.O_DIR)
    rel = top.name.encode()
    try:
        for level in range(1, depth + 1):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", fsutil.O_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            rel += b"/d"
            if level % every == 0:
                data = b"level %d " % level + os.urandom(16)
                out = os.open("f%d" % level, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(out, data)
                os.close(out)
                files[rel + b"/f%d" % level] = data
    finally:
        os.close(fd)
    return files


@pytest.fixture
def deep_cleanup(workdir: Path) -> Iterator[None]:
    yield
    # shutil.rmtree (the workdir fixture's) recurses once per level too; GNU rm does not
    subprocess.run(["rm", "-rf", str(workdir / "inbox")], check=True, timeout=120)


def test_a_1500_level_tree_moved_in_is_taken_and_the_watcher_survives(daemon_factory, deep_cleanup) -> None:
    d = daemon_factory(ingest=QUIET)
    (d.root / "deep").mkdir()
    files = make_chain(d.root / "deep", 1500, 300)
    os.rename(d.root / "deep", d.inbox / "deep")
    want = {digest(data) for data in files.values()}
    wait_for(lambda: want <= {f["hash"] for f in d.files()}, timeout=60, message="every file of the deep tree")
    # the observer still works: a file dropped now is taken by its close event
    (d.inbox / "after.txt").write_bytes(b"after the deep tree")
    wait_for(lambda: registered(d, digest(b"after the deep tree")), timeout=15, message="a file after the tree")
    log = d.log()
    assert "RecursionError" not in log and "Traceback" not in log, log[-3000:]
    assert d.status()["problems"] == []


def test_a_tree_deeper_than_a_path_may_be_is_taken_by_descriptors(daemon_factory, deep_cleanup) -> None:
    # 2,100 levels of "dd/": paths past PATH_MAX (4096); inotify cannot watch the bottom
    # folders by path, the scan and ingest walk descriptors and take the files anyway
    d = daemon_factory(ingest=QUIET)
    (d.root / "deeper").mkdir()
    fd = os.open(d.root / "deeper", fsutil.O_DIR)
    try:
        for _ in range(2100):
            os.mkdir("dd", dir_fd=fd)
            child = os.open("dd", fsutil.O_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"at the bottom")
        os.close(out)
    finally:
        os.close(fd)
    os.rename(d.root / "deeper", d.inbox / "deeper")
    wait_for(lambda: registered(d, digest(b"at the bottom")), timeout=60, message="the file at the bottom")
    assert "Traceback" not in d.log()


class Watched:
    def __init__(self, root: Path) -> None:
        self.inbox = root / "inbox"
        self.inbox.mkdir()
        self.fd = os.open(self.inbox, fsutil.O_DIR)
        self.queue = PendingQueue(0.3, lambda rel: stat_in(self.fd, rel))
        self.scans: list[bytes] = []
        self.watcher = InboxWatcher(str(self.inbox), self.queue, self.scans.append, "inotify", lambda r: None)

    def ready(self, rel: bytes) -> None:
        got: list[bytes] = []
        wait_for(lambda: got.extend(self.queue.take(100, 0.05)) or rel in got, message=f"{rel!r} ready")


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Watched]:
    w = Watched(tmp_path)
    w.watcher.start()
    yield w
    w.watcher.stop()
    w.watcher.join(10)
    w.queue.close()
    os.close(w.fd)


def test_a_watcher_whose_threads_died_is_restarted_by_check_and_rescans(watched: Watched, caplog) -> None:
    assert watched.watcher.check() == []
    for emitter in list(watched.watcher.observer.emitters):
        emitter.stop()  # as if it had died of an exception
        emitter.join(10)
    assert any(not t.is_alive() for t in watched.watcher.threads())
    with caplog.at_level(logging.INFO, logger="cloudmanagerd.inbox"):
        assert watched.watcher.check() == []
    assert "restarting it and rescanning" in caplog.text
    assert all(t.is_alive() for t in watched.watcher.threads())
    assert watched.scans[-1] == b""  # the rescan
    (watched.inbox / "new.txt").write_bytes(b"new")
    watched.ready(b"new.txt")


def test_a_watcher_that_cannot_restart_says_so_and_recovers_later(watched: Watched) -> None:
    inbox = watched.inbox
    for emitter in list(watched.watcher.observer.emitters):
        emitter.stop()
        emitter.join(10)
    os.rmdir(inbox)
    problems = watched.watcher.check()
    assert problems[0].startswith("inbox watcher not running") and str(inbox) in problems[0]
    assert watched.watcher.check() == problems  # said again in status, retried each time
    inbox.mkdir()
    assert watched.watcher.check() == []
    assert all(t.is_alive() for t in watched.watcher.threads())


# -- item 6: the inbox deleted and recreated ---------------------------------------------------------

@pytest.mark.parametrize("how", ["rm -rf", "mv"])
def test_a_recreated_inbox_is_reopened_watched_and_rescanned(daemon_factory, how: str) -> None:
    d = daemon_factory(ingest=QUIET)
    (d.inbox / "before.txt").write_bytes(b"before")
    wait_for(lambda: registered(d, digest(b"before")), message="a file before")
    if how == "rm -rf":
        os.rmdir(d.inbox)
        missing = f"inbox {d.inbox} is missing (recreate it: mkdir -p {d.inbox})"
        wait_for(lambda: missing in d.status()["problems"], message="the missing inbox in status")
    else:
        os.rename(d.inbox, d.root / "old-inbox")
    d.inbox.mkdir()
    (d.inbox / "early.txt").write_bytes(b"dropped before the daemon noticed")  # the rescan takes it
    wait_for(lambda: registered(d, digest(b"dropped before the daemon noticed")), timeout=15,
             message="the file in the new inbox")
    (d.inbox / "later.txt").write_bytes(b"dropped later")  # the new watcher takes it
    wait_for(lambda: registered(d, digest(b"dropped later")), timeout=15, message="a later file")
    assert d.status()["problems"] == []
    assert "is a new folder" in d.log()


def test_an_inbox_swapped_for_a_symlink_while_running_is_not_followed(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(ingest=QUIET)
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "private.txt").write_bytes(b"not for the store")
    os.rmdir(d.inbox)
    d.inbox.symlink_to(elsewhere)
    wait_for(lambda: any("symbolic link" in p and str(d.inbox) in p for p in d.status()["problems"]),
             message="the link named in status")
    d.request({"cmd": "reload"})  # a rescan and a reload do not follow it either
    assert (elsewhere / "private.txt").read_bytes() == b"not for the store"
    assert d.files() == []
    d.inbox.unlink()
    d.inbox.mkdir()
    (d.inbox / "a.txt").write_bytes(b"a real folder again")
    wait_for(lambda: registered(d, digest(b"a real folder again")), message="a file in the real folder")
    assert d.status()["problems"] == []
    assert (elsewhere / "private.txt").exists()


def test_many_files_at_once_are_taken_under_the_default_descriptor_limit(daemon_factory) -> None:
    # systemd's default soft limit is 1024 (and the unit may not raise it): a batch of 512
    # files held 1,024 descriptors beside the cache's folders, failed with EMFILE, and failed
    # again on every retry. Found at start-up, the files all settle at once: one full batch.
    d = daemon_factory(start=False, ingest=QUIET)
    want = set()
    for i in range(700):
        sub = d.inbox / f"s{i % 70}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}").write_bytes(b"file %d" % i)
        want.add(digest(b"file %d" % i))
    command = d.command
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    d.command = lambda *extra: ["prlimit", f"--nofile=1024:{hard}", "--", *command(*extra)]
    d.start()
    wait_for(lambda: want <= {f["hash"] for f in d.files()}, timeout=120, interval=0.2,
             message="every file")
    assert "Too many open files" not in d.log()
    assert d.status()["problems"] == []


# -- item 10: an inbox path that is a symlink ---------------------------------------------------------

def run_daemon(d, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(d.command(*extra), capture_output=True, text=True, timeout=60, cwd=d.root)


def test_an_inbox_that_is_a_symlink_is_refused_by_check_config_and_start(daemon_factory, workdir: Path) -> None:
    d = daemon_factory(start=False)
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "private.txt").write_bytes(b"not for the store")
    d.inbox.rmdir()
    d.inbox.symlink_to(elsewhere)
    for extra in (("--check-config",), ()):
        out = run_daemon(d, *extra)
        assert out.returncode == 1, out
        lines = [line for line in (out.stderr + out.stdout).splitlines() if "symbolic link" in line]
        assert len(lines) == 1 and str(d.inbox) in lines[0] and str(elsewhere) in lines[0], out
        assert "Traceback" not in out.stderr + out.stdout
    assert (elsewhere / "private.txt").read_bytes() == b"not for the store"


def test_a_symlink_higher_up_the_inbox_path_is_allowed(daemon_factory, workdir: Path) -> None:
    real = workdir / "real"
    (real / "inbox").mkdir(parents=True)
    (workdir / "srv").symlink_to(real)  # like /srv -> /data/srv
    d = daemon_factory(start=False, inbox=str(workdir / "srv" / "inbox"))
    out = run_daemon(d, "--check-config")
    assert out.returncode == 0, out
    d.start()
    (real / "inbox" / "a.txt").write_bytes(b"through the admin's link")
    wait_for(lambda: registered(d, digest(b"through the admin's link")), message="the file")
    assert d.stop() == 0
