"""The Remote protocol every backend implements, the errors they raise, and transfer progress."""

from __future__ import annotations

import re
import threading
import time
from typing import Protocol

from ..errors import CloudManagerError

# How the upload loop treats an error (SPEC: transient errors retry; remote errors mark the
# remote unhealthy and say what to fix; file errors give up this pair and use a spare remote;
# missing means a recorded copy is gone and must be marked bad).
TRANSIENT = "transient"
REMOTE = "remote"
FILE = "file"
MISSING = "missing"


# The reserved namespace of a remote: catalog snapshots live under it (snapshots.py). An object is
# named by 64 hex digits (or a 2-digit folder of them), so no object can ever have this name.
RESERVED = "cloudmanagerd-catalog"
OBJECT_NAME = re.compile(r"[0-9a-f]{64}")


def reserved_parts(rel: str) -> list[str]:
    """The components of a name in the reserved namespace; ValueError for anything else (a bug)."""
    parts = rel.split("/")
    if parts[0] != RESERVED or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a name in the reserved namespace: {rel!r}")
    return parts


class RemoteError(CloudManagerError):
    """A failed remote operation; `kind` decides what the upload loop does next."""

    def __init__(self, message: str, kind: str = TRANSIENT) -> None:
        super().__init__(message)
        self.kind = kind


class Cancelled(RemoteError):
    """The uploader stopped a transfer (stalled, too slow, or the daemon is stopping)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, TRANSIENT)


class SourceMismatch(RemoteError):
    """The bytes read from the cache object do not hash to its name: the local copy is bad, not the
    remote. The upload records nothing; the uploader replaces the cache object."""

    def __init__(self, message: str) -> None:
        super().__init__(message, TRANSIENT)


class SourceCheck(Protocol):
    """Hashes an upload's source as it is read (see uploads.SendCheck)."""

    def advance(self, done: int) -> None:
        """`done` bytes of the source have been read by the backend."""

    def confirm(self, data: bytes | None = None) -> None:
        """Raise SourceMismatch unless the whole source hashed to the object's name. `data`: the whole
        object as the backend read and sent it, when it held it in memory: hashed instead of the source."""


