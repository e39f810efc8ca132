"""Full disks are not invisible (issue 10, item 9). The cache's filesystem full while cache.capacity
is larger than the disk: files that may go are evicted (the free space is a second limit) and status
says "cache disk full". The catalog's filesystem full: status says "catalog disk full", and ingest
resumes by itself once there is room. Real tmpfs mounts (CI runs as root), always unmounted."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from conftest import wait_for

from .tmpfs import fill, tmpfs

MiB = 1 << 20


def problems_with(d, words: str) -> list[str]:
    return [p for p in d.status()["problems"] if words in p]


def test_a_full_cache_disk_evicts_what_may_go_and_says_so(daemon_factory, workdir: Path) -> None:
    with tmpfs(workdir / "cache", "4m"):
        d = daemon_factory(start=False, upload={"redundancy": 2, "min_redundancy": 2})
        assert d.config["cache"]["capacity"] == "1GiB"  # far more than the disk holds
        try:
            d.start()
            first = []
            for i in range(3):
                data = os.urandom(MiB)
                first.append(hashlib.sha256(data).hexdigest())
                (d.inbox / f"first{i}.bin").write_bytes(data)
            wait_for(lambda: all(len(f["copies"]) == 2 for f in d.files()) and len(d.files()) == 3,
                     timeout=30, message="three files with both copies (they may be evicted)")
            assert not problems_with(d, "disk full")

            later = []
            for i in range(3):
                data = os.urandom(MiB)
                later.append(hashlib.sha256(data).hexdigest())
                (d.inbox / f"later{i}.bin").write_bytes(data)
            wait_for(lambda: len(d.files()) == 6 and not list(d.inbox.iterdir()), timeout=30,
                     message="the later files taken in, room made by eviction")
            line = problems_with(d, "cache disk full")
            assert len(line) == 1 and str(d.cache) in line[0] and "cache.capacity" in line[0], d.status()["problems"]
            cached = {f["hash"] for f in d.files() if f["cached"]}
            assert set(later) <= cached and len(cached) < 6
            for h in later:
                assert hashlib.sha256((d.cache / h[:2] / h).read_bytes()).hexdigest() == h
            assert "No space left" not in d.log()
        finally:
            d.stop()


def test_a_full_catalog_disk_is_a_problem_line_and_ingest_resumes_after(daemon_factory, workdir: Path) -> None:
    with tmpfs(workdir / "state", "4m") as state:
        d = daemon_factory(start=False)
        try:
            d.start()
            (d.inbox / "before.txt").write_bytes(b"before the disk filled\n")
            wait_for(lambda: len(d.files()) == 1, message="a first file")
            filler = fill(state)
            (d.inbox / "during.txt").write_bytes(b"dropped while the catalog's disk is full\n")
            wait_for(lambda: problems_with(d, "catalog disk full"), message="the catalog disk full line")
            line = problems_with(d, "catalog disk full")[0]
            assert str(state) in line, line
            assert d.status()["state"] == "degraded"
            filler.unlink()
            wait_for(lambda: len(d.files()) == 2 and not problems_with(d, "disk full"), timeout=30,
                     message="ingest resumed and the line gone once there is room")
            assert d.status()["state"] == "running"
        finally:
            d.stop()
