"""A remote on any mounted filesystem (NAS, NFS, SMB): copies at <path>/<h[:2]>/<h>."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import time
import uuid
from collections.abc import Iterator, Sequence

from .. import fsutil
from ..config import RemoteConfig
from ..errors import explain_oserror
from .base import MISSING, OBJECT_NAME, REMOTE, TRANSIENT, RateLimit, RemoteError, Transfer, reserved_parts

# ".<hash>.<8 hex>.tmp": an upload in progress, or left by one that was killed
LEFTOVER = re.compile(r"\.[0-9a-f]{64}\.[0-9a-f]{8}\.tmp")

# errnos that no retry can fix until someone changes the remote itself
SYNCFS_BATCH = 16  # from this many copies on, one syncfs is cheaper than an fsync each (as ingest)
SMALL = 1 << 20  # an object up to this size is read into memory and written in one call

REMOTE_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                 errno.EDQUOT, errno.ELOOP}


class DirectoryRemote:
    kind = "directory"
    reports_progress = True
    sequential_get = True  # get() writes its destination front to back (fetch hashes behind it)

    def __init__(self, name: str, path: str, rate_limit: float = 0.0) -> None:
        self.name = name
        self.path = path
        self.limit = RateLimit(rate_limit)

    def _error(self, exc: OSError, what: str) -> RemoteError:
        kind = REMOTE if exc.errno in REMOTE_ERRNOS else TRANSIENT
        return RemoteError(explain_oserror(exc, f"{what} {self.path}"), kind)

    def _root(self) -> int:
        try:
            return fsutil.open_root(self.path)
        except OSError as exc:
            raise self._error(exc, "remote folder") from None

    def put(self, h: str, src_fd: int, size: int, transfer: Transfer | None = None) -> str:
        root = self._root()
        try:
            with fsutil.subdir(root, [h[:2].encode()], create=True) as folder:
                self._write(folder, h, src_fd, size, transfer)
        except OSError as exc:
            raise self._error(exc, "write to") from None
        finally:
            os.close(root)
        return self.object_url(h)

    def _write(self, folder: int, h: str, src_fd: int, size: int, transfer: Transfer | None) -> None:
        """Temp name, fsync, rename: a copy under its final name is always complete."""
        tmp, out = self._write_tmp(folder, h, src_fd, size, transfer)
        try:
            try:
                os.fsync(out)
            finally:
                os.close(out)
            os.rename(tmp, h, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
            raise
        os.fsync(folder)

    def _write_tmp(self, folder: int, h: str, src_fd: int, size: int, transfer: Transfer | None) -> tuple[str, int]:
        """The object's bytes under a temp name, its source confirmed; (temp name, open descriptor)."""
        # not uuid4 (a tenth of a batch's time went to it), nor os.urandom (a syscall a copy): `random`
        # is seeded from the kernel and again in a forked child, and O_EXCL refuses a name in use
        tmp = f".{h}.{random.getrandbits(32):08x}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=folder)
        try:
            if size <= SMALL and not self.limit:
                # one read and one write, and the check hashes the very bytes written: a copy in the
                # kernel cost two copy_file_range, a seek, and a read back for the check
                data = os.pread(src_fd, size + 1, 0)  # one byte more: a source that grew is seen
                written = len(data)
                if written == size:
                    fsutil.write_all(out, data)
                    if transfer is not None:
                        transfer.update(size)
            else:
                os.lseek(src_fd, 0, os.SEEK_SET)
                data = None
                written = fsutil.copy_fd(src_fd, out, self.limit.progress(transfer), chunk=self.limit.chunk)
            if written != size:
                raise RemoteError(f"remote {self.name}: read {written} bytes of {size}; the source changed")
            if transfer is not None:
                transfer.confirm_source(data)  # a copy of the wrong bytes never gets its final name
        except BaseException:
            os.close(out)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
            raise
        return tmp, out

    def put_many(self, items: Sequence[tuple[str, int, int, Transfer | None]]) -> list[str | RemoteError]:
        """Many objects made durable together: write each under a temp name, make all their bytes durable
        (one syncfs, or an fsync each for a few), rename them, make each folder durable once (syncfs
        again, or an fsync per folder). Only then is a URL returned: none before its copy is durable."""
        results: list[str | RemoteError | None] = [None] * len(items)
        root = self._root()
        folders: dict[str, int] = {}
        written: list[tuple[int, str, int, str, int]] = []  # (item, hash, folder, temp name, descriptor)
        try:
            for i, (h, src_fd, size, transfer) in enumerate(items):
                try:
                    if transfer is not None:
                        transfer.begin()
                    folder = folders.get(h[:2])
                    if folder is None:
                        folder = folders[h[:2]] = self._folder(root, h[:2])
                    tmp, out = self._write_tmp(folder, h, src_fd, size, transfer)
                except RemoteError as exc:
                    results[i] = exc
                    continue
                except OSError as exc:
                    results[i] = self._error(exc, "write to")
                    continue
                if len(written) + 1 >= SYNCFS_BATCH:  # one syncfs will do: no descriptor held for an fsync
                    os.close(out)
                    out = -1
                    if len(written) + 1 == SYNCFS_BATCH:  # once, not for every later copy
                        for *_, fd in written:
                            os.close(fd)
                        written = [(i, h, f, t, -1) for i, h, f, t, _ in written]
                written.append((i, h, folder, tmp, out))
            renamed = self._durable_renames(root, written, results)
            self._sync_folders(root, [folders[h[:2]] for h in renamed], renamed, items, results)
        finally:
            for *_, fd in written:
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            for fd in folders.values():
                os.close(fd)
            os.close(root)
        return [r if r is not None else RemoteError(f"remote {self.name}: not written") for r in results]

    @staticmethod
    def _folder(root: int, name: str) -> int:
        """The open folder <root>/<name>, made if missing (opened first: it nearly always exists, and
        a failing mkdir each time cost as much as the open)."""
        try:
            return os.open(name, fsutil.O_SUBDIR, dir_fd=root)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=root)
            return os.open(name, fsutil.O_SUBDIR, dir_fd=root)

    def _durable_renames(self, root: int, written: list[tuple[int, str, int, str, int]],
                         results: list[str | RemoteError | None]) -> dict[str, int]:
        """Make the temp files' bytes durable, then give them their final names; {hash: item} renamed."""
        try:
            if len(written) >= SYNCFS_BATCH:
                for fd in {os.fstat(folder).st_dev: folder for folder in {f for _, _, f, _, _ in written}}.values():
                    fsutil.syncfs(fd)
            else:
                for *_, fd in written:
                    os.fsync(fd)
        except OSError as exc:
            error = self._error(exc, "write to")
            for i, _, folder, tmp, _ in written:
                results[i] = error
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=folder)
            return {}
        renamed: dict[str, int] = {}
        for i, h, folder, tmp, _ in written:
            try:
                os.rename(tmp, h, src_dir_fd=folder, dst_dir_fd=folder)
            except OSError as exc:
                results[i] = self._error(exc, "write to")
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=folder)
                continue
            renamed[h] = i
        return renamed

    def _sync_folders(self, root: int, folders: list[int], renamed: dict[str, int],
                      items: Sequence[tuple[str, int, int, Transfer | None]],
                      results: list[str | RemoteError | None]) -> None:
        """Make the renames durable (each folder once); then, and only then, the copies have URLs."""
        try:
            if len(renamed) >= SYNCFS_BATCH:
                for fd in {os.fstat(fd).st_dev: fd for fd in set(folders)}.values():
                    fsutil.syncfs(fd)
            else:
                for fd in set(folders):  # one descriptor per folder (put_many opens each once)
                    os.fsync(fd)
        except OSError as exc:
            error = self._error(exc, "write to")
            for i in renamed.values():
                results[i] = error  # complete under its final name, but not known durable: not recorded
            return
        for h, i in renamed.items():
            results[i] = self.object_url(h)

    def get(self, h: str, url: str, dst_fd: int, transfer: Transfer | None = None) -> None:
        self._read([h[:2]], h, dst_fd, transfer, f"copy of {h}")

    def _read(self, folders: list[str], name: str, dst_fd: int, transfer: Transfer | None, what: str) -> None:
        root = self._root()
        try:
            with fsutil.subdir(root, [p.encode() for p in folders]) as folder:
                src = os.open(name, fsutil.O_READ_FILE, dir_fd=folder)
                try:
                    fsutil.copy_fd(src, dst_fd, self.limit.progress(transfer), chunk=self.limit.chunk)
                finally:
                    os.close(src)
        except FileNotFoundError:
            raise RemoteError(f"remote {self.name}: {what} is missing", MISSING) from None
        except OSError as exc:
            raise self._error(exc, "read from") from None
        finally:
            os.close(root)

    def exists(self, h: str, url: str) -> int | None:
        root = self._root()
        try:
            with fsutil.subdir(root, [h[:2].encode()]) as folder:
                return os.stat(h, dir_fd=folder, follow_symlinks=False).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc, "read from") from None
        finally:
            os.close(root)

    def delete(self, h: str, url: str) -> None:
        self._unlink([h[:2]], h)

    def _unlink(self, folders: list[str], name: str) -> None:
        root = self._root()
        try:
            with fsutil.subdir(root, [p.encode() for p in folders]) as folder:
                os.unlink(name, dir_fd=folder)
                os.fsync(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, "delete from") from None
        finally:
            os.close(root)

    def probe(self) -> None:
        root = self._root()
        try:
            name = f".probe.{uuid.uuid4().hex[:8]}"
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=root)
            os.close(fd)
            os.unlink(name, dir_fd=root)
        except OSError as exc:
            raise self._error(exc, "write to") from None
        finally:
            os.close(root)

    def clean_leftovers(self, now: float, min_age: float) -> int:
        """Remove temp files of uploads killed mid-copy (SIGKILL, power cut), once older than `min_age`
        seconds: a younger one may be another node's upload still running. Returns how many went."""
        removed = 0
        root = self._root()
        try:
            for entry in os.scandir(root):
                if len(entry.name) != 2 or not entry.is_dir(follow_symlinks=False):
                    continue
                with fsutil.subdir(root, [entry.name.encode()]) as folder, os.scandir(folder) as names:
                    for name in names:
                        if not LEFTOVER.fullmatch(name.name):
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            if now - name.stat(follow_symlinks=False).st_mtime >= min_age:
                                os.unlink(name.name, dir_fd=folder)
                                removed += 1
        except OSError as exc:
            raise self._error(exc, "clean up") from None
        finally:
            os.close(root)
        return removed

    # -- the reserved namespace: catalog snapshots, and the listing restore adopts from ------------

    def put_snapshot(self, rel: str, src_fd: int, size: int, transfer: Transfer | None = None) -> None:
        """Temp name, fsync, rename (as `put`): a killed upload leaves only a dot-temp file, never a
        partial snapshot under its name. Folders made on the way are made durable too."""
        *folders, name = reserved_parts(rel)
        root = self._root()
        try:
            fds = [root]
            try:
                for part in folders:
                    fds.append(fsutil.open_subdir(fds[-1], [part.encode()], create=True))
                self._write(fds[-1], name, src_fd, size, transfer)
                for fd in reversed(fds[:-1]):  # the new folders' entries in their parents
                    os.fsync(fd)
                self._clean_temp(fds[-1], name)
            finally:
                for fd in fds[1:]:
                    os.close(fd)
        except OSError as exc:
            raise self._error(exc, "write to") from None
        finally:
            os.close(root)

    @staticmethod
    def _clean_temp(folder: int, keep: str, min_age: float = 3600.0) -> None:
        """Temp files of snapshot uploads killed more than `min_age` ago (younger: one may be running)."""
        now = time.time()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(".tmp") and keep not in entry.name:
                    with contextlib.suppress(OSError):
                        if now - entry.stat(follow_symlinks=False).st_mtime >= min_age:
                            os.unlink(entry.name, dir_fd=folder)

    def list_snapshots(self, rel_dir: str) -> list[tuple[str, int]]:
        return [(e.name, e.stat(follow_symlinks=False).st_size) for e in self._entries(rel_dir)
                if e.is_file(follow_symlinks=False)]

    def list_snapshot_folders(self, rel_dir: str) -> list[str]:
        return [e.name for e in self._entries(rel_dir) if e.is_dir(follow_symlinks=False)]

    def _entries(self, rel_dir: str) -> list[os.DirEntry]:
        parts = reserved_parts(rel_dir)
        root = self._root()
        try:
            with fsutil.subdir(root, [p.encode() for p in parts]) as folder, os.scandir(folder) as entries:
                found = [e for e in entries if not e.name.startswith(".")]
                for e in found:
                    e.stat(follow_symlinks=False)  # cached in the entry while the folder is open
                return found
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._error(exc, "list") from None
        finally:
            os.close(root)

    def get_snapshot(self, rel: str, dst_fd: int, transfer: Transfer | None = None) -> None:
        *folders, name = reserved_parts(rel)
        self._read(folders, name, dst_fd, transfer, rel)

    def delete_snapshot(self, rel: str) -> None:
        *folders, name = reserved_parts(rel)
        self._unlink(folders, name)

    def list_objects(self) -> Iterator[tuple[str, int]]:
        """Every object under its final name (temp files and the reserved folder are not objects)."""
        root = self._root()
        try:
            with os.scandir(root) as top:
                folders = sorted(e.name for e in top if len(e.name) == 2 and e.is_dir(follow_symlinks=False))
            for prefix in folders:
                with fsutil.subdir(root, [prefix.encode()]) as folder, os.scandir(folder) as names:
                    found = [(n.name, n.stat(follow_symlinks=False).st_size) for n in names
                             if OBJECT_NAME.fullmatch(n.name) and n.name[:2] == prefix
                             and n.is_file(follow_symlinks=False)]
                yield from found
        except OSError as exc:
            raise self._error(exc, "list") from None
        finally:
            os.close(root)

    def object_url(self, h: str) -> str:
        return os.path.join(self.path, h[:2], h)

    def close(self) -> None:
        pass


def from_config(rc: RemoteConfig) -> DirectoryRemote:
    return DirectoryRemote(rc.name, str(rc.get("path")), float(rc.get("rate_limit", 0.0)))
