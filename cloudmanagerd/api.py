"""`CloudManager`: the original cloud-manager library's verbs, on the daemon's own parts.

Code written for Storj's `cloudmanager.CloudManager` runs with only the import changed. The API
starts no background thread: uploads happen in `cloud_sync()`, in the caller's thread, or in a
daemon that shares the catalog and cache (the same node). Bad input never raises: every verb
returns the documented false value or None and logs one line.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

from . import fsutil, ops
from .catalog import DB_ERRORS, ImportConflict, IngestRecord
from .config import Config, ConfigError, load_config, parse_remotes, upload_policy
from .errors import CloudManagerError
from .exchange import ExchangeError
from .hashing import HASH_CHUNK
from .logs import fields
from .protocol import FULL_HASH
from .events import Events
from .node import Node
from .remotes import RemoteError

log = logging.getLogger("cloudmanagerd.api")

DEFAULT_CONFIG = "/etc/cloudmanagerd/config.yaml"
LEASE = 60.0


def _catalog_url(database_path: str) -> str:
    return database_path if "://" in database_path else "sqlite:///" + os.path.abspath(database_path)


def _config_from_environment() -> Config | None:
    """The config file the original's three-argument constructor implies, when there is one."""
    path = os.environ.get("CLOUDMANAGERD_CONFIG")
    if path is None and not os.path.exists(DEFAULT_CONFIG):
        return None
    return load_config(path or DEFAULT_CONFIG)


def _hash(value: Any) -> str | None:
    return value if isinstance(value, str) and FULL_HASH.fullmatch(value) else None


