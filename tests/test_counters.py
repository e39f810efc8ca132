"""The trigger-kept counters behind `status` always agree with a full recount of the catalog."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from cloudmanagerd.catalog import Catalog, IngestRecord
from cloudmanagerd.uploads import choose_targets


def recount(cat: Catalog, min_redundancy: int, redundancy: int) -> dict:
    conn = cat.db.connection()
    good = "(SELECT COUNT(*) FROM copies k WHERE k.hash=f.hash AND k.bad=0)"
    one = lambda sql, *a: conn.execute(sql, a).fetchone()  # noqa: E731
    by_state = dict(conn.execute("SELECT state, COUNT(*) FROM uploads GROUP BY state").fetchall())
    return {
        "files": one("SELECT COUNT(*) FROM files")[0],
        "bytes": one("SELECT COALESCE(SUM(size), 0) FROM files")[0],
        "uploads": {s: by_state.get(s, 0) for s in ("queued", "active", "retrying", "failed", "done")},
        "queued_bytes": one("SELECT COALESCE(SUM(f.size), 0) FROM uploads u JOIN files f ON f.hash=u.hash "
                            "WHERE u.state IN ('queued', 'active', 'retrying')")[0],
        "copies": one("SELECT COUNT(*) FROM copies WHERE bad=0")[0],
        "below_min": one(f"SELECT COUNT(*) FROM files f WHERE {good} < ?", min_redundancy)[0],
        "below_min_bytes": one(f"SELECT COALESCE(SUM(size), 0) FROM files f WHERE {good} < ?", min_redundancy)[0],
        "oldest_below_min_added": one(f"SELECT MIN(added) FROM files f WHERE {good} < ?", min_redundancy)[0],
        "below_redundancy": one(f"SELECT COUNT(*) FROM files f WHERE {good} < ?", redundancy)[0],
        "cache_bytes": one("SELECT COALESCE(SUM(size), 0) FROM cache_entries WHERE node=?", cat.node)[0],
        "cache_files": one("SELECT COUNT(*) FROM cache_entries WHERE node=?", cat.node)[0],
    }


def test_counters_match_a_recount_through_a_random_history(tmp_path: Path) -> None:
    cat = Catalog.open(f"sqlite:///{tmp_path / 'c.sqlite3'}", "n1")
    rng = random.Random(7)
    remotes = ["a", "b", "c"]
    hashes: list[str] = []
    now = 1_000.0
    for step in range(600):
        now += 1
        op = rng.random()
        if op < 0.3 or not hashes:
            h = hashlib.sha256(b"%d" % step).hexdigest()
            cat.begin_ingest([IngestRecord(h, b"f%d" % step, rng.randint(0, 5000))], now)
            cat.finish_ingest([IngestRecord(h, b"f%d" % step, rng.randint(0, 5000))], remotes[:2], now)
            hashes.append(h)
            continue
        h = rng.choice(hashes)
        remote = rng.choice(remotes)
        if op < 0.45:
            for claim in cat.claim_due(now, 3, 60):
                cat.upload_done(claim.hash, claim.remote, "url", claim.size, 2, now)
        elif op < 0.55:
            for claim in cat.claim_due(now, 2, 60):
                cat.upload_failed(claim.hash, claim.remote, "boom", None if rng.random() < 0.3 else now + 5, now)
        elif op < 0.62:
            cat.top_up(h, lambda good, pairs: choose_targets(remotes, (), 2, good, pairs), now)
        elif op < 0.7:
            cat.mark_copy_bad(h, remote, "rotten", now)
        elif op < 0.75:
            cat.replace_bad_copy(h, remote, now)
        elif op < 0.8:
            cat.retry_failed(None, now)
        elif op < 0.85:
            cat.drop_cache_entries([h])
        elif op < 0.9:
            cat.add_cache_entry(h, cat.file_size(h) or 0, now)
        elif op < 0.93:
            cat.begin_remove(h)
            cat.finish_remove(h)
            hashes.remove(h)
        else:
            cat.release_claims(now)
        if step % 50 == 0:
            for lo, hi in ((0, 0), (1, 2), (2, 2), (2, 3)):
                counted = cat.counts(lo, hi)
                expected = recount(cat, lo, hi)
                assert {k: counted[k] for k in expected} == expected, (step, lo, hi)
    counted = cat.counts(2, 2)
    assert {k: counted[k] for k in recount(cat, 2, 2)} == recount(cat, 2, 2)
    cat.close()


def test_an_existing_version_2_catalog_gets_counters_from_its_data(tmp_path: Path) -> None:
    import cloudmanagerd.catalog as catalog_module

    path = tmp_path / "old.sqlite3"
    old = Catalog(catalog_module.SqliteDatabase(str(path)), "n1")
    with old.db.tx() as conn:
        for statement in catalog_module.split_statements(catalog_module.MIGRATIONS[0]):
            conn.execute(statement)
        for statement in catalog_module.split_statements(catalog_module.MIGRATIONS[1]):
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    h = hashlib.sha256(b"x").hexdigest()
    old.finish_ingest([IngestRecord(h, b"x", 10)], ["a"], 5.0)
    old.upload_done(h, "a", "url", 10, 1, 6.0)
    old.close()
    cat = Catalog.open(f"sqlite:///{path}", "n1")
    assert cat.schema_version() == catalog_module.SCHEMA_VERSION
    counted = cat.counts(1, 2)
    assert {k: counted[k] for k in recount(cat, 1, 2)} == recount(cat, 1, 2)
    assert counted["files"] == 1 and counted["copies"] == 1 and counted["below_redundancy"] == 1
    cat.close()