class Transfer:
    """One transfer's progress, watched by the uploader, and its word that the transfer must stop.

    Backends call `update(bytes_done)` as bytes move (it raises Cancelled once the uploader
    cancelled the transfer), and backends that wait on a subprocess poll `cancelled`. An upload's
    transfer carries a `source` check: a backend that can still hold a copy back calls
    `confirm_source()` before making it final (a folder remote, before its rename).
    """

    def __init__(self, size: int, monotonic=time.monotonic, source: SourceCheck | None = None,
                 pending: bool = False) -> None:
        self.size = size
        self.done = 0
        self.monotonic = monotonic
        self.started = monotonic()
        self.last_change = self.started
        self.reason: str | None = None
        self.source = source
        # one of a batch (Remote.put_many) not begun yet: no stall is counted until `begin()`
        self.pending = pending
        self._event = threading.Event()

    def begin(self) -> None:
        """A batch reached this transfer: its clock starts now (raises Cancelled if it was cancelled)."""
        self.started = self.last_change = self.monotonic()
        self.pending = False
        self.check()

    def update(self, done: int) -> None:
        if done != self.done:
            self.done = done
            self.last_change = self.monotonic()
            if self.source is not None:
                self.source.advance(done)
        self.check()

    def confirm_source(self, data: bytes | None = None) -> None:
        """`data`: the whole object, when the backend read it into memory and sent those very bytes."""
        if self.source is not None:
            self.source.confirm(data)

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason or "cancelled")

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` unless cancelled first; True when cancelled."""
        return self._event.wait(timeout)


class RateLimit:
    """A remote's `rate_limit`: a token bucket that every transfer to and from the remote draws on,
    so that the limit holds for the remote as a whole, whatever the number of concurrent transfers.

    `take(n, transfer)` is called after `n` bytes moved and sleeps until the remote's average is back
    under the rate; a transfer cancelled meanwhile raises Cancelled at once (a stop is not delayed by
    the sleep). The bucket holds BURST seconds of bytes, so a transfer is never more than that ahead.
    """

    BURST = 0.05  # seconds: 2.5% of a 2 s transfer, and few enough sleeps to cost nothing

    def __init__(self, rate: float, monotonic=time.monotonic, sleep=time.sleep) -> None:
        self.rate = float(rate)
        self.monotonic = monotonic
        self.sleep = sleep
        self._lock = threading.Lock()
        self._paid_until = monotonic()  # the moment by which every byte taken so far may have moved

    def __bool__(self) -> bool:
        return self.rate > 0

    def take(self, n: int, transfer: Transfer | None = None) -> None:
        if self.rate <= 0 or n <= 0:
            return
        with self._lock:
            now = self.monotonic()
            self._paid_until = max(self._paid_until, now - self.BURST) + n / self.rate
            delay = self._paid_until - now
        if delay <= 0:
            return
        if transfer is None:
            self.sleep(delay)
        elif transfer.wait(delay):
            transfer.check()

    @property
    def chunk(self) -> int:
        """How many bytes a copy loop moves between two takes: BURST's worth, 64 KiB to 16 MiB."""
        return max(1 << 16, min(int(self.rate * self.BURST), 1 << 24)) if self else 1 << 24

    def progress(self, transfer: Transfer | None):
        """A progress callback for fsutil.copy_fd: reports to `transfer` and draws on the bucket."""
        if not self:
            return transfer.update if transfer is not None else None
        last = [0]

        def update(done: int) -> None:
            self.take(done - last[0], transfer)
            last[0] = done
            if transfer is not None:
                transfer.update(done)

        return update


class Remote(Protocol):
    """A place that holds at most one copy of each object, named by its hash."""

    name: str
    kind: str
    # True when bytes flowing are reported through Transfer.update (stall detection by
    # progress); False for backends that can only be timed as a whole.
    reports_progress: bool
    # True when get() fills its destination front to back while reporting progress, so that
    # fetch can hash the bytes behind the writer instead of reading them back afterwards.
    sequential_get: bool

    def put(self, h: str, src_fd: int, size: int, transfer: Transfer | None = None) -> str:
        """Store the object read from `src_fd` (from offset 0) under hash `h`; returns its URL once complete."""

    def get(self, h: str, url: str, dst_fd: int, transfer: Transfer | None = None) -> None:
        """Write the object's bytes to `dst_fd`; RemoteError(kind=MISSING) when it is gone."""

    def exists(self, h: str, url: str) -> int | None:
        """The object's size, or None when it does not exist."""

    def delete(self, h: str, url: str) -> None:
        """Remove the object; deleting a missing object is not an error."""

    def probe(self) -> None:
        """Raise RemoteError when the remote cannot take uploads now."""

    # Optional: `put_many(items) -> list[str | RemoteError]` stores many small objects and makes them
    # durable together. `items` are (h, src_fd, size, transfer) as for put(); each transfer is
    # begun (`Transfer.begin()`) as the batch reaches it. The answer holds, in the items' order, the
    # URL of each copy now complete and durable, or the RemoteError that stopped that one alone; an
    # error that stops the whole batch is raised. The uploader sends batches to remotes that have it.
    #
    # Optional, for catalog snapshots and `restore` (snapshots.py, restore.py); a backend that cannot
    # list what it holds (plowshare lockers) has none of them and is skipped. `rel` is a "/"-separated
    # name under RESERVED (see reserved_parts):
    #   put_snapshot(rel, src_fd, size, transfer): store the bytes whole under `rel`, or nothing there
    #     (a temp name and a rename, or one atomic PUT); `transfer.confirm_source()` before it is final.
    #   list_snapshots(rel_dir) -> [(name, size)]: the files directly under `rel_dir` ([] when absent).
    #   list_snapshot_folders(rel_dir) -> [name]: the folders directly under it (the nodes, for a hint).
    #   get_snapshot(rel, dst_fd), delete_snapshot(rel): as get and delete.
    #   list_objects() -> iterable of (hash, size): every object the remote holds.
    #   object_url(h) -> str: the URL `put` would have returned for the object.
    #
    # Optional: `clean_leftovers(now, min_age) -> int` removes what killed uploads left behind
    # (temp files older than `min_age` seconds); the scrub calls it on backends that have it.

    def close(self) -> None:
        """Release clients and processes."""
