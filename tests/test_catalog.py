"""The catalog on a real SQLite file: schema and migrations, the transaction helper, hash
prefixes, listing, the file object of SPEC, status counts and transfer counters.

Hashes here are fabricated 64-hex strings, so that prefixes can be made to collide.
"""

from __future__ import annotations

import calendar
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmanagerd.errors import StartupError

from cloudmanagerd.catalog import MIGRATIONS, SCHEMA_VERSION, Catalog, IngestRecord, month_of
from cloudmanagerd.catalog.sqlite import BUSY_TIMEOUT_MS
from cloudmanagerd.errors import Ambiguous, NotFound

T0 = 1_700_000_000.0


def fake_hash(prefix: str, fill: str = "0") -> str:
    return (prefix + fill * 64)[:64]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "catalog.db"


@pytest.fixture
def catalog(db_path: Path) -> Iterator[Catalog]:
    c = Catalog.open(f"sqlite:///{db_path}", "node1")
    yield c
    c.close()


def register(catalog: Catalog, h: str, name: bytes = b"f", size: int = 10, now: float = T0,
             remotes: tuple[str, ...] = ("r0", "r1")) -> None:
    record = IngestRecord(h, name, size)
    catalog.begin_ingest([record], now)
    catalog.finish_ingest([record], list(remotes), now)


@contextlib.contextmanager
def raw(db_path: Path, timeout: float = 5.0) -> Iterator[sqlite3.Connection]:
    """A separate connection to the same file, as another process would have; committed and closed."""
    conn = sqlite3.connect(db_path, timeout=timeout)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


# -- schema ------------------------------------------------------------------------------------

