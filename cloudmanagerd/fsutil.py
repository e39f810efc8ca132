"""Filesystem primitives that never follow a symbolic link below a configured root.

Anyone who may drop files may also swap a folder for a symlink, so every path inside
the inbox is walked one component at a time from a directory file descriptor, with
O_NOFOLLOW. Configured roots (inbox, cache, rejected) are trusted and opened normally.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import select
import threading
from collections.abc import Iterator, Sequence

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
O_SUBDIR = O_DIR | os.O_NOFOLLOW
O_READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def open_root(path: str, create: bool = False, mode: int = 0o755, follow: bool = True) -> int:
    """Open a configured folder; with follow=False a symlink as its last component fails (ELOOP)."""
    if create:
        os.makedirs(path, mode=mode, exist_ok=True)
    return os.open(path, O_DIR if follow else O_SUBDIR)


class Root:
    """A configured folder's descriptor that can be swapped for a new one while other threads use it.

    Users never hold the number itself: `dup()` hands out a private copy under the lock, and
    `replace()` closes the old descriptor under the same lock, so no thread can dup or use a
    number that was closed (and perhaps reused by another open) meanwhile.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._lock = threading.Lock()

    def dup(self) -> int:
        with self._lock:
            return os.dup(self._fd)

    def fstat(self) -> os.stat_result:
        with self._lock:
            return os.fstat(self._fd)

    def replace(self, fd: int) -> None:
        with self._lock:
            old, self._fd = self._fd, fd
            os.close(old)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def dup_root(root: int | Root) -> int:
    return root.dup() if isinstance(root, Root) else os.dup(root)


def open_subdir(root_fd: int | Root, parts: Sequence[bytes], create: bool = False, mode: int = 0o755) -> int:
    """Open root/parts... without following a symlink in any component; the caller closes the fd."""
    fd = dup_root(root_fd)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
            child = os.open(part, O_SUBDIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def subdir(root_fd: int | Root, parts: Sequence[bytes], create: bool = False) -> Iterator[int]:
    fd = open_subdir(root_fd, parts, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding `fd`: one call instead of thousands of fsyncs in a batch."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of `fd` to disk now, without waiting for it: a later
    fsync then finds little left to do (a large file written, then fsynced, waits for all of it at the
    end). A hint only: a filesystem that refuses it changes nothing."""
    _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), SYNC_FILE_RANGE_WRITE)


STALL = 30.0  # seconds a write to someone else's descriptor may make no progress before it fails


def copy_fd(src_fd: int, dst_fd: int, progress=None, stall: float = STALL, chunk: int = 1 << 24) -> int:
    """Copy src to dst from their current offsets, in the kernel when it can; returns bytes copied.

    A non-blocking dst that stays full for `stall` seconds fails with StalledWrite; a dst the
    kernel cannot splice into (a character device such as /dev/full) gets plain writes, so
    that its own error (ENOSPC) is the one reported, not EINVAL. A rate-limited copy passes a
    smaller `chunk`, so that its bytes flow evenly rather than 16 MiB at once and then a pause.
    """
    total = 0
    how = "range"
    while True:
        try:
            if how == "range":
                n = os.copy_file_range(src_fd, dst_fd, chunk)
            elif how == "sendfile":
                n = os.sendfile(dst_fd, src_fd, None, chunk)
            else:
                data = os.read(src_fd, min(chunk, 1 << 20))
                write_all(dst_fd, data, stall)
                n = len(data)
        except BlockingIOError:
            wait_writable(dst_fd, stall)
            continue
        except OSError as exc:
            if how == "range" and exc.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                how = "sendfile"
                continue
            if how == "sendfile" and total == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                how = "write"
                continue
            raise
        if n == 0:
            return total
        total += n
        if progress is not None:
            progress(total)


class StalledWrite(OSError):
    """A descriptor someone else reads from took no byte for the allowed time."""


def wait_writable(fd: int, stall: float) -> None:
    """Wait until `fd` takes bytes again; StalledWrite after `stall` seconds without."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(stall * 1000):
        raise StalledWrite(errno.ETIMEDOUT, f"nothing was read from it for {stall:.0f}s")


def write_all(fd: int, data: bytes | bytearray | memoryview, stall: float = STALL) -> None:
    """Write every byte to `fd`, which may be non-blocking: a reader that takes nothing for `stall`
    seconds fails the write (StalledWrite) instead of holding the writer for ever."""
    view = memoryview(data).cast("B")
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            n = 0
        if n:
            view = view[n:]
        else:
            wait_writable(fd, stall)


@contextlib.contextmanager
def nonblocking(fd: int) -> Iterator[None]:
    """`fd` non-blocking for a while, as it was after: a client's descriptor shares its flags with
    the client's own (a shell's stdout), so they are put back."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        yield
    finally:
        if not flags & os.O_NONBLOCK:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def writable_fd(fd: int, what: str) -> None:
    """Refuse a descriptor that was not opened for writing, before any work is done for it."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
        raise OSError(errno.EBADF, f"{what}: the descriptor passed is not open for writing")


def split_rel(rel: bytes) -> list[bytes]:
    return [p for p in rel.split(b"/") if p and p != b"."]


F_SETLEASE = 1024  # fcntl.h; Python's fcntl module does not export the lease commands
F_RDLCK, F_UNLCK = 0, 2


def open_for_writing_elsewhere(fd: int) -> bool | None:
    """Whether anyone holds the file open for writing: True, False, or None when we may not ask.

    A read lease is refused with EAGAIN while any writer exists; it needs the file's owner or
    CAP_LEASE (otherwise EACCES: unknown). The lease is dropped at once. The daemon ignores
    SIGIO, the signal a lease break would send.
    """
    try:
        fcntl.fcntl(fd, F_SETLEASE, F_RDLCK)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True
        return None
    fcntl.fcntl(fd, F_SETLEASE, F_UNLCK)
    return False


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's included) in this PID namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: another user's live process
    return True
