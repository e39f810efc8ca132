"""Ingest: take finished files out of the inbox into the catalog and the cache, crash-safely.

The durable order, for a batch of files:
  1. hash each file (streamed SHA-256) and re-stat it: a file that changed is put back;
  2. commit an "ingesting" row per file (hash, name, size): durable before anything moves;
  3. rename each file into <cache>/<h[:2]>/<h> (copy + fsync + unlink across mounts);
  4. make the objects and both folders durable (fsync, or one syncfs for a large batch);
  5. commit the files as registered and cached, with their upload pairs.
A crash or power cut between any two steps leaves an "ingesting" row that `reconcile()`
finishes or undoes at start-up, so nothing is lost and nothing half-done remains.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import resource
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import fsutil
from .cache import Cache
from .catalog import DB_ERRORS, Catalog, IngestRecord
from .errors import CACHE_HINTS, explain_oserror
from .hashing import copy_hashed, sha256_fd
from .logs import FILE_AT_RISK, fields
from .names import show
from .rejects import Rejector

log = logging.getLogger(__name__)

SYNCFS_BATCH = 16  # from this many files on, one syncfs is cheaper than an fsync per file
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def batch_limit(most: int = 512) -> int:
    """Files per batch under the open-file limit: each holds two descriptors until its batch is
    done. Under systemd's default soft limit of 1024 (which the unit may not raise) a batch of
    512, beside the cache's up to 256 folders, failed with EMFILE, and again on every retry."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return most
    return max(8, min(most, (soft - 512) // 4))


@dataclass
class Candidate:
    rel: bytes
    dir_fd: int
    name: bytes
    fd: int
    st: os.stat_result
    hash: str = ""
    moved: bool = False
    copied: bool = False

    @property
    def record(self) -> IngestRecord:
        return IngestRecord(self.hash, self.rel, self.st.st_size)

    def close(self) -> None:
        """Idempotent: a descriptor closed twice could close another thread's newer one."""
        fd, dir_fd, self.fd, self.dir_fd = self.fd, self.dir_fd, -1, -1
        for n in (fd, dir_fd):
            if n >= 0:
                with contextlib.suppress(OSError):
                    os.close(n)


def signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """Without ctime, which our own rename into the cache changes."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class IngestResult:
    registered: list[str] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)  # each registered file's inbox ctime (ingest latency)
    duplicates: int = 0
    requeue: list[bytes] = field(default_factory=list)      # changed while hashed: take again later
    busy: list[bytes] = field(default_factory=list)         # still open for writing: take much later
    later: list[bytes] = field(default_factory=list)        # not opened (out of descriptors): next batch
    waiting: list[tuple[bytes, str]] = field(default_factory=list)  # left in the inbox, with why
    directories: list[bytes] = field(default_factory=list)  # folders to scan


class Ingestor:
    """Turns inbox entries (relative byte paths) into registered, cached files."""

    SPARE_FILES = 16  # handed back when descriptors run out, to free 32 for the rest of the batch

    def __init__(self, inbox_fd: int | fsutil.Root, cache: Cache, catalog: Catalog, rejector: Rejector,
                 remotes: Callable[[], Sequence[str]], ignore: Sequence[str],
                 now: Callable[[], float] = time.time, reserve: Callable[[int], bool] | None = None) -> None:
        # a Root when the daemon may reopen a recreated inbox; only ever used through dups
        self.inbox_fd = inbox_fd
        self.cache = cache
        self.catalog = catalog
        self.rejector = rejector
        self.remotes = remotes
        self.ignore = tuple(ignore)
        self.now = now
        # room for a file coming in; the daemon passes the Evictor's, which makes room by eviction
        self.reserve = reserve or cache.reserve
        self.tick: Callable[[], None] = lambda: None
        self._stuck_logged: set[bytes] = set()  # files that cannot be moved out, said once each

    def set_ignore(self, patterns: Sequence[str]) -> None:
        """A reload: names matching these glob patterns are left alone from now on."""
        self.ignore = tuple(patterns)

    def ignored(self, rel: bytes) -> bool:
        return any(fnmatch.fnmatchcase(os.fsdecode(part), pattern)
                   for part in fsutil.split_rel(rel) for pattern in self.ignore)

    # -- one batch --------------------------------------------------------------------------

    def ingest(self, rels: Sequence[bytes]) -> IngestResult:
        result = IngestResult()
        opened: list[Candidate] = []  # every candidate opened, closed on every path below
        try:
            todo = list(dict.fromkeys(rels))
            for i, rel in enumerate(todo):
                try:
                    candidate = self._open(rel, result)
                except OSError as exc:
                    if exc.errno not in OUT_OF_DESCRIPTORS or len(opened) <= self.SPARE_FILES:
                        raise  # the worker logs it and tries again in a while
                    # This batch goes on with the files it holds, but for a few handed back with
                    # the others, so that it has descriptors left to store them (the catalog,
                    # the cache's folders, fsync); they all come in the next batch.
                    spare = opened[-self.SPARE_FILES:]
                    del opened[-self.SPARE_FILES:]
                    for c in spare:
                        c.close()
                    result.later.extend([c.rel for c in spare] + todo[i:])
                    log.warning("out of file descriptors with %d file(s) open; the other %d wait for the "
                                "next batch", len(opened), len(result.later))
                    break
                if candidate is not None:
                    opened.append(candidate)
            self._hash_all(opened, result)
            for c in opened:
                if not c.hash:  # put back: its descriptors go now, not with the batch
                    c.close()
            self._store([c for c in opened if c.hash], result)
        finally:
            for c in opened:
                c.close()
        return result

    def _open(self, rel: bytes, result: IngestResult) -> Candidate | None:
        parts = fsutil.split_rel(rel)
        if not parts or self.ignored(rel):
            return None
        dir_fd = fsutil.dup_root(self.inbox_fd)
        try:
            for i, part in enumerate(parts[:-1]):
                try:
                    child = os.open(part, fsutil.O_SUBDIR, dir_fd=dir_fd)
                except FileNotFoundError:
                    os.close(dir_fd)
                    return None
                except OSError as exc:
                    if exc.errno in OUT_OF_DESCRIPTORS:
                        raise
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        self._reject_component(dir_fd, part, b"/".join(parts[:i + 1]))
                    else:
                        log.warning("cannot open folder %s in the inbox: %s", show(b"/".join(parts[:i + 1])),
                                    explain_oserror(exc, "open").split(": ", 1)[1])
                    os.close(dir_fd)
                    return None
                os.close(dir_fd)
                dir_fd = child
            return self._open_file(dir_fd, parts[-1], b"/".join(parts), result)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(dir_fd)
            raise

    def _reject_component(self, dir_fd: int, name: bytes, rel: bytes) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            self.rejector.reject(dir_fd, name, rel, "a symbolic link in place of a folder (never followed)")

    def _open_file(self, dir_fd: int, name: bytes, rel: bytes, result: IngestResult) -> Candidate | None:
        """Open one entry for hashing, or deal with it (reject, scan, skip) and return None."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.close(dir_fd)
            return None
        reason = kind_reason(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            os.close(dir_fd)
            result.directories.append(rel)
            return None
        if reason:
            self.rejector.reject(dir_fd, name, rel, reason)
            os.close(dir_fd)
            return None
        try:
            fd = os.open(name, fsutil.O_READ_FILE, dir_fd=dir_fd)
        except FileNotFoundError:
            os.close(dir_fd)
            return None
        except OSError as exc:
            if exc.errno in OUT_OF_DESCRIPTORS:
                raise  # _open closes dir_fd
            if exc.errno in (errno.EACCES, errno.EPERM):
                self.rejector.reject(dir_fd, name, rel, "unreadable (permission denied for the daemon's user)")
            elif exc.errno == errno.ELOOP:
                self.rejector.reject(dir_fd, name, rel, "a symbolic link (never followed)")
            else:
                log.warning("cannot open %s: %s", show(rel), explain_oserror(exc, "open").split(": ", 1)[1])
            os.close(dir_fd)
            return None
        fst = os.fstat(fd)
        reason = kind_reason(fst.st_mode)
        if reason or stat.S_ISDIR(fst.st_mode):
            # swapped between the stat and the open
            os.close(fd)
            os.close(dir_fd)
            result.requeue.append(rel)
            return None
        if fst.st_size > self.cache.capacity:
            os.close(fd)
            os.close(dir_fd)
            result.waiting.append((rel, "too-large"))
            return None
        if fsutil.open_for_writing_elsewhere(fd):
            # asked before hashing too: a file in the middle of a long write is not read in full
            os.close(fd)
            os.close(dir_fd)
            result.busy.append(rel)
            return None
        return Candidate(rel, dir_fd, name, fd, fst)

    def _hash_all(self, candidates: list[Candidate], result: IngestResult) -> None:
        for c in candidates:
            try:
                h = sha256_fd(c.fd, self.tick)
                after = os.fstat(c.fd)
            except OSError as exc:
                log.warning("cannot read %s: %s", show(c.rel), explain_oserror(exc, "read").split(": ", 1)[1])
                result.requeue.append(c.rel)
                continue
            if signature(after) != signature(c.st):
                log.info("%s changed while it was hashed; taking it again later", show(c.rel))
                result.requeue.append(c.rel)
                continue
            if fsutil.open_for_writing_elsewhere(c.fd):
                # someone else closed it, but a writer still holds it open: its next write
                # would land in the cache object, so it waits until every writer is done
                # (the worker logs this once and backs off)
                result.busy.append(c.rel)
                continue
            c.hash = h

    def _store(self, candidates: list[Candidate], result: IngestResult) -> None:
        if not candidates:
            return
        cached = self.catalog.cached_here({c.hash for c in candidates})
        fresh: dict[str, Candidate] = {}
        duplicates: list[Candidate] = []
        for c in candidates:
            if c.hash in cached or c.hash in fresh:
                duplicates.append(c)
            else:
                fresh[c.hash] = c
        # Room for the whole batch in one reservation (each one reads the catalog's account and the
        # disk's free space: per file, that was 5 % of a batch); file by file only when it falls short.
        if fresh and not self.reserve(sum(c.st.st_size for c in fresh.values())):
            fitting: dict[str, Candidate] = {}
            for h, c in fresh.items():
                if self.reserve(c.st.st_size):
                    fitting[h] = c
                else:
                    result.waiting.append((c.rel, "cache-full"))
            fresh = fitting
        todo = list(fresh.values())
        if todo:
            self.catalog.begin_ingest([c.record for c in todo], self.now())
            try:
                self._move_all(todo, result)
                self._make_durable(todo)
                self._check_unchanged(todo, result)
            except BaseException:
                self._undo(todo)
                with contextlib.suppress(Exception):
                    self.catalog.abandon_ingest([c.record for c in todo])
                raise
            done = [c for c in todo if c.moved]
            for c in todo:
                if not c.moved:
                    self.cache.release(c.st.st_size)
            if done:
                self.catalog.finish_ingest([c.record for c in done], self.remotes(), self.now())
                for c in done:
                    self.cache.commit(c.st.st_size)
                    if c.copied:
                        self._unlink_source(c)
                    log.info("registered %s hash=%s size=%d", show(c.rel), c.hash, c.st.st_size, extra=fields(c.hash))
                result.registered.extend(c.hash for c in done)
                result.dropped.extend(c.st.st_ctime for c in done)
            unmoved = [c.record for c in todo if not c.moved]
            if unmoved:  # an empty write transaction still waits for the write lock
                self.catalog.abandon_ingest(unmoved)
        for c in duplicates:
            if self._still_same(c):
                try:
                    os.unlink(c.name, dir_fd=c.dir_fd)
                except FileNotFoundError:
                    pass
                except PermissionError:
                    if c.rel not in self._stuck_logged:
                        self._stuck_logged.add(c.rel)
                        log.error("%s is already stored as %s but cannot be removed from the inbox: %s",
                                  show(c.rel), c.hash, self._why_stuck(c) or "permission denied", extra=fields(c.hash))
                    result.waiting.append((c.rel, "stuck"))
                    continue
                log.info("%s is already stored as %s; removed from the inbox", show(c.rel), c.hash,
                         extra=fields(c.hash))
                result.duplicates += 1

    def _move_all(self, todo: list[Candidate], result: IngestResult) -> None:
        for c in todo:
            if not self._still_same(c):
                continue
            target_fd = self.cache.subdir_fd(c.hash)
            if os.fstat(c.fd).st_nlink > 1:
                # Another name (a hard link, perhaps outside the inbox) shares this inode: renamed,
                # the cache object would change whenever that name is written. Copied instead.
                self._copy_in(c, target_fd, result)
                continue
            try:
                os.rename(c.name, c.hash, src_dir_fd=c.dir_fd, dst_dir_fd=target_fd)
                c.moved = True
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EACCES, errno.EPERM):
                    raise
                why = self._why_stuck(c)
                if why:
                    # Only this file waits (until the next rescan); failing the whole batch would
                    # retry it every 2 s forever and hold up every file batched with it.
                    if c.rel not in self._stuck_logged:
                        self._stuck_logged.add(c.rel)
                        log.error("cannot move %s out of the inbox: %s; it stays there", show(c.rel), why)
                    result.waiting.append((c.rel, "stuck"))
                elif exc.errno == errno.EXDEV:
                    self._copy_in(c, target_fd, result)
                else:
                    raise

    def _why_stuck(self, c: Candidate) -> str | None:
        """Why the daemon's user may not take this entry out of its inbox folder, if it may not."""
        if not os.access(".", os.W_OK | os.X_OK, dir_fd=c.dir_fd, effective_ids=True):
            return "its folder is not writable by the daemon's user (make it group-writable: chmod g+w)"
        st = os.fstat(c.dir_fd)
        if st.st_mode & stat.S_ISVTX and c.st.st_uid != os.geteuid() and st.st_uid != os.geteuid():
            return "its folder is sticky and the file is another user's (chmod -t the folder)"
        return None

    def _copy_in(self, c: Candidate, target_fd: int, result: IngestResult) -> None:
        """Copy to a temp name, fsync, rename in; the inbox entry goes after the commit.

        Across mounts, or for a file with other names. The bytes written are hashed as they are
        copied: a copy that does not match the hash taken before (the file changed through
        another name meanwhile) is dropped and the file taken again later.
        """
        tmp = f"{c.hash}.{os.getpid()}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640, dir_fd=self.cache.tmp_fd)
        try:
            os.lseek(c.fd, 0, os.SEEK_SET)
            size, copied = copy_hashed(c.fd, out, self.tick)
            if copied != c.hash or size != c.st.st_size:
                os.close(out)
                os.unlink(tmp, dir_fd=self.cache.tmp_fd)
                log.info("%s changed while it was copied into the cache; taking it again later", show(c.rel))
                result.requeue.append(c.rel)
                return
            os.fsync(out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(out)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.cache.tmp_fd)
            raise
        os.close(out)
        os.rename(tmp, c.hash, src_dir_fd=self.cache.tmp_fd, dst_dir_fd=target_fd)
        c.moved = c.copied = True

    def _make_durable(self, todo: list[Candidate]) -> None:
        moved = [c for c in todo if c.moved]
        if not moved:
            return
        if len(moved) >= SYNCFS_BATCH:
            fsutil.syncfs(self.cache.root_fd)
            if any(c.copied for c in moved):
                return
            # the inbox folders' filesystems, through descriptors the batch already holds
            for fd in {os.fstat(c.dir_fd).st_dev: c.dir_fd for c in moved}.values():
                fsutil.syncfs(fd)
            return
        folders: dict[tuple[int, int], int] = {}
        for c in moved:
            if not c.copied:
                os.fsync(c.fd)
            for fd in (c.dir_fd, self.cache.subdir_fd(c.hash)):
                st = os.fstat(fd)
                folders.setdefault((st.st_dev, st.st_ino), fd)
        for fd in folders.values():
            os.fsync(fd)

    def _check_unchanged(self, todo: list[Candidate], result: IngestResult) -> None:
        """A writer that still held the file open may have written after the hash, or a hard link
        may have been made to it before the rename: either way, put it back (it is then taken
        again, by a copy if it still has other names)."""
        for c in todo:
            if not c.moved or c.copied:
                continue
            now = os.fstat(c.fd)
            if content_signature(now) != content_signature(c.st):
                log.warning("%s changed after it was hashed; putting it back in the inbox", show(c.rel))
            elif now.st_nlink > 1:
                log.warning("%s got another name (a hard link) while it was taken in; putting it back "
                            "in the inbox to be copied", show(c.rel))
            else:
                continue
            self._move_back(c)
            result.requeue.append(c.rel)

    def _move_back(self, c: Candidate) -> None:
        target_fd = self.cache.subdir_fd(c.hash)
        try:
            os.rename(c.hash, c.name, src_dir_fd=target_fd, dst_dir_fd=c.dir_fd)
        except OSError:
            self.rejector.reject(target_fd, c.hash.encode(), c.rel, "changed while it was being taken in")
        c.moved = False

    def _undo(self, todo: list[Candidate]) -> None:
        for c in todo:
            if c.moved and not c.copied:
                with contextlib.suppress(OSError):
                    self._move_back(c)
            elif c.copied:
                self.cache.remove_object(c.hash)
            self.cache.release(c.st.st_size)
            c.moved = False

    def _still_same(self, c: Candidate) -> bool:
        """The name still points at the inode that was hashed (not swapped since)."""
        try:
            st = os.stat(c.name, dir_fd=c.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (c.st.st_dev, c.st.st_ino)

    def _unlink_source(self, c: Candidate) -> None:
        if self._still_same(c):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(c.name, dir_fd=c.dir_fd)

    # -- start-up -----------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Finish or undo what a crash left half-done: temp files and "ingesting" rows."""
        removed = self.cache.clear_tmp()
        if removed:
            log.info("removed %d temp file(s) left in the cache by an interrupted copy", removed)
        self.finish_interrupted()

    def finish_interrupted(self) -> None:
        """Register the files of this node's "ingesting" rows whose objects are whole in the cache;
        forget the others (their files are still in the inbox, or were never moved)."""
        for record in self.catalog.pending_ingests():
            self._reconcile_one(record)

    def _reconcile_one(self, r: IngestRecord) -> None:
        in_inbox = self._inbox_has(r.name)
        if self.cache.has_object(r.hash) and r.hash not in self.catalog.cached_here([r.hash]):
            fd = self.cache.open_object(r.hash)
            try:
                good = sha256_fd(fd) == r.hash
                if good:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if good:
                os.fsync(self.cache.subdir_fd(r.hash))
                self.catalog.finish_ingest([r], self.remotes(), self.now())
                log.info("finished the interrupted ingest of %s hash=%s", show(r.name), r.hash, extra=fields(r.hash))
                if in_inbox:
                    self._remove_inbox_copy(r)
                return
            log.warning("dropping a torn cache object for %s hash=%s", show(r.name), r.hash, extra=fields(r.hash))
            self.cache.remove_object(r.hash)
        self.catalog.abandon_ingest([r])
        if not in_inbox and r.hash not in self.catalog.cached_here([r.hash]):
            log.error("the interrupted ingest of %s hash=%s left no copy anywhere", show(r.name), r.hash,
                      extra=fields(r.hash, message_id=FILE_AT_RISK))

    def adopt_orphans(self) -> int:
        """Cache objects without a catalog row. The durable order never leaves one, but a restored
        backup of the catalog or an object copied in by hand can: one whose bytes match its name
        is registered (as `recovered/<hash>`: its original name is unknown) and uploaded; any
        other is moved to the rejected folder. Runs in the ingest thread, before any ingest."""
        adopted = 0
        for folder in self.cache.object_folders():
            known = self.catalog.cached_hashes_with_prefix(folder)
            for name in self.cache.objects_in(folder):
                if name not in known:
                    adopted += self._adopt(folder, name)
        if adopted:
            log.warning("registered %d cache object(s) the catalog did not know", adopted)
        return adopted

    def _adopt(self, folder: str, name: str) -> int:
        fd = os.open(name, fsutil.O_READ_FILE, dir_fd=self.cache.subdir_fd(folder))
        try:
            size = os.fstat(fd).st_size
            good = len(name) == 64 and name.startswith(folder) and sha256_fd(fd, self.tick) == name
        finally:
            os.close(fd)
        if self.catalog.cached_here([name]):
            return 0  # fetched meanwhile
        if good and self.cache.reserve(size):
            self.catalog.finish_ingest([IngestRecord(name, b"recovered/" + name.encode(), size)], self.remotes(),
                                       self.now())
            self.cache.commit(size)
            return 1
        self.rejector.reject(self.cache.subdir_fd(folder), name.encode(), b"cache/" + name.encode(),
                             "a cache object without a catalog row whose bytes do not match its name"
                             if not good else "a cache object without a catalog row, and no room for it")
        return 0

    def _inbox_has(self, rel: bytes) -> bool:
        parts = fsutil.split_rel(rel)
        try:
            with fsutil.subdir(self.inbox_fd, parts[:-1]) as fd:
                os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def _remove_inbox_copy(self, r: IngestRecord) -> None:
        """The inbox entry of a cross-mount copy that was interrupted after its object was complete."""
        parts = fsutil.split_rel(r.name)
        try:
            with fsutil.subdir(self.inbox_fd, parts[:-1]) as fd:
                file_fd = os.open(parts[-1], fsutil.O_READ_FILE, dir_fd=fd)
                try:
                    same = sha256_fd(file_fd) == r.hash
                finally:
                    os.close(file_fd)
                if same:
                    os.unlink(parts[-1], dir_fd=fd)
        except OSError:
            pass


def kind_reason(mode: int) -> str | None:
    """Why an entry of this type can never be ingested (None for files and folders)."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link (never followed)"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node, not a file"
    return "not a regular file"


class IngestWorker:
    """The ingest thread: takes ready entries in batches and feeds them to the Ingestor.

    Files that do not fit wait in the inbox untouched (back-pressure); they are offered
    again by `offer_waiting()` whenever room may have appeared. `last_progress` tells the
    health watchdog that this thread is alive, busy or idle by choice.
    """

    BATCH = 512
    BUSY_MAX_WAIT = 60.0  # a file a writer keeps open is looked at again at least this often
    PRUNE_MOST = 5000  # waiting files stat'ed per prune_gone (every 2 s): a few ms

    def __init__(self, ingestor: Ingestor, queue, scan: Callable[[bytes], None],
                 on_registered: Callable[[list[str], list[float]], None],
                 first: Callable[[], None] | None = None) -> None:
        self.ingestor = ingestor
        self.queue = queue
        self.scan = scan
        self.on_registered = on_registered
        # run in this thread before any batch, so that it never races an ingest (the daemon
        # adopts cache objects without a catalog row here)
        self.first = first
        self.waiting: dict[bytes, str] = {}
        # when each waiting file began to wait (monotonic), kept across offers: the metrics' oldest pending
        self._waiting_since: dict[bytes, float] = {}
        # offers come from upload and control threads while this thread sorts a batch: a lock, and a
        # count of offers, so that room made during an attempt that found none is not missed
        self._waiting_lock = threading.Lock()
        self._offers = 0
        self._prune_at = 0  # where the next prune_gone starts in the wait list
        self.last_progress = time.monotonic()
        self.registered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._error_logged: str | None = None
        self._unfinished = False  # a catalog error may have left a batch in the cache, unregistered
        self._announced: set[bytes] = set()
        self._busy: dict[bytes, int] = {}  # file still open for writing -> attempts so far
        ingestor.tick = self._tick
        # Fault injection for the watchdog test only: a wedged ingest stage must stop WATCHDOG=1.
        self._wedge = os.environ.get("CLOUDMANAGERD_FAULT") == "wedge-ingest"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:  # never started when an earlier start-up step failed
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def offer_waiting(self, only_reason: str | None = None) -> None:
        """Offer files waiting in the inbox again: all of them, or only those waiting for `only_reason`
        (a new copy makes room, but does not make a too-large file fit or a stuck one movable)."""
        with self._waiting_lock:
            self._offers += 1
            offered = [rel for rel, reason in self.waiting.items() if only_reason in (None, reason)]
            for rel in offered:
                del self.waiting[rel]
        for rel in offered:
            self.queue.put_ready(rel)

    def prune_gone(self, stat_rel: Callable[[bytes], os.stat_result | None]) -> int:
        """Forget waiting files that were deleted from (or moved out of) the inbox; how many. Nothing
        offers them again while the cache stays full, so without this they would stay in `status`'s
        pending count, and a too-large or stuck one in its problems, for good. At most PRUNE_MOST
        are looked at a call, in turn, so that a long wait list costs a bounded number of stats."""
        with self._waiting_lock:
            rels = list(self.waiting)
        if not rels:
            return 0
        start = self._prune_at % len(rels)
        chosen = (rels[start:] + rels[:start])[:self.PRUNE_MOST]
        self._prune_at = start + len(chosen)
        gone = []
        for rel in chosen:
            try:
                if stat_rel(rel) is None:
                    gone.append(rel)
            except OSError:
                continue  # not plainly gone (a folder replaced by a symlink...): its next offer says why
        with self._waiting_lock:
            for rel in gone:
                self.waiting.pop(rel, None)
                self._waiting_since.pop(rel, None)
        if gone:
            log.info("%d file(s) waiting in the inbox are gone from it (deleted or moved away)", len(gone))
        return len(gone)

    def oldest_waiting_age(self) -> float:
        """Seconds the longest-waiting file (for room, or stuck) has waited; 0 when none does."""
        with self._waiting_lock:
            first = next(iter(self._waiting_since.values()), None)
        return 0.0 if first is None else max(time.monotonic() - first, 0.0)

    def _tick(self) -> None:
        self.last_progress = time.monotonic()

    def _run(self) -> None:
        if self.first is not None:
            try:
                self.first()
            except OSError as exc:
                log.error("%s", explain_oserror(exc, "before the first ingest"))
        while not self._stop.is_set():
            self.last_progress = time.monotonic()
            offers = self._offers  # before the take: an offer that finds these files taken counts
            rels = self.queue.take(min(self.BATCH, batch_limit()), timeout=0.5)
            if rels and self._wedge:
                log.warning("CLOUDMANAGERD_FAULT=wedge-ingest: the ingest thread now hangs (test fault)")
                self._stop.wait()
            if self._unfinished and not self._stop.is_set():
                # a catalog error may have come between a batch's move into the cache and its
                # registration (a catalog server that went away): finish or undo that batch as soon
                # as the catalog answers again, not at the next start
                try:
                    self.ingestor.finish_interrupted()
                    self._unfinished = False
                except (OSError, *DB_ERRORS) as exc:
                    self._failed(rels, f"catalog: {exc}" if isinstance(exc, DB_ERRORS) else
                                 explain_oserror(exc, "ingest", CACHE_HINTS))
                    continue
            if not rels or self._stop.is_set():
                for rel in rels:
                    self.queue.put_ready(rel)
                continue
            try:
                result = self.ingestor.ingest(rels)
            except OSError as exc:
                self._failed(rels, explain_oserror(exc, "ingest", CACHE_HINTS))
                continue
            except DB_ERRORS as exc:
                self._unfinished = True
                self._failed(rels, f"catalog: {exc} (free some space on the state folder's disk)"
                             if "full" in str(exc) else f"catalog: {exc}")
                continue
            except Exception:
                log.exception("ingest of %d file(s) failed; they stay in the inbox", len(rels))
                self._failed(rels, None)
                continue
            self._error_logged = None
            self._apply(rels, result)
            if self._offers != offers:  # room may have appeared after this batch found none
                self.offer_waiting("cache-full")

    def _failed(self, rels: Sequence[bytes], message: str | None) -> None:
        if message and message != self._error_logged:
            log.error("%s; %d file(s) stay in the inbox and are retried", message, len(rels))
            self._error_logged = message
        for rel in rels:
            self.queue.put_settle(rel)
        self._stop.wait(2.0)

    def _apply(self, rels: Sequence[bytes], result: IngestResult) -> None:
        for rel in result.requeue:
            self.queue.put_settle(rel)
        for rel in result.later:
            self.queue.put_ready(rel)
        self._back_off(rels, result.busy)
        for rel in result.directories:
            self.scan(rel)
        with self._waiting_lock:
            was_full = any(r == "cache-full" for r in self.waiting.values())
            for rel in rels:
                self.waiting.pop(rel, None)
            for rel, reason in result.waiting:
                if reason == "too-large" and rel not in self._announced:
                    log.warning("%s is larger than the whole cache (%d bytes); it stays in the inbox",
                                show(rel), self.ingestor.cache.capacity)
                    self._announced.add(rel)
                self.waiting[rel] = reason
            now = time.monotonic()
            for rel in rels:
                if rel not in self.waiting:
                    self._waiting_since.pop(rel, None)
            for rel, _ in result.waiting:
                self._waiting_since.setdefault(rel, now)
            full = any(r == "cache-full" for r in self.waiting.values())
        if full and not was_full:
            log.warning("cache full: new files wait in the inbox until room is made")
        elif was_full and not full:
            log.info("room in the cache again: ingest resumed")
        if result.registered:
            self.registered += len(result.registered)
            self.on_registered(result.registered, result.dropped)

    def _back_off(self, rels: Sequence[bytes], busy: Sequence[bytes]) -> None:
        """Files a writer still holds open wait settle, then twice as long each time (up to a
        minute), before they are looked at again; the writer's close event takes them at once.
        Without this wait a file found by a scan, whose writer pauses, was retried thousands of
        times a second."""
        for rel in busy:
            attempts = self._busy.get(rel, 0)
            if attempts == 0:
                log.info("%s is still open for writing; it is taken once its writer closes it", show(rel))
            self._busy[rel] = attempts + 1
            settle = max(self.queue.settle, 0.1)
            self.queue.put_later(rel, min(settle * 2 ** attempts, max(self.BUSY_MAX_WAIT, settle)))
        if self._busy:
            for rel in set(rels).difference(busy):
                self._busy.pop(rel, None)

    def problems(self) -> list[str]:
        with self._waiting_lock:
            waiting = dict(self.waiting)
        full = sum(1 for r in waiting.values() if r == "cache-full")
        large = [rel for rel, r in waiting.items() if r == "too-large"]
        stuck = [rel for rel, r in waiting.items() if r == "stuck"]
        out = []
        if stuck:
            shown = ", ".join(show(rel) for rel in stuck[:3]) + (" ..." if len(stuck) > 3 else "")
            out.append(f"cannot move out of the inbox (see the log): {shown}")
        if full:
            out.append(f"cache full: {full} files waiting for uploads")
        if large:
            shown = ", ".join(show(rel) for rel in large[:3]) + (" ..." if len(large) > 3 else "")
            out.append(f"larger than the whole cache, left in the inbox: {shown}")
        return out
