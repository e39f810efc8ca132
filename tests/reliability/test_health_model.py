"""The health model's rules, one function at a time, with their inputs as arguments (issue 10)."""

from __future__ import annotations

import resource

from cloudmanagerd import health
from cloudmanagerd.cache import Cache

MiB = 1 << 20


def test_loops_turning_are_healthy_and_a_stuck_or_dead_one_is_fatal() -> None:
    assert health.loops(100.0, 30.0, True, 95.0, True, 99.0) == []
    stuck = health.assess(health.loops(100.0, 30.0, True, 60.0, True, 99.0))
    assert not stuck.healthy and "ingest thread is stuck (no progress for 40s)" in stuck.fatal[0]
    dead = health.assess(health.loops(100.0, 30.0, False, 99.0, False, 99.0))
    assert len(dead.fatal) == 2 and "died" in dead.fatal[0] and "scheduler has stopped" in dead.fatal[1]
    pump = health.assess(health.loops(100.0, 30.0, True, 99.0, True, 10.0))
    assert "upload scheduler is stuck" in pump.fatal[0]


def test_a_damaged_catalog_is_fatal_a_full_one_is_waited_out() -> None:
    damaged = health.assess(health.catalog("/s/catalog.sqlite3", "database disk image is malformed", "HINT",
                                           None, False, 10 * MiB))
    assert not damaged.healthy and damaged.fatal == [
        "catalog /s/catalog.sqlite3 is damaged (database disk image is malformed): HINT"]
    full = health.assess(health.catalog("/s/catalog.sqlite3", None, "HINT", "database or disk is full", True, 0))
    assert full.healthy and full.problems[0].startswith("catalog disk full: /s has 0 B free")
    failing = health.assess(health.catalog("/s/c.db", None, "HINT", "disk I/O error", False, 10 * MiB))
    assert failing.healthy and "cannot be written (disk I/O error)" in failing.problems[0]
    assert health.catalog("/s/c.db", None, "HINT", None, False, 10 * MiB) == []


def test_the_catalog_disk_is_full_when_sqlite_says_so_or_below_the_reserve() -> None:
    assert health.catalog_disk_full(100 * MiB, 1000 * MiB, True)
    assert health.catalog_disk_full(1 * MiB, 1000 * MiB, False)  # reserve: 2% = 20 MiB
    assert not health.catalog_disk_full(100 * MiB, 1000 * MiB, False)
    assert not health.catalog_disk_full(None, None, False)
    assert health.disk_reserve(100 * 1024 * MiB) == 64 * MiB  # capped


def test_descriptors_warn_above_90_percent_and_are_fatal_near_the_limit() -> None:
    assert health.descriptors(100, 1024) is None
    warn = health.descriptors(930, 1024)
    assert warn is not None and not warn.fatal and "930 of 1024" in warn.line
    fatal = health.descriptors(1010, 1024)
    assert fatal is not None and fatal.fatal
    assert health.descriptors(10**6, resource.RLIM_INFINITY) is None


def test_the_cache_disk_line_only_while_the_disk_limits_the_cache() -> None:
    assert health.cache_disk("/c", False, MiB, 3 * MiB, 1 << 30, 3 * MiB) is None  # never hit
    assert health.cache_disk("/c", True, 900 * MiB, 2 << 30, 1 << 30, 3 * MiB) is None  # disk holds capacity
    line = health.cache_disk("/c", True, MiB, 3 * MiB, 1 << 30, 3 * MiB)
    assert line is not None and not line.fatal and line.line.startswith("cache disk full: /c has 1.0 MiB free")


def test_the_cache_limit_is_the_smaller_of_capacity_and_the_disk(tmp_path) -> None:
    space = {"free": 10 * MiB, "total": 100 * MiB}  # reserve: 2 MiB
    cache = Cache(str(tmp_path / "cache"), 1 << 30, space=lambda fd: (space["free"], space["total"]))
    try:
        cache.set_used(5 * MiB)
        assert cache.limit() == 5 * MiB + 10 * MiB - 2 * MiB
        assert cache.reserve(8 * MiB) and not cache.hit_disk_limit
        assert not cache.reserve(1 * MiB) and cache.hit_disk_limit  # the disk said no, not the capacity
        cache.release(8 * MiB)
        space["free"] = 5000 * MiB  # room again (a bigger disk, or less else on it)
        assert cache.reserve(MiB) and not cache.hit_disk_limit
        cache.capacity = 6 * MiB  # the capacity binds again: the disk plays no part
        assert not cache.reserve(MiB) and not cache.hit_disk_limit
    finally:
        cache.close()
