"""SQLite connections: WAL, a busy timeout, full durability, one connection per thread."""

from __future__ import annotations

import contextlib
import os
import pwd
import sqlite3
import tempfile
import threading
from collections.abc import Iterator

from .. import fsutil

BUSY_TIMEOUT_MS = 30_000

# Primary result codes (the low byte of an extended one) that say the file itself is damaged:
# no retry or restart can help, and running on would only spread the damage.
CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
# ...and those that say a write could not be made (a full disk, an I/O error, a read-only file):
# the daemon waits these out, and says so in status until a write succeeds again.
WRITE_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN}


def primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _watched(name: str):
    """A cursor method that reports an error to its database's watch before raising it."""
    method = getattr(sqlite3.Cursor, name)

    def call(self, *args):
        try:
            return method(self, *args)
        except sqlite3.Error as exc:
            self.connection.watch(exc)
            raise
    call.__name__ = name
    return call


class _Cursor(sqlite3.Cursor):
    """A cursor that reports errors to its database's watch (every query of the daemon goes through one)."""

    execute = _watched("execute")
    executemany = _watched("executemany")
    fetchone = _watched("fetchone")
    fetchmany = _watched("fetchmany")
    fetchall = _watched("fetchall")
    __next__ = _watched("__next__")


class _Connection(sqlite3.Connection):
    """Hands out watching cursors (`Connection.execute` would use a plain one)."""

    watch = staticmethod(lambda exc: None)

    def cursor(self, factory=_Cursor):  # type: ignore[override]
        return super().cursor(factory)

    def execute(self, sql, parameters=()):  # type: ignore[override]
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql, parameters):  # type: ignore[override]
        return self.cursor().executemany(sql, parameters)


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
        # Set by whichever thread meets the error; read by the daemon's health check.
        self.corrupt: str | None = None  # the first "malformed"/"not a database" error, for good
        self.write_error: str | None = None  # the last failed write, until a write succeeds
        self.write_error_code: int | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)

    def watch(self, exc: sqlite3.Error) -> None:
        code = primary_code(exc)
        if code in CORRUPT_CODES and self.corrupt is None:
            self.corrupt = str(exc)
        elif code in WRITE_CODES:
            self.write_error, self.write_error_code = str(exc), code

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False, factory=_Connection)
            conn.watch = self.watch
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

    # -- what is wrong with the file, in words an operator can act on ---------------------------

    def recovery_hint(self) -> str:
        return (f"stop cloudmanagerd and restore {self.path} from a copy made by `cloudmanagerctl backup`, "
                f"or salvage what is left: sqlite3 {self.path} .recover | sqlite3 {self.path}.recovered "
                "and move that into its place")

    def explain(self, exc: sqlite3.Error) -> str:
        """One line for an error met while opening the catalog: what is wrong and what to do."""
        code = primary_code(exc)
        if code in CORRUPT_CODES:
            return f"catalog {self.path} is damaged ({exc}): {self.recovery_hint()}"
        if code == sqlite3.SQLITE_READONLY:
            return (f"catalog {self.path} is not writable by user {_user()} ({exc}; run: chown {_user()} "
                    f"{self.path}*, or remount its filesystem read-write)")
        if code == sqlite3.SQLITE_CANTOPEN:
            return (f"catalog {self.path} cannot be opened ({exc}): user {_user()} must be able to read and "
                    f"write it and create files in {os.path.dirname(self.path) or '.'}")
        if code == sqlite3.SQLITE_FULL:
            return f"catalog {self.path}: no space left on its disk (free some space there)"
        if code == sqlite3.SQLITE_IOERR:
            return f"catalog {self.path}: input/output error ({exc}; check the disk)"
        return f"catalog {self.path}: {exc}"

    def check(self) -> str | None:
        """SQLite's own consistency check of the whole file; None when it is fine, else the first finding.

        quick_check, not integrity_check: it reads every page and checks the b-trees, but does not
        cross-check indexes against their tables, and takes a fraction of the time at a million
        files (measured in issue 10: see the README's Catalog section)."""
        rows = self.connection().execute("PRAGMA quick_check").fetchall()
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        if rows == [("ok",)]:
            return None
        return "; ".join(str(r[0]) for r in rows[:3]) + (" ..." if len(rows) > 3 else "")

    def damage(self) -> str | None:
        """Why the running daemon can no longer trust its catalog, or None: SQLite found the file damaged,
        or the path no longer names the file the daemon has open (deleted, or replaced by another file:
        open connections would go on writing into a file nobody will open again)."""
        if self.corrupt:
            return self.corrupt
        if self._identity is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "the file was deleted while the daemon ran"
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != self._identity:
            return "another file was put in its place while the daemon ran"
        return None

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
        if conn.in_transaction:
            # left open by a COMMIT that failed (SQLite keeps the transaction after SQLITE_FULL
            # or an I/O error): without this, every later BEGIN on this thread would fail for good
            self._rollback(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        self.write_error = self.write_error_code = None

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the first error is the one to report
                conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        conn = self.connection()
        if conn.in_transaction:
            self._rollback(conn)
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            self._rollback(conn)  # a read-only transaction: ending it either way is the same

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


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
