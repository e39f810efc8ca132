"""The inbox: which entries are ready to be taken, from inotify events, scans and rescans.

A file is ready when its writer closed it (IN_CLOSE_WRITE) or it was renamed into the
inbox (IN_MOVED_TO). Anything found without such an event (start-up scan, rescan, a
folder moved in, the polling observer) is ready once it has been still for `settle`.

watchdog 7.1's move grouper holds every IN_MOVED_FROM for 0.5 s, and everything queued
behind it waits too; ingest renames each file out of the inbox, so every file would
delay the next one by half a second. It also pairs each IN_MOVED_TO by a linear scan of
its queue (quadratic in a burst of moves). `CookieMoveGrouper` replaces it: moves are
paired by cookie in a dict, nothing is ever held back. watchdog only logs an inotify
queue overflow and silently skips folders past the watch limit; `InboxWatchGroup`
reports both, so the daemon rescans at once.
"""

from __future__ import annotations

import collections
import errno
import heapq
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import (
    InotifyFullEmitter,
    InotifyObserver,
    InotifyWatchGroup,
)
from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent
from watchdog.observers.polling import PollingObserver

from . import fsutil
from .errors import StartupError
from .names import show

log = logging.getLogger(__name__)

LostEvents = Callable[[str], None]

SYSCTL_HINTS = {
    "overflow": "the inotify event queue overflowed and events were lost "
                "(raise the sysctl fs.inotify.max_queued_events)",
    "watch-limit": "the inotify watch limit was reached, so some folders are not watched "
                   "(raise the sysctl fs.inotify.max_user_watches)",
}


