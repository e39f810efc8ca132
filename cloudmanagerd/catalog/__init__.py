"""The catalog: every SQL statement of cloudmanagerd lives in this module.

Tables (schema version 1):
- files: one row per content hash (name as raw bytes, size, added, pin, export bookkeeping).
- ingests: files in flight from the inbox to the cache, committed before the rename so
  that start-up can finish or undo whatever a crash interrupted.
- cache_entries: which node holds which file in its cache, and when it was last used.
- uploads: one row per (file, remote) pair: state, attempts, next attempt, last error,
  and a claim (owner node, lease expiry) so that several nodes never send the same pair.
- copies: where a file's copies live (remote, url), verified or marked bad.
- remote_stats: per-remote error counters that survive a restart.
- transfer: bytes in and out of each node, by month.
- nodes: heartbeats of the nodes sharing this catalog.
"""

from __future__ import annotations

import collections
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import Ambiguous, CloudManagerError, NotFound, StartupError
from ..exchange import Entry, Location
from .sqlite import SqliteDatabase

SCHEMA_VERSION = 5

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
]

ACTIVE_STATES = ("queued", "active", "retrying")


@dataclass(frozen=True)
class IngestRecord:
    hash: str
    name: bytes
    size: int


@dataclass(frozen=True)
class UploadClaim:
    hash: str
    remote: str
    attempts: int
    size: int


class ImportConflict(CloudManagerError):
    """An entry contradicts the catalog (the same hash with another size): the import takes nothing."""


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


def month_of(now: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(now))