def _verb(false_value: Callable[[], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A public verb never raises: after close(), or when the catalog or the cache folder fails
    (a disk error, a lock held past the busy timeout), it logs one line and returns its false value."""
    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def verb(self: CloudManager, *args: Any, **kwargs: Any) -> Any:
            if self._closed:
                log.error("%s: this CloudManager is closed", method.__name__)
                return false_value()
            try:
                return method(self, *args, **kwargs)
            except (OSError, *DB_ERRORS, CloudManagerError) as exc:
                log.error("%s: %s", method.__name__, getattr(exc, "strerror", None) or exc)
                return false_value()
        return verb
    return wrap


class CloudManager:
    """A pool of files: hashed, cached within `storage_size` bytes, copied to remotes.

    `database_path` is a SQLite file or a catalog URL; `storage_path` the cache folder. With only
    these three arguments the remotes and upload policy come from the config file named by
    CLOUDMANAGERD_CONFIG, else /etc/cloudmanagerd/config.yaml if it exists; with no remotes at all,
    files stay cached and are never evicted. Raises ConfigError (one line per problem) on a bad
    `remotes`, `redundancy` or `min_redundancy`, as the daemon refuses a bad config.
    """

    def __init__(self, database_path: str, storage_path: str, storage_size: int, *,
                 remotes: list[dict[str, Any]] | None = None, redundancy: int | None = None,
                 min_redundancy: int | None = None) -> None:
        if not isinstance(database_path, (str, os.PathLike)) or not isinstance(storage_path, (str, os.PathLike)):
            raise ConfigError("database_path and storage_path must be paths")
        if isinstance(storage_size, bool) or not isinstance(storage_size, int) or storage_size <= 0:
            raise ConfigError(f"storage_size must be a whole number of bytes above 0, got {storage_size!r}")
        config = _config_from_environment() if remotes is None else None
        if remotes is not None:
            remote_configs = parse_remotes(remotes, base_dir=os.getcwd())
        else:
            remote_configs = config.remotes if config is not None else ()
        if config is not None and redundancy is None and min_redundancy is None:
            self.policy = config.upload
        else:
            self.policy = upload_policy(len(remote_configs), redundancy, min_redundancy)
        # the daemon's node name, so that an API and a daemon on one machine are one node
        self.node = config.node if config is not None else socket.gethostname()
        self.order = [rc.name for rc in remote_configs]
        self._stack = contextlib.ExitStack()
        self._closed = False
        # this process's own claim owner: a daemon's start-up never frees an API's transfers in flight,
        # and the next CloudManager frees those of a script that was killed
        self.core = Node(catalog_url=_catalog_url(os.fspath(database_path)), node=self.node,
                         cache_path=os.path.abspath(os.fspath(storage_path)), capacity=storage_size,
                         remotes=remote_configs, policy=self.policy, lease=LEASE, events=Events(),
                         claim_owner=f"{self.node}/api/{os.getpid()}")  # = Node.api_owner
        self._stack.callback(self.core.close)
        core = self.core
        self.catalog, self.cache, self.remotes = core.catalog, core.cache, core.remotes
        self.evictor, self.fetcher, self.uploader = core.evictor, core.fetcher, core.uploader
        removed = self.cache.clear_tmp(keep_own=True)  # half-done copies of a process that was killed
        if removed:
            log.info("removed %d temp file(s) left in the cache by an interrupted copy", removed)
        core.refresh_cache_account()
        core.release_dead_claims()

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Release the catalog, the cache folder's descriptors and the remotes' clients; every verb
        called afterwards logs and returns its false value (the descriptors' numbers may be reused)."""
        self._closed = True
        self._stack.close()

    def __enter__(self) -> CloudManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files in and out -----------------------------------------------------------------

    @_verb(lambda: False)
    def upload(self, file_path: Any) -> str | bool:
        """Copy a file in (the caller's file stays); its SHA-256, or False when it cannot fit or be read."""
        try:
            return self._upload(file_path)
        except ValueError as exc:  # a NUL in the path, a lone surrogate that no byte escapes
            log.error("upload %r: not a usable path: %s", file_path, exc)
            return False
        except (OSError, CloudManagerError) as exc:
            log.error("upload %r: %s", file_path, getattr(exc, "strerror", None) or exc)
            return False

    def _upload(self, file_path: Any) -> str | bool:
        if not isinstance(file_path, (str, bytes, os.PathLike)) or not os.fspath(file_path):
            log.error("upload: expected a file path, got %r", file_path)
            return False
        path = os.fsencode(file_path)
        # never follow a symlink (as the inbox does not), never block on a FIFO
        src = os.open(path, fsutil.O_READ_FILE)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                log.error("upload %s: not a regular file", os.fsdecode(path))
                return False
            size = st.st_size
            self.cache.revalidate_root()
            self.core.refresh_cache_account()
            if not self.evictor.reserve(size):
                log.error("upload %s: %d bytes do not fit in the cache (%d bytes, holding files not yet "
                          "copied to their remotes)", os.fsdecode(path), size, self.cache.capacity)
                return False
            try:
                return self._copy_in(src, st, os.path.basename(path))
            except BaseException:
                self.cache.release(size)
                raise
        finally:
            os.close(src)

    def _copy_in(self, src: int, st: os.stat_result, name: bytes) -> str | bool:
        """Copy and hash in one pass into the cache's temp folder, then rename into place and register.

        The object is in place before the catalog row: a crash between the two leaves an object without a
        row, which the daemon's start-up adopts (its bytes match its name), and the caller's file is intact.
        """
        size = st.st_size
        tmp = f"api.{os.getpid()}.{time.monotonic_ns()}"
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640, dir_fd=self.cache.tmp_fd)
        try:
            digest, copied = hashlib.sha256(), 0
            while chunk := os.read(src, HASH_CHUNK):
                digest.update(chunk)
                os.write(dst, chunk)  # a short write raises on a regular file that is full
                copied += len(chunk)
            os.fsync(dst)
            after = os.fstat(src)
            if copied != size or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise CloudManagerError("the file changed while it was copied; upload it again once it is complete")
            h = digest.hexdigest()
            self.cache.revalidate_subdir(h)
            if self.catalog.cached_here([h]) and self.cache.has_object(h):
                self.cache.release(size)
                self.catalog.touch(h, time.time())
                return h
            self.cache.install(tmp, h)
            tmp = ""
        finally:
            os.close(dst)
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=self.cache.tmp_fd)
        now = time.time()
        known = self.catalog.file_size(h) is not None
        self.catalog.finish_ingest([IngestRecord(h, name, size)], self.uploader.targets(), now)
        self.cache.commit(size)
        log.info("added hash=%s size=%d%s", h, size, " (known content, cached again)" if known else "", extra=fields(h))
        return h

    @_verb(lambda: 0)
    def cloud_sync(self) -> int:
        """Try every pending upload once, now, in this thread; returns how many transfers were tried."""
        return self.uploader.sync_round()

    @_verb(lambda: False)
    def warm_up(self, file_hash: Any) -> str | bool | None:
        """The path of the file in the cache, fetched back and verified if needed; None for an unknown
        or malformed hash, False when no remote gives a good copy or there is no room."""
        h = _hash(file_hash)
        if h is None:
            log.error("warm_up: not a SHA-256 hex digest: %r", file_hash)
            return None
        size = self.catalog.file_size(h)
        if size is None:
            return None
        self.cache.revalidate_subdir(h)
        if self.catalog.cached_here([h]) and not self.cache.has_object(h):
            # the object vanished behind the catalog's back: the catalog follows the disk, then fetch
            log.warning("cache object hash=%s is missing; fetching it again", h, extra=fields(h))
            self.evictor.drop([(h, size)])
        try:
            self.fetcher.ensure_cached(h)
        except CloudManagerError as exc:
            log.error("warm_up %s: %s", h[:12], exc, extra=fields(h))
            return False
        self.catalog.add_transfer(time.time(), outgoing=size)
        return self.cache.object_path(h)

    download = warm_up

    # -- questions ------------------------------------------------------------------------

    @_verb(lambda: False)
    def exists(self, file_hash: Any) -> bool:
        h = _hash(file_hash)
        return h is not None and self.catalog.file_size(h) is not None

    @_verb(lambda: False)
    def on_cache(self, file_hash: Any) -> bool:
        """True only when the catalog says cached and the bytes are really there, at their size."""
        h = _hash(file_hash)
        if h is None or not self.catalog.cached_here([h]):
            return False
        try:
            st = os.stat(h, dir_fd=self.cache.subdir_fd(h), follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == self.catalog.file_size(h)

    @_verb(lambda: None)
    def info(self, file_hash: Any) -> dict[str, Any] | None:
        h = _hash(file_hash)
        entry = self.catalog.entry(h) if h is not None else None
        return entry.to_object() if entry is not None else None

    @_verb(lambda: 0)
    def used_space(self) -> int:
        return self.catalog.cache_bytes()

    def capacity(self) -> int:
        return self.cache.capacity

    @_verb(lambda: 0.0)
    def usage_ratio(self) -> float:
        return min(1.0, self.used_space() / self.cache.capacity)

    @_verb(lambda: {"size": 0, "count": 0})
    def upload_queue_info(self) -> dict[str, int]:
        count, size = self.catalog.pending_upload_size()
        return {"size": size, "count": count}

    @_verb(lambda: {"size": 0, "count": 0})
    def blockchain_queue_info(self) -> dict[str, int]:
        count, size = self.catalog.export_queue_size(self.policy.min_redundancy, time.time(), ops.EXPORT_RETRY)
        return {"size": size, "count": count}

    @_verb(lambda: {"cloud_queue": [], "blockchain_queue": []})
    def sync_status(self) -> dict[str, list[dict[str, Any]]]:
        now = time.time()
        return {"cloud_queue": [_description(e) for e in self.catalog.pending_upload_entries()],
                "blockchain_queue": [_description(e) for e in
                                     self.catalog.export_queue(self.policy.min_redundancy, now, ops.EXPORT_RETRY)]}

    # -- the exchange with other nodes -----------------------------------------------------

    @_verb(lambda: None)
    def data_dump(self, data_limit: Any) -> str | None:
        """JSON text (at most `data_limit` bytes) of files not yet exported, marking them exported;
        None when nothing is due or nothing fits."""
        if isinstance(data_limit, bool) or not isinstance(data_limit, int) or data_limit < 0:
            log.error("data_dump: the limit must be a whole number of bytes, got %r", data_limit)
            return None
        return ops.export(self.catalog, self.policy.min_redundancy, data_limit, time.time())[0]

    @_verb(lambda: False)
    def data_load(self, data: Any, source: Any = None) -> bool:
        """Import other nodes' entries, all or nothing; True when done ("[]" too), False on bad input."""
        if source is not None and (not isinstance(source, str) or len(source) > 1024 or not source.isprintable()):
            log.error("data_load: source must be a printable string (the original's block hash), got %.60r", source)
            return False
        try:
            ops.import_(self.catalog, data, self.order, source, time.time())
        except (ExchangeError, ImportConflict) as exc:
            log.error("data_load: nothing imported: %s", exc)
            return False
        return True

    @_verb(lambda: 0)
    def last_known_block(self) -> int:
        return self.catalog.sync_cursor()

    @_verb(lambda: None)
    def visit_block(self, block_height: Any) -> None:
        if isinstance(block_height, bool) or not isinstance(block_height, int) or not 0 <= block_height < 1 << 63:
            log.error("visit_block: expected a block height (a whole number), got %r", block_height)
            return None
        self.catalog.set_sync_cursor(block_height)
        return None

    # -- bytes in and out ----------------------------------------------------------------

    def _transfer(self) -> dict[str, int]:
        return self.catalog.transfer_totals(time.time())

    @_verb(lambda: 0)
    def total_incoming(self) -> int:
        return self._transfer()["total_incoming"]

    @_verb(lambda: 0)
    def total_outgoing(self) -> int:
        return self._transfer()["total_outgoing"]

    @_verb(lambda: 0)
    def current_incoming(self) -> int:
        return self._transfer()["month_incoming"]

    @_verb(lambda: 0)
    def current_outgoing(self) -> int:
        return self._transfer()["month_outgoing"]


def _description(entry) -> dict[str, Any]:
    base: dict[str, Any] = {"filename": os.fsdecode(entry.filename), "filehash": entry.filehash,
                            "filesize": entry.filesize}
    if entry.uploads:
        base["uploads"] = [u.to_object() for u in entry.uploads]
    base["datetime"] = str(entry.datetime)
    return base


__all__ = ["CloudManager", "ConfigError", "RemoteError"]
