"""PostgreSQL catalogs: psycopg 3 with a connection pool, the schema in PostgreSQL's own DDL.

Several nodes share one such catalog. What differs from SQLite lives here: the DDL (DOUBLE
PRECISION times, BYTEA names, BIGINT sizes, hashes in the "C" collation so that prefix ranges
are byte ranges), counters kept by PL/pgSQL triggers in one row per server connection (summed
on read, so that nodes do not queue on one hot row), claims that skip the pairs another node
has locked, and an advisory lock around the schema's creation or upgrade.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import psycopg.adapt
import psycopg_pool

from ..errors import CloudManagerError, StartupError
from ..urls import safe_url, scrub

# How long a thread waits for a connection before the catalog counts as unreachable, and how long
# the first connection at start-up may take.
POOL_TIMEOUT = 15.0
# ...and once it is known to be unreachable: every thread (the upload pump, ingest, status) fails
# fast and comes back, instead of each waiting out POOL_TIMEOUT, which the health check would take
# for a stuck loop.
UNREACHABLE_TIMEOUT = 1.0
CONNECT_TIMEOUT = 10
POOL_SIZE = 16

# One number for pg_advisory_xact_lock: the schema's creation or upgrade, one node at a time.
SCHEMA_LOCK = 0x636D6401

# The current schema (version 5 of catalog/sqlite.py's MIGRATIONS), in one step: a PostgreSQL
# catalog starts at version 5. Later versions append a step (version it leads to, script).
SCHEMA_V5 = r"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (
    hash TEXT COLLATE "C" PRIMARY KEY,
    name BYTEA NOT NULL,
    size BIGINT NOT NULL,
    added DOUBLE PRECISION NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    removing INTEGER NOT NULL DEFAULT 0,
    exported DOUBLE PRECISION,
    confirmed INTEGER NOT NULL DEFAULT 0,
    good INTEGER NOT NULL DEFAULT 0,
    source TEXT
);
CREATE INDEX files_added ON files(added);
CREATE INDEX files_removing ON files(removing) WHERE removing=1;
CREATE INDEX files_good ON files(good, added);
CREATE INDEX files_export ON files(confirmed, exported);
CREATE TABLE ingests (
    node TEXT NOT NULL,
    hash TEXT COLLATE "C" NOT NULL,
    name BYTEA NOT NULL,
    size BIGINT NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node, hash, name)
);
CREATE TABLE cache_entries (
    hash TEXT COLLATE "C" NOT NULL REFERENCES files(hash),
    node TEXT NOT NULL,
    size BIGINT NOT NULL,
    last_used DOUBLE PRECISION NOT NULL,
    evicting INTEGER NOT NULL DEFAULT 0,
    verified DOUBLE PRECISION,
    PRIMARY KEY (hash, node)
);
CREATE INDEX cache_lru ON cache_entries(node, last_used);
CREATE INDEX cache_verified ON cache_entries(node, verified);
CREATE INDEX cache_node_hash ON cache_entries(node, hash);
CREATE TABLE uploads (
    hash TEXT COLLATE "C" NOT NULL REFERENCES files(hash),
    remote TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'active', 'retrying', 'failed', 'done')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    claim_owner TEXT,
    lease_expiry DOUBLE PRECISION,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hash, remote)
);
CREATE INDEX uploads_due ON uploads(state, next_attempt);
CREATE TABLE copies (
    hash TEXT COLLATE "C" NOT NULL REFERENCES files(hash),
    remote TEXT NOT NULL,
    url TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    verified DOUBLE PRECISION,
    bad INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hash, remote)
);
CREATE INDEX copies_verified ON copies(verified);
CREATE TABLE remote_stats (
    remote TEXT PRIMARY KEY,
    errors BIGINT NOT NULL DEFAULT 0,
    successes BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    last_error_at DOUBLE PRECISION
);
CREATE TABLE transfer (
    node TEXT NOT NULL,
    month TEXT NOT NULL,
    incoming BIGINT NOT NULL DEFAULT 0,
    outgoing BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (node, month)
);
CREATE TABLE nodes (
    node TEXT PRIMARY KEY,
    heartbeat DOUBLE PRECISION NOT NULL,
    pid INTEGER,
    info TEXT
);
CREATE TABLE foreign_copies (
    hash TEXT COLLATE "C" NOT NULL REFERENCES files(hash),
    host_name TEXT NOT NULL,
    url TEXT,
    PRIMARY KEY (hash, host_name)
);

-- The status counters. SQLite keeps one row per name; here every server connection (backend pid)
-- adds into its own row of each name, so that concurrent writers of several nodes never wait on
-- one another's counter rows; reads sum the rows (a few per name and connection). Rows of ended
-- connections are folded into shard 0 at each start (PostgresDatabase.upgrade).
CREATE TABLE counters (
    name TEXT COLLATE "C" NOT NULL,
    shard INTEGER NOT NULL,
    value BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (name, shard)
);

CREATE FUNCTION cm_count(names TEXT[], deltas BIGINT[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO counters(name, shard, value)
    SELECT n, pg_backend_pid(), SUM(d) FROM unnest(names, deltas) AS t(n, d) GROUP BY n HAVING SUM(d) <> 0
    ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value
$$;

-- Each trigger takes the old row's share away and adds the new row's (an update does both; the
-- sums per name make an unchanged share cost nothing).
CREATE FUNCTION cm_files() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n TEXT[] := '{}';
    d BIGINT[] := '{}';
BEGIN
    IF TG_OP <> 'INSERT' THEN
        n := n || ARRAY['files', 'bytes', 'good:' || OLD.good, 'goodbytes:' || OLD.good];
        d := d || ARRAY[-1, -OLD.size, -1, -OLD.size]::bigint[];
    END IF;
    IF TG_OP <> 'DELETE' THEN
        n := n || ARRAY['files', 'bytes', 'good:' || NEW.good, 'goodbytes:' || NEW.good];
        d := d || ARRAY[1, NEW.size, 1, NEW.size]::bigint[];
    END IF;
    PERFORM cm_count(n, d);
    RETURN NULL;
END $$;
CREATE TRIGGER files_count AFTER INSERT OR DELETE ON files FOR EACH ROW EXECUTE FUNCTION cm_files();
CREATE TRIGGER files_good AFTER UPDATE OF good ON files FOR EACH ROW
    WHEN (OLD.good IS DISTINCT FROM NEW.good) EXECUTE FUNCTION cm_files();

-- A good copy counts for its remote, for the total, and in its file's `good`.
CREATE FUNCTION cm_copies() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was INTEGER := 0;
    now_good INTEGER := 0;
    r TEXT;
    h TEXT;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        was := (OLD.bad = 0)::int; r := OLD.remote; h := OLD.hash;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        now_good := (NEW.bad = 0)::int; r := NEW.remote; h := NEW.hash;
    END IF;
    IF now_good <> was THEN
        UPDATE files SET good = good + now_good - was WHERE hash = h;
        PERFORM cm_count(ARRAY['copies', 'copies:' || r], ARRAY[now_good - was, now_good - was]::bigint[]);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER copies_count AFTER INSERT OR DELETE ON copies FOR EACH ROW EXECUTE FUNCTION cm_copies();
CREATE TRIGGER copies_bad AFTER UPDATE OF bad ON copies FOR EACH ROW
    WHEN (OLD.bad IS DISTINCT FROM NEW.bad) EXECUTE FUNCTION cm_copies();

-- Pairs by state, and the bytes still to send (a pair in a pending state counts its file's size).
CREATE FUNCTION cm_upload_share(st TEXT, h TEXT, sign INTEGER) RETURNS void LANGUAGE sql AS $$
    SELECT cm_count(ARRAY['uploads:' || st, 'pending_bytes'],
        ARRAY[sign, CASE WHEN st IN ('queued', 'active', 'retrying')
                    THEN sign * COALESCE((SELECT size FROM files WHERE hash = h), 0) ELSE 0 END]::bigint[])
$$;
CREATE FUNCTION cm_uploads() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM cm_upload_share(OLD.state, OLD.hash, -1);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM cm_upload_share(NEW.state, NEW.hash, 1);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER uploads_count AFTER INSERT OR DELETE ON uploads FOR EACH ROW EXECUTE FUNCTION cm_uploads();
CREATE TRIGGER uploads_state AFTER UPDATE OF state ON uploads FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION cm_uploads();

CREATE FUNCTION cm_cache() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM cm_count(ARRAY['cache_files:' || NEW.node, 'cache_bytes:' || NEW.node], ARRAY[1, NEW.size]::bigint[]);
    ELSE
        PERFORM cm_count(ARRAY['cache_files:' || OLD.node, 'cache_bytes:' || OLD.node], ARRAY[-1, -OLD.size]::bigint[]);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER cache_count AFTER INSERT OR DELETE ON cache_entries FOR EACH ROW EXECUTE FUNCTION cm_cache();
"""

