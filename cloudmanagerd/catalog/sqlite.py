"""SQLite connections: WAL, a busy timeout, full durability, one connection per thread."""

from __future__ import annotations

import collections
import contextlib
import os
import pwd
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Sequence

from .. import fsutil
from ..health import Recent

BUSY_TIMEOUT_MS = 30_000
IDENTITY_EVERY = 1.0  # seconds between two looks at the catalog's path (damage()): how late a replaced file is seen
# Rows written (conn.total_changes) between two checkpoints of the WAL, run by an upload thread after its
# write transaction; four times as many before the ingest or a command runs one itself (see tx()).
CHECKPOINT_ROWS = 4000

# Primary result codes (the low byte of an extended one) that say the file itself is damaged:
# no retry or restart can help, and running on would only spread the damage.
CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
# ...and those that say a write could not be made (a full disk, an I/O error, a read-only file):
# the daemon waits these out, and says so in status until a write succeeds again.
WRITE_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN}


# Each entry upgrades the schema from version i to i + 1; later issues append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE files (
        hash TEXT PRIMARY KEY,
        name BLOB NOT NULL,
        size INTEGER NOT NULL,
        added REAL NOT NULL,
        pinned INTEGER NOT NULL DEFAULT 0,
        removing INTEGER NOT NULL DEFAULT 0,
        exported REAL,
        confirmed INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX files_added ON files(added);
    CREATE TABLE ingests (
        node TEXT NOT NULL,
        hash TEXT NOT NULL,
        name BLOB NOT NULL,
        size INTEGER NOT NULL,
        started REAL NOT NULL,
        PRIMARY KEY (node, hash, name)
    );
    CREATE TABLE cache_entries (
        hash TEXT NOT NULL REFERENCES files(hash),
        node TEXT NOT NULL,
        size INTEGER NOT NULL,
        last_used REAL NOT NULL,
        PRIMARY KEY (hash, node)
    );
    CREATE INDEX cache_lru ON cache_entries(node, last_used);
    CREATE TABLE uploads (
        hash TEXT NOT NULL REFERENCES files(hash),
        remote TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'active', 'retrying', 'failed', 'done')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        claim_owner TEXT,
        lease_expiry REAL,
        updated REAL NOT NULL,
        PRIMARY KEY (hash, remote)
    );
    CREATE INDEX uploads_due ON uploads(state, next_attempt);
    CREATE TABLE copies (
        hash TEXT NOT NULL REFERENCES files(hash),
        remote TEXT NOT NULL,
        url TEXT NOT NULL,
        created REAL NOT NULL,
        verified REAL,
        bad INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hash, remote)
    );
    CREATE TABLE remote_stats (
        remote TEXT PRIMARY KEY,
        errors INTEGER NOT NULL DEFAULT 0,
        successes INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        last_error_at REAL
    );
    CREATE TABLE transfer (
        node TEXT NOT NULL,
        month TEXT NOT NULL,
        incoming INTEGER NOT NULL DEFAULT 0,
        outgoing INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (node, month)
    );
    CREATE TABLE nodes (
        node TEXT PRIMARY KEY,
        heartbeat REAL NOT NULL,
        pid INTEGER,
        info TEXT
    );
    """,
    # 2: eviction is marked before the object goes (start-up finishes it), and the scrub
    # remembers when each cache object and each remote copy was last checked.
    """
    ALTER TABLE cache_entries ADD COLUMN evicting INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE cache_entries ADD COLUMN verified REAL;
    CREATE INDEX cache_verified ON cache_entries(node, verified);
    CREATE INDEX copies_verified ON copies(verified);
    CREATE INDEX files_removing ON files(removing) WHERE removing=1;
    """,
    # 3: counters kept by triggers, so that `status` costs the same with a million files as with
    # ten (a COUNT/SUM over 1M rows takes 27-70 ms); files.good counts each file's good copies.
    """
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL DEFAULT 0);
    ALTER TABLE files ADD COLUMN good INTEGER NOT NULL DEFAULT 0;
    UPDATE files SET good=(SELECT COUNT(*) FROM copies k WHERE k.hash=files.hash AND k.bad=0);
    CREATE INDEX files_good ON files(good, added);
    INSERT INTO counters(name, value) SELECT 'files', COUNT(*) FROM files;
    INSERT INTO counters(name, value) SELECT 'bytes', COALESCE(SUM(size), 0) FROM files;
    INSERT INTO counters(name, value) SELECT 'copies', COUNT(*) FROM copies WHERE bad=0;
    INSERT INTO counters(name, value) SELECT 'uploads:' || state, COUNT(*) FROM uploads GROUP BY state;
    INSERT INTO counters(name, value) SELECT 'pending_bytes', COALESCE(SUM(f.size), 0) FROM uploads u
        JOIN files f ON f.hash=u.hash WHERE u.state IN ('queued', 'active', 'retrying');
    INSERT INTO counters(name, value) SELECT 'good:' || good, COUNT(*) FROM files GROUP BY good;
    INSERT INTO counters(name, value) SELECT 'goodbytes:' || good, SUM(size) FROM files GROUP BY good;
    INSERT INTO counters(name, value) SELECT 'cache_files:' || node, COUNT(*) FROM cache_entries GROUP BY node;
    INSERT INTO counters(name, value) SELECT 'cache_bytes:' || node, SUM(size) FROM cache_entries GROUP BY node;
    CREATE TRIGGER files_ins AFTER INSERT ON files BEGIN
        INSERT INTO counters VALUES ('files', 1), ('bytes', NEW.size), ('good:' || NEW.good, 1),
            ('goodbytes:' || NEW.good, NEW.size) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER files_del AFTER DELETE ON files BEGIN
        INSERT INTO counters VALUES ('files', -1), ('bytes', -OLD.size), ('good:' || OLD.good, -1),
            ('goodbytes:' || OLD.good, -OLD.size) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER files_good AFTER UPDATE OF good ON files WHEN OLD.good != NEW.good BEGIN
        INSERT INTO counters VALUES ('good:' || OLD.good, -1), ('goodbytes:' || OLD.good, -OLD.size),
            ('good:' || NEW.good, 1), ('goodbytes:' || NEW.good, NEW.size)
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER copies_ins AFTER INSERT ON copies WHEN NEW.bad=0 BEGIN
        UPDATE files SET good=good+1 WHERE hash=NEW.hash;
        INSERT INTO counters VALUES ('copies', 1) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER copies_del AFTER DELETE ON copies WHEN OLD.bad=0 BEGIN
        UPDATE files SET good=good-1 WHERE hash=OLD.hash;
        INSERT INTO counters VALUES ('copies', -1) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER copies_bad AFTER UPDATE OF bad ON copies WHEN OLD.bad != NEW.bad BEGIN
        UPDATE files SET good=good + (CASE WHEN NEW.bad=0 THEN 1 ELSE -1 END) WHERE hash=NEW.hash;
        INSERT INTO counters VALUES ('copies', CASE WHEN NEW.bad=0 THEN 1 ELSE -1 END)
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER uploads_ins AFTER INSERT ON uploads BEGIN
        INSERT INTO counters VALUES ('uploads:' || NEW.state, 1),
            ('pending_bytes', CASE WHEN NEW.state IN ('queued', 'active', 'retrying')
                              THEN (SELECT size FROM files WHERE hash=NEW.hash) ELSE 0 END)
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER uploads_del AFTER DELETE ON uploads BEGIN
        INSERT INTO counters VALUES ('uploads:' || OLD.state, -1),
            ('pending_bytes', CASE WHEN OLD.state IN ('queued', 'active', 'retrying')
                              THEN -(SELECT size FROM files WHERE hash=OLD.hash) ELSE 0 END)
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER uploads_state AFTER UPDATE OF state ON uploads WHEN OLD.state != NEW.state BEGIN
        INSERT INTO counters VALUES ('uploads:' || OLD.state, -1), ('uploads:' || NEW.state, 1),
            ('pending_bytes', (SELECT size FROM files WHERE hash=NEW.hash) *
                ((NEW.state IN ('queued', 'active', 'retrying')) - (OLD.state IN ('queued', 'active', 'retrying'))))
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER cache_ins AFTER INSERT ON cache_entries BEGIN
        INSERT INTO counters VALUES ('cache_files:' || NEW.node, 1), ('cache_bytes:' || NEW.node, NEW.size)
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER cache_del AFTER DELETE ON cache_entries BEGIN
        INSERT INTO counters VALUES ('cache_files:' || OLD.node, -1), ('cache_bytes:' || OLD.node, -OLD.size)
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END
    """,
    # 4: good copies per remote are counted too: `status` lists every remote's copies, and a GROUP BY
    # over 2M copies took 1.2-2.3 s per status (and per 2 s status job) with 1M files (issue 6's benchmark).
    """
    INSERT INTO counters(name, value) SELECT 'copies:' || remote, COUNT(*) FROM copies WHERE bad=0 GROUP BY remote;
    CREATE TRIGGER copies_ins_remote AFTER INSERT ON copies WHEN NEW.bad=0 BEGIN
        INSERT INTO counters VALUES ('copies:' || NEW.remote, 1)
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER copies_del_remote AFTER DELETE ON copies WHEN OLD.bad=0 BEGIN
        INSERT INTO counters VALUES ('copies:' || OLD.remote, -1)
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END;
    CREATE TRIGGER copies_bad_remote AFTER UPDATE OF bad ON copies WHEN OLD.bad != NEW.bad BEGIN
        INSERT INTO counters VALUES ('copies:' || NEW.remote, CASE WHEN NEW.bad=0 THEN 1 ELSE -1 END)
            ON CONFLICT(name) DO UPDATE SET value=value+excluded.value;
    END
    """,
    # 5: the exchange with other nodes (issue 11). Locations another node reported on remotes this
    # node does not have are kept, to be exported again, but never counted or used; `source` is what
    # confirmed a file (the original's block hash); the export queue reads files by (confirmed, exported).
    """
    CREATE TABLE foreign_copies (
        hash TEXT NOT NULL REFERENCES files(hash),
        host_name TEXT NOT NULL,
        url TEXT,
        PRIMARY KEY (hash, host_name)
    );
    ALTER TABLE files ADD COLUMN source TEXT;
    CREATE INDEX files_export ON files(confirmed, exported)
    """,
    # 6: several nodes on one catalog (issue 13). A node's row says which running process holds its
    # name (instance: random per start), where it runs (host; seat: boot and state folder), and
    # whether it stopped cleanly; remote_places records what place each remote name meant when first
    # seen, so that a name means one place on every node.
    """
    ALTER TABLE nodes ADD COLUMN instance TEXT;
    ALTER TABLE nodes ADD COLUMN host TEXT;
    ALTER TABLE nodes ADD COLUMN started REAL;
    ALTER TABLE nodes ADD COLUMN stopped REAL;
    ALTER TABLE nodes ADD COLUMN seat TEXT;
    CREATE TABLE remote_places (
        name TEXT PRIMARY KEY,
        place TEXT NOT NULL,
        node TEXT NOT NULL,
        recorded REAL NOT NULL
    )
    """,
    # 7: when each remote copy was last proven by its content (read back and hashed: an upload, a
    # fetch, a deep verify or the scrub), apart from `verified` (a quick check: exists, size). The
    # scrub reads the copies proven longest ago first; one never proven counts from its creation.
    """
    ALTER TABLE copies ADD COLUMN proven REAL;
    CREATE INDEX copies_proven ON copies((COALESCE(proven, created)))
    """,
]

def split_statements(script: str) -> list[str]:
    """Split a migration into statements; a trigger body's semicolons stay inside its statement."""
    statements, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                statements.append(current.strip())
            current = ""
    if current.strip(" \n;"):
        statements.append(current.strip(" \n;"))
    return statements


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


