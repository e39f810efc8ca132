"""Fetch back: bring an evicted file from a remote into the cache, verified by its SHA-256.

Remotes are tried in order of past success. A copy that is missing or holds other bytes
is marked bad (so the redundancy count drops and the upload loop makes a new copy) and
charged to its remote; the next remote is tried. Two requests for one hash fetch it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

from .cache import Cache
from .catalog import Catalog
from .errors import CacheFull, CloudManagerError, NotFound
from .eviction import Evictor
from .hashing import HASH_CHUNK, sha256_fd
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
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.digest = hashlib.sha256()
        self.offset = 0
        self.written = 0
        self.final: int | None = None
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-hash", daemon=True)
        self._thread.start()

    def advance(self, written: int) -> None:
        self.written = written
        self._wake.set()

    def _run(self) -> None:
        while True:
            target = self.final if self.final is not None else self.written
            if self.offset < target:
                data = os.pread(self.fd, min(HASH_CHUNK, target - self.offset), self.offset)
                if not data:
                    return
                self.digest.update(data)
                self.offset += len(data)
            elif self.final is not None:
                return
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def finish(self, size: int) -> str | None:
        """The hex digest of the first `size` bytes, or None if the file fell short."""
        self.final = size
        self._wake.set()
        self._thread.join()
        return self.digest.hexdigest() if self.offset == size else None


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
        self._counter = 0

    def ensure_cached(self, h: str, progress: ProgressFn | None = None) -> None:
        """Return once the object is in the cache (fetching it if needed); raise with the reason otherwise."""
        with self._lock:
            gate = self._inflight.setdefault(h, threading.Lock())
        with gate:  # a second request for the same hash waits for the first, then finds it cached
            try:
                if self.catalog.cached_here([h]) and self.cache.has_object(h):
                    self.catalog.touch(h, self.now())
                    return
                self._fetch(h, progress)
            finally:
                with self._lock:
                    if self._inflight.get(h) is gate:
                        del self._inflight[h]

    def _fetch(self, h: str, progress: ProgressFn | None) -> None:
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
                    self._fetch_from(h, size, remote, url, progress)
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

    def _fetch_from(self, h: str, size: int, remote: Remote, url: str, progress: ProgressFn | None) -> None:
        with self._lock:
            self._counter += 1
            tmp = f"{h}.fetch.{os.getpid()}.{self._counter}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640, dir_fd=self.cache.tmp_fd)
        hasher = TrailingHasher(fd) if getattr(remote, "sequential_get", False) else None
        try:
            try:
                try:
                    remote.get(h, url, fd, ReportingTransfer(size, progress, hasher))
                finally:
                    written = os.fstat(fd).st_size
                    digest = hasher.finish(written) if hasher is not None else None
                os.fsync(fd)
                if digest is None:
                    os.lseek(fd, 0, os.SEEK_SET)
                    digest = sha256_fd(fd)
            except RemoteError as exc:
                if exc.kind == MISSING:
                    self._bad_copy(h, remote.name, f"copy of {h[:12]} is missing")
                raise
            if digest != h:
                self._bad_copy(h, remote.name, f"copy of {h[:12]} holds other bytes (sha256 {digest[:12]})")
                raise RemoteError(f"copy failed verification (sha256 {digest[:12]})")
            if written != size:
                # the bytes are right and the catalog is wrong (an imported entry's size): installing the
                # object would put more bytes in the cache than its account says, for good
                log.error("copy of %s has the right bytes but %d of them, and the catalog says %d; not used",
                          h[:12], written, size)
                raise RemoteError(f"copy holds {written} bytes, the catalog says {size}")
            os.rename(tmp, h, src_dir_fd=self.cache.tmp_fd, dst_dir_fd=self.cache.subdir_fd(h))
            tmp = ""
            os.fsync(self.cache.subdir_fd(h))
        finally:
            os.close(fd)
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=self.cache.tmp_fd)
        self.catalog.add_cache_entry(h, size, self.now(), incoming=size)
        self.catalog.mark_copy_verified(h, remote.name, self.now())  # an imported location, proven now
        log.info("fetched hash=%s remote=%s size=%d, verified", h, remote.name, size)

    def _bad_copy(self, h: str, remote: str, why: str) -> None:
        log.error("remote %s: %s; marked bad, a new copy will be made", remote, why)
        now = self.now()
        self.catalog.mark_copy_bad(h, remote, why, now)
        if self.catalog.good_copies(h) or self.catalog.cached_here([h]):
            self.catalog.replace_bad_copy(h, remote, now)
        else:
            # no byte of the file is left to copy from (an imported location that was never true):
            # a replacement upload could only fail for ever; heal() queues one if a copy turns up
            log.error("hash=%s has no good copy left and is not cached here: the file is lost", h)