# 6: several nodes on one catalog (issue 13): who holds a node's name, and each remote name's place
# (see catalog/sqlite.py's step 6).
SCHEMA_V6 = r"""
ALTER TABLE nodes ADD COLUMN instance TEXT;
ALTER TABLE nodes ADD COLUMN host TEXT;
ALTER TABLE nodes ADD COLUMN started DOUBLE PRECISION;
ALTER TABLE nodes ADD COLUMN stopped DOUBLE PRECISION;
ALTER TABLE nodes ADD COLUMN seat TEXT;
CREATE TABLE remote_places (
    name TEXT PRIMARY KEY,
    place TEXT NOT NULL,
    node TEXT NOT NULL,
    recorded DOUBLE PRECISION NOT NULL
);
"""

# 7: when each remote copy was last proven by its content (see catalog/sqlite.py's step 7).
SCHEMA_V7 = r"""
ALTER TABLE copies ADD COLUMN proven DOUBLE PRECISION;
CREATE INDEX copies_proven ON copies((COALESCE(proven, created)));
"""

MIGRATIONS: list[tuple[int, str]] = [(5, SCHEMA_V5), (6, SCHEMA_V6), (7, SCHEMA_V7)]

# Counter rows of connections that have ended, folded into shard 0 (under the schema lock).
FOLD_COUNTERS = """
WITH dead AS (
    DELETE FROM counters WHERE shard <> 0 AND shard NOT IN (SELECT pid FROM pg_stat_activity)
    RETURNING name, value
)
INSERT INTO counters(name, shard, value) SELECT name, 0, SUM(value) FROM dead GROUP BY name
ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value
"""