def test_a_fresh_catalog_is_migrated_to_the_current_schema(catalog: Catalog, db_path: Path) -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 1
    assert catalog.schema_version() == SCHEMA_VERSION
    with raw(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert {"meta", "files", "ingests", "cache_entries", "uploads", "copies", "remote_stats", "transfer",
            "nodes"} <= tables
    assert version == str(SCHEMA_VERSION)


def test_a_version_1_catalog_is_upgraded_in_place_keeping_its_data(db_path: Path) -> None:
    # the database the first release wrote: migration 1 only, one file with a copy
    h = fake_hash("0ld0ld")
    db_path.parent.mkdir(parents=True)
    with raw(db_path) as conn:
        for statement in MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
        conn.execute("INSERT INTO files(hash, name, size, added) VALUES (?, ?, 5, ?)", (h, b"old.txt", T0))
        conn.execute("INSERT INTO cache_entries(hash, node, size, last_used) VALUES (?, 'node1', 5, ?)", (h, T0))
        conn.execute("INSERT INTO copies(hash, remote, url, created) VALUES (?, 'r0', 'u', ?)", (h, T0))
    catalog = Catalog.open(f"sqlite:///{db_path}", "node1")
    try:
        assert catalog.schema_version() == SCHEMA_VERSION
        info = catalog.file_info(h)
        assert (info["name"], info["size"], info["cached"]) == (b"old.txt", 5, True)
        assert info["copies"] == [{"remote": "r0", "url": "u"}]
        register(catalog, fake_hash("new000"))  # and the upgraded schema takes new files
        assert len(catalog.list_files()) == 2
    finally:
        catalog.close()


def test_opening_again_is_idempotent_and_keeps_the_data(catalog: Catalog, db_path: Path) -> None:
    h = fake_hash("ab12cd")
    register(catalog, h, b"kept.txt")
    for _ in range(2):
        again = Catalog.open(f"sqlite:///{db_path}", "node1")
        try:
            assert again.schema_version() == SCHEMA_VERSION
            assert again.file_info(h)["name"] == b"kept.txt"
            again.migrate()
            assert again.schema_version() == SCHEMA_VERSION
        finally:
            again.close()
    with raw(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 1


def test_a_newer_schema_is_refused_with_a_clear_error(catalog: Catalog, db_path: Path) -> None:
    register(catalog, fake_hash("aaaaaa"))
    catalog.close()
    newer = SCHEMA_VERSION + 5
    with raw(db_path) as conn:
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(newer),))
    with pytest.raises(Exception) as info:
        Catalog.open(f"sqlite:///{db_path}", "node1")
    message = str(info.value)
    assert str(newer) in message and "newer" in message and "upgrade" in message
    assert "\n" not in message
    # and nothing was touched
    with raw(db_path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(newer)
        assert conn.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 1


def test_only_sqlite_urls_are_accepted_for_now(tmp_path: Path) -> None:
    # a one-line start-up error (no traceback) that says what to use instead
    with pytest.raises(StartupError, match="not supported .* use a sqlite:/// catalog"):
        Catalog.open("postgresql://localhost/cm", "node1")


# -- the transaction helper and connection settings ----------------------------------------------

def test_tx_commits_on_success(catalog: Catalog, db_path: Path) -> None:
    with catalog.db.tx() as conn:
        conn.execute("INSERT INTO meta(key, value) VALUES ('k', 'v')")
    with raw(db_path) as other:  # visible to another connection: committed
        assert other.execute("SELECT value FROM meta WHERE key='k'").fetchone() == ("v",)


def test_tx_rolls_back_on_an_exception(catalog: Catalog, db_path: Path) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with catalog.db.tx() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES ('k1', 'v')")
            conn.execute("INSERT INTO files(hash, name, size, added) VALUES ('x', x'00', 1, 0)")
            raise Boom()
    with raw(db_path) as other:
        assert other.execute("SELECT COUNT(*) FROM meta WHERE key='k1'").fetchone()[0] == 0
        assert other.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 0
    # the connection is usable afterwards: no transaction left open
    assert not catalog.db.connection().in_transaction
    with catalog.db.tx() as conn:
        conn.execute("INSERT INTO meta(key, value) VALUES ('k2', 'v')")
    with raw(db_path) as other:
        assert other.execute("SELECT COUNT(*) FROM meta WHERE key='k2'").fetchone()[0] == 1


def test_a_failing_statement_rolls_back_the_whole_batch(catalog: Catalog) -> None:
    h = fake_hash("bbbbbb")
    good = IngestRecord(h, b"good", 1)
    with pytest.raises(sqlite3.Error):
        with catalog.db.tx() as conn:
            conn.execute("INSERT INTO files(hash, name, size, added) VALUES (?, ?, 1, 0)", (h, b"good"))
            conn.execute("INSERT INTO files(hash, name, size, added) VALUES (?, ?, 1, 0)", (h, b"dup"))
    with pytest.raises(NotFound):
        catalog.file_info(h)
    catalog.finish_ingest([good], [], T0)
    assert catalog.file_info(h)["name"] == b"good"


def test_wal_journal_and_busy_timeout_are_set(catalog: Catalog, db_path: Path) -> None:
    conn = catalog.db.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS >= 1000
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit is on disk
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    # WAL is a property of the file: every other connection sees it too
    with raw(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_reader_is_not_blocked_by_a_writer(catalog: Catalog, db_path: Path) -> None:
    register(catalog, fake_hash("cccccc"))
    with catalog.db.tx() as conn:
        conn.execute("INSERT INTO meta(key, value) VALUES ('w', 'x')")
        # while the write transaction is open, another connection still reads (WAL)
        with raw(db_path, timeout=0) as other:
            assert other.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 1
            assert other.execute("SELECT COUNT(*) FROM meta WHERE key='w'").fetchone()[0] == 0


# -- resolve -------------------------------------------------------------------------------------

def test_resolve_full_hash_prefix_unknown_and_ambiguous(catalog: Catalog) -> None:
    a = fake_hash("abcdef1", "1")
    b = fake_hash("abcdef2", "2")
    c = fake_hash("123456", "3")
    for h in (a, b, c):
        register(catalog, h)
    assert catalog.resolve(a) == a
    assert catalog.resolve(c) == c
    assert catalog.resolve("123456") == c
    assert catalog.resolve("abcdef1") == a
    assert catalog.resolve("abcdef2") == b
    with pytest.raises(Ambiguous) as info:
        catalog.resolve("abcdef")
    assert "abcdef" in str(info.value)
    with pytest.raises(NotFound) as info:
        catalog.resolve("fedcba")
    assert "fedcba" in str(info.value)
    with pytest.raises(NotFound):
        catalog.resolve(fake_hash("abcdef3"))
    # a prefix at the very end of the hex range
    f = "f" * 64
    register(catalog, f)
    assert catalog.resolve("ffffff") == f


# -- list_files, file_info -------------------------------------------------------------------------

def test_list_files_is_newest_first_and_limited(catalog: Catalog) -> None:
    hashes = [fake_hash(f"{i:02d}aaaa") for i in range(5)]
    for i, h in enumerate(hashes):
        register(catalog, h, f"f{i}".encode(), now=T0 + i * 10)
    listed = [f["hash"] for f in catalog.list_files()]
    assert listed == list(reversed(hashes))
    assert [f["hash"] for f in catalog.list_files(limit=2)] == [hashes[4], hashes[3]]
    assert catalog.list_files(limit=0) == []


def test_list_files_by_name_glob_including_non_utf8_names(catalog: Catalog) -> None:
    names = {
        fake_hash("100000"): b"report 2024.pdf",
        fake_hash("200000"): b"caf\xe9.txt",        # Latin-1, not UTF-8
        fake_hash("300000"): b"caf\xc3\xa9.txt",    # UTF-8
        fake_hash("400000"): b"line\nbreak.txt",
        fake_hash("500000"): b"notes.md",
    }
    for i, (h, name) in enumerate(names.items()):
        register(catalog, h, name, now=T0 + i)

    def found(glob: str) -> list[bytes]:
        return sorted(f["name"] for f in catalog.list_files(name_glob=glob))

    assert found("*.txt") == sorted([b"caf\xe9.txt", b"caf\xc3\xa9.txt", b"line\nbreak.txt"])
    assert found("caf*") == sorted([b"caf\xe9.txt", b"caf\xc3\xa9.txt"])
    assert found("caf?.txt") == sorted([b"caf\xe9.txt", b"caf\xc3\xa9.txt"])  # one character each
    assert found("café.txt") == [b"caf\xc3\xa9.txt"]
    assert found("report *") == [b"report 2024.pdf"]
    assert found("line?break.txt") == [b"line\nbreak.txt"]
    assert found("nothing*") == []
    # ctl and the JSON protocol carry a non-UTF-8 name as a str with surrogate escapes
    # (os.fsdecode); such a pattern finds the raw name, and no other
    assert found("caf\udce9.txt") == [b"caf\xe9.txt"]
    assert found("caf\udce9*") == [b"caf\xe9.txt"]


def test_list_files_by_state(catalog: Catalog) -> None:
    queued = fake_hash("a10000")
    done = fake_hash("a20000")
    failed = fake_hash("a30000")
    evicted = fake_hash("a40000")
    for i, h in enumerate((queued, done, failed, evicted)):
        register(catalog, h, now=T0 + i, remotes=("r0",))
    assert len(catalog.claim_due(T0 + 100, 10, 60)) == 4
    for h, remote in ((done, "r0"), (evicted, "r0")):
        catalog.upload_done(h, remote, f"u://{h}", 10, 1, T0 + 100)
    catalog.upload_failed(failed, "r0", "no", None, T0 + 100)
    catalog.release_claims(T0 + 100)  # the queued one goes back to the queue
    catalog.forget_cache_entry(evicted)

    def hashes(state: str | None) -> set[str]:
        return {f["hash"] for f in catalog.list_files(state=state)}

    assert hashes(None) == {queued, done, failed, evicted}
    assert hashes("pending") == {queued}
    assert hashes("failed") == {failed}
    assert hashes("cached") == {queued, done, failed}
    assert hashes("evicted") == {evicted}


def test_file_info_has_the_spec_file_object_shape(catalog: Catalog) -> None:
    h = fake_hash("deadbe", "f")
    register(catalog, h, b"caf\xe9 data.bin", size=1234, now=T0, remotes=("r0", "r1", "r2"))
    catalog.claim_due(T0, 10, 60)
    catalog.upload_done(h, "r0", "/remote/r0/de/" + h, 1234, 2, T0 + 1)
    catalog.upload_failed(h, "r1", "remote r1: refused", None, T0 + 2)
    catalog.upload_failed(h, "r2", "timeout", T0 + 60, T0 + 2)
    info = catalog.file_info(h)
    assert set(info) == {"hash", "name", "size", "added", "cached", "pinned", "copies", "pending", "failed"}
    assert info["hash"] == h
    assert info["name"] == b"caf\xe9 data.bin"
    assert info["size"] == 1234
    assert info["added"] == T0
    assert info["cached"] is True
    assert info["pinned"] is False
    assert info["copies"] == [{"remote": "r0", "url": "/remote/r0/de/" + h}]
    assert info["pending"] == ["r2"]
    assert info["failed"] == [{"remote": "r1", "error": "remote r1: refused", "attempts": 1}]
    assert catalog.list_files() == [info]
    with pytest.raises(NotFound):
        catalog.file_info(fake_hash("000000"))


# -- counts and transfer counters ------------------------------------------------------------------

COUNT_KEYS = {"files", "bytes", "uploads", "queued_bytes", "copies", "below_min", "below_min_bytes",
              "oldest_below_min_added", "below_redundancy", "cache_bytes", "cache_files", "total_incoming",
              "total_outgoing", "month_incoming", "month_outgoing"}


def test_counts_of_an_empty_catalog(catalog: Catalog) -> None:
    counts = catalog.counts(1, 2)
    assert COUNT_KEYS <= set(counts)
    assert counts["uploads"] == {"queued": 0, "active": 0, "retrying": 0, "failed": 0, "done": 0}
    assert counts["oldest_below_min_added"] is None
    assert all(counts[k] == 0 for k in COUNT_KEYS - {"uploads", "oldest_below_min_added"})


def test_counts_follow_files_uploads_and_copies(catalog: Catalog) -> None:
    now = time.time()
    a, b, c = fake_hash("c10000"), fake_hash("c20000"), fake_hash("c30000")
    register(catalog, a, size=100, now=now - 30)
    register(catalog, b, size=200, now=now - 20)
    register(catalog, c, size=400, now=now - 10)
    catalog.claim_due(now, 2, 60)  # two pairs active (a's: the oldest due first)
    catalog.upload_done(a, "r0", "u", 100, 2, now)
    catalog.upload_done(a, "r1", "u", 100, 2, now)
    catalog.upload_done(b, "r0", "u", 200, 2, now)
    catalog.upload_failed(c, "r0", "gone", None, now)
    catalog.upload_failed(c, "r1", "slow", now + 60, now)
    counts = catalog.counts(1, 2)
    assert counts["files"] == 3 and counts["bytes"] == 700
    assert counts["copies"] == 3
    assert counts["uploads"] == {"queued": 1, "active": 0, "retrying": 1, "failed": 1, "done": 3}
    assert counts["queued_bytes"] == 200 + 400  # b's queued pair and c's retrying pair
    # below min_redundancy (1): only c, which has no copy
    assert (counts["below_min"], counts["below_min_bytes"]) == (1, 400)
    assert counts["oldest_below_min_added"] == pytest.approx(now - 10)
    assert counts["below_redundancy"] == 2  # b (1 copy) and c (0)
    assert (counts["cache_bytes"], counts["cache_files"]) == (700, 3)
    assert counts["total_incoming"] == counts["month_incoming"] == 700
    assert counts["total_outgoing"] == counts["month_outgoing"] == 400


def test_cache_counts_belong_to_this_node(catalog: Catalog, db_path: Path) -> None:
    register(catalog, fake_hash("d10000"), size=50)
    other = Catalog.open(f"sqlite:///{db_path}", "node2")
    try:
        assert other.counts(1, 1)["cache_files"] == 0
        assert other.counts(1, 1)["files"] == 1  # the files are shared; the cache is not
        assert other.list_files(state="cached") == []
        assert other.file_info(fake_hash("d10000"))["cached"] is False
    finally:
        other.close()


def test_transfer_counters_are_kept_by_month(catalog: Catalog, db_path: Path) -> None:
    jan = calendar.timegm((2024, 1, 15, 12, 0, 0))
    jan_end = calendar.timegm((2024, 1, 31, 23, 59, 59))
    feb = calendar.timegm((2024, 2, 1, 0, 0, 0))
    assert (month_of(jan), month_of(jan_end), month_of(feb)) == ("2024-01", "2024-01", "2024-02")
    register(catalog, fake_hash("e10000"), size=1000, now=jan)
    register(catalog, fake_hash("e20000"), size=500, now=jan_end)
    register(catalog, fake_hash("e30000"), size=70, now=feb)
    catalog.add_transfer(feb, outgoing=30)
    catalog.upload_done(fake_hash("e10000"), "r0", "u", 1000, 2, feb)
    with raw(db_path) as conn:
        rows = conn.execute("SELECT node, month, incoming, outgoing FROM transfer ORDER BY month").fetchall()
    assert rows == [("node1", "2024-01", 1500, 0), ("node1", "2024-02", 70, 1030)]

    # this month's counters in counts(); totals over every month
    now = time.time()
    catalog.add_transfer(now, incoming=5, outgoing=6)
    counts = catalog.counts(1, 1)
    assert (counts["month_incoming"], counts["month_outgoing"]) == (5, 6)
    assert (counts["total_incoming"], counts["total_outgoing"]) == (1575, 1036)
