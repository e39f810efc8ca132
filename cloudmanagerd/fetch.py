"""Fetch back: bring an evicted file from a remote into the cache, verified by its SHA-256.

Remotes are tried in order of past success. A copy that is missing or holds other bytes
is marked bad (so the redundancy count drops and the upload loop makes a new copy) and
charged to its remote; the next remote is tried. Two requests for one hash fetch it once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Mapping

from . import fsutil
from .cache import Cache
from .catalog import Catalog
from .errors import CacheFull, CloudManagerError, NotFound, OutputError
from .eviction import Evictor
from .hashing import HASH_CHUNK, sha256_fd
from .logs import COPY_BAD, FILE_AT_RISK, fields
from .remotes.base import MISSING, Remote, RemoteError, Transfer

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class ReportingTransfer(Transfer):
    """A Transfer that also tells a client how far the fetch is, at most ~10 times a second."""

    def __init__(self, size: int, progress: ProgressFn | None, hasher: TrailingHasher | None = None) -> None:
        super().__init__(size)
        self.progress = progress
        self.hasher = hasher
        self._last_report = 0.0

    def update(self, done: int) -> None:
        super().update(done)
        if self.hasher is not None:
            self.hasher.advance(done)
        now = time.monotonic()
        if self.progress is not None and now - self._last_report >= 0.1:
            self._last_report = now
            with contextlib.suppress(OSError):
                self.progress(done, self.size)


class TrailingHasher:
    """Hashes a file while a sequential writer fills it, so the hash is ready when the copy is.

    The writer reports how many bytes it has written (a contiguous prefix, for a backend
    whose `sequential_get` is true); this thread reads them back from the page cache and
    hashes them on the other core instead of in a second pass afterwards.

    A `sink` (a get's output: _Tee) is handed each piece hashed, in order, with the function that
    gives its buffer back: it writes the pieces on a thread of its own, so that hashing and writing
    the output overlap (one thread doing both was the slowest stage of a get from S3, slower than
    the download it trailed). The pieces are read into POOL rotating buffers, never allocated anew.
    A fetch's pieces are FETCH_PIECE bytes.
    """

    POOL = 8  # buffers in flight between this thread and the sink's writer

    def __init__(self, fd: int, sink: _Tee | None = None, chunk: int = 0) -> None:
        self.fd = fd
        self.sink = sink
        self.digest = hashlib.sha256()
        self.offset = 0
        self.written = 0
        self.final: int | None = None
        self.error: OSError | None = None  # a read that failed: finish() then gives None
        self._chunk = chunk or HASH_CHUNK
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(self.POOL if sink is not None else 1):
            self._free.put(bytearray(self._chunk))
        self._wake = threading.Event()
        if sink is not None:
            sink.open()
        self._thread = threading.Thread(target=self._run, name="fetch-hash", daemon=True)
        self._thread.start()

    def advance(self, written: int) -> None:
        self.written = written
        self._wake.set()

    def _run(self) -> None:
        try:
            while True:
                target = self.final if self.final is not None else self.written
                if self.offset < target:
                    buf = self._free.get()
                    try:
                        n = os.preadv(self.fd, [memoryview(buf)[: min(self._chunk, target - self.offset)]],
                                      self.offset)
                    except OSError as exc:
                        # a read error on the temp (EIO): the fetch reads the file again itself and meets
                        # the error there, where it is reported; a traceback from this thread helps no one
                        self.error = exc
                        return
                    if not n:
                        return
                    piece = memoryview(buf)[:n]
                    self.digest.update(piece)
                    self.offset += n
                    if self.sink is not None:
                        self.sink(piece, lambda buf=buf: self._free.put(buf))
                    else:
                        self._free.put(buf)
                elif self.final is not None:
                    return
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        finally:
            if self.sink is not None:
                self.sink.close()  # every piece handed over is written (or dropped after an error)

    def finish(self, size: int) -> str | None:
        """The hex digest of the first `size` bytes, or None if the file fell short."""
        self.final = size
        self._wake.set()
        self._thread.join()
        return self.digest.hexdigest() if self.offset == size else None


SEND_CHUNK = 1 << 20
# A fetch hashes and tees in pieces of this size, small enough to stay in the core's cache from the read
# through the hash to the output's write: with 1 MiB pieces a get from S3 took 1.9-3.9 s of CPU (1.2-3.5 s
# in the kernel, copying), with 256 KiB 1.6-1.7 s (4 MiB was worse still)
FETCH_PIECE = 256 << 10


class _Writeback:
    """Starts the disk writes of a file being written front to back, every STEP bytes (see start_writeback).

    For a get's output only: the client fsyncs it once it has the reply, and without this waited for
    the whole file then (~0.3 s a GiB here). The fetch's temp is not kicked: its fsync already runs
    while the hasher catches up, and a kick from the hasher's thread held the hasher up."""

    STEP = 32 << 20

    def __init__(self, fd: int, base: int = 0) -> None:
        self.fd = fd
        self.done = base

    def reached(self, end: int) -> None:
        if end - self.done >= self.STEP:
            fsutil.start_writeback(self.fd, self.done, end - self.done)
            self.done = end


class _Tee:
    """A `get`'s output written while its file is fetched: the fetch's hasher hands over each piece
    it hashed, and the output gets it then, the last piece held back until the fetch verified the
    whole (as `_send_verified` does), so the file is read once instead of fetched, then read again.

    The pieces are written by a thread of the tee's own (`open` to `close`, one per fetch attempt)
    while the hasher reads and hashes the next ones. Only into a regular file that ends at our
    start, which a failed fetch can cut back to it.
    """

    def __init__(self, dst: int, start: int, stall: float) -> None:
        self.dst = dst
        self.start = start
        self.stall = stall
        self.held: memoryview | None = None
        self._release_held: Callable[[], None] | None = None
        self.written = 0
        self.error: OutputError | None = None
        self.verified = False  # set by the fetch once the cache object is the file's bytes
        self._queue: queue.SimpleQueue[tuple[memoryview, Callable[[], None]] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        # the client fsyncs the output once it has the reply: its writeback runs while the fetch does
        self._writeback = _Writeback(dst, start)

    def open(self) -> None:
        """A fetch begins: the writer thread starts (after `reset`, nothing of ours is in the output)."""
        self.close()
        self._writer = threading.Thread(target=self._write_pieces, name="fetch-output", daemon=True)
        self._writer.start()

    def __call__(self, piece: memoryview, release: Callable[[], None]) -> None:
        """From the hasher: `piece` is hashed; `release()` gives its buffer back once it is written."""
        self._queue.put((piece, release))

    def close(self) -> None:
        """Wait until every piece handed over is written (or dropped after an error): idempotent."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def _write_pieces(self) -> None:
        while (item := self._queue.get()) is not None:
            piece, release = item
            if self.error is None and self.held is not None:
                try:
                    _write_output(self.dst, self.held, self.stall)
                    self.written += len(self.held)
                    self._writeback.reached(self.start + self.written)
                except OutputError as exc:
                    self.error = exc  # the hasher goes on (the fetch is worth finishing); we drop
            self._drop_held()
            self.held, self._release_held = piece, release

    def _drop_held(self) -> None:
        if self._release_held is not None:
            self._release_held()
        self.held, self._release_held = None, None

    def reset(self) -> None:
        """Before a fetch (or another remote): nothing of ours in the output."""
        self.close()
        self._drop_held()
        if self.written:
            os.ftruncate(self.dst, self.start)
        os.lseek(self.dst, self.start, os.SEEK_SET)
        self._writeback = _Writeback(self.dst, self.start)
        self.written, self.error, self.verified = 0, None, False

    def finish(self, size: int) -> bool:
        """After a verified fetch: the held piece out; False when the output did not get the file."""
        self.close()
        if self.error is not None:
            raise self.error
        held = len(self.held) if self.held is not None else 0
        if not self.verified or self.written + held != size:
            return False
        if self.held is not None:
            _write_output(self.dst, self.held, self.stall)
            self.written += held
            self._drop_held()
        return True


class _Throttled:
    """Progress for a client at most ~2 times a second (each report is a line on its socket)."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self._last = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.progress is not None and now - self._last >= 0.5:
            self._last = now
            self.progress(done, self.total)


def _identity(cache: Cache, h: str) -> tuple[int, int] | None:
    try:
        st = os.stat(h, dir_fd=cache.subdir_fd(h), follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _send_verified(src: int, dst: int, size: int, expected: str, report: Callable[[int], None],
                   stall: float) -> tuple[str | None, bool]:
    """Send the object to dst, hashing it on the way: (the digest of what was read, whether any
    byte was written). The digest is None when the object is not `size` bytes long (then nothing
    is sent). The last chunk is held back and written only when the digest is `expected`."""
    if os.fstat(src).st_size != size:
        return None, False
    digest = hashlib.sha256()
    buf = bytearray(max(1, min(SEND_CHUNK, size)))
    view = memoryview(buf)
    done = 0
    last = view[:0]
    while done < size:
        n = os.preadv(src, [view[: min(len(buf), size - done)]], done)
        if n == 0:  # shrank while it was read
            return None, done > len(buf)
        digest.update(view[:n])
        done += n
        if done < size:
            _write_output(dst, view[:n], stall)
            report(done)
        else:
            last = view[:n]
    if digest.hexdigest() != expected:
        return digest.hexdigest(), size > len(buf)
    _write_output(dst, last, stall)
    report(done)
    return expected, True


def _write_output(dst: int, data: memoryview, stall: float) -> None:
    try:
        fsutil.write_all(dst, data, stall)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EPIPE:
            why += " (the reader went away)"
        raise OutputError(f"writing the output failed: {why}", exc.errno) from None


class Fetcher:
    def __init__(self, cache: Cache, catalog: Catalog, remotes: Mapping[str, Remote], evictor: Evictor,
                 now: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.catalog = catalog
        self.remotes = remotes
        self.evictor = evictor
        self.now = now
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Lock] = {}
        # cache objects with wrong bytes that are the only copy of their file: kept, never dropped
        self.damaged: dict[str, str] = {}
        self._counter = 0

    def ensure_cached(self, h: str, progress: ProgressFn | None = None, tee: _Tee | None = None) -> None:
        """Return once the object is in the cache (fetching it if needed); raise with the reason otherwise.
        A fetch also writes `tee`'s output as the bytes arrive (`tee.verified` once all are right)."""
        self._gated(h, lambda: self._ensure_cached(h, progress, tee))

    def replace(self, h: str, size: int, seen: tuple[int, int] | None, why: str = "holds other bytes",
                progress: ProgressFn | None = None) -> str:
        """The one path by which a bad cache object leaves the cache (get, an upload that hashed what it
        sent, verify and the scrub all come here): drop it and fetch the file again from a good copy.

        `seen` is the (st_dev, st_ino) of the object that was read (None: it was missing). Under the
        hash's gate, and only while the object is still the one that was read, so that two readers
        of one rotten object do not drop the good copy the first one fetched. The only copy of a
        file is never dropped: it is kept (a damaged file may be worth more than none), its uploads
        are given up, and a status problem names it. Returns "refetched" or "kept"; raises
        CloudManagerError when the fetch failed (the object is gone from the cache then).
        """
        outcome = "refetched"

        def drop_and_fetch() -> None:
            nonlocal outcome
            if _identity(self.cache, h) == seen:
                if seen is not None and not self.catalog.good_copies(h):
                    if h not in self.damaged:
                        log.error("cache object hash=%s %s, and no remote holds a good copy: kept as it is, not "
                                  "uploaded (restore the file and drop it in the inbox again, or "
                                  "cloudmanagerctl rm %s)", h, why, h[:12], extra=fields(h, message_id=FILE_AT_RISK))
                    self.damaged[h] = why
                    self.catalog.give_up_uploads(h, f"the only copy, in the cache, {why}", self.now())
                    outcome = "kept"
                    return
                log.error("cache object hash=%s %s; dropping it and fetching it again", h, why, extra=fields(h))
                if self.catalog.cached_here([h]):
                    self.evictor.drop([(h, size)])
                else:
                    self.cache.remove_object(h)  # no entry, no account: a stray object
                self.damaged.pop(h, None)
            self._ensure_cached(h, progress)
        self._gated(h, drop_and_fetch)
        return outcome

    def identity(self, h: str) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the object now in the cache, None when there is none: what `replace` needs."""
        return _identity(self.cache, h)

    def _gated(self, h: str, work: Callable[[], None]) -> None:
        with self._lock:
            gate = self._inflight.setdefault(h, threading.Lock())
        with gate:  # a second request for the same hash waits for the first, then finds it cached
            try:
                work()
            finally:
                with self._lock:
                    if self._inflight.get(h) is gate:
                        del self._inflight[h]

    def _ensure_cached(self, h: str, progress: ProgressFn | None, tee: _Tee | None = None) -> None:
        if self.catalog.cached_here([h]) and self.cache.has_object(h):
            self.catalog.touch(h, self.now())
            return
        self._fetch(h, progress, tee)

    def send(self, h: str, dst: int, progress: ProgressFn | None = None, stall: float = fsutil.STALL) -> int:
        """Write the file's bytes to a client's descriptor, verified against its hash on the way; the size.

        The object is hashed as it is read for sending (one read). The last chunk is held back
        until the hash matches, so a consumer never sees a complete-looking output of wrong
        bytes. A rotten object is dropped and fetched again (`replace`); into a regular file the
        output is then rewound and written again from the fresh copy, while into a pipe the bytes
        already written cannot be taken back: the request fails and a second `get` succeeds.
        Writes that make no progress for `stall` seconds fail the request.
        """
        size = self.catalog.file_size(h)
        if size is None:
            raise NotFound(f"no file with hash {h}")
        st_dst = os.fstat(dst)
        regular = stat.S_ISREG(st_dst.st_mode)
        # where our bytes begin: appended (`get >> FILE`) at the end, else at the offset
        appends = bool(fcntl.fcntl(dst, fcntl.F_GETFL) & os.O_APPEND)
        start = (st_dst.st_size if appends else os.lseek(dst, 0, os.SEEK_CUR)) if regular else 0
        # cut back on a mismatch only what we wrote: never bytes of the file beyond our start
        cut = regular and st_dst.st_size <= start
        reporter = _Throttled(progress, size)
        with fsutil.nonblocking(dst):
            for attempt in (1, 2):
                tee = _Tee(dst, start, stall) if attempt == 1 and cut else None
                try:
                    self.ensure_cached(h, progress, tee)  # also marks the file as recently used
                except BaseException:
                    if tee is not None:
                        tee.reset()  # no part of a failed fetch left in the output
                    raise
                if tee is not None:
                    if tee.finish(size):
                        reporter(size)
                        return size  # fetched now, and written to the output on the way
                    tee.reset()  # not fetched by us (already cached, or another request's fetch)
                try:
                    src = self.cache.open_object(h)
                except FileNotFoundError:  # evicted since: fetch it again
                    self.ensure_cached(h, progress)
                    src = self.cache.open_object(h)
                try:
                    st = os.fstat(src)
                    digest, wrote = _send_verified(src, dst, size, h, reporter, stall)
                finally:
                    os.close(src)
                if digest == h:
                    return size
                log.error("get: cache object hash=%s holds other bytes (%s); dropping it and fetching it again",
                          h, f"sha256 {digest[:12]}" if digest else f"{st.st_size} bytes instead of {size}",
                          extra=fields(h))
                if cut:  # never leave wrong bytes that look like a whole file
                    os.ftruncate(dst, start)
                if regular:
                    os.lseek(dst, start, os.SEEK_SET)
                try:
                    kept = self.replace(h, size, (st.st_dev, st.st_ino), "holds other bytes", progress) == "kept"
                except CloudManagerError as exc:
                    log.error("get: hash=%s could not be restored after corruption: %s", h, exc, extra=fields(h))
                    raise CloudManagerError(f"{h[:12]}: the cached copy was corrupt and was dropped; "
                                            f"fetching it again failed: {exc}") from None
                if kept:
                    raise CloudManagerError(f"{h[:12]}: the cached copy is corrupt and no remote has a good copy: "
                                            "the file's bytes are lost (the damaged object is kept, see the log)")
                if wrote and not regular:
                    raise CloudManagerError(
                        f"{h[:12]}: the cached copy was corrupt and the output got part of it; the copy was "
                        "replaced from a remote: run get again")
                log.info("get: hash=%s fetched again after corruption; sending the fresh copy (attempt %d)",
                         h, attempt + 1, extra=fields(h))
        raise CloudManagerError(f"{h[:12]}: the cache holds other bytes again after a fresh fetch (check the disk)")

    def _fetch(self, h: str, progress: ProgressFn | None, tee: _Tee | None = None) -> None:
        size = self.catalog.file_size(h)
        if size is None:
            raise NotFound(f"no file with hash {h}")
        copies = self.catalog.good_copies(h)
        if not copies:
            raise CloudManagerError(f"{h[:12]}: not in the cache and no good copy on any remote (the file is lost)")
        if not self.evictor.reserve(size):
            raise CacheFull(f"no room in the cache to fetch {h[:12]} ({size} bytes): the cache holds pinned files "
                            "and files still waiting for their copies; unpin some or raise cache.capacity")
        errors = []
        try:
            for name, url in copies:
                remote = self.remotes.get(name)
                if remote is None:
                    errors.append(f"{name}: not configured")
                    continue
                try:
                    self._fetch_from(h, size, remote, url, progress, tee)
                except RemoteError as exc:
                    errors.append(f"{name}: {exc}")
                    continue
                self.cache.commit(size)
                return
        except BaseException:
            self.cache.release(size)
            raise
        self.cache.release(size)
        raise CloudManagerError(f"{h[:12]}: could not fetch it from any remote ({'; '.join(errors)})")

    def _fetch_from(self, h: str, size: int, remote: Remote, url: str, progress: ProgressFn | None,
                    tee: _Tee | None = None) -> None:
        with self._lock:
            self._counter += 1
            tmp = f"{h}.fetch.{os.getpid()}.{self._counter}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640, dir_fd=self.cache.tmp_fd)
        sequential = getattr(remote, "sequential_get", False)
        if tee is not None:
            tee.reset()  # what an earlier remote's failed fetch wrote
        hasher = TrailingHasher(fd, tee, chunk=FETCH_PIECE) if sequential else None
        try:
            try:
                try:
                    remote.get(h, url, fd, ReportingTransfer(size, progress, hasher))
                    os.fsync(fd)  # while the hasher catches up: both wait on other things (disk, CPU)
                finally:
                    written = os.fstat(fd).st_size
                    digest = hasher.finish(written) if hasher is not None else None
                if digest is None:
                    os.lseek(fd, 0, os.SEEK_SET)
                    digest = sha256_fd(fd)
            except RemoteError as exc:
                if exc.kind == MISSING:
                    self.bad_copy(h, remote.name, f"copy of {h[:12]} is missing")
                raise
            if digest != h:
                self.bad_copy(h, remote.name, f"copy of {h[:12]} holds other bytes (sha256 {digest[:12]})")
                raise RemoteError(f"copy failed verification (sha256 {digest[:12]})")
            if written != size:
                # the bytes are right and the catalog is wrong (an imported entry's size): installing the
                # object would put more bytes in the cache than its account says, for good
                log.error("copy of %s has the right bytes but %d of them, and the catalog says %d; not used",
                          h[:12], written, size, extra=fields(h, remote.name))
                raise RemoteError(f"copy holds {written} bytes, the catalog says {size}")
            self.cache.install(tmp, h)
            tmp = ""
            if tee is not None:
                tee.verified = hasher is not None
        finally:
            os.close(fd)
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=self.cache.tmp_fd)
        self.catalog.add_cache_entry(h, size, self.now(), incoming=size)
        self.catalog.mark_copy_proven(h, remote.name, self.now())  # read back and hashed (an imported location too)
        log.info("fetched hash=%s remote=%s size=%d, verified", h, remote.name, size, extra=fields(h, remote.name))

    def bad_copy(self, h: str, remote: str, why: str) -> None:
        """The one path for a remote copy found missing or holding other bytes (a fetch, the scrub,
        verify): it stops counting, its remote is charged, and a replacement is queued."""
        log.error("remote %s: %s; marked bad, a new copy will be made", remote, why,
                  extra=fields(h, remote, message_id=COPY_BAD))
        now = self.now()
        self.catalog.mark_copy_bad(h, remote, why, now)
        if self.catalog.good_copies(h) or self.catalog.cached_here([h]):
            self.catalog.replace_bad_copy(h, remote, now)
        else:
            # no byte of the file is left to copy from (an imported location that was never true):
            # a replacement upload could only fail for ever; heal() queues one if a copy turns up
            log.error("hash=%s has no good copy left and is not cached here: the file is lost", h,
                      extra=fields(h, message_id=FILE_AT_RISK))
