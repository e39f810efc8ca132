"""What only the PostgreSQL backend has: URLs (never a password in a message), a server that is
not there, the schema version guard, per-connection counter rows folded at start, and pg_dump as
the backup. The catalog's behaviour itself is test_catalog.py's contract suite, run on both."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest

from cloudmanagerd.catalog import SCHEMA_VERSION, Catalog
from cloudmanagerd.catalog.postgres import glob_regex, safe_url
from cloudmanagerd.errors import CloudManagerError, StartupError

from postgres import PostgresServer
from test_catalog import fake_hash, register


@pytest.fixture
def catalog(postgres_url: str) -> Iterator[Catalog]:
    c = Catalog.open(postgres_url, "node1")
    yield c
    c.close()


def test_messages_never_show_the_password() -> None:
    assert safe_url("postgresql://cm:s3cret@db.example:5433/cm?sslmode=require&password=s3cret") == \
        "postgresql://db.example:5433/cm?sslmode=require"
    assert safe_url("postgres://db/cm") == "postgres://db/cm"
    # libpq takes a password up to the first '@' or '/': '?', '#' or '@' in it must not show either
    for password in ("hun?ter2", "hun#ter2", "hun@ter2", "hun/ter2"):
        assert safe_url(f"postgresql://cm:{password}@db:5433/cm?sslmode=require") == \
            "postgresql://db:5433/cm?sslmode=require"
    assert safe_url("postgresql:///cm?host=/run/pg&password=x") == "postgresql:///cm?host=%2Frun%2Fpg"


def test_a_server_that_is_not_there_is_one_clear_start_up_error(postgres_server: PostgresServer) -> None:
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StartupError) as info:
        Catalog.open(f"postgresql://cm:s3cret@127.0.0.1:{port}/cm", "node1")
    message = str(info.value)
    assert f"127.0.0.1:{port}/cm" in message and "cannot connect" in message
    assert "s3cret" not in message and "\n" not in message


def test_a_database_that_does_not_exist_is_named(postgres_server: PostgresServer) -> None:
    with pytest.raises(StartupError, match="nosuchdb.*cannot connect"):
        Catalog.open(postgres_server.url("nosuchdb"), "node1")


def test_other_schemes_are_refused(tmp_path) -> None:
    with pytest.raises(StartupError, match="not a sqlite:/// or postgresql:// URL"):
        Catalog.open("mysql://u:pw@host/db", "node1")


def test_a_newer_schema_is_refused_and_left_alone(catalog: Catalog, postgres_url: str) -> None:
    register(catalog, fake_hash("aaaaaa"))
    catalog.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value=%s WHERE key='schema_version'", (str(SCHEMA_VERSION + 5),))
    with pytest.raises(StartupError, match="newer than this cloudmanagerd understands.*upgrade"):
        Catalog.open(postgres_url, "node1")
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 1


def test_times_sizes_and_names_keep_their_precision(catalog: Catalog) -> None:
    # REAL would be 4 bytes in PostgreSQL: a time would lose its seconds, a size its low digits
    h = fake_hash("9e9e9e")
    register(catalog, h, name=bytes(range(256)), size=(1 << 40) + 3, now=1_700_000_000.123456)
    info = catalog.file_info(h)
    assert info["added"] == 1_700_000_000.123456
    assert info["size"] == (1 << 40) + 3 and info["name"] == bytes(range(256))
    assert catalog.counts(1, 1)["bytes"] == (1 << 40) + 3
    assert isinstance(catalog.counts(1, 1)["bytes"], int)  # a NUMERIC sum read back as int, not Decimal


def test_counter_rows_of_ended_connections_are_folded_at_start(catalog: Catalog, postgres_url: str) -> None:
    for i in range(5):
        register(catalog, fake_hash(f"f{i}0000"), size=10)
    catalog.close()
    again = Catalog.open(postgres_url, "node1")
    try:
        counts = again.counts(1, 1)
        assert (counts["files"], counts["bytes"], counts["cache_files"]) == (5, 50, 5)
        with psycopg.connect(postgres_url) as conn:
            shards = {s for (s,) in conn.execute("SELECT DISTINCT shard FROM counters WHERE name='files'")}
        assert shards == {0}  # the ended connections' rows went into one
    finally:
        again.close()


def test_backup_says_to_use_pg_dump(catalog: Catalog) -> None:
    with pytest.raises(CloudManagerError, match="pg_dump"):
        with open(os.devnull, "wb") as sink:
            catalog.backup_to(sink.fileno())


def test_glob_translation() -> None:
    import re
    rx = re.compile(glob_regex("a?[bc]*.txt"))
    assert rx.match("axb.txt") and rx.match("a\u00c3\u00a9czz.txt") and not rx.match("ab.txt")


@pytest.mark.parametrize("url", ["postgresql://cm:hunter2@[::1:bad/cm", "postgresql://cm:hunter2@host:notaport/cm",
                                 "postgresql://h/cm?password=hunter2&connect_timeout=x",
                                 "postgresql://cm:hun/ter2@[::1/cm", "postgresql://cm:hun?ter2@h:x/cm",
                                 "mysql://cm:hunter2@h/cm", "host=h password=hunter2"])
def test_an_unreadable_url_is_refused_without_showing_its_password(url: str) -> None:
    # libpq quotes a URL it cannot parse whole: the message must not carry the password along
    with pytest.raises(StartupError) as info:
        Catalog.open(url, "node1")
    assert "hunter2" not in str(info.value) and "ter2" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("skew", [180.0, -180.0])
def test_a_node_whose_clock_is_off_neither_takes_a_live_claim_nor_sees_a_live_node_down(
        postgres_url: str, skew: float) -> None:
    # two machines, one with broken time sync: leases and heartbeats written by one clock and read
    # by another would hand a transfer in flight to a second sender, and show a live node down
    import time
    lease = 60.0
    good = Catalog.open(postgres_url, "n1")
    off = Catalog.open(postgres_url, "n2", clock=lambda: time.time() + skew)
    try:
        assert abs(off.clock_offset + skew) < 1.0 and good.clock_offset == 0.0
        h1, h2 = fake_hash("a1"), fake_hash("b2")
        # each file has one copy already, so that either node may send its second
        for catalog, h, now in ((good, h1, time.time()), (off, h2, off.clock())):
            register(catalog, h, now=now, remotes=("r0", "r1"))
            assert {(c.hash, c.remote) for c in catalog.claim_due(now, 2, lease)} == {(h, "r0"), (h, "r1")}
            catalog.upload_done(h, "r0", f"r0/{h}", 10, 2, now)
        # neither claim in flight is up for grabs on the other node
        assert off.claim_due(off.clock(), 10, lease) == [] and good.claim_due(time.time(), 10, lease) == []
        assert good.refresh_claims(time.time(), lease, {(h1, "r1")}) == 0
        assert off.refresh_claims(off.clock(), lease, {(h2, "r1")}) == 0
        assert good.register_node("i1", "s1", 1, "h1", time.time(), lease) is None
        assert off.register_node("i2", "s2", 2, "h2", off.clock(), lease) is None
        for catalog, now in ((good, time.time()), (off, off.clock())):
            assert {n["node"]: n["state"] for n in catalog.nodes(now, lease)} == {"n1": "up", "n2": "up"}
    finally:
        good.close()
        off.close()


def test_a_slow_answer_is_never_taken_for_a_clock_offset(postgres_url: str) -> None:
    # under load, the server's answer came 2.5 s after the question: the midpoint put this node's
    # clock 1.25 s behind the server's, and the "correction" let another node take a lease in flight
    import time
    ticks = iter([0.0, 2.5])  # the clock as sync_clock reads it: before the query, after it
    catalog = Catalog.open(postgres_url, "n1")
    try:
        catalog.clock = lambda: time.time() + next(ticks, 2.5)
        catalog.sync_clock()
        assert catalog.clock_offset == 0.0
    finally:
        catalog.close()


def test_a_statement_timeout_too_short_is_named_not_taken_for_a_connection_failure(postgres_url: str) -> None:
    # a DBA's statement_timeout (here in the URL's options) cancels the schema's creation: the
    # server was reached, so the message must not send the operator to check host and password
    with pytest.raises(StartupError) as info:
        Catalog.open(postgres_url + "?options=-c%20statement_timeout%3D1", "node1")
    message = str(info.value)
    assert "statement_timeout is too short" in message and "cannot connect" not in message and "\n" not in message
