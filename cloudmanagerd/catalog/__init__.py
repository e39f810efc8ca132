"""The catalog: every SQL statement of cloudmanagerd lives in this package, written once here for
both engines; sqlite.py and postgres.py hold what differs (connections, DDL and migrations, the
dialect's few statements), chosen by the catalog URL's scheme.

Tables:
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
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from ..errors import Ambiguous, CloudManagerError, NotFound, StartupError
from ..exchange import Entry, Location
from ..urls import scrub
from . import sqlite as _sqlite
from .sqlite import SqliteDatabase

# SQLite's migrations, named here for the tests and benches that build old catalogs
MIGRATIONS, split_statements = _sqlite.MIGRATIONS, _sqlite.split_statements

SCHEMA_VERSION = 7

# What a catalog operation may raise when its database fails (a full disk, a damaged file, a server
# gone): the faces (daemon jobs, control socket, Python API) catch these, log one line and go on;
# the health check (Catalog.health) says what is wrong.
DB_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, psycopg.Error)

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# A node's clock further than this from the catalog server's is corrected in leases and heartbeats
# (below it, the error is smaller than a lease's slack and a test's made-up times stay exact).
CLOCK_TOLERANCE = 1.0


@dataclass(frozen=True)
class CatalogHealth:
    """What the daemon's health check needs to know about its catalog, whatever the engine."""
    where: str  # the file, or the server's URL without credentials
    folder: str | None  # the folder of a file catalog, whose disk the daemon watches; None for a server
    damage: str | None  # why the catalog can no longer be trusted (fatal), or None
    hint: str  # what to do about damage
    write_error: str | None  # the last failed write, until a write succeeds
    disk_full: bool  # that failed write said the disk is full
    unreachable: str | None = None  # the server cannot be reached (waited out, not fatal)


ACTIVE_STATES = ("queued", "active", "retrying")
EVICTION_PAGE = 500  # cache entries read per query by eviction_candidates


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


def node_state(heartbeat: float, stopped: float | None, now: float, lease: float) -> str:
    """up; down: silent longer than the lease; stopped: stopped cleanly (`now` on the server's clock)."""
    return "stopped" if stopped is not None else "up" if heartbeat > now - lease else "down"


IN_CHUNK = 500  # values per IN (...) list: well below SQLite's limit on a statement's parameters


def rows_in(conn: Any, sql: str, keys: Sequence[Any]) -> Iterator[Any]:
    """The rows of `sql`, whose `{marks}` is an IN list, for all of `keys`: run once per IN_CHUNK of them."""
    for i in range(0, len(keys), IN_CHUNK):
        chunk = keys[i:i + IN_CHUNK]
        yield from conn.execute(sql.replace("{marks}", ",".join("?" * len(chunk))), chunk)


def month_of(now: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(now))


