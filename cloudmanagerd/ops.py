"""The typed operations of a node: the control socket maps JSON lines onto them (control.py), the
Python API calls the same functions (api.py).

Each takes the node core (node.py) and plain arguments, checks them, and raises CloudManagerError
(or NotFound) with a line that says what is wrong; none starts a thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import fsutil
from .catalog import Catalog, ImportConflict
from .errors import CloudManagerError, NotFound
from .exchange import MAX_TEXT, ExchangeError, dump, parse
from .names import show
from .protocol import FULL_HASH, HASH_PREFIX
from .status import file_object

Progress = Callable[[int, int], None] | None
# what `import` reads from a client's file at most: ~170,000 files. Parsing costs ~6 times the text
# in memory (64 MiB peaked at ~460 MiB), so a larger import is split (`export --limit` on the sender).
IMPORT_MAX = 64 << 20
# one import reads and parses at a time: concurrent clients cannot multiply that peak
_IMPORTING = threading.Lock()

log = logging.getLogger(__name__)

# An exported entry that no `data_load` confirmed is offered again after an hour (the original's rule).
EXPORT_RETRY = 3600.0
_MIN_ENTRY = 100  # no exchange entry is shorter: bounds how many rows an export with a limit reads


def export(catalog: Catalog, min_copies: int, limit: int | None, now: float,
           deliver: Callable[[str | None], None] | None = None) -> tuple[str | None, int]:
    """(JSON text of the files due for export, at most `limit` bytes, how many); marks them exported.
    `(None, 0)` when nothing is due or not even one entry fits. With `deliver`, the text is handed to
    it first and the files are marked only once it returned: a text that reached no one (a reader
    that went away, a full disk) leaves them due."""
    # a limit past what any catalog holds is no limit (SQLite's LIMIT takes 64-bit integers only)
    rows = None if limit is None or limit >= _MIN_ENTRY << 62 else limit // _MIN_ENTRY + 1
    entries = list(catalog.export_queue(min_copies, now, EXPORT_RETRY, limit=rows))
    text, count = dump(entries, limit)
    if deliver is not None:
        deliver(text)
    if text is not None:
        catalog.mark_exported([e.filehash for e in entries[:count]], now)
    return text, count


def import_(catalog: Catalog, text: str | bytes, local_remotes: Iterable[str], source: str | None, now: float,
            max_bytes: int | None = MAX_TEXT) -> dict[str, int]:
    """Import an exchange text, all or nothing: ExchangeError or ImportConflict name what is wrong."""
    entries = parse(text, max_bytes)
    if not entries:
        return {"files": 0, "new": 0, "copies": 0}
    counts = catalog.import_entries(entries, local_remotes, source, now)
    log.info("imported %d file(s), %d new, %d copies on this node's remotes%s", counts["files"], counts["new"],
             counts["copies"], f", source={source}" if source else "")
    return counts


# -- one file -----------------------------------------------------------------------------------

def resolve(node, value: Any) -> str:
    """A full hash from a hash or a unique prefix of 6+ lowercase hex digits."""
    if not isinstance(value, str) or not HASH_PREFIX.match(value):
        raise NotFound(f"bad hash {value!r}: give 6 to 64 lowercase hex digits")
    known = FULL_HASH.match(value) and node.catalog.file_size(value) is not None
    return value if known else node.catalog.resolve(value)


LS_PAGE = 1000  # files read from the catalog at a time by a streamed `ls`


def ls(node, state: Any = None, name: Any = None, limit: Any = None, after: Any = None) -> list[dict[str, Any]]:
    return list(ls_pages(node, state, name, limit, after))


def ls_pages(node, state: Any = None, name: Any = None, limit: Any = None,
             after: Any = None) -> Iterator[dict[str, Any]]:
    """The files of `ls`, newest first, read from the catalog a page at a time; `after` = [added, hash]
    of the last file a client has (paging). Arguments are checked now, before the first item."""
    if state not in (None, "cached", "evicted", "pending", "failed"):
        raise CloudManagerError(f"ls: unknown state {state!r}; use cached, evicted, pending or failed")
    if name is not None and (not isinstance(name, str) or not _encodable(name)):
        raise CloudManagerError("ls: name must be a glob pattern (a string)")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit < 1 << 63):
        raise CloudManagerError("ls: limit must be a whole number, 0 or more")
    if after is not None and not (isinstance(after, list) and len(after) == 2
                                  and isinstance(after[0], (int, float)) and not isinstance(after[0], bool)
                                  and isinstance(after[1], str) and HASH_PREFIX.match(after[1])):
        raise CloudManagerError("ls: after must be [added, hash] of the last file of the previous page")
    cursor = None if after is None else (float(after[0]), after[1])
    # the first page is read now: a catalog that cannot be read is an error reply, not a cut one
    want = LS_PAGE if limit is None else min(limit, LS_PAGE)
    first, cursor = node.catalog.list_page(state, name, cursor, want) if want else ([], None)

    def pages() -> Iterator[dict[str, Any]]:
        nonlocal cursor, want
        page, left = first, limit
        while True:
            yield from (file_object(f) for f in page)
            left = None if left is None else left - len(page)
            if cursor is None or left == 0:
                return
            want = LS_PAGE if left is None else min(left, LS_PAGE)
            page, cursor = node.catalog.list_page(state, name, cursor, want)
    return pages()


def info(node, h: Any) -> dict[str, Any]:
    """The file object, and every upload pair not yet done with its stored attempts, next attempt
    and last error (`uploads`): what an operator asks of a file that has not reached its copies."""
    h = resolve(node, h)
    return {**file_object(node.catalog.file_info(h)), "uploads": node.catalog.upload_pairs(h)}


def get(node, h: Any, fd: int, progress: Progress = None) -> dict[str, Any]:
    """Write the file's verified bytes to an open descriptor (fetched back first if evicted)."""
    h = resolve(node, h)
    fsutil.writable_fd(fd, "get")
    details = node.catalog.file_info(h)
    written = node.fetcher.send(h, fd, progress)
    node.catalog.add_transfer(time.time(), outgoing=written)
    return {"hash": h, "size": written, "name": show(details["name"])}