def _translate(sql: str, cache: dict[str, str] = {}) -> str:  # noqa: B006 (a deliberate memo)
    """The catalog's `?` placeholders in psycopg's `%s` style (a literal % doubled)."""
    out = cache.get(sql)
    if out is None:
        out = cache[sql] = sql.replace("%", "%%").replace("?", "%s")
    return out


class _IntNumeric(psycopg.adapt.Loader):
    """SUM() over BIGINT is NUMERIC in PostgreSQL: the catalog's sums are whole numbers, read as int
    (a Decimal would leak into status's JSON)."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        try:
            return int(text)
        except ValueError:
            return float(text)


def glob_regex(pattern: str) -> str:
    """SQLite's GLOB (`*`, `?`, `[...]`; `?` is one UTF-8 character) as a PostgreSQL regular
    expression over the name's bytes read as LATIN1 (one character per byte, whatever the bytes)."""
    raw = pattern.encode("utf-8", "surrogateescape").decode("latin-1")
    one_char = "(?:[\u00c2-\u00df][\u0080-\u00bf]|[\u00e0-\u00ef][\u0080-\u00bf]{2}|[\u00f0-\u00f4][\u0080-\u00bf]{3}|.)"
    out, i = ["^"], 0
    while i < len(raw):
        c = raw[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(one_char)
        elif c == "[":
            end = raw.find("]", i + 2)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = raw[i + 1:end]
                negate = body.startswith("^")
                body = body[1:] if negate else body
                body = "".join("\\" + ch if ch in "\\[]^" else ch for ch in body)
                out.append(f"[{'^' if negate else ''}{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return "".join(out)


class _Result:
    """A statement's rows, fetched: the connection may go back to the pool before they are read."""

    def __init__(self, cursor: psycopg.Cursor | None) -> None:
        self.rowcount = cursor.rowcount if cursor is not None else -1
        self._rows = cursor.fetchall() if cursor is not None and cursor.description is not None else []
        self._index = 0

    def fetchone(self) -> Any:
        if self._index >= len(self._rows):
            return None
        self._index += 1
        return self._rows[self._index - 1]

    def fetchall(self) -> list[Any]:
        rows, self._index = self._rows[self._index:], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        while self._index < len(self._rows):
            yield self.fetchone()

    def close(self) -> None:
        self._rows = []


class _Session:
    """What the catalog calls a connection: the thread's transaction when it holds one, else a
    connection borrowed from the pool for one statement."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        held = getattr(self.db._local, "conn", None)
        try:
            if held is not None:
                return _Result(held.execute(_translate(sql), tuple(params)))
            with self.db.pooled() as conn:
                return _Result(conn.execute(_translate(sql), tuple(params)))
        except psycopg.Error as exc:
            self.db.watch(exc)
            raise

    def executemany(self, sql: str, seq: Any) -> _Result:
        seq = [tuple(p) for p in seq]
        held = getattr(self.db._local, "conn", None)
        try:
            if held is None:
                with self.db.pooled() as conn:
                    with conn.cursor() as cur:
                        cur.executemany(_translate(sql), seq)
                        return _Result(None)
            with held.cursor() as cur:
                cur.executemany(_translate(sql), seq)
                return _Result(None)
        except psycopg.Error as exc:
            self.db.watch(exc)
            raise


class PostgresDatabase:
    """A pool of connections to one PostgreSQL database; writes go through `tx()`.

    Each transaction borrows a connection for its length (READ COMMITTED); a statement outside
    one borrows a connection for itself. The pool checks a connection before handing it out, so
    that after a server restart the dead ones are replaced, not handed to ingest."""

    dialect = "postgresql"
    counters_sql = "SELECT name, SUM(value) FROM counters GROUP BY name"
    # Rows another node is claiming are skipped, not waited for: each node takes different pairs.
    claim_lock = "FOR UPDATE OF u SKIP LOCKED"

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = safe_url(url)
        self._local = threading.local()
        self._session = _Session(self)
        self.write_error: str | None = None
        self.disk_full = False
        self.unreachable: str | None = None
        # one direct connection first: its error says why (a pool would only time out)
        try:
            psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT).close()
        except psycopg.Error as exc:
            raise StartupError(self.explain(exc)) from None
        self._revival = threading.Lock()
        self._next_probe = 0.0
        self.pool = self._new_pool()
        self.pool.open(wait=True, timeout=POOL_TIMEOUT)

    def _new_pool(self) -> psycopg_pool.ConnectionPool:
        return psycopg_pool.ConnectionPool(
            self.url, min_size=1, max_size=POOL_SIZE, timeout=POOL_TIMEOUT, open=False, configure=self._configure,
            check=psycopg_pool.ConnectionPool.check_connection, kwargs={"connect_timeout": CONNECT_TIMEOUT},
            # the pool's own threads (one worker that opens connections, its scheduler) are the only
            # ones a PostgreSQL catalog adds; close() ends them
            num_workers=1, name="catalog")

    def _revive(self) -> None:
        """While the server is unreachable, one direct connection a second; once one succeeds, a fresh
        pool. psycopg_pool retries a lost server with a doubling delay (1, 2, 4 ... s up to its
        reconnect_timeout of 5 min): after a 30 s outage its next try came 30 s or more after the
        server was back, and every node waited that long (tests/test_cluster_pg.py)."""
        now = time.monotonic()
        if now < self._next_probe or not self._revival.acquire(blocking=False):
            return
        try:
            self._next_probe = now + 1.0
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
            except psycopg.Error:
                return
            old, self.pool = self.pool, self._new_pool()
            self.pool.open(wait=False)
        finally:
            self._revival.release()
        old.close(timeout=1.0)  # connections still lent out are closed when they come back

    @staticmethod
    def _configure(conn: psycopg.Connection) -> None:
        conn.adapters.register_loader("numeric", _IntNumeric)

    # -- what differs from SQLite ---------------------------------------------------------------

    def name_glob(self, pattern: str) -> tuple[str, Any]:
        return "convert_from(f.name, 'LATIN1') ~ ?", glob_regex(pattern)

    def server_time(self, conn: _Session) -> float:
        return float(conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0])

    def tables(self, conn: _Session) -> set[str]:
        return {name for (name,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}

    def set_version_hint(self, version: int) -> str:
        return (f"if you know its version ({version} for this cloudmanagerd's own), set it: psql {self.where} -c "
                f"\"INSERT INTO meta VALUES ('schema_version', '{version}') ON CONFLICT (key) DO UPDATE SET "
                "value = excluded.value\"")

    def lock_schema(self, conn: _Session) -> None:
        """Nodes starting together: the first creates or upgrades the schema, the others wait here and
        then find it done."""
        conn.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))

    def upgrade(self, conn: _Session, version: int) -> None:
        steps = [(to, script) for to, script in MIGRATIONS if to > version]
        if 0 < version < MIGRATIONS[0][0]:
            raise StartupError(f"catalog {self.where}: schema version {version} was never a PostgreSQL "
                               f"catalog's; {self.recovery_hint()}")
        raw = self._local.conn
        for _to, script in steps:
            raw.execute(script)  # no parameters: the script's statements go in one simple query
        conn.execute(FOLD_COUNTERS)

    # -- health -----------------------------------------------------------------------------------

    def watch(self, exc: psycopg.Error) -> None:
        state = getattr(exc, "sqlstate", None)
        if isinstance(exc, psycopg_pool.PoolTimeout) or state is None or state.startswith(("08", "57P")):
            self.unreachable = scrub(str(exc)) or type(exc).__name__
        elif state in ("53100", "53200", "53300"):  # disk full, out of memory, too many connections
            self.write_error, self.disk_full = scrub(str(exc)), state == "53100"

    def health(self):
        from . import CatalogHealth
        return CatalogHealth(where=self.where, folder=None, damage=None, hint=self.recovery_hint(),
                             write_error=self.write_error, disk_full=self.disk_full, unreachable=self.unreachable)

    def recovery_hint(self) -> str:
        return f"restore {self.where} from a pg_dump backup (README: Catalog)"

    @staticmethod
    def busy_at_once(exc: BaseException, seconds: float) -> bool:
        """PostgreSQL waits for its locks (the schema's advisory lock included): nothing to try again."""
        return False

    def explain(self, exc: BaseException) -> str:
        first = scrub(str(exc)) or type(exc).__name__
        state = getattr(exc, "sqlstate", None)
        if state == "57014":  # psycopg counts a cancelled statement as "operational": the server was reached
            return (f"catalog {self.where}: a statement was cancelled ({first}): the server's statement_timeout "
                    "is too short for cloudmanagerd; unset it or raise it (ALTER ROLE ... SET statement_timeout)")
        if isinstance(exc, psycopg.OperationalError):
            return (f"catalog {self.where}: cannot connect ({first}); check that PostgreSQL runs there and "
                    "that the URL's host, port, database, user and password are right")
        return f"catalog {self.where}: {first}"

    def check(self) -> str | None:
        return None  # the server checks its own pages

    def damage(self) -> str | None:
        return None

    def relax_durability(self) -> None:
        """Nothing: the server's synchronous_commit is the operator's choice."""

    def release(self) -> None:
        """Nothing: pooled connections are not bound to threads."""

    def backup_to(self, fd: int) -> int:
        raise CloudManagerError(f"catalog {self.where} is a PostgreSQL database: back it up with pg_dump "
                                "(README: Catalog)")

    # -- connections and transactions --------------------------------------------------------

    def connection(self) -> _Session:
        return self._session

    def pooled(self) -> contextlib.AbstractContextManager[psycopg.Connection]:
        if self.unreachable:
            self._revive()
        return self.pool.connection(timeout=UNREACHABLE_TIMEOUT if self.unreachable else POOL_TIMEOUT)

    @contextlib.contextmanager
    def tx(self) -> Iterator[_Session]:
        """One transaction on one pooled connection: commit, or roll back on any error."""
        with self._transaction(None):
            yield self._session
        self.write_error, self.disk_full, self.unreachable = None, False, None

    @contextlib.contextmanager
    def read(self) -> Iterator[_Session]:
        """A consistent snapshot for several SELECTs (REPEATABLE READ: one snapshot for all of them)."""
        with self._transaction("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"):
            yield self._session
        self.unreachable = None

    @contextlib.contextmanager
    def _transaction(self, first: str | None) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:
            yield  # already in one (schema_version inside migrate)
            return
        try:
            with self.pooled() as conn:  # commits at the end, or rolls back on an exception
                if first:
                    conn.execute(first)
                self._local.conn = conn
                try:
                    yield
                finally:
                    self._local.conn = None
        except psycopg.Error as exc:
            self.watch(exc)
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pool.close()

    # -- a bulk load (migrate-catalog) ------------------------------------------------------------

    def triggers(self, conn: _Session, tables: Sequence[str], enabled: bool) -> bool:
        """Switch the tables' own triggers off or on for the rest of the transaction (the caller then
        sets the counters itself); True when switched. A bulk load needs it: every row's trigger
        updates the same counter row, and PostgreSQL cannot prune the versions of a row that one
        transaction updates again and again, so a load with them on takes quadratic time (12,000
        files: 5 minutes). Needs the tables' owner; the change is transactional."""
        for table in tables:
            conn.execute(f"ALTER TABLE {table} {'ENABLE' if enabled else 'DISABLE'} TRIGGER USER")
        return True

    def set_counters(self, conn: _Session, counters: dict[str, int]) -> None:
        """Replace every counter by the given values (in shard 0)."""
        conn.execute("DELETE FROM counters")
        conn.executemany("INSERT INTO counters(name, shard, value) VALUES (?, 0, ?)",
                         [(name, value) for name, value in counters.items() if value])
