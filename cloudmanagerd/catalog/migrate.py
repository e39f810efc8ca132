"""migrate-catalog: copy a single node's catalog (SQLite) into another one (PostgreSQL, for several nodes).

Every table is copied in one transaction of the target, which therefore holds all of it or nothing.
The status counters are not copied but made again from the rows: by the target's triggers as the
rows go in where they are cheap (SQLite: files go in with no good copy counted, their copies then
add them), else (PostgreSQL, whose triggers make a load quadratic) with the triggers off and counted
from the rows once all are in. Then the counters are checked against counts made again from the
rows, each file's good copies against its copies, and every table's row count against the source's.
Any difference rolls the whole copy back.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import CloudManagerError
from . import Catalog

# Data tables in an order that satisfies their references (files first). `counters` is left to the
# target's triggers and `meta` is copied key by key; a table not named here stops the copy rather
# than being left behind.
TABLES = ("files", "ingests", "cache_entries", "uploads", "copies", "foreign_copies", "remote_stats",
          "transfer", "nodes", "remote_places")
DERIVED = {"counters"}
BATCH = 2000


class MigrationError(CloudManagerError):
    """The copy cannot be made, or did not come out identical: nothing was kept in the target."""


def copy_catalog(source: Catalog, target: Catalog, replace: bool = False, lease: float = 60.0,
                 progress: Callable[[str, int], None] = lambda table, rows: None,
                 now: float | None = None) -> dict[str, int]:
    """Copy every row of `source` into `target`; the row count of each table. `replace`: empty a
    target that already holds a catalog first (refused while a node runs on it)."""
    now = time.time() if now is None else now
    unknown = _table_names(source) - set(TABLES) - DERIVED - {"meta"}
    if unknown:
        raise MigrationError(f"the source catalog has table(s) this cloudmanagerd does not know: "
                             f"{', '.join(sorted(unknown))} (upgrade cloudmanagerd, then migrate)")
    held = {table: n for table, n in _row_counts(target).items() if n}
    if held and not replace:
        raise MigrationError("the target catalog is not empty (" + ", ".join(f"{n} {t}" for t, n in held.items())
                             + "); migrate into a new, empty database, or pass --replace to empty this one first")
    live = [n["node"] for n in target.nodes(now, lease) if n["state"] == "up"] if held else []
    if live:
        raise MigrationError(f"node(s) {', '.join(live)} run on the target catalog; stop them before replacing it")
    expected = _row_counts(source)
    with target.db.tx() as out:
        off = target.db.triggers(out, TABLES, enabled=False)
        if held:
            for table in reversed(TABLES):
                out.execute(f"DELETE FROM {table}")
        for table in TABLES:
            copied = 0
            for columns, rows in _batches(source, table):
                marks = ",".join("?" * len(columns))
                out.executemany(f"INSERT INTO {table}({','.join(columns)}) VALUES ({marks})", rows)
                copied += len(rows)
                progress(table, copied)
        for key, value in source.db.connection().execute(
                "SELECT key, value FROM meta WHERE key <> 'schema_version'").fetchall():
            out.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))
        if off:
            out.execute("UPDATE files SET good=(SELECT COUNT(*) FROM copies k WHERE k.hash=files.hash AND k.bad=0)")
            target.db.set_counters(out, _count(out))
            target.db.triggers(out, TABLES, enabled=True)
        got = _row_counts(target, out)
        wrong = [f"{t}: {expected[t]} in the source, {got.get(t)} copied" for t in TABLES if got.get(t) != expected[t]]
        wrong += _counter_mismatches(target, out)
        if wrong:
            # raising inside the transaction rolls every row back
            raise MigrationError("the copy does not match, nothing was kept: " + "; ".join(wrong))
    return expected


def _table_names(catalog: Catalog) -> set[str]:
    return {name for name in catalog.db.tables(catalog.db.connection()) if not name.startswith("sqlite_")}


def _row_counts(catalog: Catalog, conn: Any = None) -> dict[str, int]:
    conn = conn or catalog.db.connection()
    return {table: int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]) for table in TABLES}


def _batches(source: Catalog, table: str) -> Iterator[tuple[list[str], list[tuple[Any, ...]]]]:
    """The rows of `table` in batches, in primary-key order (rowid order is not one on every engine).
    A file goes in with no good copy counted: its copies' rows count them again in the target."""
    conn = source.db.connection()
    cursor = conn.execute(f"SELECT * FROM {table}")
    columns = [d[0] for d in cursor.description]
    good = columns.index("good") if table == "files" else None
    while True:
        rows = cursor.fetchmany(BATCH)
        if not rows:
            return
        if good is not None:
            rows = [(*r[:good], 0, *r[good + 1:]) for r in rows]
        yield columns, [tuple(r) for r in rows]


def _counter_mismatches(target: Catalog, conn: Any) -> list[str]:
    """The target's counters against counts made again from its rows."""
    kept: dict[str, int] = collections.Counter()
    for name, value in conn.execute(target.db.counters_sql):
        kept[name] += int(value)
    counted = _count(conn)
    # each file's good copies, counted again (the kept column is what `good:` counted)
    bad_good = int(conn.execute(
        "SELECT COUNT(*) FROM files f WHERE f.good <> (SELECT COUNT(*) FROM copies k "
        "WHERE k.hash=f.hash AND k.bad=0)").fetchone()[0])
    wrong = [f"counter {name}: {kept.get(name, 0)} kept, {counted.get(name, 0)} counted"
             for name in sorted(set(kept) | set(counted)) if kept.get(name, 0) != counted.get(name, 0)]
    if bad_good:
        wrong.append(f"{bad_good} file(s) with a wrong count of good copies")
    return wrong


def _count(conn: Any) -> dict[str, int]:
    """Every status counter, counted from the rows (files.good taken as right: checked apart)."""
    counted: dict[str, int] = collections.Counter()
    one = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files").fetchone()
    counted["files"], counted["bytes"] = int(one[0]), int(one[1])
    counted["copies"] = int(conn.execute("SELECT COUNT(*) FROM copies WHERE bad=0").fetchone()[0])
    queries = {
        "copies:": "SELECT remote, COUNT(*) FROM copies WHERE bad=0 GROUP BY remote",
        "uploads:": "SELECT state, COUNT(*) FROM uploads GROUP BY state",
        "cache_files:": "SELECT node, COUNT(*) FROM cache_entries GROUP BY node",
        "cache_bytes:": "SELECT node, SUM(size) FROM cache_entries GROUP BY node",
        "good:": "SELECT good, COUNT(*) FROM files GROUP BY good",
        "goodbytes:": "SELECT good, SUM(size) FROM files GROUP BY good",
    }
    for prefix, sql in queries.items():
        for key, value in conn.execute(sql).fetchall():
            counted[f"{prefix}{key}"] += int(value)
    counted["pending_bytes"] = int(conn.execute(
        "SELECT COALESCE(SUM(f.size), 0) FROM uploads u JOIN files f ON f.hash=u.hash "
        "WHERE u.state IN ('queued', 'active', 'retrying')").fetchone()[0])
    return counted