def pin(node, h: Any, pinned: bool, progress: Progress = None) -> dict[str, Any]:
    """Keep a file in the cache (fetched back if needed), or let it go again."""
    h = resolve(node, h)
    if pinned:
        node.fetcher.ensure_cached(h, progress)
    node.catalog.set_pinned(h, pinned)
    if not pinned:
        node.events.emit("room-freed")
    return {"hash": h, "pinned": pinned}


def rm(node, h: Any) -> dict[str, Any]:
    return node.remover.remove(resolve(node, h))


def retry(node, hashes: Any = None, everything: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Uploads back in the queue, now: the given-up ones, and those waiting out a backoff. With
    `dry_run`, the same counts, and nothing moves."""
    now = time.time()
    if everything:
        chosen = None
    else:
        if not isinstance(hashes, list) or not hashes:
            raise CloudManagerError("retry: name one or more hashes, or pass --all")
        chosen = [resolve(node, h) for h in hashes]
    if dry_run:
        given_up, waiting = node.catalog.count_retryable(chosen, now)
        return {"requeued": 0, "would_requeue": given_up + waiting, "given_up": given_up, "waiting": waiting,
                "dry_run": True}
    given_up = node.catalog.retry_failed(chosen, now)
    waiting = node.catalog.retry_waiting(chosen, now)
    node.events.emit("work-queued")
    return {"requeued": given_up + waiting, "given_up": given_up, "waiting": waiting}


def verify(node, remotes: bool = False, progress: Progress = None, deep: bool = False) -> dict[str, Any]:
    """Re-hash the cache; with `remotes`, check every copy: quick (exists, size) or `deep` (read back)."""
    if deep and not remotes:
        raise CloudManagerError("verify: --deep reads the remote copies back: give it with --remotes")
    result: dict[str, Any] = {"cache": node.scrubber.verify_cache(progress)}
    if remotes:
        result["remotes"] = node.scrubber.verify_remotes(progress, deep)
    node.events.emit("work-queued")
    return result


def backup(node, fd: int) -> dict[str, Any]:
    """A consistent copy of the catalog, written to an open descriptor."""
    fsutil.writable_fd(fd, "backup")
    with fsutil.nonblocking(fd):  # a reader that stops reading fails the backup (fsutil.STALL)
        size = node.catalog.backup_to(fd)
    return {"bytes": size}


def export_to(node, fd: int, limit: Any = None) -> dict[str, Any]:
    """`cloudmanagerctl export`: the files due for export, as exchange text, into an open descriptor."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise CloudManagerError("export: limit must be a whole number of bytes, 0 or more")
    fsutil.writable_fd(fd, "export")
    sent = 0

    def deliver(text: str | None) -> None:
        nonlocal sent
        data = (text or "[]").encode("ascii") + b"\n"
        with fsutil.nonblocking(fd):
            fsutil.write_all(fd, data)
        sent = len(data)

    _text, count = export(node.catalog, node.policy.min_redundancy, limit, time.time(), deliver)
    return {"files": count, "bytes": sent}


def import_from(node, fd: int, source: Any = None, stall: float = fsutil.STALL) -> dict[str, Any]:
    """`cloudmanagerctl import`: an exchange text read from an open descriptor, all or nothing."""
    if source is not None and (not isinstance(source, str) or len(source) > 1024 or not source.isprintable()):
        raise CloudManagerError("import: source must be a printable label of at most 1024 characters")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE not in (os.O_RDONLY, os.O_RDWR):
        raise OSError(errno.EBADF, "import: the descriptor passed is not open for reading")
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size - _position(fd) > IMPORT_MAX:
        raise CloudManagerError(f"import: the file is larger than {IMPORT_MAX >> 20} MiB; split it "
                                "(export --limit)")
    if not _IMPORTING.acquire(blocking=False):
        raise CloudManagerError("import: another import is running; try again when it is done")
    try:
        return _import_locked(node, fd, source, stall)
    finally:
        _IMPORTING.release()


def _position(fd: int) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return 0


def _read_text(fd: int, stall: float) -> bytes:
    """The client's whole text, read without blocking for ever (a writer that sends nothing for `stall`
    seconds fails it) and refused at its first bytes when it cannot be an exchange (an endless /dev/zero)."""
    chunks, total = [], 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    with fsutil.nonblocking(fd):
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                if not poller.poll(stall * 1000):
                    raise OSError(errno.ETIMEDOUT, f"import: nothing was written to the descriptor for "
                                                   f"{stall:.0f}s") from None
                continue
            if not chunk:
                return b"".join(chunks)
            if not chunks or not any(c.strip() for c in chunks):
                head = (b"".join(chunks) + chunk).lstrip()
                if head and not head.startswith(b"["):
                    raise CloudManagerError("import: nothing imported: not an exchange text "
                                            f"(a JSON array), it starts with {head[:16]!r}")
            total += len(chunk)
            if total > IMPORT_MAX:
                raise CloudManagerError(f"import: the file is larger than {IMPORT_MAX >> 20} MiB; split it "
                                        "(export --limit)")
            chunks.append(chunk)


def _import_locked(node, fd: int, source: str | None, stall: float) -> dict[str, Any]:
    text = _read_text(fd, stall)
    try:
        counts = import_(node.catalog, text, node.uploader.order, source, time.time(), IMPORT_MAX)
    except (ExchangeError, ImportConflict) as exc:
        raise CloudManagerError(f"import: nothing imported: {exc}") from None
    node.events.emit("work-queued")
    return counts


def _encodable(name: str) -> bool:
    """A name pattern the catalog can match (a lone surrogate from JSON is not a byte name)."""
    try:
        name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True
