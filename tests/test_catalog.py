"""The catalog's contract: every test runs against both backends (a real SQLite file and a real
PostgreSQL database from tests/postgres.py) and speaks to the catalog only through its interface:
schema, hash prefixes, listing, the file object of SPEC, status counts, transfer counters, claims.
What only one engine has (SQLite's WAL and its transaction helper, PostgreSQL's URL handling) is
tested in test_catalog_sqlite.py and test_catalog_postgres.py.

Hashes here are fabricated 64-hex strings, so that prefixes can be made to collide.
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudmanagerd.catalog import MIGRATIONS, SCHEMA_VERSION, Catalog, IngestRecord, month_of
from cloudmanagerd.errors import Ambiguous, NotFound

T0 = 1_700_000_000.0


def fake_hash(prefix: str, fill: str = "0") -> str:
    return (prefix + fill * 64)[:64]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One catalog store: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'catalog.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def open_catalog(store_url: str) -> Iterator[Callable[[str], Catalog]]:
    """Opens more catalogs on the same store (another node, or the same one again); all closed at the end."""
    opened: list[Catalog] = []

    def open_one(node: str = "node1") -> Catalog:
        opened.append(Catalog.open(store_url, node))
        return opened[-1]
    yield open_one
    for c in reversed(opened):
        c.close()


@pytest.fixture
def catalog(open_catalog: Callable[[str], Catalog]) -> Catalog:
    return open_catalog("node1")


def register(catalog: Catalog, h: str, name: bytes = b"f", size: int = 10, now: float = T0,
             remotes: tuple[str, ...] = ("r0", "r1")) -> None:
    record = IngestRecord(h, name, size)
    catalog.begin_ingest([record], now)
    catalog.finish_ingest([record], list(remotes), now)


# -- schema ------------------------------------------------------------------------------------

def test_a_fresh_catalog_is_migrated_to_the_current_schema(catalog: Catalog) -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 1
    assert catalog.schema_version() == SCHEMA_VERSION
    assert catalog.list_files() == [] and catalog.counts(1, 1)["files"] == 0


def test_opening_again_is_idempotent_and_keeps_the_data(catalog: Catalog,
                                                        open_catalog: Callable[[str], Catalog]) -> None:
    h = fake_hash("ab12cd")
    register(catalog, h, b"kept.txt")
    for _ in range(2):
        again = open_catalog("node1")
        assert again.schema_version() == SCHEMA_VERSION
        assert again.file_info(h)["name"] == b"kept.txt"
        again.migrate()
        assert again.schema_version() == SCHEMA_VERSION
    assert [f["hash"] for f in catalog.list_files()] == [h]
    assert catalog.counts(1, 1)["files"] == 1


def test_nodes_opening_one_new_store_together_create_its_schema_once(
        open_catalog: Callable[[str], Catalog]) -> None:
    # four nodes start at once on an empty store: the schema lock lets one create it, the others wait
    opened: list[Catalog] = []
    errors: list[BaseException] = []

    def start(node: str) -> None:
        try:
            opened.append(open_catalog(node))
        except BaseException as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=start, args=(f"n{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(opened) == 4
    register(opened[0], fake_hash("5c4e3a"))
    assert all(c.schema_version() == SCHEMA_VERSION and c.counts(1, 1)["files"] == 1 for c in opened)


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


def test_cache_counts_belong_to_this_node(catalog: Catalog, open_catalog: Callable[[str], Catalog]) -> None:
    register(catalog, fake_hash("d10000"), size=50)
    other = open_catalog("node2")
    assert other.counts(1, 1)["cache_files"] == 0
    assert other.counts(1, 1)["files"] == 1  # the files are shared; the cache is not
    assert other.list_files(state="cached") == []
    assert other.file_info(fake_hash("d10000"))["cached"] is False
    assert other.cache_bytes() == 0 and catalog.cache_bytes() == 50


def test_transfer_counters_are_kept_by_month(catalog: Catalog) -> None:
    jan = calendar.timegm((2024, 1, 15, 12, 0, 0))
    jan_end = calendar.timegm((2024, 1, 31, 23, 59, 59))
    feb = calendar.timegm((2024, 2, 1, 0, 0, 0))
    assert (month_of(jan), month_of(jan_end), month_of(feb)) == ("2024-01", "2024-01", "2024-02")
    register(catalog, fake_hash("e10000"), size=1000, now=jan)
    register(catalog, fake_hash("e20000"), size=500, now=jan_end)
    register(catalog, fake_hash("e30000"), size=70, now=feb)
    catalog.add_transfer(feb, outgoing=30)
    catalog.upload_done(fake_hash("e10000"), "r0", "u", 1000, 2, feb)
    month = {k: v for k, v in catalog.transfer_totals(jan).items() if k.startswith("month_")}
    assert month == {"month_incoming": 1500, "month_outgoing": 0}
    month = {k: v for k, v in catalog.transfer_totals(feb).items() if k.startswith("month_")}
    assert month == {"month_incoming": 70, "month_outgoing": 1030}

    # this month's counters in counts(); totals over every month
    now = time.time()
    catalog.add_transfer(now, incoming=5, outgoing=6)
    counts = catalog.counts(1, 1)
    assert (counts["month_incoming"], counts["month_outgoing"]) == (5, 6)
    assert (counts["total_incoming"], counts["total_outgoing"]) == (1575, 1036)


# -- claims: one node per pair, leases that run out, this node's cache first -------------------------

def test_two_nodes_claiming_at_once_never_take_the_same_pair(
        catalog: Catalog, open_catalog: Callable[[str], Catalog]) -> None:
    for i in range(60):
        register(catalog, fake_hash(f"{i:02x}c1a1"), now=T0, remotes=("r0",))
    nodes = [catalog, open_catalog("node2"), open_catalog("node3")]
    taken: dict[str, list[str]] = {c.node: [] for c in nodes}

    def claim(c: Catalog) -> None:
        while True:
            got = c.claim_due(T0 + 1, 3, 60)
            if not got:
                return
            taken[c.node] += [g.hash for g in got]
    threads = [threading.Thread(target=claim, args=(c,)) for c in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [h for hashes in taken.values() for h in hashes]
    assert len(every) == len(set(every)) == 60
    assert catalog.counts(1, 1)["uploads"]["active"] == 60


def test_a_dead_nodes_claims_go_to_another_node_when_its_lease_runs_out(
        catalog: Catalog, open_catalog: Callable[[str], Catalog]) -> None:
    h = fake_hash("1ea5e0")
    register(catalog, h, now=T0, remotes=("r0",))
    other = open_catalog("node2")
    register(other, h, now=T0, remotes=("r0",))  # the same content dropped on node2: it holds the bytes too
    assert [c.hash for c in catalog.claim_due(T0, 10, lease=60)] == [h]
    assert other.claim_due(T0 + 59, 10, lease=60) == []  # still node1's
    # node1 died: once its lease is over, node2 takes the pair
    assert [c.hash for c in other.claim_due(T0 + 61, 10, lease=60)] == [h]
    # node1 comes back and records a failure of its old attempt: node2's claim stands
    catalog.upload_failed(h, "r0", "late", T0 + 100, T0 + 62)
    assert other.counts(1, 1)["uploads"]["active"] == 1
    assert other.claim_due(T0 + 200, 10, lease=60) == []  # node2's own lease is its refresh's business
    other.upload_done(h, "r0", "u://x", 10, 1, T0 + 70)
    assert other.file_info(h)["copies"] == [{"remote": "r0", "url": "u://x"}]


def test_this_node_never_takes_back_its_own_expired_claims_by_claiming(catalog: Catalog) -> None:
    # a pair this node still sends may have an old lease (refresh_claims decides, knowing what is in flight)
    register(catalog, fake_hash("5e1f00"), now=T0, remotes=("r0",))
    assert len(catalog.claim_due(T0, 10, lease=60)) == 1
    assert catalog.claim_due(T0 + 1000, 10, lease=60) == []
    assert catalog.refresh_claims(T0 + 1000, 60, in_flight=set()) == 1
    assert len(catalog.claim_due(T0 + 1000, 10, lease=60)) == 1


def test_a_node_prefers_the_pairs_whose_file_it_holds(
        catalog: Catalog, open_catalog: Callable[[str], Catalog]) -> None:
    other = open_catalog("node2")
    mine = [fake_hash(f"a{i}0000") for i in range(3)]
    theirs = [fake_hash(f"b{i}0000") for i in range(3)]
    for i, h in enumerate(theirs):  # older, so first in next_attempt order
        register(other, h, now=T0 + i, remotes=("r0",))
    for i, h in enumerate(mine):
        register(catalog, h, now=T0 + 10 + i, remotes=("r0",))
    assert [c.hash for c in catalog.claim_due(T0 + 100, 3, 60)] == mine
    # the files only node2 holds, with no copy anywhere yet, are node2's to send: node1 leaves them
    assert catalog.claim_due(T0 + 100, 3, 60) == []
    other.upload_done(theirs[0], "r1", "u://y", 10, 2, T0 + 50)  # now a remote has one: node1 may fetch it
    assert [c.hash for c in catalog.claim_due(T0 + 100, 3, 60)] == [theirs[0]]


def test_eviction_candidates_walk_the_whole_lru_in_pages_without_repeats(catalog: Catalog) -> None:
    # more entries than one page, all used at the same instant (ties broken by hash), the newest last
    hashes = [fake_hash(f"{i:04x}e5") for i in range(1100)]
    records = [IngestRecord(h, b"f", 1) for h in hashes]
    catalog.begin_ingest(records, T0)
    catalog.finish_ingest(records, ["r0"], T0)
    catalog.touch(hashes[0], T0 + 5)
    catalog.uploads_done([(h, "r0", "u", 1) for h in hashes if h != hashes[1]], 1, T0)
    candidates = catalog.eviction_candidates(1)
    try:
        got = [h for h, _ in candidates]
    finally:
        candidates.close()
    assert got == sorted(set(hashes) - {hashes[0], hashes[1]}) + [hashes[0]]  # hashes[1] has no copy
    # the least recently used entry is hashes[1], short of copies: a scan limit of 1 stops there
    assert [h for h, _ in catalog.eviction_candidates(1, scan_limit=1)] == []


def test_two_nodes_registering_and_recording_the_same_files_in_opposite_orders_do_not_deadlock(
        catalog: Catalog, open_catalog: Callable[[str], Catalog]) -> None:
    other = open_catalog("node2")
    errors: list[BaseException] = []
    total = 0
    for round_ in range(4):
        records = [IngestRecord(fake_hash(f"{round_:x}{i:03x}dd"), b"same", 5) for i in range(40)]
        total += len(records)

        def node(c: Catalog, order: list[IngestRecord]) -> None:
            try:
                c.begin_ingest(order, T0)
                c.finish_ingest(order, ["r0", "r1"], T0)
                c.uploads_done([(r.hash, "r0", "u", 5) for r in order], 2, T0)
            except BaseException as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=node, args=(catalog, records)),
                   threading.Thread(target=node, args=(other, records[::-1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
    counts = catalog.counts(1, 2)
    assert (counts["files"], counts["copies"], counts["cache_files"]) == (total, total, total)
    assert other.counts(1, 2)["cache_files"] == total