class _WriteGate:
    """The write lock among this process's threads, taken before SQLite's.

    Without it, threads meet at SQLite's lock, whose busy handler sleeps 1, 2, 5 ... 100 ms between
    tries without waking when the lock is freed: with four upload threads committing back to back,
    the ingest thread's BEGIN IMMEDIATE waited 60-150 ms (a single drop's latency, at p99). Here the
    releasing thread hands the gate to the next waiter itself, and background writers (threads that
    relaxed their durability: the uploads) let a waiting foreground writer (ingest, a command) go
    first, FOREGROUND_TURNS times at most in a row. Handed over, not raced for: a waiter woken to race
    lost every time to a writer calling tx() again at once, and an upload thread waited out the busy
    timeout behind a steady ingest. Other processes on the same file (nodes, API scripts) still meet
    at SQLite's lock."""

    FOREGROUND_TURNS = 8

    def __init__(self, timeout: float = BUSY_TIMEOUT_MS / 1000) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        # each waiter: its thread and a lock held until the gate is handed to it
        self._queue: dict[bool, collections.deque[tuple[int, threading.Lock]]] = {
            True: collections.deque(), False: collections.deque()}  # background, foreground
        self._owner: int | None = None
        self._passed = 0  # foreground turns in a row while a background writer waited

    @property
    def waiting(self) -> dict[bool, int]:
        return {background: len(queue) for background, queue in self._queue.items()}

    @contextlib.contextmanager
    def hold(self, background: bool) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:
            # tx() within tx() on one thread: the inner BEGIN would find the outer transaction open, roll
            # it back (as one a failed COMMIT left) and commit the inner change alone: half of a change
            raise RuntimeError("a write transaction opened within another on the same thread")
        with self._lock:
            if self._owner is None:  # free means nobody waits: a release hands it to the next waiter
                self._owner = me
                entry = None
            else:
                entry = (me, threading.Lock())
                entry[1].acquire()
                self._queue[background].append(entry)
        if entry is not None:
            try:
                # as long as SQLite's busy timeout, and the same error after it
                handed = entry[1].acquire(timeout=self.timeout)
            except BaseException:  # KeyboardInterrupt while waiting: not left in the queue to be handed it
                if self._leave(background, entry):
                    self._release()  # handed it just then: passed on
                raise
            if not handed and not self._leave(background, entry):
                raise sqlite3.OperationalError("database is locked (by another thread of this process)")
        try:
            yield
        finally:
            self._release()

    def _leave(self, background: bool, entry: tuple[int, threading.Lock]) -> bool:
        """A waiter gives up; True if the gate was handed to it meanwhile (it holds it then)."""
        with self._lock:
            if entry in self._queue[background]:
                self._queue[background].remove(entry)
                return False
        return True

    def _release(self) -> None:
        with self._lock:
            foreground, background = self._queue[False], self._queue[True]
            if foreground and (not background or self._passed < self.FOREGROUND_TURNS):
                self._passed = self._passed + 1 if background else 0
                nxt = foreground.popleft()
            elif background:
                self._passed = 0
                nxt = background.popleft()
            else:
                self._owner = None
                return
            self._owner = nxt[0]
            nxt[1].release()


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
        self._gate = _WriteGate()
        self._unchecked = 0  # rows written since the last checkpoint (counted under the gate)
        self._behind = False  # the last checkpoint left pages in the WAL (a reader held them)
        # Set by whichever thread meets the error; read by the daemon's health check.
        self.corrupt: str | None = None  # the first "malformed"/"not a database" error, for good
        self.write_error: str | None = None  # the last failed write, until a write succeeds
        self.write_error_code: int | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
        # what the catalog's path names, looked at once per IDENTITY_EVERY: status asks on every call, and
        # each stat() lets a busy thread take the GIL for up to the switch interval (status p99, issue 12)
        self._path_seen = Recent(self._look_at_path, IDENTITY_EVERY)
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)

    # -- what differs from PostgreSQL (catalog/postgres.py has the same members) ----------------

    # one row per counter, kept by the triggers of migration 3
    counters_sql = "SELECT name, value FROM counters"
    # BEGIN IMMEDIATE holds the only write lock: what a claim reads, no other node can take meanwhile
    claim_lock = ""

    @staticmethod
    def name_glob(pattern: str) -> tuple[str, object]:
        """Names are raw bytes: GLOB compares them as they are (a non-UTF-8 pattern arrives with
        surrogate escapes, from os.fsdecode, and goes back to its bytes)."""
        return "CAST(f.name AS TEXT) GLOB CAST(? AS TEXT)", pattern.encode("utf-8", "surrogateescape")

    @property
    def where(self) -> str:
        return self.path

    def server_time(self, conn: sqlite3.Connection) -> float | None:
        """None: a file has no clock of its own (the nodes sharing one run on one machine)."""
        return None

    def tables(self, conn: sqlite3.Connection) -> set[str]:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def set_version_hint(self, version: int) -> str:
        return (f"if you know its version ({version} for this cloudmanagerd's own), set it: sqlite3 "
                f"{self.path} \"INSERT OR REPLACE INTO meta VALUES ('schema_version', '{version}')\"")

    def lock_schema(self, conn: sqlite3.Connection) -> None:
        """Nothing to do: tx() began with BEGIN IMMEDIATE, which already excludes every other writer."""

    def upgrade(self, conn: sqlite3.Connection, version: int) -> None:
        for step in MIGRATIONS[version:]:
            for statement in split_statements(step):
                conn.execute(statement)

    def health(self):
        from . import CatalogHealth
        return CatalogHealth(where=self.path, folder=os.path.dirname(self.path) or ".", damage=self.damage(),
                             hint=self.recovery_hint(), write_error=self.write_error,
                             disk_full=self.write_error_code == sqlite3.SQLITE_FULL)

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
            # SQLite checkpoints inside the COMMIT that crosses 1,000 pages, which would hold the write
            # gate (below) through the checkpoint's writes and fsyncs (76 ms seen): tx() runs them after
            conn.execute("PRAGMA wal_autocheckpoint=0")
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

    @staticmethod
    def busy_at_once(exc: BaseException, seconds: float) -> bool:
        """SQLite answered "locked" without waiting its busy timeout: it does so where waiting could
        deadlock (several connections opening a new file together switch it to WAL and create the
        schema: seen twice in loaded test runs, never reproduced alone), and the remedy it documents is to
        try again. A lock held for the whole busy timeout is a real one: reported."""
        return primary_code(exc) == sqlite3.SQLITE_BUSY and seconds < 1

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
        self._path_seen.refresh()  # the file just opened is the one the path names
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
        return self._path_seen.get()

    def _look_at_path(self) -> str | None:
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
        background = getattr(self._local, "relaxed", False)
        with self._gate.hold(background):
            before = conn.total_changes
            yield from self._tx(conn)
            self._unchecked += conn.total_changes - before
        # a checkpoint a reader held back is tried again after a few rows, as SQLite's own autocheckpoint
        # tried at every commit: waiting for the full count again let the WAL grow by it each time
        if self._unchecked >= (CHECKPOINT_ROWS // 16 if self._behind else CHECKPOINT_ROWS * (1 if background else 4)):
            self.checkpoint()

    def checkpoint(self, conn: sqlite3.Connection | None = None) -> None:
        """Copy the WAL's pages into the database, outside the write gate: PASSIVE neither waits for nor
        holds SQLite's write lock, so writers go on meanwhile (as with SQLite's own autocheckpoint,
        which this replaces). An upload thread runs it, unless the ingest goes on alone; a failure
        (a full disk) is reported to the health check, and the next one tries again."""
        self._unchecked = 0
        with contextlib.suppress(sqlite3.Error):
            busy, log, done = (conn or self.connection()).execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self._behind = done < log  # a reader still uses pages it would have overwritten

    def _tx(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
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
        # the rows this process wrote since its last checkpoint go into the database now: another
        # process keeps the file open (the daemon beside an API script or a restore), so closing is no
        # checkpoint, and a script writing less than CHECKPOINT_ROWS a run grew the WAL run after run
        conn = getattr(self._local, "conn", None) or next((c for _t, c in self._all), None)
        if conn is not None and (self._unchecked or self._behind):
            self.checkpoint(conn)
        with self._lock:
            for _thread, conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()

    # -- a bulk load (migrate-catalog) ------------------------------------------------------------

    def triggers(self, conn: sqlite3.Connection, tables: Sequence[str], enabled: bool) -> bool:
        """SQLite cannot switch triggers off, and needs not: its counter rows take a load's updates
        in place. False: the triggers keep the counters as the rows go in."""
        return False

    def set_counters(self, conn: sqlite3.Connection, counters: dict[str, int]) -> None:
        conn.execute("DELETE FROM counters")
        conn.executemany("INSERT INTO counters(name, value) VALUES (?, ?)",
                         [(name, value) for name, value in counters.items() if value])


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
