#!/usr/bin/env python3
"""Aggregate ingest of 1, 2 and 3 daemons on one PostgreSQL catalog, and of one daemon on SQLite
(issue 13's benchmark): each node gets --files files of --size bytes moved into its inbox at once
(a rename each, as `mv` does); the figure is every node's files registered, per second, from the
first rename to the last registration (read from the catalog, as `status` shows it).

The daemons have no remotes, so uploads do not compete with ingest. A real PostgreSQL (Debian's,
started by tests/postgres.py in a temp folder, fsync on). On a 2-CPU machine several nodes measure
contention for the CPUs (three daemons and the server share them), not scaling.

    .venv/bin/python tests/bench/pg_nodes_bench.py [--files 10000] [--size 4096] [--nodes 1,2,3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchlib import InboxDaemon, write_small_files  # noqa: E402
from postgres import start_server  # noqa: E402


def run(root: Path, catalog: str | None, nodes: int, files: int, size: int) -> float:
    daemons = []
    try:
        for i in range(nodes):
            extra = {"catalog": catalog} if catalog else {}
            d = InboxDaemon(root, f"n{i}", [], "info", node=f"n{i}", **extra)
            d.reconnect = True
            daemons.append(d.start())
        staged = [(d, write_small_files(root / f"staging{i}", files, size)) for i, d in enumerate(daemons)]
        t0 = time.perf_counter()
        for i, (d, names) in enumerate(staged):
            for name in names:
                os.rename(root / f"staging{i}" / name, d.inbox / f"{i}-{name}")
        total = nodes * files
        while daemons[0].status()["catalog"]["files"] < total:
            for d in daemons:
                d.alive()
            time.sleep(0.2)
        return total / (time.perf_counter() - t0)
    finally:
        for d in daemons:
            d.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000, help="files per node")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--nodes", default="1,2,3")
    args = ap.parse_args()
    server = start_server(fsync=True)
    try:
        for n in (int(x) for x in args.nodes.split(",")):
            root = Path(tempfile.mkdtemp(prefix="cm-pgn-"))
            try:
                rate = run(root, server.create_database(), n, args.files, args.size)
                print(f"postgresql  nodes={n}  {rate:7.0f} files/s together ({args.files} x {args.size} B per node)",
                      flush=True)
            finally:
                shutil.rmtree(root, ignore_errors=True)
        root = Path(tempfile.mkdtemp(prefix="cm-pgn-"))
        try:
            rate = run(root, None, 1, args.files, args.size)
            print(f"sqlite      nodes=1  {rate:7.0f} files/s", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


if __name__ == "__main__":
    main()