class CookieMoveGrouper:
    """A drop-in for watchdog's InotifyMoveEventGrouper that pairs moves by cookie, at once."""

    MAX_UNPAIRED = 8192

    def __init__(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._moved_from: collections.OrderedDict[int, Any] = collections.OrderedDict()

    def read_event(self) -> Any:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            return self._queue.popleft()

    def put_event(self, event: Any) -> None:
        ev = event.ev
        with self._cond:
            if ev.is_moved_from:
                # Kept only to pair a later IN_MOVED_TO (watchdog moves its watches on a folder
                # rename); a file leaving the inbox is of no interest, so it is never queued.
                self._moved_from[ev.cookie] = event
                while len(self._moved_from) > self.MAX_UNPAIRED:
                    self._moved_from.popitem(last=False)
                return
            if ev.is_moved_to:
                source = self._moved_from.pop(ev.cookie, None)
                if source is not None:
                    event = (source, event)
            self._queue.append(event)
            self._cond.notify()

    def get_queued_moved_from_event(self, cookie: int) -> Any:
        with self._cond:
            return self._moved_from.get(cookie)

    def discard_pending_events(self) -> None:
        with self._cond:
            self._queue.clear()
            self._moved_from.clear()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


FileEvent = Callable[[bytes, str], None]


@dataclass
class InboxWatchGroup(InotifyWatchGroup):
    """watchdog's watch group, with a fast lane for file events.

    Events on files ("closed", "moved in", "created") go straight from the inotify reader
    thread to `on_file_event`: no grouper, no emitter and no observer thread in between, which
    costs several thread hand-offs per event and made a `cp` of 10,000 files CPU-bound.
    Folder events still take watchdog's path, which keeps the recursive watches right.
    """

    on_lost_events: LostEvents = field(default=lambda reason: None)
    on_file_event: FileEvent | None = None
    _move_event_grouper: Any = field(default_factory=CookieMoveGrouper, init=False)
    _too_deep_logged: bool = field(default=False, init=False)

    def on_event(self, event: Any) -> None:
        if self.on_file_event is None or event.is_directory or event.is_delete_self or event.is_move_self:
            try:
                super().on_event(event)
            except (RecursionError, OSError) as exc:
                # This runs in watchdog's inotify reader thread: an exception would end it, and
                # every later event with it. The folder's files are found by a scan instead.
                watched = self._active_callbacks_by_watch.get(event.wd, self.path)
                folder = os.path.join(watched, event.name) if event.name else watched
                self.on_lost_events(f"cannot watch the inbox folder {show(folder)} "
                                    f"({type(exc).__name__}: {exc}); its files are taken by scans")
            return
        if event.is_close_write or event.is_moved_to:
            kind = "complete"
        elif event.is_create:
            kind = "created"
        else:
            return  # a file leaving the inbox (IN_MOVED_FROM, IN_DELETE): nothing to do
        watched = self._active_callbacks_by_watch.get(event.wd)
        if watched is not None and self.is_active:
            self.on_file_event(os.path.join(watched, event.name), kind)

    def on_queue_overflow(self) -> None:
        super().on_queue_overflow()
        self.on_lost_events("overflow")

    def _add_all_callbacks(self, path: bytes) -> None:
        """Watch a folder and every folder below it, never following a symlink.

        watchdog's version walks with os.walk, which recurses once per level: a tree 1,500
        levels deep raised RecursionError and ended the inotify thread. This walk keeps its
        own stack.
        """
        self._add_callback(path)
        if not self.is_recursive:
            return
        stack = [path]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as entries:
                    children = [os.path.join(folder, os.fsencode(e.name)) for e in entries
                                if e.is_dir(follow_symlinks=False)]
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    self._too_deep(folder)
                continue  # gone, or not a folder any more: nothing to watch
            for child in children:
                self._add_callback(child)
                stack.append(child)

    def _recursive_simulate(self, src_path: bytes) -> list[Any]:
        # watchdog invents a "created" event for every entry of a new folder (with a recursive
        # os.walk); the handler scans a new folder itself, from descriptors, so none is needed.
        return []

    def _too_deep(self, folder: bytes) -> None:
        if not self._too_deep_logged:
            self._too_deep_logged = True
            log.warning("inbox folder %s is nested too deep to be watched (its path is longer than the "
                        "system allows); files put there later are taken by the periodic rescan", show(folder))

    def _add_callback(self, path: bytes) -> None:
        try:
            wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.on_lost_events("watch-limit")
            elif exc.errno == errno.ENAMETOOLONG:
                self._too_deep(path)
            if path == self.path:
                raise
            return
        self._active_callbacks_by_path[path] = wd
        self._active_callbacks_by_watch[wd] = path


class InboxEmitter(InotifyFullEmitter):
    def __init__(self, *args: Any, on_lost_events: LostEvents, on_file_event: FileEvent | None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_lost_events = on_lost_events
        self._on_file_event = on_file_event

    def on_thread_start(self) -> None:
        self._inotify = InboxWatchGroup(
            self._inotify_fd, os.fsencode(self.watch.path), is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(), follow_symlink=False,
            on_lost_events=self._on_lost_events, on_file_event=self._on_file_event)

    def build_and_queue_event(self, event: Any, *, full_events: bool = True) -> None:
        """A folder created or moved in: one event for the folder alone.

        The handler scans the whole folder from descriptors. watchdog would add an event per
        entry below it, each of which the handler would scan again, found by an os.walk that
        recurses once per level (RecursionError on a deep tree, ending this thread).
        """
        if not isinstance(event, PathedInotifyEvent):  # a (moved from, moved to) pair
            source, dest = event
            if source.ev.is_directory:
                self.queue_event(DirMovedEvent(source.path, dest.path))
                return
        elif event.ev.is_directory and (event.ev.is_moved_to or event.ev.is_create):
            self.queue_event(DirMovedEvent(b"", event.path) if event.ev.is_moved_to
                             else DirCreatedEvent(event.path))
            return
        super().build_and_queue_event(event, full_events=full_events)


class InboxObserver(InotifyObserver):
    def __init__(self, on_lost_events: LostEvents, on_file_event: FileEvent | None = None) -> None:
        super().__init__(generate_full_events=True)
        self._emitter_class = InboxEmitter
        self._emitter_kwargs["on_lost_events"] = on_lost_events
        self._emitter_kwargs["on_file_event"] = on_file_event


# Only these reach the handler; the kernel is asked for nothing else (no IN_MODIFY per write).
EVENT_FILTER = [FileClosedEvent, FileCreatedEvent, FileMovedEvent, DirMovedEvent, DirCreatedEvent]


class InboxHandler(FileSystemEventHandler):
    """Turns watchdog events into ready or settling inbox entries (paths relative to the inbox)."""

    def __init__(self, inbox: bytes, queue: PendingQueue, scan: Callable[[bytes], None], polling: bool) -> None:
        self.prefix = inbox.rstrip(b"/") + b"/"
        self.queue = queue
        self.scan = scan
        self.polling = polling

    def _rel(self, path: bytes | str) -> bytes | None:
        path = os.fsencode(path)
        return path[len(self.prefix):] if path.startswith(self.prefix) else None

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if isinstance(event, (DirMovedEvent, DirCreatedEvent)):
                rel = self._rel(event.dest_path or event.src_path) if isinstance(event, DirMovedEvent) \
                    else self._rel(event.src_path)
                if rel is not None:
                    self.scan(rel)
            return
        if isinstance(event, FileMovedEvent):
            self.file_event(os.fsencode(event.dest_path), "complete")
        elif event.event_type == "created":
            self.file_event(os.fsencode(event.src_path), "created")
        elif event.event_type in ("closed", "modified"):
            self.file_event(os.fsencode(event.src_path), "complete")

    def file_event(self, path: bytes, kind: str) -> None:
        rel = self._rel(path)
        if rel is None:
            return
        if self.polling:
            self.queue.put_settle(rel)
        elif kind == "created":
            # A file being written announces itself again on close; only what never will
            # (a symlink, FIFO, socket or device) is handed on now, to be rejected. A hard link
            # (`ln`) makes no close event either: it is taken once still for settle (and not
            # while anyone holds it open for writing: ingest asks).
            try:
                st = os.lstat(path)
            except OSError:
                return
            if not stat.S_ISREG(st.st_mode):
                self.queue.put_ready(rel)
            elif st.st_nlink > 1:
                self.queue.put_settle(rel)
        else:
            self.queue.put_ready(rel)


class InboxWatcher:
    """The observer on the inbox: inotify by default, polling for network filesystems.

    `check()` (run by the daemon every few seconds) notices an observer whose threads have
    died, for whatever reason, and starts a new one, then rescans: events missed meanwhile
    are made up for by the scan.
    """

    def __init__(self, path: str, queue: PendingQueue, scan: Callable[[bytes], None],
                 observer: str, on_lost_events: LostEvents) -> None:
        self.path = path
        self._polling = observer == "polling"
        self._handler = InboxHandler(os.fsencode(path), queue, scan, self._polling)
        self._on_lost_events = on_lost_events
        self._scan = scan
        self._lock = threading.Lock()
        self._stopped = False
        self._failed: str | None = None  # why the last restart failed, said once
        self.observer = self._build()

    def _build(self) -> Any:
        observer = PollingObserver(timeout=1.0) if self._polling else InboxObserver(self._on_lost_events,
                                                                                   self._handler.file_event)
        observer.schedule(self._handler, os.fsencode(self.path), recursive=True,
                          event_filter=None if self._polling else EVENT_FILTER)
        return observer

    def start(self) -> None:
        self._start(self.observer)

    def _start(self, observer: Any) -> None:
        try:
            observer.start()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StartupError(f"inbox {self.path}: {SYSCTL_HINTS['watch-limit']}") from None
            if exc.errno == errno.EMFILE:
                raise StartupError(f"inbox {self.path}: the inotify instance limit was reached "
                                   "(raise the sysctl fs.inotify.max_user_instances)") from None
            raise

    def threads(self) -> list[threading.Thread]:
        """Every thread the observer needs: itself, its emitters, and inotify's reader."""
        observer = self.observer
        found = [observer, *observer.emitters]
        reader = getattr(observer, "_inotify_fd", None)
        if isinstance(reader, threading.Thread):
            found.append(reader)
        return found

    def check(self) -> list[str]:
        """Problem lines; an observer with a dead thread is replaced, and the inbox rescanned."""
        with self._lock:
            if self._stopped:
                return []
            dead = [t.name for t in self.threads() if not t.is_alive()]
            if not dead and self._failed is None:
                return []
            if dead and self._failed is None:
                log.error("the inbox watcher stopped (thread %s not running); restarting it and rescanning "
                          "the inbox", ", ".join(dead))
            return self._restart()

    def restart(self, why: str) -> list[str]:
        """A new observer (on a recreated inbox, say), then a rescan; problem lines if it failed."""
        with self._lock:
            if self._stopped:
                return []
            log.info("restarting the inbox watcher: %s", why)
            return self._restart()

    def _restart(self) -> list[str]:
        self._discard(self.observer)
        observer = self._build()
        try:
            self._start(observer)
        except (OSError, StartupError) as exc:
            self._discard(observer)
            self.observer = observer  # dead: the next check() tries again
            why = str(exc) if isinstance(exc, StartupError) else f"inbox {self.path}: {exc.strerror}"
            if why != self._failed:
                log.error("cannot restart the inbox watcher: %s (retrying)", why)
            self._failed = why
            return [f"inbox watcher not running: {why}"]
        self.observer = observer
        if self._failed is not None:
            log.info("the inbox watcher runs again")
        self._failed = None
        self._scan(b"")
        return []

    @staticmethod
    def _discard(observer: Any) -> None:
        try:
            observer.stop()
        except Exception as exc:  # a broken observer must not stop its replacement
            log.debug("stopping a dead inbox observer: %r", exc)
        if observer.ident is not None:
            observer.join(5)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self.observer.stop()

    def join(self, timeout: float | None = None) -> None:
        if self.observer.ident is not None:  # start() may have failed (watch limit on the inbox itself)
            self.observer.join(timeout)

    def is_alive(self) -> bool:
        return self.observer.is_alive()


class InboxRoot(fsutil.Root):
    """The inbox folder's descriptor, which follows the configured path when it is replaced."""

    def __init__(self, path: str) -> None:
        # O_NOFOLLOW: an inbox path that is a symlink is refused (ELOOP), see preflight.py
        super().__init__(path, fsutil.open_root(path, follow=False))

    def check(self) -> tuple[bool, str | None]:
        """(reopened, problem): whether the path held a new folder, now opened; or why it cannot.

        Compared by device and inode: `rm -rf inbox; mkdir inbox` or `mv inbox old; mkdir
        inbox` leave the old descriptor on a folder nobody drops into any more.
        """
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False, f"inbox {self.path} is missing (recreate it: mkdir -p {self.path})"
        except OSError as exc:
            return False, f"inbox {self.path} cannot be checked: {exc.strerror}"
        if stat.S_ISLNK(st.st_mode):
            return False, (f"inbox {self.path} is now a symbolic link, which is never followed "
                           f"(replace it with a folder: rm {self.path}; mkdir {self.path})")
        if not stat.S_ISDIR(st.st_mode):
            return False, f"inbox {self.path} is not a folder any more (replace it with one: mkdir)"
        held = self.fstat()
        if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino) and held.st_nlink > 0:
            return False, None
        try:
            fd = fsutil.open_root(self.path, follow=False)
        except OSError as exc:  # swapped again meanwhile: the next check sees what is there
            return False, f"inbox {self.path} cannot be opened: {exc.strerror}"
        self.replace(fd)
        return True, None


SCAN_HELD = 32  # folder descriptors a scan keeps open for folders waiting on its stack


def scan(inbox_fd: int | fsutil.Root, rel: bytes, ignored: Callable[[bytes], bool],
         found: Callable[[bytes], None]) -> int:
    """Walk a folder of the inbox from descriptors, never following a symlink; returns entries found.

    A subfolder is opened from its parent's descriptor, so a deep chain costs one open per
    level (reopening each from the inbox cost depth² opens: over a million at 1,500 levels).
    At most SCAN_HELD such descriptors wait on the stack; past that (a wide tree) a folder
    is reopened from the inbox when its turn comes.
    """
    count = 0
    stack: list[tuple[bytes, int]] = [(rel, -1)]
    held = 0
    try:
        while stack:
            folder, fd = stack.pop()
            if fd >= 0:
                held -= 1
            else:
                fd = _open_scanned(inbox_fd, folder, found)
                if fd < 0:
                    continue
            try:
                subfolders: list[bytes] = []
                with os.scandir(fd) as entries:
                    for entry in entries:
                        name = os.fsencode(entry.name)
                        child = folder + b"/" + name if folder else name
                        if ignored(child):
                            continue
                        try:
                            is_dir = entry.is_dir(follow_symlinks=False)
                        except OSError:
                            continue
                        if is_dir:
                            subfolders.append(name)
                        else:
                            count += 1
                            found(child)
                # those opened now go on top, so that they come off first and hand their descriptors back
                n_open = max(0, min(len(subfolders), SCAN_HELD - held))
                stack.extend((folder + b"/" + name if folder else name, -1) for name in subfolders[n_open:])
                for name in subfolders[:n_open]:
                    child = folder + b"/" + name if folder else name
                    child_fd = _open_scanned(fd, name, found, child)
                    if child_fd >= 0:
                        held += 1
                        stack.append((child, child_fd))
            finally:
                os.close(fd)
    finally:
        for _, fd in stack:
            if fd >= 0:
                os.close(fd)
    return count


def _open_scanned(base: int | fsutil.Root, rel: bytes, found: Callable[[bytes], None],
                  shown: bytes | None = None) -> int:
    """Open a folder to scan from `base` (-1 when it is gone or cannot be a folder)."""
    shown = rel if shown is None else shown
    try:
        return fsutil.open_subdir(base, fsutil.split_rel(rel))
    except FileNotFoundError:
        return -1
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            found(shown)  # ingest decides: a symlink in place of a folder is rejected
        else:
            log.warning("cannot scan inbox folder %r: %s", shown, exc.strerror)
        return -1


@dataclass(order=True)
class _Settling:
    due: float
    rel: bytes = field(compare=False)


class PendingQueue:
    """Entries waiting to be ingested: ready ones at once, the others once they are still.

    `stat_rel` stats an entry without following symlinks (None when it is gone); it is
    injected so that settle decisions can be tested with fixed clocks and fake stats.
    """

    def __init__(self, settle: float, stat_rel: Callable[[bytes], os.stat_result | None],
                 monotonic: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.settle = settle
        self.stat_rel = stat_rel
        self.monotonic = monotonic
        self.wall = wall
        self._ready: dict[bytes, None] = {}
        # rel -> (last signature, since when it is unchanged, not looked at before)
        self._settling: dict[bytes, tuple[tuple[int, int, int], float, float]] = {}
        self._heap: list[_Settling] = []
        # rel -> when it was queued (monotonic); in insertion order, so the first is the oldest (metrics)
        self._since: dict[bytes, float] = {}
        self._cond = threading.Condition()
        self._closed = False

    def set_settle(self, seconds: float) -> None:
        """A reload: files found without an event are taken after this much quiet from now on."""
        self.settle = seconds

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._settling)

    def oldest_age(self) -> float:
        """Seconds the longest-waiting entry has been in the queue (since it was last put in); 0 when empty."""
        with self._cond:
            first = next(iter(self._since.values()), None)
        return 0.0 if first is None else max(self.monotonic() - first, 0.0)

    def put_ready(self, rel: bytes) -> None:
        with self._cond:
            self._since.setdefault(rel, self.monotonic())
            self._settling.pop(rel, None)
            self._ready[rel] = None
            self._cond.notify()

    def put_settle(self, rel: bytes) -> None:
        with self._cond:
            if rel in self._ready or rel in self._settling:
                return
            now = self.monotonic()
            self._since.setdefault(rel, now)
            self._settling[rel] = ((-1, -1, -1), now, now)
            heapq.heappush(self._heap, _Settling(now, rel))
            self._cond.notify()

    def put_later(self, rel: bytes, delay: float) -> None:
        """Settle, but not before `delay` seconds (a file still open for writing); an event that
        says it is complete (put_ready) still takes it at once."""
        with self._cond:
            if rel in self._ready:
                return
            now = self.monotonic()
            self._since.setdefault(rel, now)
            self._settling[rel] = ((-1, -1, -1), now, now + delay)
            heapq.heappush(self._heap, _Settling(now + delay, rel))
            self._cond.notify()

    def prune_gone(self, ahead: float = 2.0) -> int:
        """Forget delayed entries whose file is gone; how many. A file held open for writing is
        looked at again only up to a minute later (put_later): deleted meanwhile, it would stay in
        `status`'s pending count until then. Entries due within `ahead` seconds are left to the
        settle check, which drops gone ones anyway, so that a large rescan's entries cost nothing here."""
        now = self.monotonic()
        with self._cond:
            delayed = [rel for rel, (_, _, not_before) in self._settling.items() if not_before > now + ahead]
        gone = []
        for rel in delayed:
            try:
                if self.stat_rel(rel) is None:
                    gone.append(rel)
            except OSError:
                continue  # not plainly gone: its settle check hands it to ingest, which says why
        with self._cond:
            for rel in gone:
                if self._settling.pop(rel, None) is not None:
                    self._since.pop(rel, None)  # its heap item finds nothing and is skipped
        return len(gone)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, limit: int, timeout: float) -> list[bytes]:
        """Up to `limit` ready entries; waits at most `timeout` seconds for the first one."""
        deadline = self.monotonic() + timeout
        while True:
            with self._cond:
                due = self._pop_due()
                if not self._ready and not due:
                    if self._closed:
                        return []
                    wait = deadline - self.monotonic()
                    if self._heap:
                        wait = min(wait, self._heap[0].due - self.monotonic())
                    if wait <= 0 and self.monotonic() >= deadline:
                        return []
                    self._cond.wait(max(wait, 0.001))
                    continue
            for rel in due:
                self._check_settled(rel)
            with self._cond:
                if self._ready:
                    batch = []
                    for rel in list(self._ready):
                        batch.append(rel)
                        del self._ready[rel]
                        self._since.pop(rel, None)
                        if len(batch) >= limit:
                            break
                    return batch
                if self.monotonic() >= deadline:
                    return []

    def _pop_due(self) -> list[bytes]:
        now = self.monotonic()
        due = []
        while self._heap and self._heap[0].due <= now:
            due.append(heapq.heappop(self._heap).rel)
        return due

    def _check_settled(self, rel: bytes) -> None:
        with self._cond:
            entry = self._settling.get(rel)
            if entry is None or self.monotonic() < entry[2]:
                return  # made ready meanwhile, or delayed by put_later (its own heap item comes)
        try:
            st = self.stat_rel(rel)
        except OSError:
            with self._cond:
                self._settling.pop(rel, None)
                self._ready[rel] = None
            return
        with self._cond:
            entry = self._settling.get(rel)
            if entry is None:
                return
            if st is None:
                del self._settling[rel]
                self._since.pop(rel, None)
                return
            if not stat.S_ISREG(st.st_mode):
                # ingest rejects it or scans it; nothing to wait for
                del self._settling[rel]
                self._ready[rel] = None
                return
            sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            previous, since, not_before = entry
            if self.monotonic() < not_before:
                return
            now = self.monotonic()
            quiet_for = self.wall() - st.st_ctime_ns / 1e9
            if quiet_for >= self.settle or (sig == previous and now - since >= self.settle):
                del self._settling[rel]
                self._ready[rel] = None
                return
            if sig != previous:
                since = now
            self._settling[rel] = (sig, since, not_before)
            remaining = self.settle - max(quiet_for, 0.0) if 0 <= quiet_for else self.settle
            heapq.heappush(self._heap, _Settling(now + max(min(remaining, self.settle), 0.05), rel))


def stat_in(inbox_fd: int | fsutil.Root, rel: bytes) -> os.stat_result | None:
    """Stat an inbox entry without following symlinks: None when it is gone.

    Any other error (a symlink in place of a folder, say) is raised, and the entry is then
    handed to ingest at once, which rejects or reports it.
    """
    parts = fsutil.split_rel(rel)
    if not parts:
        return None
    try:
        with fsutil.subdir(inbox_fd, parts[:-1]) as fd:
            return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