class Catalog:
    """The catalog of one node; `node` names this node's rows in a shared database."""

    def __init__(self, db: SqliteDatabase, node: str) -> None:
        self.db = db
        self.node = node

    @classmethod
    def open(cls, url: str, node: str) -> Catalog:
        if url.startswith("sqlite:///"):
            catalog = cls(SqliteDatabase(url[len("sqlite:///"):]), node)
        else:
            raise StartupError(f"catalog: {url.split('@')[-1]}: PostgreSQL catalogs are not supported by this "
                               "version yet; use a sqlite:/// catalog")
        try:
            # A damaged file must stop the start, not be run on: it would fail `ls` and every
            # ingest for ever while saying "running" (issue 10).
            damage = catalog.db.check()
            if damage:
                raise StartupError(f"catalog {catalog.db.path} is damaged ({damage}): {catalog.db.recovery_hint()}")
            catalog.migrate()
        except sqlite3.Error as exc:
            catalog.close()
            raise StartupError(catalog.db.explain(exc)) from None
        except BaseException:
            catalog.close()
            raise
        return catalog

    def close(self) -> None:
        self.db.close()

    # -- connections: the callers say what they need, the database decides how --------------

    def relax_durability(self) -> None:
        """This thread's commits are cheap to lose (an upload's record only saves work): no fsync each."""
        self.db.relax_durability()

    def release_connection(self) -> None:
        """A short-lived thread (a control client's) is done with the catalog."""
        self.db.release()

    def backup_to(self, fd: int) -> int:
        """A consistent copy of the catalog, written to an open descriptor; its size."""
        return self.db.backup_to(fd)

    # -- schema ---------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The catalog's schema version; 0 for a new, empty file. A file whose version cannot be told
        is refused (StartupError): migrating it from 0 would fail half-way or damage it."""
        conn = self.db.connection()
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            if not tables:
                return 0
            raise StartupError(f"catalog {self.db.path} has tables but no meta table: it is damaged or not a "
                               f"cloudmanagerd catalog; {self.db.recovery_hint()}")
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        set_it = (f"if you know its version ({SCHEMA_VERSION} for this cloudmanagerd's own), set it: sqlite3 "
                  f"{self.db.path} \"INSERT OR REPLACE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}')\"")
        if row is None:
            raise StartupError(f"catalog {self.db.path}: its meta table has no schema_version row; "
                               f"{set_it}, or {self.db.recovery_hint()}")
        try:
            return int(row[0])
        except (TypeError, ValueError):
            raise StartupError(f"catalog {self.db.path}: schema_version is {row[0]!r}, not a number; "
                               f"{set_it}, or {self.db.recovery_hint()}") from None

    def migrate(self) -> None:
        with self.db.tx() as conn:
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise StartupError(
                    f"catalog {self.db.path}: schema version {version} is newer than this cloudmanagerd understands "
                    f"({SCHEMA_VERSION}); upgrade cloudmanagerd")
            for step in MIGRATIONS[version:]:
                for statement in split_statements(step):
                    conn.execute(statement)
            conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(SCHEMA_VERSION),))

    # -- ingest ---------------------------------------------------------------------------

    def begin_ingest(self, records: Sequence[IngestRecord], now: float) -> None:
        """Durably note the files about to leave the inbox, before any of them moves."""
        with self.db.tx() as conn:
            conn.executemany(
                "INSERT INTO ingests(node, hash, name, size, started) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [(self.node, r.hash, r.name, r.size, now) for r in records])

    def finish_ingest(self, records: Sequence[IngestRecord], remotes: Sequence[str], now: float) -> list[str]:
        """Register files whose objects are durably in the cache; returns the hashes that were new."""
        month = month_of(now)
        with self.db.tx() as conn:
            # a statement per kind of row for the whole batch, not four per file: ingest holds the
            # write lock while it runs, and uploads wait for it
            hashes = sorted({r.hash for r in records})
            known = {row[0] for i in range(0, len(hashes), 500) for row in conn.execute(
                f"SELECT hash FROM files WHERE hash IN ({','.join('?' * len(hashes[i:i + 500]))})",
                hashes[i:i + 500])}
            fresh = {r.hash: r for r in reversed(records) if r.hash not in known}  # the first name of each
            new = [r for r in records if fresh.get(r.hash) is r]
            conn.executemany(
                "INSERT INTO files(hash, name, size, added) VALUES (?, ?, ?, ?) ON CONFLICT(hash) DO NOTHING",
                [(r.hash, r.name, r.size, now) for r in new])
            conn.executemany(
                "INSERT INTO cache_entries(hash, node, size, last_used) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(hash, node) DO UPDATE SET last_used=excluded.last_used",
                [(r.hash, self.node, r.size, now) for r in records])
            conn.executemany(
                "INSERT INTO uploads(hash, remote, state, next_attempt, updated) "
                "VALUES (?, ?, 'queued', ?, ?) ON CONFLICT(hash, remote) DO NOTHING",
                [(r.hash, remote, now, now) for r in new for remote in remotes])
            conn.executemany("DELETE FROM ingests WHERE node=? AND hash=? AND name=?",
                             [(self.node, r.hash, r.name) for r in records])
            incoming = sum(r.size for r in records)
            self._add_transfer(conn, month, incoming=incoming)
        return [r.hash for r in new]

    def abandon_ingest(self, records: Iterable[IngestRecord]) -> None:
        with self.db.tx() as conn:
            conn.executemany("DELETE FROM ingests WHERE node=? AND hash=? AND name=?",
                             [(self.node, r.hash, r.name) for r in records])

    def pending_ingests(self) -> list[IngestRecord]:
        rows = self.db.connection().execute(
            "SELECT hash, name, size FROM ingests WHERE node=? ORDER BY started", (self.node,)).fetchall()
        return [IngestRecord(h, bytes(n), s) for h, n, s in rows]

    def cached_here(self, hashes: Iterable[str]) -> set[str]:
        hashes = list(hashes)
        if not hashes:
            return set()
        conn = self.db.connection()
        marks = ",".join("?" * len(hashes))
        rows = conn.execute(f"SELECT hash FROM cache_entries WHERE node=? AND hash IN ({marks})",
                            (self.node, *hashes)).fetchall()
        return {r[0] for r in rows}

    def cached_hashes_with_prefix(self, prefix: str) -> set[str]:
        """Cached hashes starting with a 2-digit cache folder name: one folder at a time keeps memory flat."""
        rows = self.db.connection().execute(
            "SELECT hash FROM cache_entries WHERE node=? AND hash >= ? AND hash < ?",
            (self.node, prefix, prefix + "g")).fetchall()
        return {r[0] for r in rows}

    def cache_usage(self) -> tuple[int, int]:
        """(bytes, files) in this node's cache."""
        row = self.db.connection().execute(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM cache_entries WHERE node=?", (self.node,)).fetchone()
        return int(row[0]), int(row[1])

    def cache_bytes(self) -> int:
        """Bytes in this node's cache, from the trigger-kept counter (constant time, as `status`): what
        every face on this node (the daemon, a script using the API) added and dropped, committed."""
        row = self.db.connection().execute("SELECT value FROM counters WHERE name=?",
                                           (f"cache_bytes:{self.node}",)).fetchone()
        return int(row[0]) if row else 0

    def forget_cache_entry(self, h: str) -> None:
        with self.db.tx() as conn:
            conn.execute("DELETE FROM cache_entries WHERE node=? AND hash=?", (self.node, h))

    def touch(self, h: str, now: float) -> None:
        with self.db.tx() as conn:
            conn.execute("UPDATE cache_entries SET last_used=? WHERE node=? AND hash=?", (now, self.node, h))

    # -- eviction, fetch-back, pins, removal ---------------------------------------------------

    def eviction_candidates(self, min_copies: int, scan_limit: int = 10_000) -> Iterator[tuple[str, int]]:
        """Cached, unpinned files with at least `min_copies` good, verified copies, least recently used first.

        Read lazily, in the order of the LRU index: the caller stops as soon as it has enough,
        so a typical decision reads a handful of rows even with a million cached files (a
        fixed LRU window of 10,000 rows cost ~0.5-1 s there, could never free more than those
        rows hold, and was filled for good by pinned files, which age to the front). Files
        still short of copies are skipped, at most `scan_limit` of them, so that the decision
        stays bounded when most of the cache cannot go yet. Close the iterator when done.
        """
        cursor = self.db.connection().execute(
            # only verified copies count: a location imported from another node (verified NULL) is a
            # claim, and a file whose only copies are claims would be lost with its cache object
            "SELECT c.hash, c.size, (SELECT COUNT(*) FROM copies k WHERE k.hash=c.hash AND k.bad=0 "
            "AND k.verified IS NOT NULL) "
            "FROM cache_entries c JOIN files f ON f.hash=c.hash "
            "WHERE c.node=? AND c.evicting=0 AND f.pinned=0 AND f.removing=0 ORDER BY c.last_used",
            (self.node,))
        need, skipped = max(min_copies, 1), 0
        try:
            for h, size, good in cursor:
                if good >= need:
                    yield h, size
                else:
                    skipped += 1
                    if skipped >= scan_limit:
                        return
        finally:
            cursor.close()

    def mark_evicting(self, hashes: Sequence[str]) -> None:
        with self.db.tx() as conn:
            conn.executemany("UPDATE cache_entries SET evicting=1 WHERE node=? AND hash=?",
                             [(self.node, h) for h in hashes])

    def drop_cache_entries(self, hashes: Sequence[str]) -> None:
        """The objects are gone from the cache: the catalog says so only now."""
        with self.db.tx() as conn:
            conn.executemany("DELETE FROM cache_entries WHERE node=? AND hash=?", [(self.node, h) for h in hashes])

    def evicting(self) -> list[tuple[str, int]]:
        return [(h, s) for h, s in self.db.connection().execute(
            "SELECT hash, size FROM cache_entries WHERE node=? AND evicting=1", (self.node,))]

    def unmark_evicting(self, hashes: Sequence[str]) -> None:
        with self.db.tx() as conn:
            conn.executemany("UPDATE cache_entries SET evicting=0 WHERE node=? AND hash=?",
                             [(self.node, h) for h in hashes])

    def add_cache_entry(self, h: str, size: int, now: float, incoming: int = 0) -> None:
        with self.db.tx() as conn:
            conn.execute(
                "INSERT INTO cache_entries(hash, node, size, last_used, verified) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET last_used=excluded.last_used, evicting=0",
                (h, self.node, size, now, now))
            self._add_transfer(conn, month_of(now), incoming=incoming)

    def good_copies(self, h: str) -> list[tuple[str, str]]:
        """(remote, url) of the file's good copies, the remotes with the best record first."""
        return [(r, u) for r, u in self.db.connection().execute(
            "SELECT k.remote, k.url FROM copies k LEFT JOIN remote_stats s ON s.remote=k.remote "
            "WHERE k.hash=? AND k.bad=0 "
            "ORDER BY COALESCE(s.successes, 0) - 4 * COALESCE(s.errors, 0) DESC, k.created", (h,))]

    def mark_copy_bad(self, h: str, remote: str, error: str, now: float) -> None:
        """A copy that is missing or holds other bytes: it no longer counts, and the remote is charged."""
        with self.db.tx() as conn:
            conn.execute("UPDATE copies SET bad=1 WHERE hash=? AND remote=?", (h, remote))
            conn.execute("DELETE FROM uploads WHERE hash=? AND remote=? AND state='done'", (h, remote))
            conn.execute(
                "INSERT INTO remote_stats(remote, errors, last_error, last_error_at) VALUES (?, 1, ?, ?) "
                "ON CONFLICT DO UPDATE SET errors=errors+1, last_error=excluded.last_error, "
                "last_error_at=excluded.last_error_at", (remote, error, now))

    def mark_copy_verified(self, h: str, remote: str, now: float) -> None:
        with self.db.tx() as conn:
            conn.execute("UPDATE copies SET verified=? WHERE hash=? AND remote=?", (now, h, remote))

    def replace_bad_copy(self, h: str, remote: str, now: float) -> None:
        """Queue a new upload to a remote whose copy went bad (the old record is dropped)."""
        with self.db.tx() as conn:
            conn.execute("DELETE FROM copies WHERE hash=? AND remote=? AND bad=1", (h, remote))
            conn.execute(
                "INSERT INTO uploads(hash, remote, state, next_attempt, updated) VALUES (?, ?, 'queued', ?, ?) "
                "ON CONFLICT DO UPDATE SET state='queued', attempts=0, next_attempt=excluded.next_attempt, "
                "updated=excluded.updated", (h, remote, now, now))

    def under_replicated(self, redundancy: int, limit: int = 1000) -> list[str]:
        """Files with fewer good copies than wanted and nothing queued to fix it (index on files.good)."""
        return [h for (h,) in self.db.connection().execute(
            "SELECT f.hash FROM files f WHERE f.good < ? AND f.removing=0 "
            "AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.hash=f.hash "
            "AND u.state IN ('queued', 'active', 'retrying')) "
            # a file known only from another node's export, with no copy this node can read and no
            # bytes here, is that node's to replicate: queuing it here would fail for ever
            "AND (f.good > 0 OR EXISTS (SELECT 1 FROM cache_entries c WHERE c.hash=f.hash AND c.node=?)) "
            "LIMIT ?", (redundancy, self.node, limit))]

    def set_pinned(self, h: str, pinned: bool) -> None:
        with self.db.tx() as conn:
            conn.execute("UPDATE files SET pinned=? WHERE hash=?", (int(pinned), h))

    def begin_remove(self, h: str) -> None:
        with self.db.tx() as conn:
            conn.execute("UPDATE files SET removing=1 WHERE hash=?", (h,))
            conn.execute("DELETE FROM uploads WHERE hash=? AND state != 'active'", (h,))

    def removing(self) -> list[str]:
        return [h for (h,) in self.db.connection().execute("SELECT hash FROM files WHERE removing=1")]

    def all_copies(self, h: str) -> list[tuple[str, str]]:
        return [(r, u) for r, u in self.db.connection().execute(
            "SELECT remote, url FROM copies WHERE hash=?", (h,))]

    def forget_copy(self, h: str, remote: str) -> None:
        with self.db.tx() as conn:
            conn.execute("DELETE FROM copies WHERE hash=? AND remote=?", (h, remote))

    def finish_remove(self, h: str) -> None:
        with self.db.tx() as conn:
            for table in ("uploads", "copies", "foreign_copies", "cache_entries", "ingests"):
                conn.execute(f"DELETE FROM {table} WHERE hash=?", (h,))
            conn.execute("DELETE FROM files WHERE hash=?", (h,))

    def scrub_candidates(self, limit: int) -> list[tuple[str, int]]:
        """Cache objects least recently checked first."""
        return [(h, s) for h, s in self.db.connection().execute(
            "SELECT hash, size FROM cache_entries WHERE node=? AND evicting=0 "
            "ORDER BY verified IS NOT NULL, verified LIMIT ?", (self.node, limit))]

    def mark_cache_verified(self, h: str, now: float) -> None:
        with self.db.tx() as conn:
            conn.execute("UPDATE cache_entries SET verified=? WHERE node=? AND hash=?", (now, self.node, h))

    def copies_to_check(self, limit: int) -> list[tuple[str, str, str, int]]:
        """(hash, remote, url, size) of good copies, least recently checked first."""
        return [tuple(r) for r in self.db.connection().execute(
            "SELECT k.hash, k.remote, k.url, f.size FROM copies k JOIN files f ON f.hash=k.hash "
            "WHERE k.bad=0 AND f.removing=0 ORDER BY k.verified IS NOT NULL, k.verified LIMIT ?", (limit,))]

    def cached_entries(self, after: str = "", limit: int = 1000) -> list[tuple[str, int]]:
        return [(h, s) for h, s in self.db.connection().execute(
            "SELECT hash, size FROM cache_entries WHERE node=? AND hash > ? ORDER BY hash LIMIT ?",
            (self.node, after, limit))]

    def file_size(self, h: str) -> int | None:
        row = self.db.connection().execute("SELECT size FROM files WHERE hash=?", (h,)).fetchone()
        return row[0] if row else None

    # -- uploads --------------------------------------------------------------------------

    def release_claims(self, now: float, owner: str | None = None) -> int:
        """Pairs this node (or `owner`) had in flight when it stopped go back to the queue."""
        with self.db.tx() as conn:
            return conn.execute(
                "UPDATE uploads SET state=CASE WHEN attempts > 0 THEN 'retrying' ELSE 'queued' END, "
                "claim_owner=NULL, lease_expiry=NULL, updated=? WHERE state='active' AND claim_owner=?",
                (now, owner or self.node)).rowcount

    def refresh_claims(self, now: float, lease: float, in_flight: Collection[tuple[str, str]]) -> int:
        """Renew the leases of the pairs this node is sending (`in_flight`), and queue again every other
        pair it holds as active whose lease expired, or lies further ahead than a lease can (the clock
        was set back). A pair in flight is never released: it would be sent twice at once."""
        with self.db.tx() as conn:
            conn.executemany(
                "UPDATE uploads SET lease_expiry=? WHERE hash=? AND remote=? AND state='active' AND claim_owner=?",
                [(now + lease, h, r, self.node) for h, r in in_flight])
            rows = conn.execute(
                "SELECT hash, remote FROM uploads WHERE state='active' AND claim_owner=? "
                "AND (lease_expiry IS NULL OR lease_expiry < ? OR lease_expiry > ?)",
                (self.node, now, now + lease)).fetchall()
            stale = [(h, r) for h, r in rows if (h, r) not in in_flight]
            conn.executemany(
                "UPDATE uploads SET state=CASE WHEN attempts > 0 THEN 'retrying' ELSE 'queued' END, "
                "claim_owner=NULL, lease_expiry=NULL, next_attempt=?, updated=? "
                "WHERE hash=? AND remote=? AND state='active' AND claim_owner=?",
                [(now, now, h, r, self.node) for h, r in stale])
        return len(stale)

    def claim_owners(self, prefix: str) -> list[str]:
        """The owners, starting with `prefix`, of pairs in flight."""
        return [o for (o,) in self.db.connection().execute(
            "SELECT DISTINCT claim_owner FROM uploads WHERE state='active' AND substr(claim_owner, 1, ?)=?",
            (len(prefix), prefix))]

    def claim_due(self, now: float, limit: int, lease: float, skip_remotes: Sequence[str] = (),
                  due_by: float | None = None, states: Sequence[str] = ("queued", "retrying"),
                  owner: str | None = None, remote: str | None = None,
                  max_size: int | None = None) -> list[UploadClaim]:
        """Take up to `limit` pairs due by `due_by` (default `now`) in `states`, oldest first; only
        those to `remote` and of files of at most `max_size` bytes when given (a batch's).

        `cloud_sync()` of the Python API passes an infinite `due_by` (every pending pair, backoff or
        not) and then only 'queued' (the spares that failures queued in the same round)."""
        if limit <= 0:
            return []
        with self.db.tx() as conn:
            return self._claim(conn, now, limit, lease, skip_remotes, due_by, states, owner, remote, max_size)

    def claim_batches(self, now: float, limit: int, lease: float, batchable: Collection[str], batch_files: int,
                      max_size: int, owner: str | None = None) -> list[list[UploadClaim]]:
        """The uploader's pump in one transaction: up to `limit` due pairs, oldest first, each made the
        head of a batch of up to `batch_files` pairs to its remote when that remote is `batchable` and
        the file at most `max_size` bytes (claimed in a second transaction, the batch cost a third of
        an upload's commits, and each waited for the write lock again)."""
        if limit <= 0:
            return []
        with self.db.tx() as conn:
            heads = self._claim(conn, now, limit, lease, owner=owner)
            return [[head] + (self._claim(conn, now, batch_files - 1, lease, owner=owner, remote=head.remote,
                                          max_size=max_size)
                              if head.remote in batchable and head.size <= max_size and batch_files > 1 else [])
                    for head in heads]

    def _claim(self, conn, now: float, limit: int, lease: float, skip_remotes: Sequence[str] = (),
               due_by: float | None = None, states: Sequence[str] = ("queued", "retrying"),
               owner: str | None = None, remote: str | None = None,
               max_size: int | None = None) -> list[UploadClaim]:
        skip = ",".join("?" * len(skip_remotes))
        skip_sql = f"AND u.remote NOT IN ({skip})" if skip_remotes else ""
        only_sql = ("" if remote is None else "AND u.remote=? ") + ("" if max_size is None else "AND f.size<=? ")
        only = [v for v in (remote, max_size) if v is not None]
        # one indexed walk in next_attempt order per state, merged: `state IN (...) ORDER BY` would read
        # and sort every due pair (10,000 after a large drop) in each claim, holding the write lock
        one_state = ("SELECT * FROM (SELECT u.hash, u.remote, u.attempts, f.size, u.next_attempt "
                     "FROM uploads u JOIN files f ON f.hash=u.hash WHERE u.state=? AND u.next_attempt <= ? "
                     f"AND f.removing=0 {skip_sql} {only_sql}ORDER BY u.next_attempt LIMIT ?)")
        params = [(state, now if due_by is None else due_by, *skip_remotes, *only, limit) for state in states]
        rows = [row[:4] for row in conn.execute(
            " UNION ALL ".join([one_state] * len(states)) + " ORDER BY 5 LIMIT ?",
            (*(v for p in params for v in p), limit)).fetchall()]
        conn.executemany(
            "UPDATE uploads SET state='active', claim_owner=?, lease_expiry=?, updated=? "
            "WHERE hash=? AND remote=?",
            [(owner or self.node, now + lease, now, h, r) for h, r, _, _ in rows])
        return [UploadClaim(h, r, a, s) for h, r, a, s in rows]

    def next_due_time(self) -> float | None:
        row = self.db.connection().execute(
            "SELECT MIN(next_attempt) FROM uploads WHERE state IN ('queued', 'retrying')").fetchone()
        return row[0]

    def upload_done(self, h: str, remote: str, url: str, size: int, redundancy: int, now: float) -> None:
        """Record a verified copy; once the file has its copies, cancel its other pending pairs."""
        self.uploads_done([(h, remote, url, size)], redundancy, now)

    def uploads_done(self, copies: Sequence[tuple[str, str, str, int]], redundancy: int, now: float) -> None:
        """Record verified copies (hash, remote, url, size), all in one transaction (a batch's)."""
        with self.db.tx() as conn:
            conn.executemany(
                "INSERT INTO copies(hash, remote, url, created, verified) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET url=excluded.url, verified=excluded.verified, bad=0",
                [(h, remote, url, now, now) for h, remote, url, _ in copies])
            conn.executemany(
                "UPDATE uploads SET state='done', last_error=NULL, claim_owner=NULL, lease_expiry=NULL, "
                "updated=? WHERE hash=? AND remote=?", [(now, h, remote) for h, remote, _, _ in copies])
            hashes = sorted({h for h, *_ in copies})
            complete = [row for i in range(0, len(hashes), 500) for row in conn.execute(
                f"SELECT hash FROM copies WHERE hash IN ({','.join('?' * len(hashes[i:i + 500]))}) AND bad=0 "
                "GROUP BY hash HAVING COUNT(*) >= ?", (*hashes[i:i + 500], redundancy))]
            # given-up pairs go too once a file has its copies: `retry` must not over-copy
            conn.executemany("DELETE FROM uploads WHERE hash=? AND state IN ('queued', 'retrying', 'failed')",
                             complete)
            for remote, count in collections.Counter(remote for _, remote, _, _ in copies).items():
                conn.execute(
                    "INSERT INTO remote_stats(remote, successes) VALUES (?, ?) "
                    "ON CONFLICT DO UPDATE SET successes=successes+excluded.successes", (remote, count))
            self._add_transfer(conn, month_of(now), outgoing=sum(size for *_, size in copies))

    def upload_failed(self, h: str, remote: str, error: str, next_attempt: float | None, now: float,
                      charge: bool = True) -> None:
        """A failed attempt: retry at `next_attempt`, or give the pair up when it is None. `charge`
        counts it against the remote (not when the local copy was at fault)."""
        state = "failed" if next_attempt is None else "retrying"
        with self.db.tx() as conn:
            conn.execute(
                "UPDATE uploads SET state=?, attempts=attempts+1, next_attempt=?, last_error=?, "
                "claim_owner=NULL, lease_expiry=NULL, updated=? WHERE hash=? AND remote=?",
                (state, next_attempt if next_attempt is not None else now, error, now, h, remote))
            if charge:
                conn.execute(
                    "INSERT INTO remote_stats(remote, errors, last_error, last_error_at) VALUES (?, 1, ?, ?) "
                    "ON CONFLICT DO UPDATE SET errors=errors+1, last_error=excluded.last_error, "
                    "last_error_at=excluded.last_error_at", (remote, error, now))

    def top_up(self, h: str, choose: Callable[[set[str], dict[str, str]], Sequence[str]], now: float) -> list[str]:
        """Queue the remotes that `choose(good copies, {remote: pair state})` picks for a file, in the
        transaction that read what it picks from. The policy is the upload stage's (uploads.choose_targets)."""
        with self.db.tx() as conn:
            pairs = dict(conn.execute("SELECT remote, state FROM uploads WHERE hash=?", (h,)).fetchall())
            good = {r for (r,) in conn.execute("SELECT remote FROM copies WHERE hash=? AND bad=0", (h,))}
            added = [r for r in choose(good, pairs) if r not in pairs and r not in good]
            conn.executemany(
                "INSERT INTO uploads(hash, remote, state, next_attempt, updated) VALUES (?, ?, 'queued', ?, ?)",
                [(h, remote, now, now) for remote in added])
        return added

    def give_up_uploads(self, h: str, error: str, now: float) -> int:
        """Give up a file's waiting uploads (its only copy is damaged); `retry` revives them."""
        with self.db.tx() as conn:
            return conn.execute(
                "UPDATE uploads SET state='failed', last_error=?, updated=? "
                "WHERE hash=? AND state IN ('queued', 'retrying')", (error, now, h)).rowcount

    def retry_failed(self, hashes: Sequence[str] | None, now: float) -> int:
        """Put given-up pairs back in the queue (all of them when `hashes` is None)."""
        with self.db.tx() as conn:
            if hashes is None:
                return conn.execute(
                    "UPDATE uploads SET state='queued', attempts=0, next_attempt=?, updated=? WHERE state='failed'",
                    (now, now)).rowcount
            return sum(conn.execute(
                "UPDATE uploads SET state='queued', attempts=0, next_attempt=?, updated=? "
                "WHERE state='failed' AND hash=?", (now, now, h)).rowcount for h in hashes)

    def remote_stats(self) -> dict[str, dict[str, Any]]:
        with self.db.read() as conn:
            counters = dict(conn.execute(
                "SELECT name, value FROM counters WHERE name >= 'copies:' AND name < 'copies;'").fetchall())
            return self._remote_stats(conn, counters)

    def _remote_stats(self, conn, counters: dict[str, int]) -> dict[str, dict[str, Any]]:
        """Errors per remote, and its good copies from the trigger-kept 'copies:<remote>' counters
        (migration 4): no scan of the copies table."""
        stats: dict[str, dict[str, Any]] = {}
        for remote, errors, last_error in conn.execute("SELECT remote, errors, last_error FROM remote_stats"):
            stats[remote] = {"errors": errors, "last_error": last_error, "copies": 0}
        for name, n in counters.items():
            if name.startswith("copies:"):
                stats.setdefault(name[len("copies:"):], {"errors": 0, "last_error": None})["copies"] = n
        return stats

    # -- queries for status, ls and info --------------------------------------------------

    def counts(self, min_redundancy: int, redundancy: int) -> dict[str, Any]:
        """Status figures from trigger-kept counters: constant time whatever the catalog's size,
        and few statements (each one lets other threads take the GIL: the tail of a status call)."""
        with self.db.read() as conn:
            c = dict(conn.execute("SELECT name, value FROM counters").fetchall())
            below_min = range(max(min_redundancy, 0))
            oldest = None
            for k in below_min:
                row = conn.execute("SELECT MIN(added) FROM files WHERE good=?", (k,)).fetchone()
                if row[0] is not None and (oldest is None or row[0] < oldest):
                    oldest = row[0]
            transfer = self._transfer_totals(conn, time.time())
            remotes = self._remote_stats(conn, c)
        return {
            "files": c.get("files", 0), "bytes": c.get("bytes", 0),
            "uploads": {s: c.get(f"uploads:{s}", 0) for s in ("queued", "active", "retrying", "failed", "done")},
            "queued_bytes": c.get("pending_bytes", 0), "copies": c.get("copies", 0),
            "below_min": sum(c.get(f"good:{k}", 0) for k in below_min),
            "below_min_bytes": sum(c.get(f"goodbytes:{k}", 0) for k in below_min),
            "oldest_below_min_added": oldest,
            "below_redundancy": sum(c.get(f"good:{k}", 0) for k in range(max(redundancy, 0))),
            "cache_bytes": c.get(f"cache_bytes:{self.node}", 0), "cache_files": c.get(f"cache_files:{self.node}", 0),
            **transfer,
            "remotes": remotes,
        }

    def resolve(self, prefix: str) -> str:
        """The one hash starting with `prefix` (6+ lowercase hex digits), or NotFound/Ambiguous."""
        rows = self.db.connection().execute(
            "SELECT hash FROM files WHERE hash >= ? AND hash < ? ORDER BY hash LIMIT 2",
            (prefix, prefix + "g")).fetchall()
        if not rows:
            raise NotFound(f"no file with hash {prefix}")
        if len(rows) > 1:
            raise Ambiguous(f"hash prefix {prefix} matches several files; give more digits")
        return rows[0][0]

    def list_files(self, state: str | None = None, name_glob: str | None = None,
                   limit: int | None = None) -> list[dict[str, Any]]:
        where, args = ["1=1"], []
        if state == "cached":
            where.append("EXISTS (SELECT 1 FROM cache_entries c WHERE c.hash=f.hash AND c.node=?)")
            args.append(self.node)
        elif state == "evicted":
            where.append("NOT EXISTS (SELECT 1 FROM cache_entries c WHERE c.hash=f.hash AND c.node=?)")
            args.append(self.node)
        elif state == "pending":
            where.append("EXISTS (SELECT 1 FROM uploads u WHERE u.hash=f.hash "
                         "AND u.state IN ('queued', 'active', 'retrying'))")
        elif state == "failed":
            where.append("EXISTS (SELECT 1 FROM uploads u WHERE u.hash=f.hash AND u.state='failed')")
        if name_glob is not None:
            # names are raw bytes; a non-UTF-8 pattern arrives with surrogate escapes (os.fsdecode)
            where.append("CAST(f.name AS TEXT) GLOB CAST(? AS TEXT)")
            args.append(name_glob.encode("utf-8", "surrogateescape"))
        sql = f"SELECT f.hash FROM files f WHERE {' AND '.join(where)} ORDER BY f.added DESC, f.hash"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self.db.read() as conn:
            hashes = [r[0] for r in conn.execute(sql, args).fetchall()]
            return [self._file_object(conn, h) for h in hashes]

    def file_info(self, h: str) -> dict[str, Any]:
        with self.db.read() as conn:
            info = self._file_object(conn, h)
        if info is None:
            raise NotFound(f"no file with hash {h}")
        return info

    def _file_object(self, conn, h: str) -> dict[str, Any] | None:
        row = conn.execute("SELECT name, size, added, pinned FROM files WHERE hash=?", (h,)).fetchone()
        if row is None:
            return None
        name, size, added, pinned = row
        cached = conn.execute("SELECT 1 FROM cache_entries WHERE hash=? AND node=?", (h, self.node)).fetchone()
        copies = conn.execute("SELECT remote, url FROM copies WHERE hash=? AND bad=0 ORDER BY created",
                              (h,)).fetchall()
        pairs = conn.execute("SELECT remote, state, last_error, attempts FROM uploads WHERE hash=? "
                             "AND state != 'done' ORDER BY remote", (h,)).fetchall()
        return {
            "hash": h, "name": bytes(name), "size": size, "added": added, "cached": cached is not None,
            "pinned": bool(pinned),
            "copies": [{"remote": r, "url": u} for r, u in copies],
            "pending": [r for r, s, _, _ in pairs if s in ACTIVE_STATES],
            "failed": [{"remote": r, "error": e, "attempts": a} for r, s, e, a in pairs if s == "failed"],
        }

    # -- the exchange with other nodes (format 0.2, exchange.py) ----------------------------

    def export_queue(self, min_copies: int, now: float, retry_after: float = 3600.0,
                     limit: int | None = None) -> Iterator[Entry]:
        """Files to offer other nodes, oldest first: they have `min_copies` good copies (so that their
        entry carries locations), no `data_load` confirmed them, and they were never offered or were
        offered `retry_after` seconds ago without a confirmation (the original's at-least-once)."""
        sql = ("SELECT hash, name, size, added FROM files WHERE confirmed=0 AND removing=0 AND good >= ? "
               "AND (exported IS NULL OR exported <= ?) ORDER BY added, hash")
        args: list[Any] = [max(min_copies, 1), now - retry_after]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self.db.read() as conn:
            rows = conn.execute(sql, args).fetchall()
            for h, name, size, added in rows:
                yield self._entry(conn, h, bytes(name), size, added)

    def export_queue_size(self, min_copies: int, now: float, retry_after: float = 3600.0) -> tuple[int, int]:
        row = self.db.connection().execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE confirmed=0 AND removing=0 AND good >= ? "
            "AND (exported IS NULL OR exported <= ?)", (max(min_copies, 1), now - retry_after)).fetchone()
        return int(row[0]), int(row[1])

    def entry(self, h: str) -> Entry | None:
        """One file as an exchange entry, whatever its export state."""
        with self.db.read() as conn:
            row = conn.execute("SELECT name, size, added FROM files WHERE hash=?", (h,)).fetchone()
            return None if row is None else self._entry(conn, h, bytes(row[0]), row[1], row[2])

    def _entry(self, conn, h: str, name: bytes, size: int, added: float) -> Entry:
        locations = [Location(r, u) for r, u in conn.execute(
            "SELECT remote, url FROM copies WHERE hash=? AND bad=0 ORDER BY created", (h,))]
        known = {loc.host_name for loc in locations}
        for (remote,) in conn.execute("SELECT remote FROM uploads WHERE hash=? AND state='failed' "
                                      "ORDER BY remote", (h,)):
            if remote not in known:
                locations.append(Location(remote))
                known.add(remote)
        for host, url in conn.execute("SELECT host_name, url FROM foreign_copies WHERE hash=? ORDER BY host_name",
                                      (h,)):
            if host not in known:
                locations.append(Location(host, url))
        return Entry(h, name, size, int(added), tuple(locations))

    def mark_exported(self, hashes: Sequence[str], now: float) -> None:
        with self.db.tx() as conn:
            conn.executemany("UPDATE files SET exported=? WHERE hash=?", [(now, h) for h in hashes])

    def import_entries(self, entries: Sequence[Entry], local_remotes: Iterable[str], source: str | None,
                       now: float) -> dict[str, int]:
        """Take another node's entries in one transaction: all of them or, on any conflict, none.

        Unknown files are registered (not cached here); the locations of known files are merged in.
        A location on a remote this node has becomes a copy (verified when fetched or scrubbed); one
        on another node's remote is kept for the next export only. Every file named is confirmed: it
        is never offered to other nodes again. A size that contradicts the catalog's is a conflict.
        """
        local = set(local_remotes)
        counts = {"files": 0, "new": 0, "copies": 0}
        with self.db.tx() as conn:
            for index, e in enumerate(entries):
                row = conn.execute("SELECT size FROM files WHERE hash=?", (e.filehash,)).fetchone()
                if row is not None and row[0] != e.filesize:
                    raise ImportConflict(f"entry {index}: {e.filehash[:12]} is known with size {row[0]}, "
                                         f"not {e.filesize}")
                if row is None:
                    conn.execute("INSERT INTO files(hash, name, size, added, confirmed, source) "
                                 "VALUES (?, ?, ?, ?, 1, ?)", (e.filehash, e.filename, e.filesize, e.datetime, source))
                    counts["new"] += 1
                else:
                    conn.execute("UPDATE files SET confirmed=1, source=COALESCE(?, source) WHERE hash=?",
                                 (source, e.filehash))
                counts["files"] += 1
                for loc in e.uploads:
                    if loc.error:
                        continue  # another node's failed attempt tells this one nothing it can use
                    if loc.host_name in local:
                        counts["copies"] += conn.execute(
                            "INSERT INTO copies(hash, remote, url, created) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT DO NOTHING", (e.filehash, loc.host_name, loc.url, now)).rowcount
                    else:
                        conn.execute("INSERT INTO foreign_copies(hash, host_name, url) VALUES (?, ?, ?) "
                                     "ON CONFLICT DO UPDATE SET url=excluded.url", (e.filehash, loc.host_name, loc.url))
        return counts

    _PENDING = ("FROM files f WHERE f.removing=0 AND EXISTS (SELECT 1 FROM uploads u WHERE u.hash=f.hash "
                "AND u.state IN ('queued', 'active', 'retrying'))")

    def pending_upload_size(self) -> tuple[int, int]:
        """(files, bytes) still waiting for copies."""
        row = self.db.connection().execute(f"SELECT COUNT(*), COALESCE(SUM(f.size), 0) {self._PENDING}").fetchone()
        return int(row[0]), int(row[1])

    def pending_upload_entries(self) -> list[Entry]:
        with self.db.read() as conn:
            rows = conn.execute(f"SELECT f.hash, f.name, f.size, f.added {self._PENDING} "
                                "ORDER BY f.added, f.hash").fetchall()
            return [self._entry(conn, h, bytes(n), s, a) for h, n, s, a in rows]

    def transfer_totals(self, now: float) -> dict[str, int]:
        return self._transfer_totals(self.db.connection(), now)

    def _transfer_totals(self, conn, now: float) -> dict[str, int]:
        """Bytes in and out of this node, all time and this calendar month (UTC)."""
        month = month_of(now)
        row = conn.execute(
            "SELECT COALESCE(SUM(incoming), 0), COALESCE(SUM(outgoing), 0), "
            "COALESCE(SUM(CASE WHEN month=? THEN incoming END), 0), "
            "COALESCE(SUM(CASE WHEN month=? THEN outgoing END), 0) FROM transfer WHERE node=?",
            (month, month, self.node)).fetchone()
        return {"total_incoming": row[0], "total_outgoing": row[1], "month_incoming": row[2],
                "month_outgoing": row[3]}

    def sync_cursor(self) -> int:
        row = self.db.connection().execute("SELECT value FROM meta WHERE key='last_known_block'").fetchone()
        return int(row[0]) if row else 0

    def set_sync_cursor(self, height: int) -> None:
        with self.db.tx() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES ('last_known_block', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(height),))

    # -- counters -------------------------------------------------------------------------

    def _add_transfer(self, conn, month: str, incoming: int = 0, outgoing: int = 0) -> None:
        if not incoming and not outgoing:
            return
        conn.execute(
            "INSERT INTO transfer(node, month, incoming, outgoing) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET incoming=incoming+excluded.incoming, outgoing=outgoing+excluded.outgoing",
            (self.node, month, incoming, outgoing))

    def add_transfer(self, now: float, incoming: int = 0, outgoing: int = 0) -> None:
        with self.db.tx() as conn:
            self._add_transfer(conn, month_of(now), incoming, outgoing)

    def heartbeat(self, pid: int, now: float) -> None:
        with self.db.tx() as conn:
            conn.execute("INSERT INTO nodes(node, heartbeat, pid) VALUES (?, ?, ?) "
                         "ON CONFLICT DO UPDATE SET heartbeat=excluded.heartbeat, pid=excluded.pid",
                         (self.node, now, pid))
