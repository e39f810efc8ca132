"""A script using CloudManager and a running daemon on one node (one catalog, one cache) at once."""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from cloudmanagerd import CloudManager
from conftest import wait_for

pytestmark = pytest.mark.e2e


def test_api_and_daemon_share_a_catalog_without_errors_lost_updates_or_double_uploads(
        daemon_factory, workdir: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="cloudmanagerd")
    d = daemon_factory(remotes=2)
    remotes = [dict(r) for r in d.config["remotes"]]
    catalog = Path(d.config["state"]) / "catalog.sqlite3"
    outside = workdir / "outside"
    outside.mkdir()
    expected: dict[str, bytes] = {}
    for i in range(150):
        data = f"api file {i}\n".encode() * (i + 1)
        (outside / f"api-{i}").write_bytes(data)
        expected[hashlib.sha256(data).hexdigest()] = data
    dropped: dict[str, bytes] = {}
    for i in range(150):
        dropped[hashlib.sha256(f"inbox file {i}\n".encode() * 3).hexdigest()] = f"inbox file {i}\n".encode() * 3

    def drop() -> None:
        for i in range(150):
            tmp = d.inbox / f".in-{i}"
            tmp.write_bytes(f"inbox file {i}\n".encode() * 3)
            os.rename(tmp, d.inbox / f"in-{i}")

    dropper = threading.Thread(target=drop)
    with CloudManager(str(catalog), str(d.cache), 1 << 30, remotes=remotes) as cm:
        dropper.start()
        hashes = [cm.upload(str(outside / f"api-{i}")) for i in range(150)]
        for _ in range(3):
            cm.cloud_sync()
        dropper.join()
        assert set(hashes) == set(expected)
        wait_for(lambda: all(cm.exists(h) for h in dropped), timeout=60, message="the dropped files registered")
        for _ in range(3):
            cm.cloud_sync()
        # the daemon's files are the API's too, and the other way round
        for h, data in list(dropped.items())[:10] + list(expected.items())[:10]:
            assert Path(cm.warm_up(h)).read_bytes() == data
    wait_for(lambda: d.status()["safety"]["below_redundancy"] == 0, timeout=60,
             message="every file on both remotes")
    status = d.status()
    assert status["catalog"]["files"] == 300 and status["problems"] == []

    # no upload was sent twice: the daemon's log and the API's together name each pair once
    sent = collections.Counter(re.findall(r"uploaded hash=([0-9a-f]{64}) remote=(\w+)", d.log()))
    sent.update(re.findall(r"uploaded hash=([0-9a-f]{64}) remote=(\w+)", caplog.text))
    assert sent and max(sent.values()) == 1, [k for k, n in sent.items() if n > 1][:3]
    assert len(sent) == 600
    assert "database is locked" not in d.log() + caplog.text

    # the catalog and the cache folder agree, object by object
    with sqlite3.connect(catalog) as db:
        rows = dict(db.execute("SELECT hash, size FROM cache_entries"))
    on_disk = {p.name: p.stat().st_size for p in d.cache.glob("??/*")}
    assert rows == on_disk
    assert status["cache"]["used"] == sum(on_disk.values())
    for h, size in on_disk.items():
        assert hashlib.sha256((d.cache / h[:2] / h).read_bytes()).hexdigest() == h
    assert d.stop() == 0
