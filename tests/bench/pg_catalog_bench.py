"""The PostgreSQL catalog under concurrent writers: files registered per second by 1 and 3 writer
processes (each a node with its own name, as ingest registers them: begin_ingest + finish_ingest,
one transaction each, `--batch` files per transaction), with the status counters in per-connection
rows (the design kept) and, for comparison, in one hot row per name (every writer updating the
same rows); then claims per second with 3 nodes claiming at once. SQLite, one writer, for scale.

A real server (Debian's postgresql, started in a temp folder by tests/postgres.py) with fsync on.
This machine has 2 cores shared with other work: 3 writers here measure contention, not scaling.

    .venv/bin/python tests/bench/pg_catalog_bench.py [--files 2000] [--batch 1]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from postgres import start_server  # noqa: E402

from cloudmanagerd.catalog import Catalog, IngestRecord  # noqa: E402

HOT_ROW = """
CREATE OR REPLACE FUNCTION cm_count(names TEXT[], deltas BIGINT[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO counters(name, shard, value)
    SELECT n, 0, SUM(d) FROM unnest(names, deltas) AS t(n, d) GROUP BY n HAVING SUM(d) <> 0
    ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value
$$
"""


def _writer(url: str, node: str, files: int, batch: int, start: multiprocessing.Event, out) -> None:
    catalog = Catalog.open(url, node)
    try:
        start.wait()
        t0 = time.perf_counter()
        for i in range(0, files, batch):
            records = [IngestRecord(os.urandom(32).hex(), f"{node}-{j}".encode(), 4096)
                       for j in range(i, min(i + batch, files))]
            now = time.time()
            catalog.begin_ingest(records, now)
            catalog.finish_ingest(records, ["r0", "r1"], now)
        out.put(time.perf_counter() - t0)
    finally:
        catalog.close()


def _claimer(url: str, node: str, start: multiprocessing.Event, out) -> None:
    catalog = Catalog.open(url, node)
    try:
        start.wait()
        t0, claimed = time.perf_counter(), 0
        while True:
            got = catalog.claim_due(time.time(), 8, 60)
            if not got:
                break
            claimed += len(got)
        out.put((claimed, time.perf_counter() - t0))
    finally:
        catalog.close()


def round_trips(url: str, files: int, batch: int) -> tuple[float, float]:
    """(statements, commits) per file registered by one writer in this process: statements counted at
    the backend's session (an executemany counts once: psycopg pipelines it), commits by the server."""
    import psycopg
    from cloudmanagerd.catalog import postgres
    counted = {"n": 0}
    calls = {name: getattr(postgres._Session, name) for name in ("execute", "executemany")}

    def counting(name):
        def call(self, *args):
            counted["n"] += 1
            return calls[name](self, *args)
        return call
    catalog = Catalog.open(url, "counted")
    try:
        for name in calls:
            setattr(postgres._Session, name, counting(name))
        with psycopg.connect(url) as conn:
            before = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname=current_database()"
                                  ).fetchone()[0]
        for i in range(0, files, batch):
            records = [IngestRecord(os.urandom(32).hex(), b"f", 4096) for _ in range(min(batch, files - i))]
            catalog.begin_ingest(records, time.time())
            catalog.finish_ingest(records, ["r0", "r1"], time.time())
        time.sleep(1.0)  # the server's statistics are sent at intervals
        with psycopg.connect(url) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            after = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname=current_database()"
                                 ).fetchone()[0]
    finally:
        for name, method in calls.items():
            setattr(postgres._Session, name, method)
        catalog.close()
    return counted["n"] / files, (after - before - 2) / files


def run(url: str, writers: int, files: int, batch: int) -> float:
    """Files registered per second, all writers together."""
    start, out = multiprocessing.Event(), multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_writer, args=(url, f"node{w}", files, batch, start, out))
             for w in range(writers)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every writer has opened its catalog (the schema is made once)
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    took = time.perf_counter() - t0
    return writers * files / took


def claims(url: str, nodes: int) -> tuple[float, int]:
    start, out = multiprocessing.Event(), multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_claimer, args=(url, f"node{n}", start, out)) for n in range(nodes)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    took = time.perf_counter() - t0
    total = sum(out.get()[0] for _ in procs)
    return total / took, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000, help="files per writer")
    ap.add_argument("--batch", type=int, default=1, help="files per transaction")
    args = ap.parse_args()
    server = start_server(fsync=True)
    tmp = tempfile.mkdtemp(prefix="cm-bench-")
    try:
        import psycopg
        results = []
        for design in ("per-connection rows", "one hot row"):
            for writers in (1, 3):
                url = server.create_database()
                Catalog.open(url, "setup").close()
                if design == "one hot row":
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute(HOT_ROW)
                rate = run(url, writers, args.files, args.batch)
                results.append((f"postgresql, {design}", writers, rate))
                print(f"postgresql  {design:20} writers={writers}  {rate:8.0f} files/s", flush=True)
                if design == "per-connection rows" and writers == 3:
                    cps, total = claims(url, 3)
                    print(f"postgresql  claims, 3 nodes at once: {cps:8.0f} pairs/s ({total} pairs, 8 per claim)",
                          flush=True)
        statements, commits = round_trips(server.create_database(), 500, args.batch)
        print(f"postgresql  per file: {statements:.1f} statements (round trips), {commits:.2f} commits "
              f"(batch {args.batch})", flush=True)
        rate = run(f"sqlite:///{tmp}/catalog.sqlite3", 1, args.files, args.batch)
        print(f"sqlite      {'':20} writers=1  {rate:8.0f} files/s", flush=True)
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
