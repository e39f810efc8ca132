"""SQLite connections: WAL, a busy timeout, full durability, one connection per thread."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator

from .. import fsutil

BUSY_TIMEOUT_MS = 30_000


class SqliteDatabase:
    """Hands each thread its own connection; writes go through `tx()` (BEGIN IMMEDIATE).

    WAL lets readers (status, ls) run beside the ingest writer. `synchronous=FULL`
    because ingest relies on a commit being on disk before it renames a file out of
    the inbox: a power cut must not lose the row that points at the cache object.
    """

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                # a thread that ended (a control client's, a pool's) left its connection here:
                # close it, or every `cloudmanagerctl status` would leak two descriptors
                for thread, old in self._all:
                    if not thread.is_alive():
                        with contextlib.suppress(sqlite3.Error):
                            old.close()
                self._all = [(t, c) for t, c in self._all if t.is_alive()]
                self._all.append((threading.current_thread(), conn))
        return conn

    def relax_durability(self) -> None:
        """This thread's commits go to the WAL without an fsync each (synchronous=NORMAL): a power
        cut may lose its last few commits, never corrupt the database. Only for threads whose
        records are cheap to lose (the upload workers'): ingest keeps FULL, it renames files on
        the strength of its commits."""
        conn = self.connection()
        if not getattr(self._local, "relaxed", False):
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.relaxed = True

    def release(self) -> None:
        """Close the calling thread's connection: for short-lived threads (a control client's),
        so that their descriptors go with them instead of waiting for the next new thread."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        self._local.relaxed = False
        with self._lock:
            self._all = [(t, c) for t, c in self._all if c is not conn]
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE, commit, or roll back on any error."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def backup_to(self, fd: int) -> int:
        """A consistent online copy of the database (SQLite's backup API), written to an open
        descriptor; returns its size. The copy is made beside the catalog first because the
        backup API needs a database file, and the client's descriptor may be a pipe."""
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(self.path), prefix=".backup-") as tmp:
            target = sqlite3.connect(tmp.name)
            try:
                self.connection().backup(target)
            finally:
                target.close()
            with open(tmp.name, "rb") as src:
                return fsutil.copy_fd(src.fileno(), fd)

    def close(self) -> None:
        with self._lock:
            for _thread, conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()
