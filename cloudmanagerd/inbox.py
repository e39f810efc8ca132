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
from watchdog.observers.polling import PollingObserver

from . import fsutil
from .errors import StartupError

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

    def on_event(self, event: Any) -> None:
        if self.on_file_event is None or event.is_directory or event.is_delete_self or event.is_move_self:
            super().on_event(event)
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

    def _add_callback(self, path: bytes) -> None:
        try:
            wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.on_lost_events("watch-limit")
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
            # (a symlink, FIFO, socket or device) is handed on now, to be rejected.
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    return
            except OSError:
                return
            self.queue.put_ready(rel)
        else:
            self.queue.put_ready(rel)


class InboxWatcher:
    """The observer on the inbox: inotify by default, polling for network filesystems."""

    def __init__(self, path: str, queue: PendingQueue, scan: Callable[[bytes], None],
                 observer: str, on_lost_events: LostEvents) -> None:
        self.path = path
        polling = observer == "polling"
        handler = InboxHandler(os.fsencode(path), queue, scan, polling)
        self.observer = PollingObserver(timeout=1.0) if polling else InboxObserver(on_lost_events,
                                                                                   handler.file_event)
        self.observer.schedule(handler, os.fsencode(path), recursive=True,
                               event_filter=None if polling else EVENT_FILTER)

    def start(self) -> None:
        try:
            self.observer.start()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StartupError(f"inbox {self.path}: {SYSCTL_HINTS['watch-limit']}") from None
            if exc.errno == errno.EMFILE:
                raise StartupError(f"inbox {self.path}: the inotify instance limit was reached "
                                   "(raise the sysctl fs.inotify.max_user_instances)") from None
            raise

    def stop(self) -> None:
        self.observer.stop()

    def join(self, timeout: float | None = None) -> None:
        if self.observer.ident is not None:  # start() may have failed (watch limit on the inbox itself)
            self.observer.join(timeout)

    def is_alive(self) -> bool:
        return self.observer.is_alive()


def scan(inbox_fd: int, rel: bytes, ignored: Callable[[bytes], bool], found: Callable[[bytes], None]) -> int:
    """Walk a folder of the inbox from descriptors, never following a symlink; returns entries found."""
    count = 0
    stack = [rel]
    while stack:
        folder = stack.pop()
        try:
            fd = fsutil.open_subdir(inbox_fd, fsutil.split_rel(folder))
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                found(folder)  # ingest decides: a symlink in place of a folder is rejected
            else:
                log.warning("cannot scan inbox folder %r: %s", folder, exc.strerror)
            continue
        try:
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
                        stack.append(child)
                    else:
                        count += 1
                        found(child)
        finally:
            os.close(fd)
    return count


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
        self._settling: dict[bytes, tuple[tuple[int, int, int], float]] = {}
        self._heap: list[_Settling] = []
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._settling)

    def put_ready(self, rel: bytes) -> None:
        with self._cond:
            self._settling.pop(rel, None)
            self._ready[rel] = None
            self._cond.notify()

    def put_settle(self, rel: bytes) -> None:
        with self._cond:
            if rel in self._ready or rel in self._settling:
                return
            self._settling[rel] = ((-1, -1, -1), self.monotonic())
            heapq.heappush(self._heap, _Settling(self.monotonic(), rel))
            self._cond.notify()

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
                return
            if not stat.S_ISREG(st.st_mode):
                # ingest rejects it or scans it; nothing to wait for
                del self._settling[rel]
                self._ready[rel] = None
                return
            sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            previous, since = entry
            now = self.monotonic()
            quiet_for = self.wall() - st.st_ctime_ns / 1e9
            if quiet_for >= self.settle or (sig == previous and now - since >= self.settle):
                del self._settling[rel]
                self._ready[rel] = None
                return
            if sig != previous:
                since = now
            self._settling[rel] = (sig, since)
            remaining = self.settle - max(quiet_for, 0.0) if 0 <= quiet_for else self.settle
            heapq.heappush(self._heap, _Settling(now + max(min(remaining, self.settle), 0.05), rel))


def stat_in(inbox_fd: int, rel: bytes) -> os.stat_result | None:
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
