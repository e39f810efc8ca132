"""The cache: objects at <path>/<h[:2]>/<h>, temp files under <path>/tmp, and the byte budget."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

from . import fsutil
from .health import disk_reserve, fs_space

log = logging.getLogger(__name__)

TMP = b"tmp"


def _writer_alive(name: str, keep_own: bool) -> bool:
    """Whether the temp file `name` belongs to another live process (or to this one, with `keep_own`):
    its pid is the field after "api" (API uploads), after "fetch" (fetch-back), or before "tmp" (ingest)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ("api", "fetch") and i + 1 < len(parts):
            field = parts[i + 1]
            break
        if part == "tmp" and i > 0:
            field = parts[i - 1]
            break
    else:
        return False
    if not field.isdigit():
        return False
    return keep_own if int(field) == os.getpid() else fsutil.pid_alive(int(field))


class Cache:
    """Owns the cache folder's descriptors and the in-memory account of bytes used.

    `used` starts from the catalog and follows every object added or dropped;
    `reserve()` holds room for files in flight so that a batch never overshoots.

    The filesystem's free space is a second limit: with `cache.capacity` larger than the disk,
    a full disk would otherwise fail every copy into the cache while eviction, counting only
    against the capacity, never starts. `space(fd)` gives (free, total) bytes.
    """

    def __init__(self, path: str, capacity: int,
                 space: Callable[[int], tuple[int, int]] = fs_space) -> None:
        self.path = path
        self.capacity = capacity
        self.space = space
        # the disk, not the capacity, refused a reservation (and still limits the cache)
        self.hit_disk_limit = False
        self.root_fd = fsutil.open_root(path, create=True)
        self._subdirs: dict[str, int] = {}
        self._lock = threading.Lock()
        self.used = 0
        self.reserved = 0
        with contextlib.suppress(FileExistsError):
            os.mkdir(TMP, 0o700, dir_fd=self.root_fd)
        self.tmp_fd = os.open(TMP, fsutil.O_SUBDIR, dir_fd=self.root_fd)

    def close(self) -> None:
        for fd in self._subdirs.values():
            os.close(fd)
        self._subdirs.clear()
        os.close(self.tmp_fd)
        os.close(self.root_fd)

    def object_path(self, h: str) -> str:
        return os.path.join(self.path, h[:2], h)

    def subdir_fd(self, h: str) -> int:
        """The descriptor of the object's two-digit folder, created on first use and kept open."""
        key = h[:2]
        fd = self._subdirs.get(key)
        if fd is None:
            with self._lock:
                fd = self._subdirs.get(key)
                if fd is None:
                    fd = fsutil.open_subdir(self.root_fd, [key.encode()], create=True)
                    self._subdirs[key] = fd
        return fd

    def revalidate_root(self) -> None:
        """Recreate the cache folder or its tmp folder if they were deleted behind our back (st_nlink 0
        on the kept descriptor): else every temp file and object would go to a folder that is gone."""
        with self._lock:
            if os.fstat(self.root_fd).st_nlink > 0 and os.fstat(self.tmp_fd).st_nlink > 0:
                return
            for fd in self._subdirs.values():
                os.close(fd)
            self._subdirs.clear()
            os.close(self.tmp_fd)
            os.close(self.root_fd)
            self.root_fd = fsutil.open_root(self.path, create=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(TMP, 0o700, dir_fd=self.root_fd)
            self.tmp_fd = os.open(TMP, fsutil.O_SUBDIR, dir_fd=self.root_fd)
        log.warning("cache folder %s or its tmp folder was removed while in use; recreating it", self.path)

    def revalidate_subdir(self, h: str) -> None:
        """Reopen the object's folder if it was deleted behind our back (st_nlink 0 on the kept
        descriptor): else every object later written there would land in a folder nobody can see."""
        self.revalidate_root()
        key = h[:2]
        with self._lock:
            fd = self._subdirs.get(key)
            if fd is None or os.fstat(fd).st_nlink > 0:
                return
            del self._subdirs[key]
            os.close(fd)
        log.warning("cache folder %s was removed while in use; recreating it", os.path.join(self.path, key))

    def has_object(self, h: str) -> bool:
        try:
            os.stat(h, dir_fd=self.subdir_fd(h), follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def open_object(self, h: str) -> int:
        return os.open(h, fsutil.O_READ_FILE, dir_fd=self.subdir_fd(h))

    def install(self, tmp: str, h: str) -> None:
        """Move a complete, fsynced temp file (in the tmp folder) into place as object `h`, durably."""
        os.rename(tmp, h, src_dir_fd=self.tmp_fd, dst_dir_fd=self.subdir_fd(h))
        os.fsync(self.subdir_fd(h))

    def remove_object(self, h: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(h, dir_fd=self.subdir_fd(h))

    # -- the byte budget ----------------------------------------------------------------

    def set_capacity(self, capacity: int) -> None:
        with self._lock:
            self.capacity = capacity

    def set_used(self, used: int) -> None:
        with self._lock:
            self.used = used

    def disk_limit(self) -> int | None:
        """What the cache may hold by its filesystem: what it holds plus the free space, less a small
        reserve (None when the filesystem cannot tell)."""
        try:
            free, total = self.space(self.root_fd)
        except OSError:
            return None
        return self.used + free - disk_reserve(total)

    def limit(self) -> int:
        """The effective capacity: min(cache.capacity, the disk's limit)."""
        disk = self.disk_limit()
        return self.capacity if disk is None else min(self.capacity, disk)

    def free(self) -> int:
        limit = self.limit()
        with self._lock:
            return limit - self.used - self.reserved

    def reserve(self, size: int) -> bool:
        """Hold `size` bytes for a file on its way in; False when it does not fit."""
        disk = self.disk_limit()
        with self._lock:
            limit = self.capacity if disk is None else min(self.capacity, disk)
            if self.used + self.reserved + size > limit:
                if limit < self.capacity:
                    self.hit_disk_limit = True
                return False
            if disk is None or disk >= self.capacity:
                self.hit_disk_limit = False
            self.reserved += size
            return True

    def commit(self, size: int) -> None:
        """A reserved file is now an object."""
        with self._lock:
            self.reserved -= size
            self.used += size

    def release(self, size: int) -> None:
        """A reserved file did not come in after all."""
        with self._lock:
            self.reserved -= size

    def dropped(self, size: int) -> None:
        with self._lock:
            self.used -= size

    # -- start-up -------------------------------------------------------------------------

    def clear_tmp(self, keep_own: bool = False) -> int:
        """Temp files are half-written copies from a process that died: nothing refers to them.

        A temp file whose name carries the id of another live process (a daemon's or a Python API
        script's on the same cache folder) is that process's copy in flight, and stays. So do this
        process's own with `keep_own` (a CloudManager opened while another one of this process copies);
        a daemon's start-up clears them (its pid may be a dead predecessor's, as pid 1 in a container)."""
        removed = 0
        for entry in os.scandir(self.tmp_fd):
            if _writer_alive(entry.name, keep_own):
                continue
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(entry.name, dir_fd=self.tmp_fd)
                removed += 1
        return removed

    def object_folders(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root_fd)
                      if len(e.name) == 2 and e.is_dir(follow_symlinks=False))

    def objects_in(self, folder: str) -> list[str]:
        """Names of the regular files in one object folder (types read while the folder is open:
        a DirEntry of a closed descriptor cannot stat on filesystems without d_type)."""
        with fsutil.subdir(self.root_fd, [folder.encode()]) as fd, os.scandir(fd) as entries:
            return [e.name for e in entries if e.is_file(follow_symlinks=False)]
