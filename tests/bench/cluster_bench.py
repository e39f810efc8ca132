#!/usr/bin/env python3
"""Several daemons on one PostgreSQL catalog (issue 13): aggregate ingest with 1, 2 and 3 nodes, and
one node on SQLite for scale.

Each run starts fresh daemons (real subprocesses, default settings: settle, upload concurrency, the
default lease), each with its own inbox and cache, all on one catalog and one shared folder remote
(redundancy 1). `--files` files of `--size` random bytes per node are written beside each inbox
first (untimed), then renamed in at once. Measured:

- ingest: from the first rename until the catalog holds every file (files/s, all nodes together);
- safe: until every file also has its copy on the remote (the claims and uploads done);
- per file, from the server's own statistics: commits (pg_stat_database.xact_commit) and
  statements (pg_stat_statements, top level: every statement a client sent, its round trips; the triggers' own statements run inside them);
- claims per second: (file, remote) pairs claimed and sent per second, all nodes competing for
  one queue (the safe rate: one pair per file), and the claim SELECTs (FOR UPDATE SKIP LOCKED)
  per file that took; and claims alone at the catalog, 3 processes competing for one queue of
  2 x --files pairs (pg_catalog_bench.py's claimers).

The server is Debian's PostgreSQL started in a temp folder by tests/postgres.py, with fsync and
synchronous_commit on (as a real server runs) and pg_stat_statements loaded. This machine has 2
cores shared with other work: several nodes here measure contention more than scaling.

    .venv/bin/python tests/bench/cluster_bench.py [--files 10000] [--size 4096] [--nodes 1,2,3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import psycopg  # noqa: E402
from benchlib import InboxDaemon, fmt, human_bytes, parse_size, say, table, write_small_files  # noqa: E402
from postgres import PostgresServer, start_server  # noqa: E402

from pg_catalog_bench import claims  # noqa: E402

from cloudmanagerd.catalog import Catalog, IngestRecord  # noqa: E402

STATS = ("SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname=current_database()), "
         "(SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid=s.dbid "
         " WHERE d.datname=current_database()), "
         "(SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid=s.dbid "
         " WHERE d.datname=current_database() AND s.query LIKE '%%SKIP LOCKED%%')")


def server_with_statements() -> PostgresServer:
    server = start_server(fsync=True)
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    server.stop("fast")
    server.start()
    return server


def stats(url: str) -> tuple[int, int, int]:
    """(commits, statements, claim SELECTs ... FOR UPDATE SKIP LOCKED) so far in this database."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        commits, statements, claims = conn.execute(STATS).fetchone()
    return int(commits), int(statements), int(claims)


