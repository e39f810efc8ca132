"""migrate-catalog into PostgreSQL: how long a single node's SQLite catalog takes to copy (files, their
cache entries, two copies and two done uploads each), and the at-risk count of `status` on the same
catalog (half the files cached on a node that is down, none with a copy).

A real server (Debian's postgresql, started in a temp folder by tests/postgres.py) with fsync off
(as the tests' server). This machine has 2 shared cores: the figures are a floor, not a forecast.

    .venv/bin/python tests/bench/migrate_catalog_bench.py [--files 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from postgres import start_server  # noqa: E402

from cloudmanagerd.catalog import Catalog  # noqa: E402
from cloudmanagerd.catalog.migrate import copy_catalog  # noqa: E402


def build(path: str, n: int, copies: bool) -> Catalog:
    """A catalog of `n` files written straight into its tables (the bench measures the copy, not ingest)."""
    catalog = Catalog.open(f"sqlite:///{path}", "n1")
    rows = [(hashlib.sha256(str(i).encode()).hexdigest(), f"file{i}".encode(), 4096 + i, 1e9 + i) for i in range(n)]
    with catalog.db.tx() as c:
        c.executemany("INSERT INTO files(hash, name, size, added) VALUES (?, ?, ?, ?)", rows)
        c.executemany("INSERT INTO cache_entries(hash, node, size, last_used) VALUES (?, ?, ?, ?)",
                      [(h, "n1" if i % 2 or copies else "n2", s, a) for i, (h, _, s, a) in enumerate(rows)])
        for remote in ("r0", "r1") if copies else ():
            c.executemany("INSERT INTO copies(hash, remote, url, created, verified) VALUES (?, ?, ?, ?, ?)",
                          [(h, remote, f"{remote}/{h}", a, a) for h, _, s, a in rows])
            c.executemany("INSERT INTO uploads(hash, remote, state, updated) VALUES (?, ?, 'done', ?)",
                          [(h, remote, a) for h, _, s, a in rows])
    return catalog


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=100_000)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="cm-migrate-bench-")
    server = start_server()
    try:
        source = build(os.path.join(root, "copy.sqlite3"), args.files, copies=True)
        target = Catalog.open(server.create_database(), "n1")
        started = time.perf_counter()
        counts = copy_catalog(source, target)
        took = time.perf_counter() - started
        rows = sum(counts.values())
        print(f"migrate-catalog: {args.files} files, {rows} rows into PostgreSQL in {took:.1f} s "
              f"({rows / took:.0f} rows/s)")
        source.close()
        target.close()
        risky = build(os.path.join(root, "risk.sqlite3"), args.files, copies=False)
        for absent in (["n2"], ["n3"]):
            started = time.perf_counter()
            found = risky.at_risk(absent, 1)
            print(f"at-risk count, {args.files} files below min_redundancy, absent {absent}: {found} in "
                  f"{(time.perf_counter() - started) * 1000:.0f} ms")
        risky.close()
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
