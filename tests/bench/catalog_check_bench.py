#!/usr/bin/env python3
"""Issue 10 item 8: what the start-up check of the catalog costs at a million files.

Run from the repository root:

    .venv/bin/python tests/bench/catalog_check_bench.py                 # 1,000,000 files
    .venv/bin/python tests/bench/catalog_check_bench.py --files 100000 --cold

Fabricates a catalog through the real schema (status_bench.fabricate: every file with two good
copies and two `done` uploads), then times SQLite's `PRAGMA quick_check` (what the daemon runs
at every start) and `PRAGMA integrity_check` (what it does not, and why), each warm (page cache
filled) and, with --cold (root only), after `echo 3 > /proc/sys/vm/drop_caches`. Not collected
by pytest (tests/bench/conftest.py).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from status_bench import fabricate  # noqa: E402  (the bench folder is not a package)


def timed(path: Path, pragma: str, cold: bool) -> float:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    conn = sqlite3.connect(path)
    try:
        started = time.perf_counter()
        result = conn.execute(f"PRAGMA {pragma}").fetchall()
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    assert result == [("ok",)], result
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--cold", action="store_true", help="also time with the page cache dropped (root)")
    p.add_argument("--tmp", default=tempfile.gettempdir())
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="cm-check-") as tmp:
        path = Path(tmp) / "catalog.sqlite3"
        started = time.perf_counter()
        fabricate(path, args.files)
        print(f"fabricated {args.files:,} files in {time.perf_counter() - started:.1f} s, "
              f"{path.stat().st_size / 1e6:.0f} MB")
        rows = []
        for pragma in ("quick_check", "integrity_check"):
            for cold in ((True, False) if args.cold else (False,)):
                rows.append((pragma, "cold" if cold else "warm", timed(path, pragma, cold)))
        print(f"{'check':<16} {'cache':<5} seconds")
        for pragma, state, seconds in rows:
            print(f"{pragma:<16} {state:<5} {seconds:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