def top_statements(url: str, limit: int) -> list[tuple[int, str]]:
    """The statements sent most often in this database: (calls, start of the text)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [(int(calls), " ".join(query.split())[:110]) for calls, query in conn.execute(
            "SELECT calls, query FROM pg_stat_statements s JOIN pg_database d ON d.oid=s.dbid "
            "WHERE d.datname=current_database() ORDER BY calls DESC LIMIT %s", (limit,))]


def counts(url: str) -> tuple[int, int]:
    """(files, copies) in the catalog, from its trigger-kept counters."""
    catalog = Catalog.open(url, "bench")
    try:
        c = catalog.counts(1, 1)
        return c["files"], c["copies"]
    finally:
        catalog.close()


def run(root: Path, url: str, nodes: int, files: int, size: int, pg: bool, top: int = 0) -> dict[str, Any]:
    remote = root / "nas"
    remote.mkdir()
    daemons = []
    try:
        for i in range(nodes):
            d = InboxDaemon(root, f"n{i + 1}", remotes=[{"name": "nas", "type": "directory", "path": str(remote)}],
                            log_level="warning", catalog=url, node=f"n{i + 1}")
            daemons.append(d)
            write_small_files(d.dir / "staging", files, size)
        for d in daemons:
            d.start()
        if pg:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            before = stats(url)
        say(f"{nodes} node(s): renaming {nodes * files} files into the inboxes")
        t0 = time.monotonic()
        for d in daemons:
            for name in os.listdir(d.dir / "staging"):
                os.rename(d.dir / "staging" / name, d.inbox / name)
        total, ingested = nodes * files, None
        while True:
            for d in daemons:
                d.alive()
            got_files, got_copies = counts(url)
            now = time.monotonic() - t0
            if ingested is None and got_files >= total:
                ingested = now
            if got_copies >= total:
                safe = now
                break
            time.sleep(0.25)
        result = {"nodes": nodes, "files": total, "ingest_s": ingested, "safe_s": safe,
                  "ingest_rate": total / ingested, "safe_rate": total / safe}
        if pg:
            time.sleep(1.0)  # the server sends its statistics at intervals
            after = stats(url)
            result["commits_per_file"] = (after[0] - before[0]) / total
            result["statements_per_file"] = (after[1] - before[1]) / total
            result["claim_statements"] = after[2] - before[2]
            result["top"] = top_statements(url, top) if top else []
        return result
    finally:
        for d in daemons:
            d.stop()


def claim_rate(url: str, files: int, nodes: int = 3) -> tuple[float, int]:
    """Claims alone, at the catalog: `files` files queued for two remotes, then `nodes` processes
    claiming 8 pairs at a time until the queue is empty (pg_catalog_bench's claimers); pairs/s."""
    for n in range(nodes):  # each claimer's share cached on it: a node never claims a file that
        catalog = Catalog.open(url, f"node{n}")  # only another node's cache holds
        try:
            for i in range(n, files, 500 * nodes):
                records = [IngestRecord(os.urandom(32).hex(), f"c{j}".encode(), 4096)
                           for j in range(i, min(i + 500 * nodes, files), nodes)]
                catalog.begin_ingest(records, time.time())
                catalog.finish_ingest(records, ["r0", "r1"], time.time())
        finally:
            catalog.close()
    return claims(url, nodes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10_000, help="files per node (default 10000)")
    ap.add_argument("--size", type=parse_size, default=4096, help="bytes per file (default 4 KiB)")
    ap.add_argument("--nodes", default="1,2,3", help="node counts on PostgreSQL (default 1,2,3)")
    ap.add_argument("--no-sqlite", action="store_true", help="skip the single node on SQLite")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="also print the N statements sent most often in each PostgreSQL run, per file")
    ap.add_argument("--tmp", default="/tmp", help="where the daemons' folders go")
    args = ap.parse_args()

    server = server_with_statements()
    results = []
    try:
        runs = [("postgresql", int(n)) for n in args.nodes.split(",")]
        if not args.no_sqlite:
            runs.append(("sqlite", 1))
        for engine, nodes in runs:
            root = Path(__import__("tempfile").mkdtemp(prefix="cm-cluster-", dir=args.tmp))
            try:
                url = server.create_database() if engine == "postgresql" else f"sqlite:///{root}/catalog.sqlite3"
                r = run(root, url, nodes, args.files, args.size, engine == "postgresql", args.top)
                r["engine"] = engine
                results.append(r)
                say(f"{engine}, {nodes} node(s): {dict((k, v) for k, v in r.items() if k != 'top')}")
                for calls, query in r.get("top", []):
                    say(f"  {calls / r['files']:6.2f}/file  {query}")
            finally:
                shutil.rmtree(root, ignore_errors=True)
        claimed = claim_rate(server.create_database(), args.files)
        say(f"claims, 3 nodes at once: {claimed[0]:.0f} pairs/s ({claimed[1]} pairs, 8 per claim)")
    finally:
        server.stop("fast")
        shutil.rmtree(server.root, ignore_errors=True)

    rows = [[r["engine"], str(r["nodes"]), str(r["files"]), fmt(r["ingest_s"], ".1f", " s"),
             fmt(r["ingest_rate"], ".0f", "/s"), fmt(r["safe_s"], ".1f", " s"), fmt(r["safe_rate"], ".0f", "/s"),
             fmt(r.get("commits_per_file"), ".2f"), fmt(r.get("statements_per_file"), ".1f"),
             fmt(r["files"] / r["safe_s"] if r.get("claim_statements") is not None else None, ".0f", "/s"),
             fmt(r["claim_statements"] / r["files"] if r.get("claim_statements") is not None else None, ".2f")]
            for r in results]
    print(f"\n{args.files} files of {human_bytes(args.size)} per node, one folder remote; "
          f"1-min load at the end: {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    print("\n".join(table(rows, ["catalog", "nodes", "files", "ingest", "files/s", "safe", "files/s",
                                 "commits/file", "stmts/file", "claims+sends/s", "claim selects/file"],
                          right=set(range(1, 11)))))
    print(f"claims alone, 3 nodes competing at the catalog: {claimed[0]:.0f} pairs/s "
          f"({claimed[1]} pairs of {args.files} files x 2 remotes, 8 pairs per claim)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