class SchemaTooNew(StartupError):
    """The catalog was written by a newer cloudmanagerd (`restore` must not pass over such a snapshot
    for an older one: that would lose what it knows)."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


class Catalog:
    """The catalog of one node; `node` names this node's rows in a shared database.

    The SQL here is written once for both engines (`?` placeholders, explicit ON CONFLICT targets,
    qualified columns in DO UPDATE); what must differ is the backend's (`db`): its connections and
    transactions, DDL and migrations, name matching, the counters' read and the claim of due pairs."""

    def __init__(self, db: Any, node: str, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.node = node
        self.clock = clock
        # The catalog server's clock minus this node's: leases and heartbeats are written and compared
        # on the server's time, so that nodes whose clocks disagree (time sync broken on one machine)
        # neither take each other's live claims nor see each other down. 0 for SQLite (one machine).
        self.clock_offset = 0.0

    @classmethod
    def open(cls, url: str, node: str, create: bool = True, clock: Callable[[], float] = time.time) -> Catalog:
        """`create=False`: an empty database is refused, not given a new schema (a snapshot to restore
        must be a catalog: an empty one would install as a catalog that knows no file)."""
        for attempt in (1, 2, 3):
            if url.startswith("sqlite:///"):
                catalog = cls(SqliteDatabase(url[len("sqlite:///"):]), node, clock)
            elif url.lower().startswith(POSTGRES_SCHEMES):
                from .postgres import PostgresDatabase  # only a PostgreSQL catalog needs the pool
                catalog = cls(PostgresDatabase(url), node, clock)
            else:
                raise StartupError(f"catalog {scrub(url)}: not a sqlite:/// or postgresql:// URL")
            began = time.monotonic()
            try:
                # A damaged file must stop the start, not be run on: it would fail `ls` and every
                # ingest for ever while saying "running" (issue 10).
                damage = catalog.db.check()
                if damage:
                    raise StartupError(f"catalog {catalog.db.where} is damaged ({damage}): "
                                       f"{catalog.db.recovery_hint()}")
                catalog.migrate(create)
                catalog.sync_clock()
            except DB_ERRORS as exc:
                catalog.close()
                if attempt < 3 and catalog.db.busy_at_once(exc, time.monotonic() - began):
                    time.sleep(0.05 * attempt)
                    continue
                raise StartupError(catalog.db.explain(exc)) from None
            except BaseException:
                catalog.close()
                raise
            return catalog
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        self.db.close()

    def health(self) -> CatalogHealth:
        """The catalog's state for the health check: damage (fatal), a failed write or an unreachable
        server (waited out), in words that name the file or the server (never its password)."""
        return self.db.health()

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
        """The catalog's schema version; 0 for a new, empty database. One whose version cannot be told
        is refused (StartupError): migrating it from 0 would fail half-way or damage it."""
        conn = self.db.connection()
        tables = self.db.tables(conn)
        where = self.db.where
        if "meta" not in tables:
            if not tables:
                return 0
            raise StartupError(f"catalog {where} has tables but no meta table: it is damaged or not a "
                               f"cloudmanagerd catalog; {self.db.recovery_hint()}")
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        set_it = self.db.set_version_hint(SCHEMA_VERSION)
        if row is None:
            raise StartupError(f"catalog {where}: its meta table has no schema_version row; "
                               f"{set_it}, or {self.db.recovery_hint()}")
        try:
            return int(row[0])
        except (TypeError, ValueError):
            raise StartupError(f"catalog {where}: schema_version is {row[0]!r}, not a number; "
                               f"{set_it}, or {self.db.recovery_hint()}") from None

    def migrate(self, create: bool = True) -> None:
        """Create or upgrade the schema, in one transaction that holds the backend's schema lock: nodes
        starting together on one server do not race (the second finds the work done)."""
        with self.db.tx() as conn:
            self.db.lock_schema(conn)
            version = self.schema_version()
            if version == 0 and not create:
                raise StartupError(f"catalog {self.db.where} is an empty database, not a cloudmanagerd catalog")
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"catalog {self.db.where}: schema version {version} is newer than this cloudmanagerd "
                    f"understands ({SCHEMA_VERSION}); upgrade cloudmanagerd", version)
            self.db.upgrade(conn, version)
            conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(SCHEMA_VERSION),))

    def sync_clock(self) -> float:
        """Measure this node's clock against the catalog server's (at open and each heartbeat); the
        offset found (0 for a catalog without a clock of its own)."""
        conn = self.db.connection()  # before the clock starts: waiting for a pooled connection is no offset
        before = self.clock()
        server = self.db.server_time(conn)
        after = self.clock()
        if server is None:
            return 0.0
        if after - before > CLOCK_TOLERANCE / 2:
            # a slow answer (a loaded machine or server) cannot tell an offset this small: the midpoint
            # could be off by more than the tolerance, and a wrong correction hands leases in flight
            # to other nodes; keep the last measure
            return self.clock_offset
        offset = server - (before + after) / 2
        self.clock_offset = offset if abs(offset) >= CLOCK_TOLERANCE else 0.0
        return offset

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
        # in hash order: two nodes registering the same content at once (the same files dropped on
        # both) must lock the rows in one order, or each would wait on the other's (a deadlock)
        records = sorted(records, key=lambda r: (r.hash, r.name))
        hashes = sorted({r.hash for r in records})
        # a statement per step for the whole batch, not per file: on a server each statement is a
        # round trip (executemany pipelines its rows), and a batch of files cost 4 per file
        with self.db.tx() as conn:
            known = {h for (h,) in rows_in(conn, "SELECT hash FROM files WHERE hash IN ({marks})", hashes)}
            first = {r.hash: r for r in reversed(records)}  # the first name of each new content
            new = [h for h in hashes if h not in known]
            # ON CONFLICT DO NOTHING: another node may have registered the same content meanwhile
            conn.executemany("INSERT INTO files(hash, name, size, added) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             [(h, first[h].name, first[h].size, now) for h in new])
            conn.executemany(
                "INSERT INTO cache_entries(hash, node, size, last_used) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(hash, node) DO UPDATE SET last_used=excluded.last_used",
                [(h, self.node, first[h].size, now) for h in hashes])
            conn.executemany(
                "INSERT INTO uploads(hash, remote, state, next_attempt, updated) "
                "VALUES (?, ?, 'queued', ?, ?) ON CONFLICT DO NOTHING",
                [(h, remote, now, now) for h in new for remote in remotes])
            conn.executemany("DELETE FROM ingests WHERE node=? AND hash=? AND name=?",
                             [(self.node, r.hash, r.name) for r in records])
            self._add_transfer(conn, month_of(now), incoming=sum(r.size for r in records))
        return new

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
        return self._counters(self.db.connection(), "name=?", f"cache_bytes:{self.node}").get(
            f"cache_bytes:{self.node}", 0)

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
        need, skipped = max(min_copies, 1), 0
        after: tuple[float, str] = (float("-inf"), "")
        while True:
            # pages in (last_used, hash) order: a server's rows come to the client whole, so one
            # query for the whole LRU would load a million rows to evict a few
            rows = self.db.connection().execute(
                # only verified copies count: a location imported from another node (verified NULL) is a
                # claim, and a file whose only copies are claims would be lost with its cache object
                "SELECT c.hash, c.size, (SELECT COUNT(*) FROM copies k WHERE k.hash=c.hash AND k.bad=0 "
                "AND k.verified IS NOT NULL), c.last_used "
                "FROM cache_entries c JOIN files f ON f.hash=c.hash "
                "WHERE c.node=? AND c.evicting=0 AND f.pinned=0 AND f.removing=0 "
                "AND (c.last_used > ? OR (c.last_used = ? AND c.hash > ?)) ORDER BY c.last_used, c.hash LIMIT ?",
                (self.node, after[0], after[0], after[1], EVICTION_PAGE)).fetchall()
            for h, size, good, _ in rows:
                if good >= need:
                    yield h, size
                else:
                    skipped += 1
                    if skipped >= scan_limit:
                        return
            if len(rows) < EVICTION_PAGE:
                return
            after = (rows[-1][3], rows[-1][0])

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
                "ON CONFLICT(hash, node) DO UPDATE SET last_used=excluded.last_used, evicting=0",
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
                "ON CONFLICT(remote) DO UPDATE SET errors=remote_stats.errors+1, last_error=excluded.last_error, "
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
                "ON CONFLICT(hash, remote) DO UPDATE SET state='queued', attempts=0, "
                "next_attempt=excluded.next_attempt, "
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
        now += self.clock_offset
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
        """claim_due's work inside the caller's transaction."""
        owner = owner or self.node
        due = now if due_by is None else due_by
        now += self.clock_offset  # leases are on the server's clock (next_attempt stays on this node's)
        skip = ",".join("?" * len(skip_remotes))
        skip_sql = f"AND u.remote NOT IN ({skip}) " if skip_remotes else ""
        only_sql = ("" if remote is None else "AND u.remote=? ") + ("" if max_size is None else "AND f.size<=? ")
        only = [v for v in (remote, max_size) if v is not None]
        # Which pairs: due ones in `states`, and pairs another node claimed whose lease ran out (it died
        # or was cut off: its claims go to whoever can send them). This node's own stale claims are
        # refresh_claims' (it alone knows what this node still has in flight).
        branches = [("u.state=? AND u.next_attempt <= ?", (state, due)) for state in states]
        if "queued" in states or "retrying" in states:
            branches.append(("u.state='active' AND u.lease_expiry < ? AND u.claim_owner <> ? "
                             "AND substr(u.claim_owner, 1, ?) <> ?",
                             (now, self.node, len(self.node) + 1, self.node + "/")))
        here = "EXISTS (SELECT 1 FROM cache_entries c WHERE c.hash=u.hash AND c.node=?)"
        # Pass 1: pairs whose file is in this node's cache (no fetch needed); pass 2, only when that did
        # not fill `limit`: the others, except files cached on another node that no remote holds yet
        # (only that node has their bytes: it sends them).
        passes = [(f"AND {here}", (self.node,)),
                  (f"AND NOT {here} AND (f.good > 0 OR NOT EXISTS (SELECT 1 FROM cache_entries o "
                   "WHERE o.hash=u.hash AND o.node <> ?))", (self.node, self.node))]
        rows: list[tuple[str, str, int, int]] = []
        for pass_sql, pass_args in passes:
            found: list[tuple[Any, ...]] = []
            # one indexed walk in next_attempt order per branch, merged here: `state IN (...) ORDER BY`
            # would read and sort every due pair (10,000 after a large drop) in each claim, holding
            # the write lock (and PostgreSQL's FOR UPDATE does not go with UNION)
            for cond, cond_args in branches:
                found += conn.execute(
                    "SELECT u.hash, u.remote, u.attempts, f.size, u.next_attempt "
                    f"FROM uploads u JOIN files f ON f.hash=u.hash WHERE {cond} AND f.removing=0 "
                    f"{skip_sql}{only_sql}{pass_sql} ORDER BY u.next_attempt LIMIT ? {self.db.claim_lock}",
                    (*cond_args, *skip_remotes, *only, *pass_args, limit - len(rows))).fetchall()
            found.sort(key=lambda row: row[4])
            rows += [tuple(row[:4]) for row in found[:limit - len(rows)]]
            if len(rows) >= limit:
                break
        conn.executemany(
            "UPDATE uploads SET state='active', claim_owner=?, lease_expiry=?, updated=? "
            "WHERE hash=? AND remote=?",
            [(owner, now + lease, now, h, r) for h, r, _, _ in rows])
        return [UploadClaim(h, r, a, s) for h, r, a, s in rows]

    def next_due_time(self) -> float | None:
        row = self.db.connection().execute(
            "SELECT MIN(next_attempt) FROM uploads WHERE state IN ('queued', 'retrying')").fetchone()
        return row[0]

    def upload_done(self, h: str, remote: str, url: str, size: int, redundancy: int, now: float) -> list[float]:
        """Record a verified copy; once the file has its copies, cancel its other pending pairs. Returns
        when each good copy of the file was last proven, as this commit left them (see uploads_done)."""
        return self.uploads_done([(h, remote, url, size)], redundancy, now)[h]

    def uploads_done(self, copies: Sequence[tuple[str, str, str, int]], redundancy: int,
                     now: float) -> dict[str, list[float]]:
        """Record verified copies (hash, remote, url, size), all in one transaction (a batch's). Returns,
        for each file, when each of its good copies was last proven (recorded or verified), read in
        the same transaction: the file-safe line needs them, and a read per copy afterwards cost as
        much as recording it (and could see copies other threads recorded since)."""
        # in hash order: each copy's trigger updates its file's row, and two nodes recording copies of
        # the same files in different orders would deadlock on those rows (PostgreSQL aborts one)
        copies = sorted(copies)
        with self.db.tx() as conn:
            conn.executemany(
                "INSERT INTO copies(hash, remote, url, created, verified) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(hash, remote) DO UPDATE SET url=excluded.url, verified=excluded.verified, bad=0",
                [(h, remote, url, now, now) for h, remote, url, _ in copies])
            conn.executemany(
                "UPDATE uploads SET state='done', last_error=NULL, claim_owner=NULL, lease_expiry=NULL, "
                "updated=? WHERE hash=? AND remote=?", [(now, h, remote) for h, remote, _, _ in copies])
            hashes = sorted({h for h, *_ in copies})
            proven: dict[str, list[float]] = {h: [] for h in hashes}
            for h, when in rows_in(conn, "SELECT hash, COALESCE(verified, created) FROM copies "
                                   "WHERE hash IN ({marks}) AND bad=0", hashes):
                proven[h].append(when)
            # given-up pairs go too once a file has its copies: `retry` must not over-copy
            conn.executemany("DELETE FROM uploads WHERE hash=? AND state IN ('queued', 'retrying', 'failed')",
                             [(h,) for h, times in proven.items() if len(times) >= redundancy])
            for remote, count in collections.Counter(remote for _, remote, _, _ in copies).items():
                conn.execute(
                    "INSERT INTO remote_stats(remote, successes) VALUES (?, ?) "
                    "ON CONFLICT(remote) DO UPDATE SET successes=remote_stats.successes+excluded.successes",
                    (remote, count))
            self._add_transfer(conn, month_of(now), outgoing=sum(size for *_, size in copies))
        return proven

    def upload_failed(self, h: str, remote: str, error: str, next_attempt: float | None, now: float,
                      charge: bool = True) -> None:
        """A failed attempt: retry at `next_attempt`, or give the pair up when it is None. `charge`
        counts it against the remote (not when the local copy was at fault)."""
        state = "failed" if next_attempt is None else "retrying"
        with self.db.tx() as conn:
            # a node whose lease ran out while it sent must not undo the claim another node has made
            # since (this node's own claims are its daemon's or its API scripts', node/api/pid), nor
            # the copy that node has recorded meanwhile ('done': queued again, it would be sent twice)
            conn.execute(
                "UPDATE uploads SET state=?, attempts=attempts+1, next_attempt=?, last_error=?, "
                "claim_owner=NULL, lease_expiry=NULL, updated=? WHERE hash=? AND remote=? AND state <> 'done' "
                "AND (state <> 'active' OR claim_owner IS NULL OR claim_owner=? OR substr(claim_owner, 1, ?)=?)",
                (state, next_attempt if next_attempt is not None else now, error, now, h, remote,
                 self.node, len(self.node) + 1, self.node + "/"))
            if charge:
                conn.execute(
                    "INSERT INTO remote_stats(remote, errors, last_error, last_error_at) VALUES (?, 1, ?, ?) "
                    "ON CONFLICT(remote) DO UPDATE SET errors=remote_stats.errors+1, last_error=excluded.last_error, "
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
            counters = self._counters(conn, "name >= 'copies:' AND name < 'copies;'")
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

    def _counters(self, conn, where: str = "", *args: Any) -> dict[str, int]:
        """Trigger-kept counters by name (the backend sums its shards, if it has any)."""
        sql = self.db.counters_sql
        if where:
            sql = sql.replace("FROM counters", f"FROM counters WHERE {where}")
        return {name: int(value) for name, value in conn.execute(sql, args).fetchall()}

    def counts(self, min_redundancy: int, redundancy: int) -> dict[str, Any]:
        """Status figures from trigger-kept counters: constant time whatever the catalog's size,
        and few statements (each one lets other threads take the GIL: the tail of a status call)."""
        with self.db.read() as conn:
            c = self._counters(conn)
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
        return self.list_page(state, name_glob, None, limit)[0]

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
                                     "ON CONFLICT(hash, host_name) DO UPDATE SET url=excluded.url",
                                     (e.filehash, loc.host_name, loc.url))
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
            "ON CONFLICT(node, month) DO UPDATE SET incoming=transfer.incoming+excluded.incoming, "
            "outgoing=transfer.outgoing+excluded.outgoing",
            (self.node, month, incoming, outgoing))

    def add_transfer(self, now: float, incoming: int = 0, outgoing: int = 0) -> None:
        with self.db.tx() as conn:
            self._add_transfer(conn, month_of(now), incoming, outgoing)

    # -- several nodes on one catalog (issue 13): identity, remote places, the cluster's view --------

    def register_node(self, instance: str, seat: str, pid: int, host: str, now: float, lease: float
                      ) -> dict[str, Any] | None:
        """Take this node's name for the process `instance`: None when taken, else the row of the
        process that holds it (heartbeat fresher than `lease`, not stopped), which is left alone.
        `seat` says where a process runs (this boot of this machine, this state folder): a holder in
        the caller's own seat is gone, as the caller holds that state folder's lock.

        One conditional upsert, so that two processes starting at once under one name cannot both
        win (SQLite serialises the write; PostgreSQL locks the conflicting row)."""
        now += self.clock_offset
        with self.db.tx() as conn:
            taken = conn.execute(
                "INSERT INTO nodes(node, heartbeat, pid, host, instance, seat, started, stopped) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, NULL) "
                "ON CONFLICT(node) DO UPDATE SET heartbeat=excluded.heartbeat, pid=excluded.pid, "
                "host=excluded.host, instance=excluded.instance, seat=excluded.seat, started=excluded.started, "
                "stopped=NULL WHERE nodes.stopped IS NOT NULL OR nodes.heartbeat <= ? "
                "OR nodes.instance=excluded.instance OR nodes.seat=excluded.seat",
                (self.node, now, pid, host, instance, seat, now, now - lease)).rowcount
            if taken:
                return None
            row = conn.execute("SELECT heartbeat, pid, host, instance FROM nodes WHERE node=?",
                               (self.node,)).fetchone()
        return {"heartbeat": row[0], "pid": row[1], "host": row[2], "instance": row[3]}

    def heartbeat(self, instance: str, now: float) -> bool:
        """Renew this node's heartbeat; False when the name is no longer this process's (another
        process took it over after this one stayed silent longer than the lease)."""
        self.sync_clock()
        now += self.clock_offset
        with self.db.tx() as conn:
            return conn.execute("UPDATE nodes SET heartbeat=? WHERE node=? AND instance=? AND stopped IS NULL",
                                (now, self.node, instance)).rowcount == 1

    def node_stopped(self, instance: str, now: float) -> None:
        """A clean stop: the name is free at once, and `nodes` shows the node as stopped, not down."""
        now += self.clock_offset
        with self.db.tx() as conn:
            conn.execute("UPDATE nodes SET stopped=?, heartbeat=? WHERE node=? AND instance=?",
                         (now, now, self.node, instance))

    def release_node_name(self, now: float) -> int:
        """`restore`: the process that held this node's name in a snapshot ran on the lost disk; the name
        is free at once (a snapshot holds the name as taken, heartbeat fresh, and a daemon started on
        the restored catalog waited out cluster.lease for a process that no longer exists)."""
        with self.db.tx() as conn:
            return conn.execute("UPDATE nodes SET stopped=? WHERE node=? AND stopped IS NULL",
                                (now, self.node)).rowcount

    def check_remote_places(self, places: Mapping[str, str], accept: Collection[str], now: float,
                            exclusive: Collection[str] = ()) -> list[tuple[str, ...]]:
        """Compare each remote's place (name -> place) with the one recorded for that name; record the
        names seen for the first time, and those in `accept` (a change made on purpose). Returns the
        others that differ, as (name, recorded place, node that recorded it, this node's place); when
        any differ nothing is recorded.

        A name in `exclusive` whose place is recorded under another name (a remote renamed on one node)
        differs too, as (name, place, node, place, other name): its copies and the other name's would be
        one object counted as two copies. Accepting it drops the other name's record."""
        with self.db.tx() as conn:
            recorded = {name: (place, node) for name, place, node in conn.execute(
                "SELECT name, place, node FROM remote_places").fetchall()}
            wrong: list[tuple[str, ...]] = [
                (name, recorded[name][0], recorded[name][1], place) for name, place in places.items()
                if name in recorded and recorded[name][0] != place and name not in accept]
            aliases = [(name, other) for name, place in places.items() if name in exclusive
                       for other, (there, _) in recorded.items() if other != name and there == place]
            wrong += [(name, places[name], recorded[other][1], places[name], other)
                      for name, other in aliases if name not in accept]
            if not wrong:
                conn.executemany("DELETE FROM remote_places WHERE name=?", [(other,) for _, other in aliases])
                conn.executemany(
                    "INSERT INTO remote_places(name, place, node, recorded) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET place=excluded.place, node=excluded.node, "
                    "recorded=excluded.recorded",
                    [(name, place, self.node, now) for name, place in places.items()
                     if recorded.get(name, (None,))[0] != place])
        return wrong

    def remote_places(self) -> dict[str, str]:
        return dict(self.db.connection().execute("SELECT name, place FROM remote_places").fetchall())

    def nodes(self, now: float, lease: float) -> list[dict[str, Any]]:
        """Every node that ever ran on this catalog: its last heartbeat, state (up; down: silent longer
        than the lease; stopped: stopped cleanly), cache files and bytes, and the pending uploads it holds
        claims on (its API scripts' claims included). Heartbeats are on the server's clock."""
        now += self.clock_offset
        with self.db.read() as conn:
            rows = conn.execute("SELECT node, heartbeat, pid, host, started, stopped FROM nodes "
                                "ORDER BY node").fetchall()
            wanted = [f"cache_{kind}:{r[0]}" for r in rows for kind in ("files", "bytes")]
            counters = self._counters(conn, f"name IN ({','.join('?' * len(wanted))})", *wanted) if wanted else {}
            claims = conn.execute(
                "SELECT u.claim_owner, COUNT(*), COALESCE(SUM(f.size), 0) FROM uploads u "
                "JOIN files f ON f.hash=u.hash WHERE u.state='active' GROUP BY u.claim_owner").fetchall()
        held: dict[str, list[int]] = {}
        for owner, n, size in claims:
            account = held.setdefault(str(owner).split("/api/")[0], [0, 0])
            account[0] += n
            account[1] += size
        return [{"node": node, "host": host, "pid": pid, "heartbeat": heartbeat, "started": started,
                 "state": node_state(heartbeat, stopped, now, lease),
                 "cache_files": counters.get(f"cache_files:{node}", 0),
                 "cache_bytes": counters.get(f"cache_bytes:{node}", 0),
                 "claims": held.get(node, [0, 0])[0], "claims_bytes": held.get(node, [0, 0])[1]}
                for node, heartbeat, pid, host, started, stopped in rows]

    def node_states(self, now: float, lease: float) -> list[tuple[str, str]]:
        """(node, state) of every node, as `nodes()` says them, in one statement: for status, which
        needs neither the caches nor the claims that `nodes()` adds up."""
        now += self.clock_offset
        rows = self.db.connection().execute("SELECT node, heartbeat, stopped FROM nodes ORDER BY node").fetchall()
        return [(node, node_state(heartbeat, stopped, now, lease)) for node, heartbeat, stopped in rows]

    def cached_only_on(self, absent: Sequence[str], min_copies: int) -> tuple[int, int]:
        """(files, bytes) with fewer than `min_copies` good copies whose only cached copies are on the
        `absent` nodes: nobody can fetch them until one of those nodes runs again. Reads only the files
        below `min_copies` (files_good index) and only when some node is absent."""
        if not absent or min_copies <= 0:
            return 0, 0
        marks = ",".join("?" * len(absent))
        row = self.db.connection().execute(
            "SELECT COUNT(*), COALESCE(SUM(f.size), 0) FROM files f WHERE f.good < ? "
            f"AND EXISTS (SELECT 1 FROM cache_entries c WHERE c.hash=f.hash AND c.node IN ({marks})) "
            f"AND NOT EXISTS (SELECT 1 FROM cache_entries c WHERE c.hash=f.hash AND c.node NOT IN ({marks}))",
            (min_copies, *absent, *absent)).fetchone()
        return int(row[0]), int(row[1])

    def explain(self, exc: BaseException) -> str:
        """One line for a database error met outside the catalog's own start (naming the file or server)."""
        return self.db.explain(exc)

    # -- deep checks and waiting pairs (issue 14) ---------------------------------------------

    def copies_to_prove(self, limit: int, skip_remotes: Sequence[str] = ()) -> list[tuple[str, str, str, int]]:
        """(hash, remote, url, size) of good copies, the one proven by content longest ago first (a copy
        never read back counts from its creation: its upload hashed what it sent), none on `skip_remotes`."""
        skip = f"AND k.remote NOT IN ({','.join('?' * len(skip_remotes))}) " if skip_remotes else ""
        return [tuple(r) for r in self.db.connection().execute(
            "SELECT k.hash, k.remote, k.url, f.size FROM copies k JOIN files f ON f.hash=k.hash "
            f"WHERE k.bad=0 AND f.removing=0 {skip}ORDER BY COALESCE(k.proven, k.created) LIMIT ?",
            (*skip_remotes, limit))]

    def mark_copy_proven(self, h: str, remote: str, now: float) -> None:
        """The copy was read back and hashed to its name: proven, and so verified too."""
        with self.db.tx() as conn:
            conn.execute("UPDATE copies SET proven=?, verified=? WHERE hash=? AND remote=?", (now, now, h, remote))

    def wake_remote(self, remote: str, now: float) -> int:
        """A remote works again: its pairs waiting out a backoff are due now (their attempts still count
        toward upload.retry.max_attempts)."""
        with self.db.tx() as conn:
            return conn.execute(
                "UPDATE uploads SET next_attempt=?, updated=? "
                "WHERE remote=? AND state='retrying' AND next_attempt > ?", (now, now, remote, now)).rowcount

    def retry_waiting(self, hashes: Sequence[str] | None, now: float) -> int:
        """`retry`: pairs waiting out a backoff are due now (all of them when `hashes` is None)."""
        sql = ("UPDATE uploads SET state='queued', attempts=0, next_attempt=?, updated=? "
               "WHERE state='retrying' AND next_attempt > ?")
        with self.db.tx() as conn:
            if hashes is None:
                return conn.execute(sql, (now, now, now)).rowcount
            return sum(conn.execute(sql + " AND hash=?", (now, now, now, h)).rowcount for h in hashes)

    def count_retryable(self, hashes: Sequence[str] | None, now: float) -> tuple[int, int]:
        """`retry --dry-run`: (given-up pairs, pairs waiting out a backoff) that retry would requeue."""
        sql = ("SELECT COALESCE(SUM(CASE WHEN state='failed' THEN 1 ELSE 0 END), 0), "
               "COALESCE(SUM(CASE WHEN state='retrying' THEN 1 ELSE 0 END), 0) FROM uploads "
               "WHERE (state='failed' OR (state='retrying' AND next_attempt > ?))")
        with self.db.read() as conn:
            if hashes is None:
                row = conn.execute(sql, (now,)).fetchone()
                return int(row[0]), int(row[1])
            given_up = waiting = 0
            for h in dict.fromkeys(hashes):  # a hash named twice is requeued once
                row = conn.execute(sql + " AND hash=?", (now, h)).fetchone()
                given_up, waiting = given_up + int(row[0]), waiting + int(row[1])
            return given_up, waiting

    # -- for `status --check`, `info` and a paged `ls` (issue 15) ------------------------------

    def at_risk(self, min_redundancy: int, added_before: float, cap: int = 1000) -> tuple[int, float | None]:
        """(how many, oldest `added`) of the files below `min_redundancy` added before `added_before`
        that this node answers for: with a good copy, or cached here. A file known only from another
        node's export (no copy this node can read, no bytes here) is that node's to replicate, as in
        `under_replicated`. Reads the old rows below min_redundancy in index order (files_good):
        such foreign files are skipped one by one (about 1 s per million), so the daemon runs this
        in a job, not in every status; the count stops past `cap`."""
        count, oldest = 0, None
        with self.db.read() as conn:
            for good in range(max(min_redundancy, 0)):
                rows = conn.execute(
                    "SELECT f.added FROM files f WHERE f.good=? AND f.added<=? AND f.removing=0 "
                    "AND (f.good>0 OR EXISTS (SELECT 1 FROM cache_entries c WHERE c.hash=f.hash AND c.node=?)) "
                    "ORDER BY f.added LIMIT ?", (good, added_before, self.node, cap + 1 - count)).fetchall()
                if rows:
                    count += len(rows)
                    oldest = rows[0][0] if oldest is None else min(oldest, rows[0][0])
                if count > cap:
                    break
        return count, oldest

    def upload_pairs(self, h: str) -> list[dict[str, Any]]:
        """Every upload pair of a file not yet done: its state, stored attempts, next attempt and last error."""
        rows = self.db.connection().execute(
            "SELECT remote, state, attempts, next_attempt, last_error, updated FROM uploads "
            "WHERE hash=? AND state != 'done' ORDER BY remote", (h,)).fetchall()
        return [{"remote": r, "state": s, "attempts": a, "next_attempt": n if s in ("queued", "retrying") else None,
                 "last_error": e, "updated": u} for r, s, a, n, e, u in rows]

    def list_page(self, state: str | None, name_glob: str | None, after: tuple[float, str] | None,
                  limit: int | None) -> tuple[list[dict[str, Any]], tuple[float, str] | None]:
        """One page of files (newest first) after the file `after` = (added, hash) of the previous
        page, and the cursor of the next page (None at the end): a client pages through a million
        files without anyone holding them all. A file removed while it is read is left out."""
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
            sql, arg = self.db.name_glob(name_glob)
            where.append(sql)
            args.append(arg)
        if after is not None:
            # this form lets SQLite start at the cursor in index files_added (an OR around the
            # equality made it scan from the newest file on every page: quadratic)
            where.append("f.added <= ? AND (f.added < ? OR f.hash > ?)")
            args += [after[0], after[0], after[1]]
        sql = f"SELECT f.hash, f.added FROM files f WHERE {' AND '.join(where)} ORDER BY f.added DESC, f.hash"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self.db.read() as conn:
            rows = conn.execute(sql, args).fetchall()
            found = [info for info in (self._file_object(conn, h) for h, _ in rows) if info is not None]
        more = limit is not None and len(rows) == limit and limit > 0
        return found, (rows[-1][1], rows[-1][0]) if more else None

    def least_recently_checked(self) -> float | None:
        """When the cache object the scrub checks next was last known good: for one never checked
        since it came in (the scrub takes those first), when its file was added; else its last check.
        None with an empty cache. Two index lookups (cache_verified): no scan of the cache."""
        conn = self.db.connection()
        row = conn.execute(
            "SELECT f.added FROM cache_entries c JOIN files f ON f.hash=c.hash "
            "WHERE c.node=? AND c.verified IS NULL AND c.evicting=0 LIMIT 1", (self.node,)).fetchone()
        if row is not None:
            return row[0]
        return conn.execute("SELECT MIN(verified) FROM cache_entries WHERE node=? AND evicting=0",
                            (self.node,)).fetchone()[0]

    def metrics_figures(self) -> dict[str, Any]:
        """What the Prometheus metrics add to `counts`: upload pairs per remote and state (the pairs not
        done, through the uploads_due index: about 0.5 us a pair, so the caller spaces its calls), and
        how far the cache scrub got (the oldest re-hash time of this node's objects, and how many were
        never re-hashed)."""
        with self.db.read() as conn:
            uploads = {(remote, state): n for remote, state, n in conn.execute(
                "SELECT remote, state, COUNT(*) FROM uploads WHERE state IN ('queued', 'active', 'retrying', "
                "'failed') GROUP BY remote, state")}
            unverified = conn.execute("SELECT COUNT(*) FROM cache_entries WHERE node = ? AND verified IS NULL",
                                      (self.node,)).fetchone()[0]
            oldest = conn.execute("SELECT MIN(verified) FROM cache_entries WHERE node = ? AND verified IS NOT NULL",
                                  (self.node,)).fetchone()[0]
        return {"uploads": uploads, "cache_unverified": unverified, "cache_oldest_verified": oldest}

    # -- snapshots and restore after a lost disk (snapshots.py, restore.py; issue 14) ------------

    def change_marker(self) -> tuple[int, ...] | None:
        """Changes when anything was committed (the file's and its WAL's size and modification time:
        every commit writes the WAL, a checkpoint the file); None when it cannot tell (no file)."""
        path = getattr(self.db, "path", None)
        if not path:
            return None
        marker: list[int] = []
        for name in (path, path + "-wal"):
            try:
                st = os.stat(name)
            except FileNotFoundError:
                marker += [-1, -1]
            else:
                marker += [st.st_size, st.st_mtime_ns]
        return tuple(marker)

    def good_copies_on(self, remote: str) -> set[str]:
        """The hashes of every good copy recorded on `remote`."""
        return {h for (h,) in self.db.connection().execute(
            "SELECT hash FROM copies WHERE remote=? AND bad=0", (remote,))}

    def adopt_objects(self, remote: str, objects: Sequence[tuple[str, int, str]],
                      now: float) -> tuple[dict[str, int], list[str]]:
        """Objects (hash, size, url) found on `remote` that the catalog does not record there: an
        unknown hash becomes a file named by its hash (its bytes are verified at its first fetch, as
        every fetch's are), a known one gains the copy and its pending upload there is done. A size
        that contradicts the file's is not recorded ("conflicts"; their hashes are returned too). One
        transaction."""
        counts = {"files": 0, "copies": 0, "conflicts": 0}
        conflicted: list[str] = []
        with self.db.tx() as conn:
            for h, size, url in objects:
                row = conn.execute("SELECT size FROM files WHERE hash=?", (h,)).fetchone()
                if row is None:
                    conn.execute("INSERT INTO files(hash, name, size, added) VALUES (?, ?, ?, ?)",
                                 (h, h.encode(), size, now))
                    counts["files"] += 1
                elif row[0] != size:
                    counts["conflicts"] += 1
                    conflicted.append(h)
                    continue
                added = conn.execute("INSERT INTO copies(hash, remote, url, created) VALUES (?, ?, ?, ?) "
                                     "ON CONFLICT(hash, remote) DO NOTHING", (h, remote, url, now)).rowcount
                if added:
                    counts["copies"] += 1
                    conn.execute("UPDATE uploads SET state='done', last_error=NULL, claim_owner=NULL, "
                                 "lease_expiry=NULL, updated=? WHERE hash=? AND remote=?", (now, h, remote))
        return counts, conflicted

    def settle_size(self, h: str, size: int, remote: str, url: str, now: float) -> None:
        """A copy on `remote` was read back and hashes to `h` with `size` bytes, which the file's row
        contradicts: the row came from another remote's listing (restore adopts unknown objects by their
        listed size), whose copy cannot hold these bytes. The size is corrected, the copies recorded
        with the old one are bad (the self-heal copies the file again) and this one is recorded, proven."""
        with self.db.tx() as conn:
            conn.execute("UPDATE files SET size=? WHERE hash=?", (size, h))
            conn.execute("UPDATE copies SET bad=1 WHERE hash=? AND remote<>?", (h, remote))
            conn.execute("INSERT INTO copies(hash, remote, url, created, proven, verified) VALUES (?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT(hash, remote) DO UPDATE SET url=excluded.url, bad=0, proven=excluded.proven, "
                         "verified=excluded.verified", (h, remote, url, now, now, now))
            conn.execute("UPDATE uploads SET state='done', last_error=NULL, claim_owner=NULL, "
                         "lease_expiry=NULL, updated=? WHERE hash=? AND remote=?", (now, h, remote))

    def mark_copies_missing(self, remote: str, hashes: Sequence[str], error: str, now: float) -> int:
        """Recorded copies whose object is not on `remote`: bad (the self-heal copies their files again)."""
        with self.db.tx() as conn:
            changed = sum(conn.execute("UPDATE copies SET bad=1 WHERE hash=? AND remote=? AND bad=0",
                                       (h, remote)).rowcount for h in hashes)
            if changed:
                conn.execute(
                    "INSERT INTO remote_stats(remote, errors, last_error, last_error_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(remote) DO UPDATE SET errors=remote_stats.errors+excluded.errors, "
                    "last_error=excluded.last_error, last_error_at=excluded.last_error_at",
                    (remote, changed, error, now))
        return changed
