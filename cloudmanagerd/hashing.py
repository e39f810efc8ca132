"""Streamed SHA-256 of a file descriptor: the one hash every stage (ingest, fetch, scrub) uses."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable

HASH_CHUNK = 1 << 20
_buffers = threading.local()


OVERLAP_MIN = 16 << 20  # from this size on, reading and hashing run on both cores at once


def sha256_fd(fd: int, tick: Callable[[], None] | None = None) -> str:
    """Streamed SHA-256 from the fd's current offset; `tick` is called per read, so that the
    health watchdog sees a long hash as progress.

    Small files are read into a reused 1 MiB buffer (allocating a fresh megabyte per file cost
    more than hashing a small file). Large ones are read by a second thread into rotating
    buffers while this one hashes: both calls release the GIL, so the file is hashed at
    nearly the speed of the hash alone instead of read time plus hash time.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    try:
        remaining = os.fstat(fd).st_size - os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        remaining = 0
    if remaining >= OVERLAP_MIN:
        return _sha256_overlapped(fd, tick)
    digest = hashlib.sha256()
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    while n := os.readv(fd, [buf]):
        digest.update(view[:n])
        if tick is not None:
            tick()
    return digest.hexdigest()


def _sha256_overlapped(fd: int, tick: Callable[[], None] | None) -> str:
    digest = hashlib.sha256()
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[bytearray, int] | OSError] = queue.SimpleQueue()
    for _ in range(3):
        free.put(bytearray(HASH_CHUNK))
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                buf = free.get()
                n = os.readv(fd, [buf])
                full.put((buf, n))
                if n == 0:
                    return
        except OSError as exc:
            full.put(exc)

    reader = threading.Thread(target=read, name="hash-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = full.get()
            if isinstance(item, OSError):
                raise item
            buf, n = item
            if n == 0:
                return digest.hexdigest()
            digest.update(memoryview(buf)[:n])
            free.put(buf)
            if tick is not None:
                tick()
    finally:
        stop.set()
        free.put(bytearray(0))  # unblocks a reader waiting for a buffer
        reader.join()


def copy_hashed(src_fd: int, dst_fd: int, tick: Callable[[], None] | None = None) -> tuple[int, str]:
    """Copy src to dst from their current offsets, hashing exactly the bytes written: (bytes, SHA-256).

    Slower than an in-kernel copy, but the caller learns what the copy holds, not what the
    source held when it was hashed before (a writer elsewhere may have changed it since).
    """
    digest = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    total = 0
    while n := os.readv(src_fd, [buf]):
        digest.update(view[:n])
        done = 0
        while done < n:
            done += os.write(dst_fd, view[done:n])
        total += n
        if tick is not None:
            tick()
    return total, digest.hexdigest()
